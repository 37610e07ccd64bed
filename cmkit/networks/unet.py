"""A small, plain UNet F(x, c_noise) used as the backbone of EDM teachers and consistency models.

It knows nothing of σ: callers pass an already-scaled input and a per-sample c_noise, and
apply their own preconditioning (c_skip, c_out, c_in) around it.
"""

import torch
import torch.nn.functional as F
from torch import nn

from cmkit.networks.embedding import MAX_FREQ, ConditionEmbedding, make_embedding


def _norm(ch: int) -> nn.GroupNorm:
    """GroupNorm with the largest of 8, 4, 2, 1 groups that divides ch, so any width works."""
    groups = next(g for g in (8, 4, 2, 1) if ch % g == 0)
    return nn.GroupNorm(groups, ch)


def _zero(module: nn.Conv2d) -> nn.Conv2d:
    """Zero a conv so the residual branch (or the network output) it ends starts at zero."""
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√C)·v, written out rather than F.scaled_dot_product_attention: the fused
    CUDA kernels SDPA picks (flash, memory-efficient) have no forward-mode AD rule, so
    torch.func.jvp (sCM) fails through them; this is SDPA's math path, equal to ~1e-7 in
    float32, at the cost of an (H·W)² matrix per sample. Shapes: (B, N, C) each -> (B, N, C).
    """
    weights = torch.softmax(q @ k.transpose(1, 2) * q.shape[-1] ** -0.5, dim=-1)
    return weights @ v


class Attention(nn.Module):
    """Single-head self-attention over the H·W positions, residual. Shapes: (B, C, H, W) -> same."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3).unbind(1)
        out = attention(q, k, v)  # (B, H·W, C)
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


class ResBlock(nn.Module):
    """Residual conv block conditioned on the noise embedding by adaptive GroupNorm.

    The embedding sets a per-channel scale and shift after the second norm, which conditions
    every block more strongly than adding a bias. The last conv starts at zero, so the block
    starts as its skip path. Optional attention follows. Shapes: x (B, in_ch, H, W),
    emb (B, emb_dim) -> (B, out_ch, H, W).
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, attn: bool) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.attn = Attention(out_ch) if attn else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.attn(self.skip(x) + h)


class Upsample(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv to the finer level's width (no checkerboard).

    Shapes: (B, in_ch, H, W) -> (B, out_ch, 2H, 2W).
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """UNet F(x, c_noise) -> tensor of x's shape; the output conv starts at zero, so F starts at 0.

    Level i runs at resolution 2**-i of the input with channels * channel_mult[i] channels;
    attention_levels lists the levels (0 = full resolution) whose ResBlocks get self-attention;
    listing the lowest level also puts attention in the middle block. embedding: the c_noise
    features, "positional" (sinusoidal up to max_freq, the default) or "fourier" (see
    networks.embedding).
    num_classes, guidance_dim and interval add the `labels`, `guidance` and `interval` inputs,
    summed into the noise embedding (networks.embedding.ConditionEmbedding).
    Every op has a forward-mode AD rule on CPU and CUDA, so torch.func.jvp runs through it.
    Shapes: x (B, in_channels, H, W) with H, W divisible by 2**(levels-1), c_noise (B,).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int = 32,
        channel_mult: tuple[int, ...] = (1, 2),
        num_res_blocks: int = 1,
        attention_levels: tuple[int, ...] = (),
        emb_dim: int = 128,
        dropout: float = 0.0,
        embedding: str = "positional",
        num_classes: int | None = None,
        guidance_dim: int | None = None,
        interval: bool = False,
        max_freq: float = MAX_FREQ,
    ) -> None:
        super().__init__()
        levels = len(channel_mult)
        if levels == 0:
            raise ValueError("UNet needs a non-empty channel_mult, got ()")
        if num_res_blocks < 1:
            raise ValueError(f"UNet needs num_res_blocks >= 1, got {num_res_blocks}")
        bad = [a for a in attention_levels if not 0 <= a < levels]
        if bad:
            raise ValueError(f"attention_levels must lie in [0, {levels - 1}], got {bad}")
        self.in_channels = in_channels
        self.levels = levels
        self.freq_embed = make_embedding(embedding, channels, max_freq)
        self.emb_mlp = nn.Sequential(
            nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim), nn.SiLU()
        )
        self.cond = ConditionEmbedding(emb_dim, num_classes, guidance_dim, interval, max_freq)
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        def block(cin: int, cout: int, attn: bool) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout, attn)

        # Down path: each ResBlock's output is kept as a skip for the matching up ResBlock.
        self.down = nn.ModuleList()
        skip_chs, ch = [], channels
        for i, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(block(ch, channels * mult, i in attention_levels))
                ch = channels * mult
                skip_chs.append(ch)
            if i < levels - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))

        self.mid = nn.ModuleList(
            [block(ch, ch, levels - 1 in attention_levels), block(ch, ch, False)]
        )

        # Up path: each ResBlock consumes one skip (concatenated on channels).
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks):
                self.up.append(block(ch + skip_chs.pop(), channels * mult, i in attention_levels))
                ch = channels * mult
            if i > 0:
                self.up.append(Upsample(ch, channels * channel_mult[i - 1]))
                ch = channels * channel_mult[i - 1]

        self.out_norm = _norm(ch)
        self.conv_out = _zero(nn.Conv2d(ch, in_channels, 3, padding=1))

    def _check(self, x: torch.Tensor, c_noise: torch.Tensor) -> None:
        """Reject bad shapes here with a one-line message rather than deep inside a conv."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet expects x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        div = 2 ** (self.levels - 1)
        if x.shape[2] % div or x.shape[3] % div:
            raise ValueError(
                f"UNet with {self.levels} levels needs H and W divisible by {div}, "
                f"got {x.shape[2]}x{x.shape[3]}"
            )
        if tuple(c_noise.shape) != (x.shape[0],):
            raise ValueError(
                f"UNet expects c_noise of shape ({x.shape[0]},), got {tuple(c_noise.shape)}"
            )

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, **cond) -> torch.Tensor:
        """x (B, C, H, W), c_noise (B,), cond: labels (B,), guidance (B,) -> (B, C, H, W)."""
        self._check(x, c_noise)
        emb = self.cond(self.emb_mlp(self.freq_embed(c_noise).to(x.dtype)), **cond)
        h = self.conv_in(x)
        skips = []
        for module in self.down:
            if isinstance(module, ResBlock):
                h = module(h, emb)
                skips.append(h)
            else:
                h = module(h)
        for module in self.mid:
            h = module(h, emb)
        for module in self.up:
            if isinstance(module, ResBlock):
                h = module(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = module(h)
        return self.conv_out(F.silu(self.out_norm(h)))
