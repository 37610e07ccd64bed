"""Samplers for consistency models: one step, multistep (Algorithm 1), TCD, and the ODE.

Each takes the consistency function `f(x, t, **cond)`, the process and the initial noise
`z`, so that the same seed gives the same samples whatever the sampler; `cond` is the
conditioning of the samples being drawn, passed to every network evaluation.
"""

import math

import torch

from cmkit.batch import NO_COND, Cond
from cmkit.errors import OptionError, UserError
from cmkit.param import as_batch_times
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


def check_gamma(gamma: float) -> None:
    """TCD's γ moves s from 0 (γ = 1) to τ (γ = 0); outside [0, 1] s leaves that segment."""
    if not 0 <= gamma <= 1:
        raise OptionError(
            "gamma", f"must be in [0, 1] (1: the multistep sampler, 0: deterministic), got {gamma}"
        )


def edm_sigma(process, t: float) -> float:
    """EDM's σ at the process's time t (σ = t on EDM)."""
    return process.to_edm(torch.zeros(()), t)[1]


def predicted_noise(process, x_t: torch.Tensor, t: float, x0_hat: torch.Tensor) -> torch.Tensor:
    """ε̂ of x_t = a_t·x̂₀ + b_t·ε̂, with a_t and b_t read off the process's (linear) perturb.

    It is (x_σ − x̂₀)/σ in EDM variables, but stays finite at t_max, where the σ of the flow
    and TrigFlow processes is ∞ and x_t is the prior's noise itself.
    """
    t_b, zero = as_batch_times(t, x_t), torch.zeros_like(x_t)
    a_x0, b = process.perturb(x0_hat, t_b, zero), process.perturb(zero, t_b, torch.ones_like(x_t))
    return (x_t - a_x0) / b


def tcd_renoise(
    process,
    x: torch.Tensor,
    t: float,
    x0_hat: torch.Tensor,
    s: float,
    tau: float,
    z: torch.Tensor,
) -> torch.Tensor:
    """x at τ from x at t and its prediction x̂₀: the deterministic (DDIM) jump to s,
    x_s = x̂₀ + s_σ·ε̂, then forward to τ with fresh noise, x_τ = x_s + √(τ_σ² − s_σ²)·z, in EDM
    σ units and back. At s = 0 x_s is x̂₀ itself, re-noised by the process's own renoise, so
    γ = 1 is Algorithm 1 exactly (on EDM it counts x̂₀ at ε: √(τ² − ε²))."""
    if s == 0:
        return process.renoise(x0_hat, tau, z)
    s_sigma, tau_sigma = edm_sigma(process, s), edm_sigma(process, tau)
    x_s = x0_hat + s_sigma * predicted_noise(process, x, t, x0_hat)
    x_tau, _ = process.from_edm(x_s + math.sqrt(tau_sigma**2 - s_sigma**2) * z, tau_sigma)
    return x_tau


@torch.no_grad()
def sample_tcd(
    f: Denoiser,
    process,
    z: torch.Tensor,
    times: list[float],
    noises: list[torch.Tensor],
    gamma: float,
    cond: Cond = NO_COND,
) -> torch.Tensor:
    """Strategic stochastic sampling of TCD (Zheng et al. 2024, arXiv 2402.19159; diffusers'
    TCDScheduler with eta = γ): at each τ in `times`, denoise x̂₀ = f(x, t), move
    deterministically to s = (1 − γ)·τ, re-noise forward to τ, and denoise again.

    Algorithm 1 re-noises the clean x̂₀ from scratch at every step, and the fresh noise of
    each step compounds the errors of the last as steps are added; the jump to s keeps the
    predicted noise ε̂ for that part of the way. γ sets how much fresh noise replaces it:
    γ = 1 is Algorithm 1 (the same result as sample_multistep for the same noises), γ = 0 a
    deterministic sampler that uses no noise. `times`, `noises` and NFE = 1 + len(times) as
    in sample_multistep.
    """
    check_gamma(gamma)
    check_times(process, times)
    x, t = process.prior(z), process.t_max
    for tau, noise in zip(times, noises, strict=True):
        x0_hat = f(x, t, **cond)
        x, t = tcd_renoise(process, x, t, x0_hat, (1 - gamma) * tau, tau, noise), tau
    return f(x, t, **cond)


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
