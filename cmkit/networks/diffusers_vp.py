"""A DDPM (VP) `diffusers.UNet2DModel` as a plain network F(x_in, c_noise) under EDM's
preconditioning, so that a diffusion model trained elsewhere is a cmkit teacher.

A VP model sees x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε at an integer timestep t. Dividing by √ᾱ_t gives
EDM's x_σ = x₀ + σ·ε with σ_t = √((1 − ᾱ_t)/ᾱ_t) (cm-reference §15), so a σ between two
timesteps is a fractional timestep, found by interpolating t linearly in ln σ over the
scheduler's table (exact at its points). The output is turned into the denoised D(x_σ, σ)
and returned as F = (D − c_skip·x_σ)/c_out, which `param.EDMDenoiser` maps back to D: the
same function the diffusers pipeline computes, wrapped like every other cmkit network.
ε-prediction: D = x_σ − σ·ε̂; v-prediction: D = √ᾱ·x_t − √(1 − ᾱ)·v̂; sample: D = x̂₀.
"""

import torch
from torch import nn

from cmkit.errors import UserError
from cmkit.networks.diffusers_unet import require_diffusers
from cmkit.noise import SIGMA_DATA
from cmkit.param import batch_column, edm_scalings

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")


def vp_log_sigmas(schedule: dict) -> torch.Tensor:
    """ln σ_t for t = 0..T−1 (ascending), float64, from diffusers' own ᾱ_t of the beta
    schedule (`schedule` holds SCHEDULE_KEYS): ln σ_t = ½·ln((1 − ᾱ_t)/ᾱ_t). ᾱ_t is float32 in
    diffusers, as its pipelines use it; 1 − ᾱ_t is exact in float64 even where ᾱ_t ≈ 1."""
    alpha_bar = require_diffusers().DDPMScheduler(**schedule).alphas_cumprod.double()
    return 0.5 * torch.log((1 - alpha_bar) / alpha_bar)


class DiffusersVP(nn.Module):
    """F(x_in, c_noise, labels=None) of a VP UNet2DModel; see the module docstring.

    unet: UNet2DModel arguments; schedule: the scheduler fields of SCHEDULE_KEYS;
    prediction_type: what the UNet predicts; sigma_data: the σ_d of the EDMDenoiser around it.
    A UNet with num_class_embeds takes `labels` (B,) int64 as its class_labels, or the
    null_label where none are given; other conditioning is ignored. σ outside the table's
    range is evaluated at its nearest end (timestep 0 or T−1). Shapes: x_in (B, C, H, W),
    c_noise (B,).
    """

    def __init__(
        self,
        unet: dict,
        schedule: dict,
        prediction_type: str = "epsilon",
        sigma_data: float = SIGMA_DATA,
        null_label: int | None = None,
    ) -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}"
            )
        self.unet = require_diffusers().UNet2DModel(**unet)
        # computed in float64, kept in the network's dtype as a buffer that .to() carries (MPS
        # has no float64) and state_dict leaves out; float32 loses nothing at the table's
        # points: 4·c_noise with c_noise = fl(ln σ/4) is exactly fl(ln σ), so the σ of a
        # timestep gives back that integer timestep
        self.register_buffer("log_sigmas", vp_log_sigmas(schedule).float(), persistent=False)
        self.prediction_type = prediction_type
        self.sigma_data, self.null_label = sigma_data, null_label

    def timestep(self, log_sigma: torch.Tensor) -> torch.Tensor:
        """The fractional DDPM timestep whose ln σ_t is `log_sigma` (B,), clamped to [0, T−1]."""
        table = self.log_sigmas
        i = torch.searchsorted(table, log_sigma.detach()).clamp(1, len(table) - 1)
        lo, hi = table[i - 1], table[i]
        return ((i - 1) + (log_sigma - lo) / (hi - lo)).clamp(0, len(table) - 1)

    def class_labels(self, labels: torch.Tensor | None, batch: int, device) -> torch.Tensor | None:
        """What goes in as class_labels: the labels, the null label, or None (unconditional)."""
        if self.unet.config.num_class_embeds is None:
            return None
        if labels is not None:
            return labels
        if self.null_label is None:
            raise UserError(
                f"this diffusers UNet is class-conditional ({self.unet.config.num_class_embeds} "
                "class embeddings) and was given no labels; give labels, or import it with "
                "--null-label K to name the unconditional class"
            )
        return torch.full((batch,), self.null_label, dtype=torch.long, device=device)

    def forward(
        self, x_in: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None, **cond
    ) -> torch.Tensor:
        log_sigma = 4 * c_noise.to(self.log_sigmas.dtype)
        sigma = torch.exp(log_sigma)
        s = edm_scalings(sigma, x_in, self.sigma_data)
        sigma_col = batch_column(sigma, x_in)
        x_sigma = x_in / s.c_in
        sqrt_alpha_bar = 1 / torch.sqrt(1 + sigma_col**2)  # σ² = (1 − ᾱ)/ᾱ
        x_t = sqrt_alpha_bar * x_sigma
        t = self.timestep(log_sigma)
        class_labels = self.class_labels(labels, len(x_in), x_in.device)
        out = self.unet(x_t, t, class_labels=class_labels, return_dict=False)[0]
        if self.prediction_type == "epsilon":
            D = x_sigma - sigma_col * out
        elif self.prediction_type == "v_prediction":  # √(1 − ᾱ) = σ·√ᾱ, without cancellation
            D = sqrt_alpha_bar * x_t - sigma_col * sqrt_alpha_bar * out
        else:
            D = out
        return (D - s.c_skip * x_sigma) / s.c_out
