"""Noise processes: how data is noised, what the prior is, and the time grids.

Two processes share one small protocol so that losses and samplers are written once:
`grid(n)` (ascending training grid), `sampling_times(k)` (descending solver grid ending at 0),
`perturb(x0, t, z)`, `prior(z)`, `renoise(x, t, z)`, `consistency(net)`, `denoiser(net)`.
"""

from dataclasses import asdict, dataclass

import torch
from torch import nn

from cmkit.errors import UserError
from cmkit.noise import check_grid_args, karras_sigmas
from cmkit.param import ConsistencyFunction, EDMDenoiser, FlowParam, batch_column


@dataclass(frozen=True)
class EDMProcess:
    """Variance-exploding process x_t = x₀ + t·z on t ∈ [σ_min, σ_max] (Karras et al. 2022)."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_data: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise UserError(
                f"need 0 < sigma_min < sigma_max, got sigma_min={self.sigma_min}, "
                f"sigma_max={self.sigma_max}"
            )
        if self.sigma_data <= 0 or self.rho <= 0:
            raise UserError(f"need sigma_data > 0 and rho > 0, got {asdict(self)}")

    name = "edm"

    @property
    def t_min(self) -> float:
        return self.sigma_min

    @property
    def t_max(self) -> float:
        return self.sigma_max

    def grid(self, n: int) -> torch.Tensor:
        return karras_sigmas(n, self.sigma_min, self.sigma_max, self.rho)

    def sampling_times(self, k: int) -> torch.Tensor:
        """K Karras points from σ_max down to σ_min, then 0 (EDM's sampler grid); K = 1: σ_max."""
        if k < 1:
            raise UserError(f"solver steps must be >= 1, got {k}")
        top = self.grid(k).flip(0) if k > 1 else torch.tensor([self.sigma_max], dtype=torch.float64)
        return torch.cat([top, torch.zeros(1, dtype=torch.float64)])

    def perturb(self, x0: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return x0 + batch_column(t, x0) * z

    def prior(self, z: torch.Tensor) -> torch.Tensor:
        return self.sigma_max * z

    def renoise(self, x: torch.Tensor, t: float, z: torch.Tensor) -> torch.Tensor:
        """Algorithm 1: x̂ = x + √(τ² − ε²)·z, so x̂ has noise level τ when x is clean at ε."""
        return x + (t**2 - self.sigma_min**2) ** 0.5 * z

    def consistency(self, net: nn.Module) -> ConsistencyFunction:
        return ConsistencyFunction(net, self.sigma_data, self.sigma_min)

    def denoiser(self, net: nn.Module) -> EDMDenoiser:
        return EDMDenoiser(net, self.sigma_data)

    def to_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}


@dataclass(frozen=True)
class FlowProcess:
    """Rectified flow x_t = (1 − t)·x₀ + t·x₁, x₁ ~ N(0, I), t ∈ [0, 1] (Liu et al. 2022)."""

    name = "flow"
    t_min = 0.0
    t_max = 1.0
    sigma_data = 0.5

    def grid(self, n: int) -> torch.Tensor:
        check_grid_args(n, 0.0, 1.0)
        return torch.linspace(0.0, 1.0, n, dtype=torch.float64)

    def sampling_times(self, k: int) -> torch.Tensor:
        """K uniform points from 1 down to 1/K, then 0."""
        if k < 1:
            raise UserError(f"solver steps must be >= 1, got {k}")
        return self.grid(k + 1).flip(0)

    def perturb(self, x0: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        tc = batch_column(t, x0)
        return (1 - tc) * x0 + tc * z

    def prior(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def renoise(self, x: torch.Tensor, t: float, z: torch.Tensor) -> torch.Tensor:
        """The ReFlow stochastic iteration: x_t = (1 − t)·x₀ + t·z."""
        return (1 - t) * x + t * z

    def consistency(self, net: nn.Module) -> FlowParam:
        return FlowParam(net)

    def denoiser(self, net: nn.Module) -> FlowParam:
        return FlowParam(net)

    def to_dict(self) -> dict:
        return {"name": self.name}


Process = EDMProcess | FlowProcess


def process_from_dict(d: dict) -> Process:
    """Rebuild a process from its `to_dict()` form (as stored in a run's config.json)."""
    d = dict(d)
    name = d.pop("name", None)
    if name == "edm":
        return EDMProcess(**d)
    if name == "flow":
        return FlowProcess()
    raise UserError(f"unknown process {name!r}; expected 'edm' or 'flow'")
