"""Easy consistency tuning (Geng et al. 2024, "Consistency Models Made Easy"; ICLR 2025).

Start from a trained EDM teacher (a denoiser is the dt → 0 limit of a consistency function)
or from scratch, and train in continuous time: t ~ lognormal(P_mean, P_std²), r from the
staged mapping of noise.ECTSchedule, shared noise z for x_t and x_r (as CT), the target the
same network at r under no-grad with the same dropout masks (μ = 0), per-sample
pseudo-Huber (or L2) distance and λ = 1/(t − r) or EDM's SNR weighting.

Deviations from the paper's CIFAR-10 settings, for runs of thousands rather than 400k steps
(measured in BENCHMARKS.md): t is uniform along the Karras ramp by default (the paper's
lognormal, `time_dist="lognormal"`, rarely visits the high noise levels one-step sampling
starts from: on digits, 1500 steps from the teacher gave one-step FD-digitsnet 6.6 against
3.1 with Karras times, 1000 samples against the held-out split); q = 2 as on CIFAR-10, with
the run's steps spread evenly over the stages down to ECT_MIN_RATIO (so a resume with more
steps stretches them, as iCT's curriculum follows the step count) where the paper fixes the
steps per stage (`double`); from a teacher, a quarter of the data kind's learning rate (1e-4
on images: the paper's, with Adam as every cmkit recipe rather than RAdam); iCT's
pseudo-Huber c.
"""

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cmkit.config import NetworkSpec, RunConfig, SamplingSection
from cmkit.errors import OptionError
from cmkit.losses import ConsistencyLoss, UnbiasedEstimate, edm_snr_weight, inverse_gap_weight
from cmkit.noise import ECT_P_MEAN, ECT_P_STD, MAX_SCALES, ECTSchedule
from cmkit.process import Process
from cmkit.recipes.common import (
    FINE_TUNE_LR_SCALE,
    RunOptions,
    distance_for,
    fit,
    from_data,
    start,
    training_section,
)
from cmkit.runs import load_network
from cmkit.train import check_grad_clip
from cmkit.training_times import ContinuousPairs, KarrasTimes, LognormalTimes

ECT_WEIGHTINGS = ("inverse-gap", "snr")
ECT_DISTANCES = ("pseudo-huber", "l2")
ECT_TIMES = ("karras", "lognormal")


@dataclass
class ECTOptions:
    init_from: str | None = None  # an EDM teacher run of the same network; None: from scratch
    q: float = 2.0  # the gap t − r shrinks by q per stage
    double: int | None = None  # steps per stage; None: the run's steps over every stage
    k: float = 8.0  # n(t) = 1 + k·sigmoid(−b·t)
    b: float = 1.0
    time_dist: str = "karras"  # t uniform along the Karras ramp, or "lognormal" (the paper's)
    p_mean: float = ECT_P_MEAN  # lognormal times: ln t ~ N(P_mean, P_std²)
    p_std: float = ECT_P_STD
    distance: str = "pseudo-huber"  # per-sample √(‖Δ‖² + c²) − c, or l2 (mean square)
    huber_c: float | None = None  # None: iCT's 0.00054·√d
    weighting: str = "inverse-gap"  # λ = 1/(t − r), or "snr": (t² + σ_d²)/(t·σ_d)²
    dropout: float | None = None  # None: the network's own (a teacher's, with init_from)
    grad_clip: float | None = 1.0


def check(opts: ECTOptions, steps: int) -> ECTSchedule:
    """The schedule of a run of `steps`, every option checked before anything is trained."""
    if not opts.q > 1:
        raise OptionError("q", f"must be > 1 (the gap shrinks by q per stage), got {opts.q}")
    if opts.double is not None and opts.double < 1:
        raise OptionError("double", f"must be >= 1 step per stage, got {opts.double}")
    if not (opts.k >= 0 and opts.b >= 0):
        raise OptionError("k", f"k and b must be >= 0, got k={opts.k}, b={opts.b}")
    if opts.time_dist not in ECT_TIMES:
        raise OptionError("time_dist", f"must be 'karras' or 'lognormal', got {opts.time_dist!r}")
    if not opts.p_std > 0:
        raise OptionError("p_std", f"must be > 0, got {opts.p_std}")
    if opts.weighting not in ECT_WEIGHTINGS:
        raise OptionError("weighting", f"must be 'inverse-gap' or 'snr', got {opts.weighting!r}")
    if opts.distance not in ECT_DISTANCES:
        raise OptionError("distance", f"must be 'pseudo-huber' or 'l2', got {opts.distance!r}")
    if opts.huber_c is not None and not opts.huber_c >= 0:
        raise OptionError("huber_c", f"must be >= 0, got {opts.huber_c}")
    if opts.dropout is not None and not 0 <= opts.dropout < 1:
        raise OptionError("dropout", f"must be in [0, 1), got {opts.dropout}")
    check_grad_clip(opts.grad_clip)
    if opts.double is not None:
        return ECTSchedule(opts.q, opts.double, opts.k, opts.b)
    stages = ECTSchedule(opts.q, 1, opts.k, opts.b).last_stage() + 1
    return ECTSchedule(opts.q, max(1, steps // stages), opts.k, opts.b)


def ect_run(run: RunOptions, data_spec: str, process: Process, opts: ECTOptions) -> Path:
    """Tune a teacher (opts.init_from) or train from scratch on `data_spec`; returns the run."""
    if not process.t_min > 0:
        raise OptionError(
            "process", f"ect pairs t ~ lognormal over σ > 0; the {process.name} process starts at 0"
        )
    data, section, net_spec, net = from_data(run, data_spec, process)
    lr_scale = FINE_TUNE_LR_SCALE if opts.init_from is not None else 1.0
    training = training_section(run, section.shape, "cm_steps", "ect", {}, lr_scale)
    schedule = check(opts, training.steps)
    if opts.init_from is not None:
        teacher_spec, weights = _teacher(opts.init_from, process, net_spec)
        net.load_state_dict(weights)
        opts = copy.copy(opts)
        opts.init_from = str(Path(opts.init_from).resolve())
        net_spec = copy.deepcopy(teacher_spec)
    if opts.dropout is not None:
        net_spec.kwargs["dropout"] = opts.dropout
        _set_dropout(net, opts.dropout)
    training.options = asdict(opts)
    distance = distance_for(opts.distance, section.shape, opts.huber_c)
    weighting = (
        inverse_gap_weight
        if opts.weighting == "inverse-gap"
        else edm_snr_weight(process.sigma_data)
    )
    loss = ConsistencyLoss(
        process,
        ContinuousPairs(process, schedule, _times(opts, process)),
        UnbiasedEstimate(process.perturb),
        distance,
        weighting,
    )
    # continuous time has no grid: a diffusers scheduler gets the finest one it may take
    sampling = SamplingSection(num_scales=MAX_SCALES)
    config = RunConfig("consistency", process, net_spec, section, training, sampling)
    online, target = process.consistency(net), process.consistency(copy.deepcopy(net))
    state = start(run, config, online, target, net)
    return fit(run, config, state, data, loss, opts.grad_clip, schedule.target_mu)


def _times(opts: ECTOptions, process: Process):
    if opts.time_dist == "lognormal":
        return LognormalTimes(opts.p_mean, opts.p_std)
    return KarrasTimes(process.rho)


def _without_dropout(spec: NetworkSpec) -> dict:
    return {"type": spec.type, **{k: v for k, v in spec.kwargs.items() if k != "dropout"}}


def _teacher(run_dir: str, process: Process, net_spec: NetworkSpec):
    """(spec, EMA weights) of a teacher run this run can start from; one line where not."""
    config, net = load_network(run_dir, "ema")
    if config.kind != "teacher":
        raise OptionError("init_from", f"{run_dir} is a consistency run; expected a teacher run")
    if config.process.to_dict() != process.to_dict():
        raise OptionError(
            "init_from",
            f"{run_dir} was trained with process {config.process.to_dict()}; this run uses "
            f"{process.to_dict()}",
        )
    if _without_dropout(config.network) != _without_dropout(net_spec):
        raise OptionError(
            "init_from",
            f"{run_dir} has network {_without_dropout(config.network)}; this data and --network "
            f"give {_without_dropout(net_spec)} (they must match, dropout aside)",
        )
    return config.network, net.state_dict()


def _set_dropout(net: torch.nn.Module, p: float) -> None:
    """Dropout has no weights: a teacher trained without it can be tuned with it."""
    for module in net.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
