"""Improved consistency training (Song & Dhariwal 2023): μ = 0, per-sample pseudo-Huber,
λ = 1/(t_{n+1} − t_n), the doubling N(k) curriculum and, optionally, lognormal pairs.

Deviation, measured (README, BENCHMARKS.md): pairs are uniform by default; the paper's
discretised lognormal (`pairs="lognormal"`) pays off on its 400k-step runs, not on ours.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from cmkit.errors import OptionError, UserError
from cmkit.losses import ConsistencyLoss, UnbiasedEstimate, inverse_gap_weight, unit_weight
from cmkit.noise import ICT_P_MEAN, ICT_P_STD, ICTCurriculum, lognormal_index_probs
from cmkit.process import Process
from cmkit.recipes.common import (
    RunOptions,
    check_scales,
    distance_for,
    train_from_data,
)
from cmkit.train import check_grad_clip
from cmkit.training_times import GridPairs, LognormalIndices, uniform_indices

PAIRS = ("uniform", "lognormal")
WEIGHTINGS = {"ict": inverse_gap_weight, "uniform": unit_weight}


@dataclass
class ICTOptions:
    distance: str = "pseudo-huber"
    s0: int = ICTCurriculum.s0
    s1: int = ICTCurriculum.s1
    pairs: str = "uniform"  # or "lognormal", with P_mean and P_std below
    p_mean: float = ICT_P_MEAN
    p_std: float = ICT_P_STD
    weighting: str = "ict"  # λ = 1/(t_{n+1} − t_n), or "uniform" (λ = 1)
    grad_clip: float | None = 1.0


def pair_indices(opts: ICTOptions, process: Process):
    """Uniform pair indices, or the lognormal ones where they put mass on the process's σ."""
    if opts.pairs not in PAIRS:
        raise OptionError("pairs", f"must be 'uniform' or 'lognormal', got {opts.pairs!r}")
    if opts.pairs == "uniform":
        return uniform_indices
    if not process.t_min > 0:
        raise OptionError(
            "pairs",
            f"lognormal needs noise levels σ > 0; the {process.name} process's times start at "
            f"{process.t_min:g}",
        )
    # every grid shares the endpoints, so the mass on a 2-point grid is the mass on any grid
    mass = lognormal_index_probs(process.grid(2), opts.p_mean, opts.p_std)
    if not opts.p_std > 0 or not torch.isfinite(mass).all():
        raise UserError(
            f"p_mean {opts.p_mean} and p_std {opts.p_std} put no probability on "
            f"[σ_min, σ_max]; expected p_std > 0 and p_mean near ln σ of the grid"
        )
    return LognormalIndices(opts.p_mean, opts.p_std)


def ict_loss(opts: ICTOptions, process: Process, steps: int, shape) -> tuple:
    """The iCT loss and its curriculum, every grid it will use checked before training."""
    check_grad_clip(opts.grad_clip)
    if opts.weighting not in WEIGHTINGS:
        raise OptionError("weighting", f"must be 'uniform' or 'ict', got {opts.weighting!r}")
    indices = pair_indices(opts, process)
    check_scales(opts.s0, opts.s1, s0_min=1)  # N(0) = s₀ + 1
    schedule = ICTCurriculum(steps, opts.s0, opts.s1)
    for step in (0, steps):
        process.grid(schedule.scales(step))
    loss = ConsistencyLoss(
        process,
        GridPairs(process, schedule, indices),
        UnbiasedEstimate(process.perturb),
        distance_for(opts.distance, shape),
        WEIGHTINGS[opts.weighting],
    )
    return loss, schedule


def ict_run(run: RunOptions, data_spec: str, process: Process, opts: ICTOptions) -> Path:
    """Train a consistency model on `data_spec` with iCT; returns the run directory."""
    return train_from_data(run, data_spec, process, "ict", opts, ict_loss)
