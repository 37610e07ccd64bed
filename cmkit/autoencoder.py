"""A small KL autoencoder for latent consistency models, sized to train on 2 CPU cores.

The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, appendix G): a conv
encoder gives the mean and log-variance of C latent channels at 1/2^L of the image size, a
mirrored decoder maps a latent back, and training minimises the reconstruction error plus a
small KL weight β·KL(q(z|x) ‖ N(0, I)). Images are padded to a multiple of 4·2^L (edge pixels
repeated, centred: 28 → 32 is 2 pixels a side) so that latent sides are multiples of 4, and
cropped back after decoding, so any image size works; the padding is part of the model,
which takes and returns images of its size.

There is no perceptual or adversarial loss (they need pretrained networks, and nothing is
downloaded): the reconstruction loss is the squared error, which is what PSNR measures.
"""

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cmkit.batch import Batch
from cmkit.errors import UserError
from cmkit.runs import read_json, read_tensors
from cmkit.units import Scaler

CONFIG = "autoencoder.json"  # written last: a folder holding it is a finished autoencoder
WEIGHTS = "autoencoder.safetensors"
FORMAT = 1
# Latent sides are padded to a multiple of 4, so the latent UNet can halve them twice
# (MNIST: 28 → 32 pixels, 8×8 latents at 2^L = 4; digits: 8 pixels, 4×4 latents at 2)
LATENT_MULTIPLE = 4


@dataclass
class Posterior:
    """The encoder's diagonal Gaussian q(z|x): mean and log-variance, (B, C, h, w) each."""

    mean: torch.Tensor
    logvar: torch.Tensor

    def sample(self, eps: torch.Tensor) -> torch.Tensor:
        """z = μ + σ·ε, the reparameterised draw the decoder trains on."""
        return self.mean + torch.exp(0.5 * self.logvar) * eps

    def kl(self) -> torch.Tensor:
        """KL(q ‖ N(0, I)) per sample, (B,): ½ Σ (μ² + σ² − 1 − log σ²) over the latent."""
        terms = self.mean.square() + self.logvar.exp() - 1 - self.logvar
        return 0.5 * terms.flatten(1).sum(1)


def padding(size: int, multiple: int) -> tuple[int, int]:
    """(before, after) pixels that pad `size` up to a multiple of `multiple`, centred."""
    extra = -size % multiple
    return extra // 2, extra - extra // 2


def pad(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H', W') with H', W' multiples of `multiple`, edges repeated (for
    digits on a dark ground, the ground; for photographs, no artificial border)."""
    top, bottom = padding(x.shape[2], multiple)
    left, right = padding(x.shape[3], multiple)
    if top == bottom == left == right == 0:
        return x
    return F.pad(x, (left, right, top, bottom), mode="replicate")


def crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The centred (height, width) window of padded images: pad's inverse."""
    top = (x.shape[2] - height) // 2
    left = (x.shape[3] - width) // 2
    return x[:, :, top : top + height, left : left + width]


def latent_size(size: tuple[int, int], factor: int) -> tuple[int, int]:
    """(h, w) of the latent of (H, W) images: the padded size over the downsampling factor."""
    multiple = factor * LATENT_MULTIPLE
    return tuple(LATENT_MULTIPLE * math.ceil(side / multiple) for side in size)


def _norm(ch: int) -> nn.GroupNorm:
    """GroupNorm with the largest of 8, 4, 2, 1 groups that divides ch."""
    return nn.GroupNorm(next(g for g in (8, 4, 2, 1) if ch % g == 0), ch)


class _ResBlock(nn.Module):
    """norm → SiLU → conv, twice, plus the (1×1-projected) input. (B, i, H, W) -> (B, o, H, W)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _norm(in_ch),
            nn.SiLU(),
            nn.Conv2d(in_ch, out_ch, 3, padding=1),
            _norm(out_ch),
            nn.SiLU(),
            nn.Conv2d(out_ch, out_ch, 3, padding=1),
        )
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


def _head(ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))


class KLAutoencoder(nn.Module):
    """Encoder x (B, C_img, H, W) -> Posterior over z (B, C, h, w), decoder z -> x̂, with
    (h, w) = latent_size((H, W), 2^L): the padded size over 2^L.

    Widths: `channels`·mult[i] at level i (full size, then after each halving), one residual
    block per level and one in the middle, as LDM's encoder with attention left out (at 8×8
    latents and on 2 CPU cores, convolutions are what pays).
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        latent_channels: int = 4,
        levels: int = 2,
        channels: int = 16,
        channel_mult: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        mult = tuple(channel_mult or (1, *[2] * levels))
        if len(mult) != levels + 1:
            raise ValueError(f"channel_mult needs {levels + 1} entries, got {mult}")
        self.image_shape = tuple(image_shape)
        self.latent_channels, self.levels = latent_channels, levels
        widths = [channels * m for m in mult]
        self.encoder = self._encoder(image_shape[0], widths, 2 * latent_channels)
        self.decoder = self._decoder(latent_channels, widths, image_shape[0])

    @staticmethod
    def _encoder(in_ch: int, widths: list[int], out_ch: int) -> nn.Sequential:
        layers: list[nn.Module] = [nn.Conv2d(in_ch, widths[0], 3, padding=1)]
        for i, width in enumerate(widths):
            layers.append(_ResBlock(widths[max(i - 1, 0)], width))
            if i < len(widths) - 1:
                layers.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        return nn.Sequential(*layers, _ResBlock(widths[-1], widths[-1]), _head(widths[-1], out_ch))

    @staticmethod
    def _decoder(in_ch: int, widths: list[int], out_ch: int) -> nn.Sequential:
        top = widths[-1]
        layers: list[nn.Module] = [nn.Conv2d(in_ch, top, 3, padding=1), _ResBlock(top, top)]
        previous = top
        for i in reversed(range(len(widths))):
            layers.append(_ResBlock(previous, widths[i]))
            previous = widths[i]
            if i > 0:
                layers += [nn.Upsample(scale_factor=2), nn.Conv2d(previous, previous, 3, padding=1)]
        return nn.Sequential(*layers, _head(previous, out_ch))

    @property
    def factor(self) -> int:
        """2^L: how many pixels one latent position spans along each side."""
        return 2**self.levels

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        _, height, width = self.image_shape
        return self.latent_channels, *latent_size((height, width), self.factor)

    def encode(self, x: torch.Tensor) -> Posterior:
        """Images in model units [−1, 1] of the model's image shape -> q(z|x)."""
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"expected images of shape {self.image_shape}, got {x.shape[1:]}")
        mean, logvar = self.encoder(pad(x, self.factor * LATENT_MULTIPLE)).chunk(2, dim=1)
        return Posterior(mean, logvar.clamp(-30.0, 20.0))  # as LDM, so exp() stays finite

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images of the model's image shape, in model units."""
        _, height, width = self.image_shape
        return crop(self.decoder(z), height, width)


class Wrapped(nn.Module):
    """The autoencoder as the loop's `online` module: the loop averages `online.net` into
    the EMA, as it does the plain network of a denoiser or a consistency function."""

    def __init__(self, net: KLAutoencoder) -> None:
        super().__init__()
        self.net = net


@dataclass(frozen=True)
class AutoencoderLoss:
    """Squared reconstruction error of z ~ q(z|x) plus β·KL, per pixel: LDM's objective (its
    sums over each sample's pixels and latent elements) divided by the pixel count, so the
    loss reads as a mean squared error. The loop's loss call: (online, target, batch, step,
    generator) -> scalar; the noise ε is drawn through the batch, so a resumed run draws it
    again exactly."""

    kl_weight: float

    def __call__(self, online, target, batch: Batch, step: int, generator) -> torch.Tensor:
        ae: KLAutoencoder = online.net
        posterior = ae.encode(batch.x0)
        eps = batch.randn(ae.latent_shape, generator).to(batch.x0.device)
        x_hat = ae.decode(posterior.sample(eps))
        squared = (x_hat - batch.x0).square().flatten(1).sum(1)
        pixels = batch.x0[0].numel()
        return ((squared + self.kl_weight * posterior.kl()) / pixels).mean()


@torch.no_grad()
def reconstruct(ae: KLAutoencoder, x: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Decoded posterior means of images x (model units), chunk by chunk."""
    parts = [ae.decode(ae.encode(x[i : i + chunk]).mean) for i in range(0, len(x), chunk)]
    return torch.cat(parts) if parts else x.clone()


def psnr(mse: float, peak_to_peak: float = 2.0) -> float:
    """10·log10(peak² / MSE) in dB; images in model units span 2 (−1 to 1)."""
    return math.inf if mse == 0 else 10 * math.log10(peak_to_peak**2 / mse)


@dataclass
class AutoencoderConfig:
    """autoencoder.json: the architecture (KLAutoencoder's keyword arguments), the data it
    was trained on and its map to model units, the training settings. JSON only, so an
    autoencoder is rebuilt without unpickling anything."""

    architecture: dict
    data: dict  # spec, key, layout, holdout
    scaler: Scaler
    training: dict = field(default_factory=dict)  # steps, batch_size, lr, kl_weight, seed

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.architecture["image_shape"])

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "kind": "autoencoder",
            **asdict(self),
            "architecture": {**self.architecture, "image_shape": list(self.image_shape)},
            "scaler": self.scaler.to_dict(),
        }

    @classmethod
    def from_dict(cls, d, source: str) -> "AutoencoderConfig":
        if not isinstance(d, dict) or d.get("kind") != "autoencoder" or d.get("format") != FORMAT:
            raise UserError(f"{source} is not a cmkit autoencoder config (format {FORMAT})")
        try:
            return cls(
                dict(d["architecture"]),
                dict(d["data"]),
                Scaler.from_dict(d["scaler"]),
                dict(d.get("training", {})),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{source} is not a complete autoencoder config ({err!r})") from None


def build(architecture: dict) -> KLAutoencoder:
    """The autoencoder of an architecture record (lists from JSON become tuples)."""
    kwargs = dict(architecture)
    kwargs["image_shape"] = tuple(kwargs["image_shape"])
    if kwargs.get("channel_mult") is not None:
        kwargs["channel_mult"] = tuple(kwargs["channel_mult"])
    try:
        return KLAutoencoder(**kwargs)
    except (TypeError, ValueError) as err:
        raise UserError(f"autoencoder architecture {architecture} is unusable: {err}") from None


def load_autoencoder(folder: str | Path) -> tuple[AutoencoderConfig, KLAutoencoder]:
    """A folder written by `cmkit train-autoencoder`: its config and the model in eval mode,
    weights from safetensors only."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise UserError(
            f"{folder} is not a cmkit autoencoder folder (no {CONFIG}); train one with "
            "cmkit train-autoencoder"
        )
    config = AutoencoderConfig.from_dict(read_json(folder / CONFIG), str(folder / CONFIG))
    ae = build(config.architecture)
    try:
        ae.load_state_dict(read_tensors(folder / WEIGHTS))
    except RuntimeError as err:  # key and shape mismatches
        raise UserError(f"cannot load {folder / WEIGHTS}: {str(err).splitlines()[0]}") from None
    return config, ae.eval().requires_grad_(False)
