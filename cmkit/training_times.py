"""The times a consistency loss trains at: pairs t > r of adjacent points of a discrete grid
(CD, CT, iCT), pairs in continuous time (ECT), and sCM's single times on TrigFlow.

A pair sampler is a callable (batch, step, generator) -> (t, r), each (B,), that
losses.ConsistencyLoss draws from; the time distributions inside them (lognormal, along the
Karras ramp) are callables too, so a recipe picks its pairs by composition. Times are drawn
in float64 and cast to the data's dtype, so the draw does not depend on the training precision.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cmkit.batch import Batch
from cmkit.noise import (
    ECT_P_MEAN,
    ECT_P_STD,
    ICT_P_MEAN,
    ICT_P_STD,
    RHO,
    SCM_P_MEAN,
    SCM_P_STD,
    SIGMA_MAX,
    SIGMA_MIN,
    lognormal_index_probs,
)

DOUBLE = torch.float64  # times are drawn in float64, then cast to the data's dtype


def uniform_indices(grid: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Pair indices n ~ U{0..N−2}: the pair is (t_n, t_{n+1}) on an ascending grid."""
    return torch.randint(0, len(grid) - 1, (batch,), generator=generator)


@dataclass(frozen=True)
class LognormalIndices:
    """iCT's discretised lognormal over the pairs of a grid (Song & Dhariwal 2023, §3.5)."""

    p_mean: float = ICT_P_MEAN
    p_std: float = ICT_P_STD

    def __call__(self, grid: torch.Tensor, batch: int, generator: torch.Generator):
        probs = lognormal_index_probs(grid, self.p_mean, self.p_std)
        return torch.multinomial(probs, batch, replacement=True, generator=generator)


@dataclass
class GridPairs:
    """Adjacent points (t_{n+1}, t_n) of the process's N(k)-point grid, n drawn by `indices`
    (uniform for the original CM, lognormal for iCT). Returns (t, r), each (B,)."""

    process: object
    curriculum: object  # .scales(step) -> N
    indices: Callable = uniform_indices

    def __call__(self, batch: Batch, step: int, generator: torch.Generator):
        grid = self.process.grid(self.curriculum.scales(step))
        n = batch.draw(lambda count: self.indices(grid, count, generator))
        return grid[n + 1].to(batch.x0), grid[n].to(batch.x0)


@dataclass(frozen=True)
class LognormalTimes:
    """ln t ~ N(P_mean, P_std²), clipped to the process's range (ECT's choice, from EDM)."""

    p_mean: float = ECT_P_MEAN
    p_std: float = ECT_P_STD

    def __call__(self, process, batch: int, generator: torch.Generator) -> torch.Tensor:
        ln_t = self.p_mean + self.p_std * torch.randn(batch, generator=generator, dtype=DOUBLE)
        return torch.exp(ln_t).clamp(process.t_min, process.t_max)


@dataclass(frozen=True)
class KarrasTimes:
    """t uniform along the Karras ramp, t = (t_min^{1/ρ} + u·(t_max^{1/ρ} − t_min^{1/ρ}))^ρ with
    u ~ U(0, 1): the continuous limit of uniform pairs on CD's and iCT's grid. It puts far more
    weight on the high noise levels one-step sampling starts from than the lognormal does."""

    rho: float = RHO

    def __call__(self, process, batch: int, generator: torch.Generator) -> torch.Tensor:
        u = torch.rand(batch, generator=generator, dtype=DOUBLE)
        t = karras_ramp(u, process.t_min, process.t_max, self.rho)
        return t.clamp(process.t_min, process.t_max)


def karras_ramp(u: torch.Tensor, lo: float, hi: float, rho: float = RHO) -> torch.Tensor:
    """(lo^{1/ρ} + u·(hi^{1/ρ} − lo^{1/ρ}))^ρ: u ∈ [0, 1] along Karras et al.'s σ schedule."""
    a, b = lo ** (1 / rho), hi ** (1 / rho)
    return (a + u * (b - a)) ** rho


@dataclass
class ContinuousPairs:
    """ECT's pairs in continuous time: t drawn by `times`, r = schedule.lower(t, step) (see
    noise.ECTSchedule). r is clamped at ≥ ε = t_min, where f(x_r, ε) = x_r = x₀ + ε·z is the
    boundary: the paper's r < σ_min → "target x₀"."""

    process: object
    schedule: object  # .lower(t, step) -> r
    times: Callable  # (process, batch, generator) -> (B,) float64 times

    def __call__(self, batch: Batch, step: int, generator: torch.Generator):
        t = batch.draw(lambda count: self.times(self.process, count, generator))
        r = self.schedule.lower(t, step).clamp(min=self.process.t_min)
        return t.to(batch.x0), r.to(batch.x0)


SCM_TIMES = ("lognormal", "karras")


@dataclass(frozen=True)
class TrigFlowTimes:
    """sCM's training times t = arctan(σ/σ_d) on TrigFlow: σ = e^τ with τ ~ N(P_mean, P_std²)
    (the paper's "lognormal"), or σ uniform along the Karras ramp over EDM's [σ_min, σ_max]
    ("karras"), which visits the high noise levels one-step sampling starts from far more
    often, as ECT's KarrasTimes does."""

    dist: str = "lognormal"
    p_mean: float = SCM_P_MEAN
    p_std: float = SCM_P_STD

    def __call__(self, batch: int, sigma_data: float, generator: torch.Generator) -> torch.Tensor:
        if self.dist == "karras":
            u = torch.rand(batch, generator=generator, dtype=DOUBLE)
            sigma = karras_ramp(u, SIGMA_MIN, SIGMA_MAX)
        else:
            tau = self.p_mean + self.p_std * torch.randn(batch, generator=generator, dtype=DOUBLE)
            sigma = torch.exp(tau)
        return torch.atan(sigma / sigma_data)
