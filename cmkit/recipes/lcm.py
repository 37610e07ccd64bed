"""Latent consistency distillation (LCM, Luo et al. 2023): CD of a classifier-free-guided
teacher with LCM's published settings, in whatever space the teacher lives in (an
autoencoder's latents for a latent teacher).

What LCM's choices are on cmkit's σ axis:
- **Skipping step.** LCM pairs timesteps (t_{n+k}, t_n) of the teacher's 1000-step DDPM
  table with k = 20, i.e. adjacent points of the 51 timesteps 0, 19, 39, …, 999. On a DDPM
  teacher imported from diffusers this grid is used as it is (spacing "timesteps": σ_t of
  those timesteps). A teacher trained here has no timestep table; its Karras grid with
  N = 51 points is the same construction (k = 20 of a 1000-point Karras ramp is a 51-point
  one), so LCM's N carries over and spacing is the process's.
- **Teacher step.** LCM's DDIM step on the guided denoiser D_w is Euler's method in σ.
- **Boundary.** LCM's c_skip = σ_d²/((s·t)² + σ_d²), c_out = s·t/√((s·t)² + σ_d²) with the
  integer timestep t and the scaling s = 10 is exact at t = 0 but already ≈ 7·10⁻⁶ at the
  next grid point (t = 19): the skip connection acts at timestep 0 only. cmkit's
  parameterisation c_skip(σ) = σ_d²/((σ − σ_min)² + σ_d²) is exact at σ_min = σ_0 as well
  and keeps the skip connection at low noise (c_skip ≈ 0.96 at σ = 0.1). Both give
  f(x, σ_0) = x exactly; cmkit keeps its own so every recipe shares one boundary.
- **Target.** θ⁻ ← μθ⁻ + (1 − μ)θ with μ = 0.95; the loss is l2 (diffusers' default).
  LCM-LoRA (`--lora-rank`) uses μ = 0: the target is the online network itself.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from cmkit.recipes.cd import CDOptions, distill_run
from cmkit.recipes.common import RunOptions
from cmkit.runs import load_config

LCM_SCALES = 51  # 50 DDIM steps of a 1000-step table (k = 20), and the boundary point
LCM_MU = 0.95


@dataclass
class LCMOptions(CDOptions):
    recipe: ClassVar[str] = "lcm"
    solver: str = "euler"
    num_scales: int = LCM_SCALES
    mu: float | None = None  # None: 0.95, or 0 for LCM-LoRA
    # None: "timesteps" for a DDPM teacher (its own table), else the process's grid
    spacing: str | None = None


def lcm_run(run: RunOptions, opts: LCMOptions) -> Path:
    """CD with LCM's defaults; the μ and spacing the run used are recorded, not None."""
    if opts.mu is None:
        opts.mu = LCM_MU if opts.lora_rank is None else 0.0
    if opts.spacing is None:
        imported = load_config(opts.teacher, "teacher").network.type == "diffusers-vp"
        opts.spacing = "timesteps" if imported else "process"
    return distill_run(run, opts)
