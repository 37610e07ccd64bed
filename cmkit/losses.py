"""Training objectives: teacher losses (EDM, flow matching) and the consistency loss.

CD and CT share one loss and differ in a single function: how the lower-noise point of a pair
is made (a teacher ODE step, or the unbiased estimate x₀ + t_n·z).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cmkit.noise import lognormal_indices, uniform_indices
from cmkit.param import EDMDenoiser, FlowParam, batch_column
from cmkit.rng import device_rng_state, set_device_rng_state
from cmkit.solvers import SOLVER_STEPS, Denoiser

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def l2_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per sample: (B, ...) -> (B,)."""
    return (a - b).flatten(1).pow(2).mean(1)


def l1_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference per sample: (B, ...) -> (B,)."""
    return (a - b).flatten(1).abs().mean(1)


def pseudo_huber_distance(c: float) -> Distance:
    """√(‖a − b‖² + c²) − c over each sample's whole flattened vector (iCT), not per pixel."""

    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.sqrt((a - b).flatten(1).pow(2).sum(1) + c**2) - c

    return distance


def make_distance(name: str, data_dim: int, c: float | None = None) -> Distance:
    """l2, l1 or pseudo-huber; pseudo-Huber's c defaults to iCT's 0.00054·√d."""
    if name == "l2":
        return l2_distance
    if name == "l1":
        return l1_distance
    if name == "pseudo-huber":
        return pseudo_huber_distance(c if c is not None else 0.00054 * math.sqrt(data_dim))
    raise ValueError(f"unknown distance {name!r}; expected l2, l1 or pseudo-huber")


def edm_loss(
    denoiser: EDMDenoiser,
    x0: torch.Tensor,
    generator: torch.Generator,
    p_mean: float = -1.2,
    p_std: float = 1.2,
) -> torch.Tensor:
    """EDM denoising score matching: ln σ ~ N(P_mean, P_std²), weight (σ² + σ_d²)/(σ·σ_d)²."""
    shape = (x0.shape[0],)
    sigma = torch.exp(p_mean + p_std * torch.randn(shape, generator=generator).to(x0))
    z = torch.randn(x0.shape, generator=generator).to(x0)
    sd = denoiser.sigma_data
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    return (weight * l2_distance(denoiser(x0 + batch_column(sigma, x0) * z, sigma), x0)).mean()


def flow_matching_loss(
    flow: FlowParam, x0: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Flow matching with t ~ U(0, 1): regress v(x_t, t) on x₁ − x₀ (Lipman et al.; Liu et al.)."""
    t = torch.rand((x0.shape[0],), generator=generator).to(x0)
    x1 = torch.randn(x0.shape, generator=generator).to(x0)
    x_t = (1 - batch_column(t, x0)) * x0 + batch_column(t, x0) * x1
    return l2_distance(flow.velocity(x_t, t), x1 - x0).mean()


@dataclass
class TeacherStep:
    """CD: the lower point is one Euler or Heun step of the teacher's PF-ODE from t_{n+1} to t_n."""

    teacher: Denoiser
    solver: str = "heun"

    @torch.no_grad()
    def __call__(self, x0, x_hi, z, t_hi, t_lo) -> torch.Tensor:
        return SOLVER_STEPS[self.solver](self.teacher, x_hi, t_hi, t_lo)


@dataclass
class UnbiasedEstimate:
    """CT: the lower point reuses x₀ and z at t_n (CD with the teacher's denoiser D := x₀)."""

    perturb: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

    def __call__(self, x0, x_hi, z, t_hi, t_lo) -> torch.Tensor:
        return self.perturb(x0, t_lo, z)


@dataclass
class ConsistencyLoss:
    """λ(t_n)·d(f_θ(x_{n+1}, t_{n+1}), f_θ⁻(x̂_n, t_n)) over pairs of an ascending grid.

    All randomness comes from `generator`, a CPU generator, so runs reproduce across devices.

    `curriculum` gives N(k); `pairs` is "uniform" (original CM) or "lognormal" (iCT);
    `weighting` is "uniform" (λ = 1) or "ict" (λ = 1/(t_{n+1} − t_n)).
    """

    process: object
    curriculum: object
    lower_point: Callable
    distance: Distance
    pairs: str = "uniform"
    weighting: str = "uniform"
    p_mean: float = -1.1  # lognormal pairs only
    p_std: float = 2.0

    def __call__(
        self,
        f_online: nn.Module,
        f_target: nn.Module,
        x0: torch.Tensor,
        step: int,
        generator: torch.Generator,
    ) -> torch.Tensor:
        grid = self.process.grid(self.curriculum.scales(step))
        if self.pairs == "lognormal":
            n = lognormal_indices(grid, x0.shape[0], generator, self.p_mean, self.p_std)
        else:
            n = uniform_indices(len(grid), x0.shape[0], generator)
        t_lo, t_hi = (grid[n].to(x0), grid[n + 1].to(x0))
        z = torch.randn(x0.shape, generator=generator).to(x0)
        x_hi = self.process.perturb(x0, t_hi, z)
        x_lo = self.lower_point(x0, x_hi, z, t_hi, t_lo)
        state = device_rng_state(x0.device)  # the target pass must see the same dropout masks
        pred = f_online(x_hi, t_hi)
        with torch.no_grad():
            set_device_rng_state(state, x0.device)
            target = f_target(x_lo, t_lo)
        weight = 1.0 / (t_hi - t_lo) if self.weighting == "ict" else torch.ones_like(t_hi)
        return (weight * self.distance(pred, target)).mean()
