"""Samplers for consistency models: one step, multistep (Algorithm 1), and the ODE.

Each takes the consistency function `f(x, t, **cond)`, the process and the initial noise
`z`, so that the same seed gives the same samples whatever the sampler; `cond` is the
conditioning of the samples being drawn, passed to every network evaluation.
"""

import torch

from cmkit.batch import NO_COND, Cond
from cmkit.errors import UserError
from cmkit.solvers import Denoiser, solve


@torch.no_grad()
def sample_onestep(f: Denoiser, process, z: torch.Tensor, cond: Cond = NO_COND) -> torch.Tensor:
    """x = f(x_T, T) with x_T drawn from the prior: one network evaluation."""
    return f(process.prior(z), process.t_max, **cond)


def clip_denoised(f: Denoiser) -> Denoiser:
    """f with each output clamped to [−1, 1], the image range in model units, as diffusers'
    CMStochasticIterativeScheduler does with clip_denoised=True before re-noising."""
    return lambda x, t, **cond: f(x, t, **cond).clamp(-1.0, 1.0)


def check_times(process, times: list[float]) -> None:
    """Intermediate times must be strictly decreasing inside (t_min, t_max)."""
    for a, b in zip([process.t_max, *times], times, strict=False):
        if not (process.t_min < b < a):
            raise UserError(
                f"sampling times must decrease strictly inside ({process.t_min:g}, "
                f"{process.t_max:g}); got {', '.join(f'{t:g}' for t in times)}"
            )


@torch.no_grad()
def sample_multistep(
    f: Denoiser,
    process,
    z: torch.Tensor,
    times: list[float],
    noises: list[torch.Tensor],
    cond: Cond = NO_COND,
) -> torch.Tensor:
    """Algorithm 1 of Song et al. 2023: denoise, re-noise to each τ in `times`, denoise again.

    `noises` holds one tensor shaped like z per τ (drawn by the caller, so a seed fixes them).
    On the flow process the re-noising is the ReFlow stochastic iteration x = (1−τ)x₀ + τz.
    NFE = 1 + len(times).
    """
    check_times(process, times)
    x = sample_onestep(f, process, z, cond)
    for tau, noise in zip(times, noises, strict=True):
        x = f(process.renoise(x, tau, noise), tau, **cond)
    return x


@torch.no_grad()
def sample_ode(
    f: Denoiser,
    process,
    z: torch.Tensor,
    steps: int,
    solver: str = "euler",
    cond: Cond = NO_COND,
) -> torch.Tensor:
    """Deterministic sampling of dx/dt = (x − f(x, t))/t (or f's own drift: TrigFlow's σ_d·F)
    over the process's solver grid of `steps` points: the PF-ODE of a teacher denoiser, or a
    consistency model's own ODE (f taken as the denoiser)."""
    return solve(f, process.prior(z), process.sampling_times(steps), solver, cond=cond)
