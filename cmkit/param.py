"""Parameterisations: wrap a plain network F(x, c_noise) into a denoiser or a consistency function.

The networks never see σ or t directly, only the scaled input and c_noise; these wrappers own
the scalings, so the boundary condition holds by construction, not by training.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from cmkit.noise import SIGMA_DATA, SIGMA_MAX, SIGMA_MIN

TIME_INPUTS = ("t", "edm")  # TrigFlowParam's c_noise: t itself, or EDM's ln(σ_d·tan t)/4


@dataclass(frozen=True)
class Scalings:
    """Per-sample coefficients, each shaped to broadcast against x (or one float for the batch)."""

    c_skip: torch.Tensor | float
    c_out: torch.Tensor | float
    c_in: torch.Tensor | float
    c_noise: torch.Tensor  # (B,)


Times = torch.Tensor | float


def as_batch_times(t: Times, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or (B,) time to shape (B,) on x's device and dtype."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def batch_column(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def _batch_or_float(t: Times, x: torch.Tensor) -> Times:
    """A float time stays a float; a tensor becomes (B,) in x's dtype and device."""
    return t if isinstance(t, int | float) else as_batch_times(t, x)


def _column_or_float(t: Times, x: torch.Tensor) -> torch.Tensor | float:
    """A float stays a float: samplers pass one time for the whole batch, and scalar
    coefficients keep a one-step sample within a few percent of a bare forward at batch 1."""
    return float(t) if isinstance(t, int | float) else batch_column(t, x)


def trig_columns(t: Times, x: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """(cos t, sin t): floats for a float t, else columns broadcasting against x. At t = 0 they
    are exactly 1 and 0, in any dtype."""
    if isinstance(t, int | float):
        return math.cos(t), math.sin(t)
    tc = batch_column(t, x)
    return torch.cos(tc), torch.sin(tc)


def _c_noise(t: Times, x: torch.Tensor) -> torch.Tensor:
    """c_noise = ln(t)/4 as a (B,) tensor."""
    if isinstance(t, int | float):
        return torch.full((x.shape[0],), math.log(t) / 4, dtype=x.dtype, device=x.device)
    return torch.log(t) / 4


def consistency_scalings(t: Times, x: torch.Tensor, sigma_data: float, sigma_min: float):
    """Song et al. 2023, Appendix C: c_skip = σ_d²/((t−ε)² + σ_d²), c_out = σ_d(t−ε)/√(σ_d² + t²),
    c_in = 1/√(t² + σ_d²), c_noise = ln(t)/4. At t = ε: c_skip = 1 and c_out = 0 exactly.
    t: a float, or a (B,) tensor."""
    tc = _column_or_float(t, x)
    return Scalings(
        c_skip=1 / (((tc - sigma_min) / sigma_data) ** 2 + 1),  # exactly 1 at t = ε, any σ_d
        c_out=sigma_data * (tc - sigma_min) / (sigma_data**2 + tc**2) ** 0.5,
        c_in=1.0 / (tc**2 + sigma_data**2) ** 0.5,
        c_noise=_c_noise(t, x),
    )


def edm_scalings(sigma: Times, x: torch.Tensor, sigma_data: float) -> Scalings:
    """Karras et al. 2022, Table 1 (EDM preconditioning). sigma: a float or a (B,) tensor."""
    sc = _column_or_float(sigma, x)
    return Scalings(
        c_skip=sigma_data**2 / (sc**2 + sigma_data**2),
        c_out=sc * sigma_data / (sc**2 + sigma_data**2) ** 0.5,
        c_in=1.0 / (sc**2 + sigma_data**2) ** 0.5,
        c_noise=_c_noise(sigma, x),
    )


class ConsistencyFunction(nn.Module):
    """f(x, t) = c_skip(t)·x + c_out(t)·F(c_in(t)·x, c_noise(t)); f(x, σ_min) = x exactly.

    Song et al. 2023, eq. (5) with the σ_min-shifted scalings of Appendix C.
    """

    def __init__(
        self, net: nn.Module, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN
    ) -> None:
        super().__init__()
        self.net, self.sigma_data, self.sigma_min = net, sigma_data, sigma_min

    def forward(self, x: torch.Tensor, t: Times, **net_kwargs) -> torch.Tensor:
        s = consistency_scalings(_batch_or_float(t, x), x, self.sigma_data, self.sigma_min)
        F_x = self.net(s.c_in * x, s.c_noise, **net_kwargs)
        return s.c_skip * x + s.c_out * F_x


class EDMDenoiser(nn.Module):
    """D(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, ln(σ)/4): EDM's preconditioned denoiser."""

    def __init__(self, net: nn.Module, sigma_data: float = SIGMA_DATA) -> None:
        super().__init__()
        self.net, self.sigma_data = net, sigma_data

    def forward(self, x: torch.Tensor, sigma: Times, **net_kwargs) -> torch.Tensor:
        s = edm_scalings(_batch_or_float(sigma, x), x, self.sigma_data)
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


class TrigFlowParam(nn.Module):
    """TrigFlow (Lu & Song 2024, sCM): f(x_t, t) = cos t·x_t − sin t·σ_d·F_θ(x_t/σ_d, c_noise(t)),
    c_noise(t) = t; f(x, 0) = x exactly (cos 0 = 1, sin 0 = 0).

    The same expression is the teacher's x₀-prediction when F is trained on the velocity, and
    σ_d·F is the PF-ODE dx_t/dt (`drift`, which the solvers use). t: a float or a (B,) tensor;
    `F` is the raw network output, the function sCM's forward-mode JVP differentiates.

    time_input "edm" runs a network trained as an EDM denoiser: c_noise = ln(σ)/4 with
    σ = σ_d·tan t (clamped to EDM's [σ_min, σ_max]) and F = −F_EDM. EDM's c_in·x_σ is exactly
    x_t/σ_d and its c_skip, c_out are cos²t and σ_d·sin t there, so f is then the EDM denoiser
    D(x_t/cos t, σ_d·tan t): how sCD starts a TrigFlow student from an EDM teacher's weights.
    """

    def __init__(
        self, net: nn.Module, sigma_data: float = SIGMA_DATA, time_input: str = "t"
    ) -> None:
        super().__init__()
        if time_input not in TIME_INPUTS:
            raise ValueError(f"unknown time input {time_input!r}; expected 't' or 'edm'")
        self.net, self.sigma_data, self.time_input = net, sigma_data, time_input

    def F(self, x_t: torch.Tensor, t: Times, **net_kwargs) -> torch.Tensor:
        """F_θ(x_t/σ_d, c_noise(t)), shaped like x_t."""
        t = as_batch_times(t, x_t)
        if self.time_input == "t":
            return self.net(x_t / self.sigma_data, t, **net_kwargs)
        sigma = (self.sigma_data * torch.tan(t)).clamp(SIGMA_MIN, SIGMA_MAX)
        return -self.net(x_t / self.sigma_data, torch.log(sigma) / 4, **net_kwargs)

    def drift(self, x_t: torch.Tensor, t: Times, **net_kwargs) -> torch.Tensor:
        """dx_t/dt = σ_d·F_θ(x_t/σ_d, t)."""
        return self.sigma_data * self.F(x_t, t, **net_kwargs)

    def forward(self, x_t: torch.Tensor, t: Times, **net_kwargs) -> torch.Tensor:
        cos_t, sin_t = trig_columns(_batch_or_float(t, x_t), x_t)
        return cos_t * x_t - sin_t * self.drift(x_t, t, **net_kwargs)
