"""Noise levels: the Karras σ grid, the N(k)/μ(k) curricula and the index samplers.

Everything here is a pure function of its arguments (Song et al. 2023, "Consistency Models";
Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models").
"""

import math
from dataclasses import dataclass

import torch

from cmkit.errors import UserError

# EDM's constants (Karras et al. 2022, Table 1), the defaults wherever a σ range is needed
SIGMA_MIN, SIGMA_MAX, RHO, SIGMA_DATA = 0.002, 80.0, 7.0, 0.5
MAX_SCALES = 100_000  # far beyond any published N (1280); bounds memory and time per step
EDM_P_MEAN, EDM_P_STD = -1.2, 1.2  # EDM training: ln σ ~ N(P_mean, P_std²) (Karras et al. 2022)
ICT_P_MEAN, ICT_P_STD = -1.1, 2.0  # iCT's lognormal over grid pairs (Song & Dhariwal 2023)
ECT_P_MEAN, ECT_P_STD = -1.1, 2.0  # ECT's lognormal over t (Geng et al. 2024)
SCM_P_MEAN, SCM_P_STD = -1.0, 1.4  # sCM's τ ~ N(P_mean, P_std²) on CIFAR-10 (Lu & Song 2024)
# ECT's smallest gap ratio (t − r)/t, where the stages stop (q = 2: 12 stages); finer gaps
# only add float32 noise to the difference of the two evaluations
ECT_MIN_RATIO = 2e-4


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = RHO) -> torch.Tensor:
    """The Karras grid t_1 < … < t_N, ascending, float64, endpoints exactly σ_min and σ_max.

    t_i = (σ_min^{1/ρ} + (i−1)/(N−1)·(σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ.
    """
    check_grid_args(n, sigma_min, sigma_max)
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    try:
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    except OverflowError:  # e.g. ρ = 1e-300; the check below reports it
        lo, hi = math.inf, math.inf
    grid = (lo + ramp * (hi - lo)) ** rho
    grid[0], grid[-1] = sigma_min, sigma_max  # exact endpoints despite the root/power round trip
    if not (torch.isfinite(grid).all() and (grid.diff() > 0).all()):
        raise UserError(
            f"sigma_min={sigma_min}, sigma_max={sigma_max}, rho={rho} give no strictly "
            f"increasing grid of {n} finite points in float64; expected moderate values"
        )
    return grid


def lcm_timesteps(num_timesteps: int, n: int) -> torch.Tensor:
    """LCM's N timesteps of a T-step DDPM table, ascending: 0 and t_j = round(j·k) − 1 for
    j = 1..N−1 with the skipping step k = T/(N − 1) (T = 1000, N = 51: 0, 19, 39, …, 999,
    the DDIM timesteps of diffusers' LCM training, with t − k clamped to 0 at the bottom)."""
    most = num_timesteps // 2 + 1  # k >= 2, so that t_1 = round(k) − 1 > 0
    if not 2 <= n <= most:
        raise UserError(f"a grid on {num_timesteps} timesteps has 2 to {most} points, got N={n}")
    k = num_timesteps / (n - 1)
    upper = torch.round(torch.arange(1, n, dtype=torch.float64) * k).long() - 1
    return torch.cat([torch.zeros(1, dtype=torch.long), upper])


@dataclass(frozen=True)
class TimestepGrid:
    """The N-point σ grid at LCM's timesteps of a DDPM teacher's own table (`log_sigmas`:
    ln σ_t for t = 0..T−1, ascending), ends exactly the process's σ_min = σ_0 and σ_max = σ_{T−1}.

    LCM pairs adjacent points (t_{n+k}, t_n) of the 1000-step table, k = 20; on cmkit's σ axis
    these are adjacent points of this grid, with CD's boundary f(x, σ_0) = x at timestep 0."""

    log_sigmas: torch.Tensor
    process: object  # the teacher's EDMProcess on [σ_0, σ_{T−1}]

    def grid(self, n: int) -> torch.Tensor:
        t = lcm_timesteps(len(self.log_sigmas), n)
        sigmas = torch.exp(self.log_sigmas.double()[t])
        sigmas[0], sigmas[-1] = self.process.t_min, self.process.t_max
        return sigmas


def check_grid_args(n: int, t_min: float, t_max: float) -> None:
    """Reject grids that cannot exist, with a message naming the bad value."""
    if not 2 <= n <= MAX_SCALES:
        raise UserError(f"a noise grid needs N >= 2 and N <= {MAX_SCALES} points, got N={n}")
    if not (0 <= t_min < t_max):
        raise UserError(f"need 0 <= t_min < t_max, got t_min={t_min}, t_max={t_max}")


@dataclass(frozen=True)
class FixedScales:
    """A constant N and target EMA rate μ, as used for consistency distillation."""

    num_scales: int
    mu: float = 0.0

    def scales(self, step: int) -> int:
        return self.num_scales

    def target_mu(self, step: int) -> float:
        return self.mu


@dataclass(frozen=True)
class CTCurriculum:
    """Original CT: N(k) = ⌈√(k/K·((s₁+1)² − s₀²) + s₀²) − 1⌉ + 1 and μ(k) = exp(s₀·ln μ₀ / N(k)).

    variant="openai" divides by N(k) − 1 instead, as openai/consistency_models does
    (μ starts at 0.81 for μ₀ = 0.9, s₀ = 2); "paper" follows the paper's Appendix C.
    """

    total_steps: int
    s0: int = 2
    s1: int = 150
    mu0: float = 0.9
    variant: str = "paper"

    def scales(self, step: int) -> int:
        frac = min(step, self.total_steps) / self.total_steps
        inner = math.sqrt(frac * ((self.s1 + 1) ** 2 - self.s0**2) + self.s0**2)
        return math.ceil(inner - 1) + 1

    def target_mu(self, step: int) -> float:
        n = self.scales(step)
        denom = n - 1 if self.variant == "openai" else n
        return math.exp(self.s0 * math.log(self.mu0) / denom)


@dataclass(frozen=True)
class ICTCurriculum:
    """iCT doubling curriculum, μ = 0:
    N(k) = min(s₀·2^⌊k/K'⌋, s₁) + 1 with K' = ⌊K/(log₂⌊s₁/s₀⌋ + 1)⌋."""

    total_steps: int
    s0: int = 10
    s1: int = 1280

    def scales(self, step: int) -> int:
        stage = max(1, math.floor(self.total_steps / (math.log2(self.s1 // self.s0) + 1)))
        return min(self.s0 * 2 ** (step // stage), self.s1) + 1

    def target_mu(self, step: int) -> float:
        return 0.0


@dataclass(frozen=True)
class ECTSchedule:
    """ECT's staged mapping from t to the lower time r (Geng et al. 2024, "Consistency Models
    Made Easy", §3): r = t·(1 − q^{−(s+1)}·n(t)), n(t) = 1 + k·sigmoid(−b·t), clamped at 0, with
    the stage s = ⌊step / double⌋. Stage 0 pairs t with r ≈ 0 (a denoising loss: where a
    diffusion model already is); every stage shrinks the gap t − r by q, towards the
    continuous-time consistency condition, until q^{−(s+1)} reaches ECT_MIN_RATIO (the stage
    stays there). μ = 0: the target is the online network."""

    q: float = 2.0
    double: int = 500
    k: float = 8.0
    b: float = 1.0

    def stage(self, step: int) -> int:
        return min(step // self.double, self.last_stage())

    def ratio(self, t: torch.Tensor, step: int) -> torch.Tensor:
        """(t − r)/t before clamping: q^{−(s+1)}·n(t)."""
        return self.q ** -(self.stage(step) + 1) * (1 + self.k * torch.sigmoid(-self.b * t))

    def lower(self, t: torch.Tensor, step: int) -> torch.Tensor:
        return (t * (1 - self.ratio(t, step))).clamp(min=0)

    def target_mu(self, step: int) -> float:
        return 0.0

    def last_stage(self) -> int:
        """The last stage whose smallest gap ratio q^{−(s+1)} is still ≥ ECT_MIN_RATIO."""
        return max(0, math.floor(-math.log(ECT_MIN_RATIO) / math.log(self.q)) - 1)


def lognormal_index_probs(
    grid: torch.Tensor, p_mean: float = ICT_P_MEAN, p_std: float = ICT_P_STD
) -> torch.Tensor:
    """iCT's discretised lognormal over pairs: p(σ_i) ∝ erf((ln σ_{i+1} − P_mean)/(√2·P_std))
    − erf((ln σ_i − P_mean)/(√2·P_std)). grid: ascending (N,) -> probabilities (N−1,)."""
    cdf = torch.erf((torch.log(grid.double()) - p_mean) / (math.sqrt(2.0) * p_std))
    probs = cdf[1:] - cdf[:-1]
    return probs / probs.sum()
