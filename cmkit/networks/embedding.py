"""Noise-level embeddings shared by the networks, chosen by name with `make_embedding`."""

import math

import torch
from torch import nn

EMBEDDINGS = ("positional", "fourier")


def _angle_dtype(freqs: torch.Tensor) -> torch.dtype:
    """float32 for float32 and half-precision nets, float64 for float64 ones, so that a
    float64 net (forward-mode AD checks) sees c_noise unrounded."""
    return torch.promote_types(freqs.dtype, torch.float32)


class SinusoidalEmbedding(nn.Module):
    """Map a scalar c_noise per sample to sin/cos features at geometric frequencies.

    The frequencies span [1, max_freq] because c_noise lives in a range of a few units
    (EDM: ln(σ)/4 ∈ [−1.6, 1.1]; flow: t ∈ [0, 1]) and must be resolved finely near σ_min.
    Shapes: c_noise (B,) -> (B, dim).
    """

    def __init__(self, dim: int, max_freq: float = 200.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"embedding dim must be even, got {dim}")
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


def make_embedding(name: str, dim: int) -> nn.Module:
    """ "positional" (SinusoidalEmbedding, the default) or "fourier" (FourierEmbedding)."""
    if name == "positional":
        return SinusoidalEmbedding(dim)
    if name == "fourier":
        return FourierEmbedding(dim)
    raise ValueError(f"unknown embedding {name!r}; expected {' or '.join(map(repr, EMBEDDINGS))}")
