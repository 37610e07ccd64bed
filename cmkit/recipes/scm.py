"""Continuous-time consistency models on TrigFlow (Lu & Song 2024, "sCM"): sCT from data,
sCD from any teacher run (EDM, flow or TrigFlow), with losses.SCMLoss.

The tangent dF/dt is one JVP per step (`jvp="exact"`: torch.func.jvp; "finite-difference":
two more forwards), normalised, warmed up over `warmup` steps; the learned weighting w_φ(t)
is trained with the network and checkpointed with it (aux.safetensors).

sCD starts the student from the teacher's weights (like CD): an EDM teacher's network reads
its noise level as c_noise = ln(σ)/4, so such a student's process keeps that time input
(TrigFlowProcess(time_input="edm")), with σ = σ_d·tan t and F = −F_EDM, which makes the
student at step 0 exactly the teacher's denoiser. Deviations from the paper's settings, for
runs of thousands of steps: Adam at the data kind's learning rate (a quarter of it for a
student started from its teacher, common.FINE_TUNE_LR_SCALE), warm-up 1000 steps (10k in the
paper), no EMA-of-EMA; measured in BENCHMARKS.md.
"""

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cmkit.config import RunConfig, SamplingSection
from cmkit.errors import OptionError
from cmkit.jvp import JVP_METHODS
from cmkit.losses import AdaptiveWeight, SCMLoss
from cmkit.networks.zoo import build_for_data
from cmkit.noise import MAX_SCALES, SCM_P_MEAN, SCM_P_STD
from cmkit.process import Process, TrigFlowProcess, trigflow_velocity
from cmkit.recipes.common import (
    FINE_TUNE_LR_SCALE,
    RunOptions,
    fit,
    from_data,
    guided_teacher,
    load_teacher_weights,
    start,
    training_section,
)
from cmkit.runs import load_network
from cmkit.train import check_grad_clip
from cmkit.training_data import run_data
from cmkit.training_times import SCM_TIMES, TrigFlowTimes

VELOCITY_RANGE = (1e-4, 1e4)  # σ where any teacher is asked for its velocity


@dataclass
class SCTOptions:
    time_dist: str = "lognormal"  # τ ~ N(P_mean, P_std²) (the paper's), or "karras"
    p_mean: float = SCM_P_MEAN
    p_std: float = SCM_P_STD
    warmup: int = 1000  # tangent warm-up H: r = min(1, step/H); 0: none
    tangent_c: float = 0.1  # g/(‖g‖ + c)
    jvp: str = "exact"  # or "finite-difference"
    grad_clip: float | None = 1.0


@dataclass
class SCDOptions(SCTOptions):
    teacher: str = ""  # the teacher's run directory
    init_from_teacher: bool = True
    guidance: tuple[float, float] | None = None  # distil the guided teacher: w_min, w_max


def check(opts: SCTOptions) -> None:
    if opts.time_dist not in SCM_TIMES:
        raise OptionError("time_dist", f"must be 'lognormal' or 'karras', got {opts.time_dist!r}")
    if not opts.p_std > 0:
        raise OptionError("p_std", f"must be > 0, got {opts.p_std}")
    if opts.warmup < 0:
        raise OptionError("warmup", f"must be >= 0 steps, got {opts.warmup}")
    if not opts.tangent_c > 0:
        raise OptionError("tangent_c", f"must be > 0, got {opts.tangent_c}")
    if opts.jvp not in JVP_METHODS:
        raise OptionError("jvp", f"must be {' or '.join(map(repr, JVP_METHODS))}, got {opts.jvp!r}")
    check_grad_clip(opts.grad_clip)


def scm_loss(opts: SCTOptions, process: Process, **teacher) -> SCMLoss:
    return SCMLoss(
        process,
        AdaptiveWeight(),
        times=TrigFlowTimes(opts.time_dist, opts.p_mean, opts.p_std),
        warmup_steps=opts.warmup,
        tangent_c=opts.tangent_c,
        jvp=opts.jvp,
        **teacher,
    )


def sct_run(run: RunOptions, data_spec: str, process: Process, opts: SCTOptions) -> Path:
    """Train a TrigFlow consistency model on `data_spec` with sCT; returns the run directory."""
    if not isinstance(process, TrigFlowProcess):
        raise OptionError("process", f"sct trains on the trigflow process, got {process.name}")
    check(opts)
    data, section, net_spec, net = from_data(run, data_spec, process)
    training = training_section(run, section.shape, "cm_steps", "sct", asdict(opts))
    loss = scm_loss(opts, process)
    config = RunConfig("consistency", process, net_spec, section, training, _sampling())
    return _fit(run, config, data, net, loss, opts)


def scd_run(run: RunOptions, opts: SCDOptions) -> Path:
    """Distil the teacher run `opts.teacher` into a TrigFlow consistency model with sCD."""
    check(opts)
    torch.manual_seed(run.seed)
    teacher_config, teacher_net = load_network(opts.teacher, "ema")
    if teacher_config.kind != "teacher":
        raise OptionError("teacher", f"{opts.teacher} is a consistency run; expected a teacher run")
    teacher_process = teacher_config.process
    sd = teacher_process.sigma_data
    if isinstance(teacher_process, TrigFlowProcess):
        time_input = teacher_process.time_input
    elif not opts.init_from_teacher:
        time_input = "t"
    elif teacher_process.name == "edm":
        time_input = "edm"  # the teacher's network reads EDM's c_noise
    else:
        raise OptionError(
            "init_from_teacher",
            f"a {teacher_process.name} teacher's network cannot start a TrigFlow student; "
            "train it from random weights (no init from the teacher)",
        )
    process = TrigFlowProcess(sigma_data=sd, time_input=time_input)
    section = teacher_config.data
    data = run_data(section)
    net_spec = copy.deepcopy(teacher_config.network)
    frozen = copy.deepcopy(teacher_net).eval().to(run.device).requires_grad_(False)
    teacher = teacher_process.denoiser(frozen)
    teacher, with_guidance = guided_teacher(
        opts.guidance, section, teacher, teacher_config.network, net_spec
    )
    if not opts.init_from_teacher:
        net = build_for_data(net_spec, section.shape)
    elif net_spec == teacher_config.network:
        net = teacher_net.train()
    else:  # the student takes w as an input, which the teacher has not
        net = build_for_data(net_spec, section.shape)
        load_teacher_weights(net, teacher_net)
    options = {**asdict(opts), "teacher": str(Path(opts.teacher).resolve())}
    lr_scale = FINE_TUNE_LR_SCALE if opts.init_from_teacher else 1.0
    training = training_section(run, section.shape, "cm_steps", "scd", options, lr_scale)
    lo, hi = _teacher_sigmas(teacher_process)
    loss = scm_loss(
        opts,
        process,
        velocity=trigflow_velocity(teacher_process, teacher, sd),
        t_range=(math.atan(lo / sd), math.atan(hi / sd)),
    )
    config = RunConfig("consistency", process, net_spec, section, training, _sampling())
    return _fit(run, config, data, net, loss, opts, with_guidance)


def _sampling() -> SamplingSection:
    # continuous time has no grid; diffusers cannot sample TrigFlow (export refuses it)
    return SamplingSection(num_scales=MAX_SCALES)


def _teacher_sigmas(process: Process) -> tuple[float, float]:
    """The noise levels σ the teacher was trained on, within VELOCITY_RANGE."""
    lo, hi = process.noise_levels
    return max(lo, VELOCITY_RANGE[0]), min(hi, VELOCITY_RANGE[1])


def _fit(
    run: RunOptions,
    config: RunConfig,
    data,
    net,
    loss: SCMLoss,
    opts: SCTOptions,
    wrap: Callable = lambda loss: loss,
) -> Path:
    """μ = 0: the target is the online network under no-grad (θ⁻ = stopgrad θ); `wrap` puts
    guided distillation's w into each batch."""
    process = config.process
    online, target = process.consistency(net), process.consistency(copy.deepcopy(net))
    state = start(run, config, online, target, net, aux=loss.weight)
    return fit(run, config, state, data, wrap(loss), opts.grad_clip)
