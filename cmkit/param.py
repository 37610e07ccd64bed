"""Parameterisations: wrap a plain network F(x, c_noise) into a denoiser or a consistency function.

The networks never see σ or t directly, only the scaled input and c_noise; these wrappers own
the scalings, so the boundary condition holds by construction, not by training.
"""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Scalings:
    """Per-sample coefficients, each shaped to broadcast against x."""

    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor  # (B,)


def as_batch_times(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or (B,) time to shape (B,) on x's device and dtype."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def batch_column(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def consistency_scalings(t: torch.Tensor, x: torch.Tensor, sigma_data: float, sigma_min: float):
    """Song et al. 2023, Appendix C: c_skip = σ_d²/((t−ε)² + σ_d²), c_out = σ_d(t−ε)/√(σ_d² + t²),
    c_in = 1/√(t² + σ_d²), c_noise = ln(t)/4. At t = ε: c_skip = 1 and c_out = 0 exactly."""
    tc = batch_column(t, x)
    return Scalings(
        c_skip=1 / (((tc - sigma_min) / sigma_data) ** 2 + 1),  # exactly 1 at t = ε, any σ_d
        c_out=sigma_data * (tc - sigma_min) / torch.sqrt(sigma_data**2 + tc**2),
        c_in=1.0 / torch.sqrt(tc**2 + sigma_data**2),
        c_noise=torch.log(t) / 4,
    )


def edm_scalings(sigma: torch.Tensor, x: torch.Tensor, sigma_data: float) -> Scalings:
    """Karras et al. 2022, Table 1 (EDM preconditioning)."""
    sc = batch_column(sigma, x)
    return Scalings(
        c_skip=sigma_data**2 / (sc**2 + sigma_data**2),
        c_out=sc * sigma_data / torch.sqrt(sc**2 + sigma_data**2),
        c_in=1.0 / torch.sqrt(sc**2 + sigma_data**2),
        c_noise=torch.log(sigma) / 4,
    )


class ConsistencyFunction(nn.Module):
    """f(x, t) = c_skip(t)·x + c_out(t)·F(c_in(t)·x, c_noise(t)); f(x, σ_min) = x exactly.

    Song et al. 2023, eq. (5) with the σ_min-shifted scalings of Appendix C.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002) -> None:
        super().__init__()
        self.net, self.sigma_data, self.sigma_min = net, sigma_data, sigma_min

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, **net_kwargs) -> torch.Tensor:
        t = as_batch_times(t, x)
        s = consistency_scalings(t, x, self.sigma_data, self.sigma_min)
        F_x = self.net(s.c_in * x, s.c_noise, **net_kwargs)
        return s.c_skip * x + s.c_out * F_x


class EDMDenoiser(nn.Module):
    """D(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, ln(σ)/4): EDM's preconditioned denoiser."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5) -> None:
        super().__init__()
        self.net, self.sigma_data = net, sigma_data

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **net_kwargs) -> torch.Tensor:
        sigma = as_batch_times(sigma, x)
        s = edm_scalings(sigma, x, self.sigma_data)
        F_x = self.net(s.c_in * x, s.c_noise, **net_kwargs)
        return s.c_skip * x + s.c_out * F_x


class FlowParam(nn.Module):
    """Rectified-flow view: the network predicts a velocity v and x₀ = x_t − t·v.

    With the flow-matching target v ≈ x₁ − x₀ this is the teacher's denoiser E[x₀ | x_t];
    trained by consistency it is the consistency function, and f(x, 0) = x exactly either way.
    c_noise = t.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def velocity(self, x: torch.Tensor, t: torch.Tensor | float, **net_kwargs) -> torch.Tensor:
        return self.net(x, as_batch_times(t, x), **net_kwargs)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, **net_kwargs) -> torch.Tensor:
        t = as_batch_times(t, x)
        return x - batch_column(t, x) * self.velocity(x, t, **net_kwargs)
