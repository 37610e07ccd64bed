"""Noise-level embeddings shared by the networks."""

import math

import torch
from torch import nn


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
        angles = c_noise.float()[:, None] * self.freqs[None, :]
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
