"""Consistency training (Song et al. 2023, Algorithm 3): from data alone, the lower point of
each pair is x₀ + t_n·z, with the N(k)/μ(k) curriculum and an EMA target θ⁻."""

from dataclasses import dataclass
from pathlib import Path

from cmkit.errors import OptionError
from cmkit.losses import ConsistencyLoss, UnbiasedEstimate
from cmkit.noise import CTCurriculum
from cmkit.process import Process
from cmkit.recipes.common import (
    RunOptions,
    check_scales,
    distance_for,
    train_from_data,
)
from cmkit.train import check_grad_clip
from cmkit.training_times import GridPairs

MU_VARIANTS = ("paper", "openai")


@dataclass
class CTOptions:
    """The paper's settings: l2, s₀ = 2, s₁ = 150, μ₀ = 0.9, uniform pairs, λ = 1."""

    distance: str = "l2"
    s0: int = CTCurriculum.s0
    s1: int = CTCurriculum.s1
    mu0: float = CTCurriculum.mu0
    mu_variant: str = "paper"  # μ(k) divides by N(k) ("paper") or N(k) − 1 ("openai")
    grad_clip: float | None = 1.0


def curriculum(opts: CTOptions, steps: int) -> CTCurriculum:
    check_scales(opts.s0, opts.s1, s0_min=2)  # N(0) = s₀
    if opts.mu_variant not in MU_VARIANTS:
        raise OptionError("mu_variant", f"must be 'paper' or 'openai', got {opts.mu_variant!r}")
    if not 0 < opts.mu0 < 1:
        raise OptionError("mu0", f"must be in (0, 1), got {opts.mu0}")
    return CTCurriculum(steps, opts.s0, opts.s1, opts.mu0, opts.mu_variant)


def ct_loss(opts: CTOptions, process: Process, steps: int, shape) -> tuple:
    """The CT loss and its curriculum, every grid it will use checked before training."""
    check_grad_clip(opts.grad_clip)
    schedule = curriculum(opts, steps)
    for step in (0, steps):
        process.grid(schedule.scales(step))
    pairs = GridPairs(process, schedule)
    loss = ConsistencyLoss(
        process, pairs, UnbiasedEstimate(process.perturb), distance_for(opts.distance, shape)
    )
    return loss, schedule


def ct_run(run: RunOptions, data_spec: str, process: Process, opts: CTOptions) -> Path:
    """Train a consistency model on `data_spec` with original CT; returns the run directory."""
    return train_from_data(run, data_spec, process, "ct", opts, ct_loss)
