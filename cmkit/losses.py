"""Training objectives behind one protocol: `loss(online, target, batch, step, generator)`.

Every loss takes the wrapped online model, the wrapped target (None for teachers), a Batch
(x₀ and its conditioning), the step (for curricula) and the CPU generator that owns all of
its randomness, and returns the scalar to minimise. Teacher losses regress the denoiser or
the velocity; the consistency loss compares f at the two points of a drawn Pair. CD and CT
differ in one object, the `lower_point`: a teacher ODE step, or the unbiased estimate
x₀ + t_n·z. Time pairs (cmkit.training_times) and weightings are callables, so ECT's
continuous pairs or sCM's weighting slot in beside the grid pairs of CD/CT.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cmkit.batch import Batch, Cond
from cmkit.jvp import jvp
from cmkit.networks.embedding import SinusoidalEmbedding
from cmkit.noise import EDM_P_MEAN, EDM_P_STD
from cmkit.param import batch_column, trig_columns
from cmkit.rng import device_rng_state, set_device_rng_state
from cmkit.solvers import SOLVER_STEPS, Denoiser
from cmkit.training_times import TrigFlowTimes

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Weighting = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


DISTANCES = ("l2", "l1", "pseudo-huber")


def make_distance(name: str, data_dim: int, c: float | None = None) -> Distance:
    """l2, l1 or pseudo-huber; pseudo-Huber's c defaults to iCT's 0.00054·√d."""
    if name == "l2":
        return l2_distance
    if name == "l1":
        return l1_distance
    if name == "pseudo-huber":
        return pseudo_huber_distance(c if c is not None else 0.00054 * math.sqrt(data_dim))
    raise ValueError(f"unknown distance {name!r}; expected {', '.join(DISTANCES)}")


# ---------------------------------------------------------------- teacher losses


def lognormal_draw(batch: Batch, p_mean: float, p_std: float, generator: torch.Generator):
    """(ln σ ~ N(P_mean, P_std²) per sample, z ~ N(0, I) like x₀), in this order."""
    x0 = batch.x0
    ln_sigma = p_mean + p_std * batch.randn((), generator).to(x0)
    return ln_sigma, batch.randn(x0.shape[1:], generator).to(x0)


def trigflow_target(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor, sigma_data: float):
    """dx_t/dt = cos t·σ_d·z − sin t·x₀ of x_t = cos t·x₀ + sin t·σ_d·z."""
    cos_t, sin_t = trig_columns(t, x0)
    return cos_t * sigma_data * z - sin_t * x0


@dataclass
class EDMLoss:
    """EDM denoising score matching (Karras et al. 2022): ln σ ~ N(P_mean, P_std²), weight
    λ(σ) = (σ² + σ_d²)/(σ·σ_d)², x_σ from the process's own perturbation."""

    process: object
    p_mean: float = EDM_P_MEAN
    p_std: float = EDM_P_STD

    def __call__(self, denoiser, _target, batch: Batch, step: int, generator) -> torch.Tensor:
        x0 = batch.x0
        ln_sigma, z = lognormal_draw(batch, self.p_mean, self.p_std, generator)
        sigma = torch.exp(ln_sigma)
        sd = self.process.sigma_data
        weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
        x_sigma = self.process.perturb(x0, sigma, z)
        return (weight * l2_distance(denoiser(x_sigma, sigma, **batch.cond), x0)).mean()


@dataclass
class FlowMatchingLoss:
    """Flow matching with t ~ U(0, 1): regress v(x_t, t) on x₁ − x₀ (Lipman et al.; Liu et al.)."""

    process: object

    def __call__(self, flow, _target, batch: Batch, step: int, generator) -> torch.Tensor:
        x0 = batch.x0
        t = batch.rand(generator).to(x0)
        x1 = batch.randn(x0.shape[1:], generator).to(x0)
        x_t = self.process.perturb(x0, t, x1)
        return l2_distance(flow.velocity(x_t, t, **batch.cond), x1 - x0).mean()


@dataclass
class TrigFlowLoss:
    """TrigFlow velocity regression (Lu & Song 2024): ln σ ~ N(P_mean, P_std²), t = arctan(σ/σ_d),
    x_t = cos t·x₀ + sin t·σ_d·z, target v = dx_t/dt = cos t·σ_d·z − sin t·x₀, loss
    ‖σ_d·F − v‖²/σ_d² (mean over dimensions, then over the batch).

    It is EDMLoss term for term on the same draws: with D = cos t·x_t − sin t·σ_d·F,
    D − x₀ = sin t·(v − σ_d·F) and EDM's λ(σ) = (σ² + σ_d²)/(σ·σ_d)² = 1/(σ_d·sin t)².
    """

    process: object
    p_mean: float = EDM_P_MEAN
    p_std: float = EDM_P_STD

    def __call__(self, param, _target, batch: Batch, step: int, generator) -> torch.Tensor:
        x0 = batch.x0
        ln_sigma, z = lognormal_draw(batch, self.p_mean, self.p_std, generator)  # as EDMLoss
        sd = self.process.sigma_data
        t = torch.atan(torch.exp(ln_sigma) / sd)
        v = trigflow_target(x0, z, t, sd)
        x_t = self.process.perturb(x0, t, z)
        return (l2_distance(param.drift(x_t, t, **batch.cond), v) / sd**2).mean()


# ---------------------------------------------------------------- consistency losses


@dataclass(frozen=True)
class Pair:
    """One draw of a consistency loss: times t > r per sample, the shared noise z, the upper
    point x_t = perturb(x₀, t, z) and the lower point x_r made by the loss's lower_point."""

    t: torch.Tensor  # (B,)
    r: torch.Tensor  # (B,)
    z: torch.Tensor
    x_t: torch.Tensor
    x_r: torch.Tensor


def unit_weight(t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """λ = 1 (Song et al. 2023)."""
    return torch.ones_like(t)


def inverse_gap_weight(t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """λ = 1/(t − r) (iCT)."""
    return 1.0 / (t - r)


def edm_snr_weight(sigma_data: float) -> Weighting:
    """λ = (t² + σ_d²)/(t·σ_d)², EDM's weighting, as ECT uses on ImageNet-64."""

    def weight(t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return (t**2 + sigma_data**2) / (t * sigma_data) ** 2

    return weight


@dataclass
class TeacherStep:
    """CD: the lower point is one Euler or Heun step of the teacher's PF-ODE from t to r."""

    teacher: Denoiser
    solver: str = "heun"

    @torch.no_grad()
    def __call__(self, x0, x_t, z, t, r, cond: Cond) -> torch.Tensor:
        return SOLVER_STEPS[self.solver](self.teacher, x_t, t, r, cond)


@dataclass
class UnbiasedEstimate:
    """CT: the lower point reuses x₀ and z at r (CD with the teacher's denoiser D := x₀)."""

    perturb: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

    def __call__(self, x0, x_t, z, t, r, cond: Cond) -> torch.Tensor:
        return self.perturb(x0, r, z)


@dataclass
class ConsistencyLoss:
    """λ(t, r)·d(f_θ(x_t, t), f_θ⁻(x_r, r)) over pairs t > r drawn by `pairs`.

    All randomness comes from `generator`, a CPU generator, so runs reproduce across devices.
    """

    process: object
    pairs: Callable  # (batch, step, generator) -> (t, r)
    lower_point: Callable  # (x0, x_t, z, t, r, cond) -> x_r
    distance: Distance
    weighting: Weighting = unit_weight

    def draw(self, batch: Batch, step: int, generator: torch.Generator) -> Pair:
        x0 = batch.x0
        t, r = self.pairs(batch, step, generator)
        z = batch.randn(x0.shape[1:], generator).to(x0)
        x_t = self.process.perturb(x0, t, z)
        return Pair(t, r, z, x_t, self.lower_point(x0, x_t, z, t, r, batch.cond))

    def __call__(
        self,
        f_online: nn.Module,
        f_target: nn.Module,
        batch: Batch,
        step: int,
        generator: torch.Generator,
    ) -> torch.Tensor:
        p = self.draw(batch, step, generator)
        device = batch.x0.device
        state = device_rng_state(device)  # the target pass must see the same dropout masks
        pred = f_online(p.x_t, p.t, **batch.cond)
        with torch.no_grad():
            set_device_rng_state(state, device)
            target = f_target(p.x_r, p.r, **batch.cond)
        # a pair with t = r (both clipped to ε) carries no information: weight 0, not 1/0
        weight = torch.where(p.t > p.r, self.weighting(p.t, p.r), 0.0)
        return (weight * self.distance(pred, target)).mean()


# ---------------------------------------------------------------- continuous time (sCM)


class AdaptiveWeight(nn.Module):
    """sCM's learned weighting w_φ(t): positional features of t, then one linear layer, zero
    at the start (weight e⁰ = 1). Trained with the model, it evens the loss out over t."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.embed = SinusoidalEmbedding(dim)
        self.out = nn.Linear(dim, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(t)).squeeze(1).to(t.dtype)


def normalised_tangent(
    F_minus: torch.Tensor,
    J: torch.Tensor,
    x_t: torch.Tensor,
    dxdt: torch.Tensor,
    t: torch.Tensor,
    sigma_data: float,
    warmup: float,
    c: float,
) -> torch.Tensor:
    """g = −cos²t·(σ_d·F⁻ − dx_t/dt) − r·(cos t·sin t·x_t + σ_d·J), then g/(‖g‖ + c) per
    sample (Lu & Song 2024, Algorithm 1; r the tangent warm-up). J = cos t·sin t·dF⁻/dt, the
    JVP along cos t·sin t·(dx_t/dt, 1): the paper's arrangement, which never divides by sin t.
    At r = 1, g = cos t·df⁻/dt along the ODE, with f⁻ = cos t·x_t − sin t·σ_d·F⁻."""
    cos, sin = batch_column(torch.cos(t), x_t), batch_column(torch.sin(t), x_t)
    g = -(cos**2) * (sigma_data * F_minus - dxdt) - warmup * (cos * sin * x_t + sigma_data * J)
    norm = g.flatten(1).norm(dim=1)
    return g / batch_column(norm + c, g)


@dataclass
class SCMLoss:
    """Continuous-time consistency training (sCT) or distillation (sCD) on the TrigFlow
    process (Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time
    Consistency Models", Algorithm 1):

        L = e^{w_φ(t)}/D·‖F_θ − F_θ⁻ − g‖² − w_φ(t)

    with g the normalised tangent, dF_θ⁻/dt from one JVP of the target network along
    (dx_t/dt, 1), and dx_t/dt = cos t·z − sin t·x₀ (sCT, z ~ N(0, σ_d²I)) or the teacher's
    PF-ODE velocity (sCD). `online`/`target` are TrigFlow consistency functions exposing F."""

    process: object  # TrigFlowProcess
    weight: AdaptiveWeight
    velocity: Callable | None = None  # sCD: (x_t, t, **cond) -> dx_t/dt; None: sCT
    times: TrigFlowTimes = TrigFlowTimes()
    warmup_steps: int = 1000  # r = min(1, step/H)
    tangent_c: float = 0.1
    jvp: str = "exact"
    t_range: tuple[float, float] | None = None  # sCD: the times the teacher was trained on

    def draw(self, batch: Batch, generator: torch.Generator):
        """(t, x_t, dx_t/dt) of one batch."""
        x0, sd = batch.x0, self.process.sigma_data
        t = batch.draw(lambda count: self.times(count, sd, generator))
        if self.t_range is not None:
            t = t.clamp(*self.t_range)
        t = t.to(x0)
        z = batch.randn(x0.shape[1:], generator).to(x0)
        x_t = self.process.perturb(x0, t, z)
        if self.velocity is None:
            dxdt = trigflow_target(x0, z, t, sd)
        else:
            with torch.no_grad():
                dxdt = self.velocity(x_t, t, **batch.cond)
        return t, x_t, dxdt

    def __call__(self, online, target, batch: Batch, step: int, generator) -> torch.Tensor:
        t, x_t, dxdt = self.draw(batch, generator)
        device = x_t.device
        state = device_rng_state(device)  # both passes draw the same dropout masks
        cs = batch_column(torch.cos(t) * torch.sin(t), x_t)

        def F_target(x: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
            return target.F(x, tt, **batch.cond)

        F_minus, J = jvp(F_target, (x_t, t), (cs * dxdt, cs.flatten()), self.jvp)
        set_device_rng_state(state, device)
        F_theta = online.F(x_t, t, **batch.cond)
        r = min(1.0, step / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        g = normalised_tangent(F_minus, J, x_t, dxdt, t, self.process.sigma_data, r, self.tangent_c)
        w = self.weight(t)
        dim = x_t[0].numel()
        per_sample = (F_theta - F_minus - g).flatten(1).pow(2).sum(1)
        return (torch.exp(w) / dim * per_sample - w).mean()
