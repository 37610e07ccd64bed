"""Flow maps: one network that jumps from any time t to any earlier time s on the flow process.

A consistency function maps every point to the data, so each extra step of its multistep
sampler re-noises and throws the last step's work away. A flow map F(x_t, t → s) moves along
the probability-flow ODE x_t = (1 − t)·x₀ + t·x₁ (t = 1 noise) from t to s; K jumps over a
grid 1 = t₀ > t₁ > … > t_K = 0 spend K evaluations and get better as K grows.

Both recipes (cmkit.flowmap_losses) learn the average velocity over [s, t],
    u(x_t, s, t) = (1/(t − s))·∫_s^t v(x_τ, τ) dτ,   F(x_t, t → s) = x_t − (t − s)·u,
with a plain network that reads t as its noise input and the interval h = t − s as a second
one (`interval`, networks.embedding.ConditionEmbedding): MeanFlow (Geng et al. 2025) writes
u as MeanFlow's u(z_t, r, t), shortcut models (Frans et al. 2025) as s(x_t, t, d) for d = h.
At h = 0 the network is the instantaneous velocity v, a flow-matching model of its own (the
ODE sampler's), and F(x_t, t → 0) is a consistency function with F(x, 0 → 0) = x exactly.
"""

import math

import torch
from torch import nn

from cmkit.batch import NO_COND, Cond
from cmkit.config import RunConfig
from cmkit.errors import OptionError
from cmkit.param import Times, as_batch_times, batch_column

SHORTCUT = "shortcut"  # the recipe whose jumps are restricted to its dyadic grid


class FlowMap(nn.Module):
    """F(x_t, t → s) = x_t − (t − s)·u_θ(x_t, t, h = t − s); t, s floats or (B,) tensors.

    Called as f(x, t) it is the consistency function F(x, t → 0), so every consistency
    sampler, editing task and tune-times takes it; `denoiser` is the flow-matching denoiser
    x_t − t·v(x_t, t) of the instantaneous velocity (h = 0), the ODE sampler's.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def average_velocity(self, x: torch.Tensor, t: Times, h: Times, **cond) -> torch.Tensor:
        """u_θ(x_t, t, h): the mean of v over [t − h, t] (h = 0: v itself)."""
        return self.net(x, as_batch_times(t, x), interval=as_batch_times(h, x), **cond)

    def jump(self, x: torch.Tensor, t: Times, s: Times, **cond) -> torch.Tensor:
        h = as_batch_times(t, x) - as_batch_times(s, x)
        return x - batch_column(h, x) * self.average_velocity(x, t, h, **cond)

    def forward(self, x: torch.Tensor, t: Times, **cond) -> torch.Tensor:
        return self.jump(x, t, 0.0, **cond)

    def denoiser(self, x: torch.Tensor, t: Times, **cond) -> torch.Tensor:
        t = as_batch_times(t, x)
        return x - batch_column(t, x) * self.average_velocity(x, t, 0.0, **cond)


def check_jumps(config: RunConfig, jumps: list[tuple[float, float]]) -> None:
    """Jumps t → s the run was trained for: any for MeanFlow; for shortcut models a step size
    d = 2^−j ≥ 1/M from a time on d's own grid (the only (t, d) pairs its self-consistency
    targets visit), so K uniform jumps need K a power of two up to M."""
    if config.training.recipe != SHORTCUT:
        return
    finest = config.training.options["max_steps"]
    for t, s in jumps:
        d = t - s
        k = round(math.log2(1 / d)) if d > 0 else -1
        on_grid = 0 <= k <= math.log2(finest) and math.isclose(d, 2.0**-k, rel_tol=1e-9)
        if not (on_grid and math.isclose(t / d, round(t / d), abs_tol=1e-6)):
            raise OptionError(
                "steps",
                f"a shortcut model jumps by d = 1, 1/2, …, 1/{finest} from a multiple of d; "
                f"the jump {t:g} → {s:g} is not one (give a power-of-two step count up to "
                f"{finest})",
            )


def jump_grid(config: RunConfig, times: list[float]) -> list[float]:
    """1, the intermediate `times`, 0: a flow map's jumps, checked against its training."""
    grid = [1.0, *times, 0.0]
    check_jumps(config, list(zip(grid, grid[1:], strict=False)))
    return grid


@torch.no_grad()
def sample_jumps(
    F: FlowMap, z: torch.Tensor, grid: list[float], cond: Cond = NO_COND
) -> torch.Tensor:
    """x₁ = z (the flow prior), then x ← F(x, t_i → t_{i+1}) along the descending `grid`,
    which starts at 1 and ends at 0; NFE = len(grid) − 1, no noise after the first."""
    x = z
    for t, s in zip(grid, grid[1:], strict=False):
        x = F.jump(x, t, s, **cond)
    return x
