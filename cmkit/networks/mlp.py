"""A residual MLP F(x, c_noise) for vector data such as 2-D toys."""

import torch
from torch import nn

from cmkit.networks.embedding import MAX_FREQ, ConditionEmbedding, make_embedding


class ResidualBlock(nn.Module):
    """h + Linear(SiLU(Linear(SiLU(LayerNorm(h)) + emb))): the embedding enters every block."""

    def __init__(self, hidden: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(emb_dim, hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        a = nn.functional.silu(self.fc1(self.norm(h)) + self.emb(emb))
        return h + self.fc2(self.drop(nn.functional.silu(a)))


class MLP(nn.Module):
    """Residual MLP over (B, D) vectors with a noise embedding. Output (B, D).

    embedding: "positional" (sinusoidal, the default) or "fourier" (random Fourier features,
    see networks.embedding; max_freq: the positional one's highest frequency); both run under
    forward-mode AD (torch.func.jvp). num_classes and guidance_dim add the `labels` and
    `guidance` inputs, interval a flow map's `interval` (networks.embedding.ConditionEmbedding).
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        depth: int = 4,
        emb_dim: int = 64,
        dropout: float = 0.0,
        embedding: str = "positional",
        num_classes: int | None = None,
        guidance_dim: int | None = None,
        interval: bool = False,
        max_freq: float = MAX_FREQ,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.embed = nn.Sequential(
            make_embedding(embedding, emb_dim, max_freq), nn.Linear(emb_dim, emb_dim), nn.SiLU()
        )
        self.cond = ConditionEmbedding(emb_dim, num_classes, guidance_dim, interval, max_freq)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(ResidualBlock(hidden, emb_dim, dropout) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, **cond) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLP expects input of shape (B, {self.dim}), got {tuple(x.shape)}")
        emb = self.cond(self.embed(c_noise), **cond)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)
