"""Noise processes: every formula that depends on how data is noised lives on its class.

Losses, samplers, editing, tune-times, export and the CLI are written once against this
protocol, so adding a process is adding one class here (and its name to PROCESSES):
  t_min, t_max            the time range; t_min is the boundary time ε of f(x, ε) = x
  grid(n)                 ascending training grid of n times
  sampling_times(k)       descending solver grid of k points, then 0
  default_times(k)        intermediate τ of k-step consistency sampling
  perturb(x₀, t, z)       x_t;  prior(z): x_T;  renoise(x, τ, z): Algorithm 1's re-noising
  denoise_point(y, σ)     (x_t, t) for y = x + σ·z, the input of one-step denoising
  noise_levels            the σ of y = x + σ·z that denoise_point takes, (lo, hi]
  to_search / from_search the coordinate tune-times searches τ in
  consistency(net), denoiser(net), teacher_loss()
  diffusers_scheduler()   ConsistencyModelPipeline scheduler settings, or None
"""

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from cmkit.errors import UserError
from cmkit.losses import EDMLoss, FlowMatchingLoss
from cmkit.noise import RHO, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, check_grid_args, karras_sigmas
from cmkit.param import ConsistencyFunction, EDMDenoiser, FlowParam, batch_column


@dataclass(frozen=True)
class EDMProcess:
    """Variance-exploding process x_t = x₀ + t·z on t ∈ [σ_min, σ_max] (Karras et al. 2022)."""

    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    rho: float = RHO
    sigma_data: float = SIGMA_DATA

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

    @property
    def noise_levels(self) -> tuple[float, float]:
        return self.sigma_min, self.sigma_max

    def grid(self, n: int) -> torch.Tensor:
        return karras_sigmas(n, self.sigma_min, self.sigma_max, self.rho)

    def sampling_times(self, k: int) -> torch.Tensor:
        """K Karras points from σ_max down to σ_min, then 0 (EDM's sampler grid); K = 1: σ_max."""
        _check_steps(k)
        top = self.grid(k).flip(0) if k > 1 else torch.tensor([self.sigma_max], dtype=torch.float64)
        return torch.cat([top, torch.zeros(1, dtype=torch.float64)])

    def default_times(self, steps: int) -> list[float]:
        """The interior points of a (steps + 1)-point Karras grid (2 steps: τ = 2.52 with the
        default σ range). The best τ depends on the model (the papers searched for it)."""
        _check_steps(steps)
        return [float(t) for t in self.grid(steps + 1).flip(0)[1:-1]]

    def perturb(self, x0: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return x0 + batch_column(t, x0) * z

    def prior(self, z: torch.Tensor) -> torch.Tensor:
        return self.sigma_max * z

    def renoise(self, x: torch.Tensor, t: float, z: torch.Tensor) -> torch.Tensor:
        """Algorithm 1: x̂ = x + √(τ² − ε²)·z, so x̂ has noise level τ when x is clean at ε."""
        return x + (t**2 - self.sigma_min**2) ** 0.5 * z

    def denoise_point(self, y: torch.Tensor, sigma: float) -> tuple[torch.Tensor, float]:
        """y = x + σ·z is already the process at t = σ."""
        _check_noise_level(self, sigma)
        return y, sigma

    def to_search(self, t: float) -> float:
        """τ is searched in log σ: the Karras grid is near-uniform there."""
        return math.log(t)

    def from_search(self, u: float) -> float:
        return math.exp(u)

    def consistency(self, net: nn.Module) -> ConsistencyFunction:
        return ConsistencyFunction(net, self.sigma_data, self.sigma_min)

    def denoiser(self, net: nn.Module) -> EDMDenoiser:
        return EDMDenoiser(net, self.sigma_data)

    def teacher_loss(self) -> EDMLoss:
        return EDMLoss(self)

    def diffusers_scheduler(self) -> dict:
        """CMStochasticIterativeScheduler computes this process exactly."""
        return asdict(self)

    def to_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}


@dataclass(frozen=True)
class FlowProcess:
    """Rectified flow x_t = (1 − t)·x₀ + t·x₁, x₁ ~ N(0, I), t ∈ [0, 1] (Liu et al. 2022).

    σ_data only sets the data scaling (vectors to std σ_data); the parameterisation has none.
    """

    sigma_data: float = SIGMA_DATA

    def __post_init__(self) -> None:
        if not self.sigma_data > 0:
            raise UserError(f"need sigma_data > 0, got {self.sigma_data}")

    name = "flow"
    t_min = 0.0
    t_max = 1.0
    noise_levels = (0.0, math.inf)

    def grid(self, n: int) -> torch.Tensor:
        check_grid_args(n, 0.0, 1.0)
        return torch.linspace(0.0, 1.0, n, dtype=torch.float64)

    def sampling_times(self, k: int) -> torch.Tensor:
        """K uniform points from 1 down to 1/K, then 0."""
        _check_steps(k)
        return self.grid(k + 1).flip(0)

    def default_times(self, steps: int) -> list[float]:
        """Uniform (k−1)/k, …, 1/k."""
        _check_steps(steps)
        return [i / steps for i in range(steps - 1, 0, -1)]

    def perturb(self, x0: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        tc = batch_column(t, x0)
        return (1 - tc) * x0 + tc * z

    def prior(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def renoise(self, x: torch.Tensor, t: float, z: torch.Tensor) -> torch.Tensor:
        """The ReFlow stochastic iteration: x_t = (1 − t)·x₀ + t·z."""
        return (1 - t) * x + t * z

    def denoise_point(self, y: torch.Tensor, sigma: float) -> tuple[torch.Tensor, float]:
        """y/(1 + σ) = (1 − t)·x + t·z with t = σ/(1 + σ), so any σ > 0 maps into (0, 1)."""
        _check_noise_level(self, sigma)
        t = sigma / (1 + sigma)
        return (1 - t) * y, t

    def to_search(self, t: float) -> float:
        return float(t)

    def from_search(self, u: float) -> float:
        return float(u)

    def consistency(self, net: nn.Module) -> FlowParam:
        return FlowParam(net)

    def denoiser(self, net: nn.Module) -> FlowParam:
        return FlowParam(net)

    def teacher_loss(self) -> FlowMatchingLoss:
        return FlowMatchingLoss(self)

    def diffusers_scheduler(self) -> None:
        """ConsistencyModelPipeline samples the EDM process only."""
        return None

    def to_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}


Process = EDMProcess | FlowProcess
PROCESSES: dict[str, type[Process]] = {"edm": EDMProcess, "flow": FlowProcess}


def _check_steps(k: int) -> None:
    if k < 1:
        raise UserError(f"sampling steps must be >= 1, got {k}")


def _check_noise_level(process: Process, sigma: float) -> None:
    lo, hi = process.noise_levels
    if not lo < sigma <= hi:
        raise UserError(
            f"noise level {sigma:g} (model units) is outside ({lo:g}, {hi:g}]; "
            "expected a level the model was trained on"
        )


def make_process(name: str, **params: float) -> Process:
    """The one factory: a process by name with its own parameters (from flags or a config)."""
    cls = PROCESSES.get(name)
    if cls is None:
        raise UserError(f"unknown process {name!r}; expected {' or '.join(map(repr, PROCESSES))}")
    accepted = {f.name for f in fields(cls)}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise UserError(
            f"the {name} process takes {', '.join(sorted(accepted)) or 'no parameters'}; "
            f"got {', '.join(unknown)}"
        )
    return cls(**params)


def process_from_dict(d: dict) -> Process:
    """Rebuild a process from its `to_dict()` form (as stored in a run's config.json)."""
    params = dict(d)
    return make_process(params.pop("name", None), **params)
