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
  to_edm(x_t, t), from_edm(x_σ, σ)  the same point in EDM's x_σ = x₀ + σ·z, σ (per sample)
  consistency(net), denoiser(net), teacher_loss()
  diffusers_scheduler()   ConsistencyModelPipeline scheduler settings, or None
"""

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from cmkit.errors import UserError
from cmkit.losses import EDMLoss, FlowMatchingLoss, TrigFlowLoss
from cmkit.noise import RHO, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, check_grid_args, karras_sigmas
from cmkit.param import (
    TIME_INPUTS,
    ConsistencyFunction,
    EDMDenoiser,
    FlowParam,
    Times,
    TrigFlowParam,
    as_batch_times,
    batch_column,
    trig_columns,
)


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
        return self.from_edm(y, sigma)

    def to_edm(self, x_t: torch.Tensor, t: Times) -> tuple[torch.Tensor, Times]:
        """The identity: x_t = x₀ + t·z is EDM's x_σ at σ = t."""
        return x_t, t

    def from_edm(self, x_sigma: torch.Tensor, sigma: Times) -> tuple[torch.Tensor, Times]:
        return x_sigma, sigma

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
        return self.from_edm(y, sigma)

    def to_edm(self, x_t: torch.Tensor, t: Times) -> tuple[torch.Tensor, Times]:
        """σ = t/(1 − t), x_σ = x_t/(1 − t) (t < 1). t: a float or a (B,) tensor."""
        keep = 1 - t
        return x_t / _column_or_float(keep, x_t), t / keep

    def from_edm(self, x_sigma: torch.Tensor, sigma: Times) -> tuple[torch.Tensor, Times]:
        """t = σ/(1 + σ), x_t = (1 − t)·x_σ."""
        t = sigma / (1 + sigma)
        return (1 - _column_or_float(t, x_sigma)) * x_sigma, t

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


T_MID = 1.1  # sCM's 2-step intermediate time (Lu & Song 2024)


@dataclass(frozen=True)
class TrigFlowProcess:
    """TrigFlow x_t = cos t·x₀ + sin t·σ_d·z, z ~ N(0, I), t ∈ [0, π/2] (Lu & Song 2024, sCM).

    It is EDM's process re-timed and rescaled: σ = σ_d·tan t and x_σ = x_t/cos t (to_edm), so
    a denoiser of any process serves as its x₀-prediction (trigflow_velocity). The boundary is
    t = 0, where the parameterisation gives f(x, 0) = x exactly.
    """

    sigma_data: float = SIGMA_DATA
    time_input: str = "t"  # c_noise = t, or "edm": an EDM network's ln(σ)/4 (see TrigFlowParam)

    def __post_init__(self) -> None:
        if not self.sigma_data > 0:
            raise UserError(f"need sigma_data > 0, got {self.sigma_data}")
        if self.time_input not in TIME_INPUTS:
            raise UserError(f"time_input must be 't' or 'edm', got {self.time_input!r}")

    name = "trigflow"
    t_min = 0.0
    t_max = math.pi / 2
    noise_levels = (0.0, math.inf)

    def grid(self, n: int) -> torch.Tensor:
        """arctan(σ_i/σ_d) of the n-point Karras grid over EDM's σ range [0.002, 80] (ρ = 7):
        the ends are that range mapped (0.0040 and 1.5645 at σ_d = 0.5), not 0 and π/2, so
        CT/iCT's grid pairs are EDM's pairs in TrigFlow time."""
        return torch.atan(karras_sigmas(n, SIGMA_MIN, SIGMA_MAX, RHO) / self.sigma_data)

    def sampling_times(self, k: int) -> torch.Tensor:
        """π/2, then the K − 1 lower points of the K-point grid (descending), then 0: EDM's
        sampler grid mapped, with its top σ_max moved to σ = ∞. K = 1: π/2, 0."""
        _check_steps(k)
        lower = self.grid(k).flip(0)[1:] if k > 1 else torch.zeros(0, dtype=torch.float64)
        ends = torch.tensor([self.t_max, 0.0], dtype=torch.float64)
        return torch.cat([ends[:1], lower, ends[1:]])

    def default_times(self, steps: int) -> list[float]:
        """τ_i = 1.1·(k − i)/(k − 1), i = 1 … k − 1: sCM's t_mid = 1.1 at 2 steps, then evenly
        spaced below it (3 steps: 1.1, 0.55). The best τ depends on the model (tune-times)."""
        _check_steps(steps)
        return [T_MID * (steps - i) / (steps - 1) for i in range(1, steps)]

    def perturb(self, x0: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        cos_t, sin_t = trig_columns(as_batch_times(t, x0), x0)
        return cos_t * x0 + sin_t * self.sigma_data * z

    def prior(self, z: torch.Tensor) -> torch.Tensor:
        return self.sigma_data * z

    def renoise(self, x: torch.Tensor, t: float, z: torch.Tensor) -> torch.Tensor:
        """sCM's multistep re-noising x = cos τ·x₀ + sin τ·σ_d·z."""
        return math.cos(t) * x + math.sin(t) * self.sigma_data * z

    def denoise_point(self, y: torch.Tensor, sigma: float) -> tuple[torch.Tensor, float]:
        """y = x + σ·z is EDM's x_σ: t = arctan(σ/σ_d), x_t = cos t·y."""
        _check_noise_level(self, sigma)
        return self.from_edm(y, sigma)

    def to_edm(self, x_t: torch.Tensor, t: Times) -> tuple[torch.Tensor, Times]:
        """σ = σ_d·tan t, x_σ = x_t/cos t, for t < π/2 (σ = ∞ at π/2; a float32 tensor of π/2
        rounds above it, where cos t < 0). t: a float or a (B,) tensor."""
        cos_t, _ = trig_columns(t, x_t)
        tan_t = math.tan(t) if isinstance(t, int | float) else torch.tan(t)
        return x_t / cos_t, self.sigma_data * tan_t

    def from_edm(self, x_sigma: torch.Tensor, sigma: Times) -> tuple[torch.Tensor, Times]:
        """t = arctan(σ/σ_d), x_t = cos t·x_σ."""
        ratio = sigma / self.sigma_data
        t = math.atan(ratio) if isinstance(ratio, int | float) else torch.atan(ratio)
        cos_t, _ = trig_columns(t, x_sigma)
        return cos_t * x_sigma, t

    def to_search(self, t: float) -> float:
        return float(t)

    def from_search(self, u: float) -> float:
        return float(u)

    def consistency(self, net: nn.Module) -> TrigFlowParam:
        return TrigFlowParam(net, self.sigma_data, self.time_input)

    def denoiser(self, net: nn.Module) -> TrigFlowParam:
        return TrigFlowParam(net, self.sigma_data, self.time_input)

    def teacher_loss(self) -> TrigFlowLoss:
        return TrigFlowLoss(self)

    def diffusers_scheduler(self) -> None:
        """ConsistencyModelPipeline samples the EDM process only."""
        return None

    def to_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}


Process = EDMProcess | FlowProcess | TrigFlowProcess
PROCESSES: dict[str, type[Process]] = {
    "edm": EDMProcess,
    "flow": FlowProcess,
    "trigflow": TrigFlowProcess,
}


def trigflow_velocity(teacher_process: Process, teacher_denoiser, sigma_data: float = SIGMA_DATA):
    """The TrigFlow PF-ODE v(x_t, t, **cond) = dx_t/dt = (cos t·x_t − D)/sin t of any teacher.

    D = teacher_denoiser(x, s) at the teacher's point (x, s) = teacher_process.from_edm(x_σ, σ)
    of (x_σ, σ) = TrigFlowProcess(σ_d).to_edm(x_t, t): an x₀-prediction does not depend on the
    process. For sCD's target dx_t/dt. t: a float or a (B,) tensor in (0, π/2).
    """
    trig = TrigFlowProcess(sigma_data)

    def velocity(x_t: torch.Tensor, t: Times, **cond) -> torch.Tensor:
        t = as_batch_times(t, x_t)
        D = teacher_denoiser(*teacher_process.from_edm(*trig.to_edm(x_t, t)), **cond)
        cos_t, sin_t = trig_columns(t, x_t)
        return (cos_t * x_t - D) / sin_t

    return velocity


def _column_or_float(t: Times, x: torch.Tensor) -> Times:
    return float(t) if isinstance(t, int | float) else batch_column(t, x)


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
