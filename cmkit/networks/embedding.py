"""Embeddings shared by the networks: of the noise level (chosen by name with
`make_embedding`), and of the conditioning: class labels, the guidance scale, and a flow
map's interval."""

import math

import torch
from torch import nn

EMBEDDINGS = ("positional", "fourier")
MAX_FREQ = 200.0  # the positional embedding's highest frequency (flow maps use less)


def _angle_dtype(freqs: torch.Tensor) -> torch.dtype:
    """float32 for float32 and half-precision nets, float64 for float64 ones, so that a
    float64 net (forward-mode AD checks) sees c_noise unrounded."""
    return torch.promote_types(freqs.dtype, torch.float32)


class SinusoidalEmbedding(nn.Module):
    """Map a scalar c_noise per sample to sin/cos features at geometric frequencies.

    The frequencies span [1, max_freq] because c_noise lives in a range of a few units
    (EDM: ln(σ)/4 ∈ [−1.6, 1.1]; flow: t ∈ [0, 1]) and must be resolved finely near σ_min.
    A loss that differentiates the network in time (a flow map's JVP) sees ∂/∂t scaled by up
    to max_freq, so flow maps take a lower one.
    Shapes: c_noise (B,) -> (B, dim).
    """

    def __init__(self, dim: int, max_freq: float = MAX_FREQ) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"embedding dim must be even, got {dim}")
        if not max_freq > 0:
            raise ValueError(f"max_freq must be > 0, got {max_freq}")
        freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), dim // 2))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        angles = c_noise.to(_angle_dtype(self.freqs))[:, None] * self.freqs[None, :]
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features cos/sin(2π·f_i·c_noise), f_i ~ N(0, scale²) (NCSN++'s
    FourierEmbedding in EDM, scale 16).

    The frequencies come from their own generator seeded with `seed`, so building one draws
    nothing from the global RNG (the other layers initialise as with the positional
    embedding), and are a persistent buffer, saved with the weights. Every op has a
    forward-mode rule, for sCM's JVP. Shapes: c_noise (B,) -> (B, dim).
    """

    def __init__(self, dim: int, scale: float = 16.0, seed: int = 0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"embedding dim must be even, got {dim}")
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", scale * torch.randn(dim // 2, generator=gen))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        angles = c_noise.to(_angle_dtype(self.freqs))[:, None] * (2 * math.pi * self.freqs)[None]
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def make_embedding(name: str, dim: int, max_freq: float = MAX_FREQ) -> nn.Module:
    """ "positional" (SinusoidalEmbedding up to max_freq, the default) or "fourier"
    (FourierEmbedding, whose frequencies are random)."""
    if name == "positional":
        return SinusoidalEmbedding(dim, max_freq)
    if name == "fourier":
        return FourierEmbedding(dim)
    raise ValueError(f"unknown embedding {name!r}; expected {' or '.join(map(repr, EMBEDDINGS))}")


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's guidance-scale embedding (diffusers' `get_guidance_scale_embedding`): e = 1000·w,
    f_i = exp(−ln(10⁴)·i/(h − 1)) for i < h = dim/2, features [sin(e·f), cos(e·f)], a zero
    column appended when dim is odd. Shapes: w (B,) -> (B, dim)."""
    half = dim // 2
    # in diffusers' order of float32 operations: at e = 1000·w ~ 10⁴, rounding shows at 1e-4
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=w.dtype) * -step).to(w.device)
    angles = (1000.0 * w)[:, None] * freqs[None, :]
    features = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return nn.functional.pad(features, (0, dim % 2))


class ConditionEmbedding(nn.Module):
    """What a network adds to its noise embedding for the sample's class, guidance scale and
    interval.

    num_classes K: a learned vector per class plus one for the null label ∅ = K, which
    classifier-free guidance needs and which stands in when no labels are given, so a
    conditional network also evaluates unconditionally. guidance_dim h: the guidance scale w
    (LCM's guided distillation) through `guidance_embedding` and a bias-free linear layer that
    starts at zero, so a student built from its teacher starts as the teacher at every w; with
    no w given, w = 0. interval: a flow map's second time input h = t − s (cmkit.flowmap), by
    a sinusoidal embedding (up to max_freq) and a linear layer that starts at zero (so a flow
    map starts as the velocity field of the same network); with no h given, h = 0, the
    instantaneous velocity.
    Shapes: emb (B, emb_dim), labels (B,) int64, guidance (B,), interval (B,) -> emb's.
    """

    def __init__(
        self,
        emb_dim: int,
        num_classes: int | None = None,
        guidance_dim: int | None = None,
        interval: bool = False,
        max_freq: float = MAX_FREQ,
    ) -> None:
        super().__init__()
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if guidance_dim is not None and guidance_dim < 4:
            raise ValueError(f"guidance_dim must be >= 4, got {guidance_dim}")
        self.num_classes, self.guidance_dim = num_classes, guidance_dim
        self.labels = None if num_classes is None else nn.Embedding(num_classes + 1, emb_dim)
        self.guidance = None
        if guidance_dim is not None:
            self.guidance = nn.Linear(guidance_dim, emb_dim, bias=False)
            nn.init.zeros_(self.guidance.weight)
        self.interval = None
        if interval:
            self.interval = nn.Sequential(
                SinusoidalEmbedding(emb_dim, max_freq), nn.Linear(emb_dim, emb_dim)
            )
            nn.init.zeros_(self.interval[1].weight)
            nn.init.zeros_(self.interval[1].bias)

    def forward(
        self,
        emb: torch.Tensor,
        labels: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        interval: torch.Tensor | None = None,
        **ignored,
    ) -> torch.Tensor:
        """The noise embedding emb (B, emb_dim) plus the conditioning's; other inputs of the
        batch's conditioning are not this network's and are ignored."""
        batch, device = emb.shape[0], emb.device  # not len(): torch.export keeps it symbolic
        if self.labels is not None:
            if labels is None:
                labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
            emb = emb + self.labels(labels).to(emb.dtype)
        if self.guidance is not None:
            w = torch.zeros(batch, device=device) if guidance is None else guidance.float()
            g = self.guidance(guidance_embedding(w.expand(batch), self.guidance_dim))
            emb = emb + g.to(emb.dtype)
        if self.interval is not None:
            h = torch.zeros(batch, device=device) if interval is None else interval.expand(batch)
            emb = emb + self.interval(h).to(emb.dtype)
        return emb
