"""ODE solvers for the probability-flow ODE dx/dt = (x − D(x, t))/t, over any denoiser.

A denoiser is any callable D(x, t, **cond) -> x₀ estimate: an EDM teacher, a flow teacher
(D = x − t·v), a consistency function, or a test mock. One whose process has another ODE
carries it as a `drift(x, t, **cond)` method (TrigFlow: dx_t/dt = σ_d·F), used instead.
Samplers are plain loops over an explicit, printable list of times (Karras et al. 2022,
Algorithm 1 without churn); the batch's conditioning is passed to every evaluation.
"""

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from cmkit.batch import NO_COND, Cond
from cmkit.param import as_batch_times, batch_column

Denoiser = Callable[..., torch.Tensor]


def drift(denoiser: Denoiser, x: torch.Tensor, t, cond: Cond = NO_COND) -> torch.Tensor:
    """dx/dt: the denoiser's own `drift(x, t, **cond)` where it has one (TrigFlow: σ_d·F),
    else (x − D(x, t))/t, which needs t > 0."""
    t = as_batch_times(t, x)
    own = getattr(denoiser, "drift", None)
    if own is not None:
        return own(x, t, **cond)
    return (x - denoiser(x, t, **cond)) / batch_column(t, x)


def euler_step(denoiser: Denoiser, x: torch.Tensor, t, t_next, cond: Cond = NO_COND):
    """One Euler step from t to t_next (scalars or (B,) tensors)."""
    dt = batch_column(as_batch_times(t_next, x) - as_batch_times(t, x), x)
    return x + dt * drift(denoiser, x, t, cond)


def heun_step(denoiser: Denoiser, x: torch.Tensor, t, t_next, cond: Cond = NO_COND):
    """Heun's second-order step; falls back to Euler where t_next = 0 (the drift is undefined)."""
    t_next = as_batch_times(t_next, x)
    dt = batch_column(t_next - as_batch_times(t, x), x)
    d = drift(denoiser, x, t, cond)
    x_euler = x + dt * d
    positive = t_next > 0
    if not positive.any():
        return x_euler
    safe_next = torch.where(positive, t_next, torch.ones_like(t_next))
    d_next = drift(denoiser, x_euler, safe_next, cond)
    x_heun = x + dt * (d + d_next) / 2
    return torch.where(batch_column(positive, x), x_heun, x_euler)


SOLVER_STEPS = {"euler": euler_step, "heun": heun_step}
SOLVERS = tuple(SOLVER_STEPS)
DEFAULT_SOLVER, DEFAULT_GRID_POINTS = "heun", 18  # EDM's sampler: 18 points, 35 evaluations


def nfe(solver: str, times: torch.Tensor) -> int:
    """Network evaluations used by `solve` over `times` (Heun: 2 per step, 1 for a step to 0)."""
    steps = len(times) - 1
    if solver == "euler":
        return steps
    return 2 * steps - int(times[-1] == 0)


@torch.no_grad()
def solve(
    denoiser: Denoiser,
    x: torch.Tensor,
    times: torch.Tensor,
    solver: str = "heun",
    progress: bool = False,
    cond: Cond = NO_COND,
) -> torch.Tensor:
    """Integrate from times[0] to times[-1] (descending) with Euler or Heun steps."""
    step = SOLVER_STEPS[solver]
    pairs = list(zip(times[:-1].tolist(), times[1:].tolist(), strict=True))
    for t, t_next in tqdm(pairs, disable=not progress, desc=f"{solver} sampling", leave=False):
        x = step(denoiser, x, t, t_next, cond)
    return x
