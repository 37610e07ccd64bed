"""The latent space of a latent consistency model (LCM, Luo et al. 2023): a run trains on an
autoencoder's latents instead of pixels, and decodes what it samples.

Images in model units [−1, 1] are encoded to the posterior mean of q(z|x), not a draw from
it, so encoding is deterministic: a student distilled from a latent teacher re-encodes the
teacher's data to the same latents, bit for bit. The latents are scaled by s = σ_data / std(z)
(std over every value of the encoded training split), so the network sees latents of std
σ_data as it sees vectors of std σ_data, which is what the EDM preconditioning assumes (EDM2,
Karras et al. 2024, scales its latents so); with σ_data = 1 it is latent diffusion's 1/std.

The autoencoder is cmkit's own (`--latent DIR`, from `cmkit train-autoencoder`) or a diffusers
AutoencoderKL folder (`--vae DIR`: config.json and diffusion_pytorch_model.safetensors, read
with cmkit's safetensors reader; a folder with pickled weights only is refused unread, and
nothing is downloaded). A run records which one (folder, sha256 of the weights) and s in its
data section (config.LatentSection); a run whose autoencoder has changed since is refused.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from cmkit import autoencoder
from cmkit.autoencoder import LATENT_MULTIPLE, Posterior, crop, latent_size, pad
from cmkit.batch import Batch, Samples
from cmkit.config import LatentSection
from cmkit.errors import OptionError, UserError
from cmkit.networks.diffusers_unet import require_diffusers
from cmkit.runs import read_tensors

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # weights that only unpickling reads
CHUNK = 256  # images encoded or latents decoded per forward
FLAGS = {"builtin": "latent", "diffusers": "vae"}  # the option naming each kind


@dataclass(frozen=True)
class Source:
    """The autoencoder a user chose: kind "builtin" (--latent) or "diffusers" (--vae), and the
    folder holding its weights."""

    kind: str
    path: Path


def source(latent: str | None, vae: str | None) -> Source | None:
    """The autoencoder of --latent or --vae (None: a pixel run), checked to be a folder; a
    pipeline folder given to --vae means its vae/ subfolder."""
    if latent is not None and vae is not None:
        raise UserError("--latent and --vae both choose the autoencoder; pass one")
    if latent is None and vae is None:
        return None
    kind, folder = ("builtin", latent) if latent is not None else ("diffusers", vae)
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise OptionError(FLAGS[kind], f"{folder} is not a folder; expected {_expected(kind)}")
    if kind == "diffusers" and not (path / "config.json").is_file() and (path / "vae").is_dir():
        path = path / "vae"
    return Source(kind, path.resolve())


def _expected(kind: str) -> str:
    if kind == "builtin":
        return "a folder written by cmkit train-autoencoder"
    return f"a diffusers AutoencoderKL folder (config.json, {DIFFUSERS_WEIGHTS})"


class DiffusersVAE(nn.Module):
    """A diffusers AutoencoderKL behind the built-in autoencoder's interface: encode(x) ->
    Posterior, decode(z) -> x, for images of `image_shape`, padded as the built-in pads them
    (to a multiple of 4·2^(levels−1)) and cropped back."""

    def __init__(self, vae: nn.Module, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.vae, self.image_shape = vae, tuple(image_shape)
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.vae.config.latent_channels, *latent_size(self.image_shape[1:], self.factor)

    def encode(self, x: torch.Tensor) -> Posterior:
        dist = self.vae.encode(pad(x, self.factor * LATENT_MULTIPLE)).latent_dist
        return Posterior(dist.mean, dist.logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return crop(self.vae.decode(z).sample, *self.image_shape[1:])


def weights_file(src: Source) -> Path:
    """The file whose sha256 the run records; a diffusers folder holding pickled weights and
    no safetensors is refused here, before anything reads them."""
    if src.kind == "builtin":
        return src.path / autoencoder.WEIGHTS
    weights = src.path / DIFFUSERS_WEIGHTS
    if weights.is_file():
        return weights
    pickled = sorted(p.name for p in src.path.iterdir() if p.suffix.lower() in PICKLED)
    if pickled:
        raise OptionError(
            "vae",
            f"{src.path} holds pickled weights ({', '.join(pickled)}), which cmkit does not "
            f"read; save the model with save_pretrained(safe_serialization=True) to get "
            f"{DIFFUSERS_WEIGHTS}",
        )
    raise OptionError(
        "vae", f"{src.path} has no {DIFFUSERS_WEIGHTS}; expected {_expected('diffusers')}"
    )


def load_vae(src: Source, image_shape: tuple[int, int, int]) -> DiffusersVAE:
    """The folder's AutoencoderKL: built from config.json, weights from safetensors."""
    weights = weights_file(src)
    diffusers = require_diffusers()
    try:
        config = json.loads((src.path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise OptionError("vae", f"cannot read {src.path / 'config.json'}: {err}") from None
    if not isinstance(config, dict) or config.get("_class_name") != "AutoencoderKL":
        found = config.get("_class_name") if isinstance(config, dict) else None
        raise OptionError("vae", f"{src.path} describes {found!r}; expected an AutoencoderKL")
    if config.get("in_channels", 3) != image_shape[0]:
        raise OptionError(
            "vae",
            f"{src.path} encodes images of {config.get('in_channels', 3)} channels; the data's "
            f"have {image_shape[0]}",
        )
    try:
        vae = diffusers.AutoencoderKL.from_config(config)
        tensors = dict(read_tensors(weights))
        # files saved by diffusers before 0.14 name attention weights query/key/value
        rename = getattr(vae, "_fix_state_dict_keys_on_load", None)
        vae.load_state_dict(tensors if rename is None else rename(tensors))
    except (RuntimeError, TypeError, ValueError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise OptionError(
            "vae", f"cannot build the AutoencoderKL of {src.path}: {reason}"
        ) from None
    return DiffusersVAE(vae, image_shape).eval().requires_grad_(False)


def open_autoencoder(src: Source, image_shape: tuple[int, ...]) -> nn.Module:
    """The autoencoder of `src` for images of `image_shape` (C, H, W), in eval mode."""
    if len(image_shape) != 3:
        raise OptionError(FLAGS[src.kind], f"needs image data (C, H, W); got vectors {image_shape}")
    if src.kind == "diffusers":
        return load_vae(src, image_shape)
    config, ae = autoencoder.load_autoencoder(src.path)
    if config.image_shape != tuple(image_shape):
        raise OptionError(
            "latent",
            f"{src.path} was trained on images of shape {config.image_shape}; the data's are "
            f"{tuple(image_shape)}",
        )
    return ae


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


class Codec(nn.Module):
    """Images in model units <-> the latents a latent run's network sees (z·s), in chunks of
    CHUNK, without gradients. Shapes: (N, *image_shape) <-> (N, *latent_shape)."""

    def __init__(self, ae: nn.Module, scaling_factor: float = 1.0) -> None:
        super().__init__()
        self.ae, self.scaling_factor = ae, scaling_factor

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The scaled posterior means μ(x)·s."""
        device = next(self.ae.parameters()).device
        parts = [self.ae.encode(x.to(device)).mean.cpu() for x in images.split(CHUNK)]
        return torch.cat(parts) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images decoded from scaled latents: D(z / s), on the latents' device."""
        return torch.cat([self.ae.decode(z / self.scaling_factor) for z in latents.split(CHUNK)])


def encode_rows(codec: Codec, pixels: Samples) -> Batch:
    """Every row of `pixels` (a Batch, or rows read from disk) encoded, its conditioning kept."""
    parts, conds = [], []
    starts = range(0, len(pixels), CHUNK)
    for start in tqdm(starts, desc="encoding", unit="chunk", disable=None, leave=False):
        rows = pixels.rows(torch.arange(start, min(start + CHUNK, len(pixels))))
        parts.append(codec.encode(rows.x0))
        conds.append(rows.cond)
    cond = {key: torch.cat([c[key] for c in conds]) for key in conds[0]}
    return Batch(torch.cat(parts), cond)


def fit(
    src: Source, pixels: Samples, image_shape: tuple[int, ...], sigma_data: float
) -> tuple[Batch, LatentSection]:
    """A new run's training latents and its latent section: s = σ_data / std of the
    encoded training split (to 4 significant digits, so a resumed run, which encodes again,
    finds the same s whatever the rounding of its convolutions)."""
    ae = open_autoencoder(src, image_shape)
    weights = weights_file(src)
    unscaled = encode_rows(Codec(ae), pixels)
    std = float(unscaled.x0.double().std())
    if not std > 0:
        raise UserError(f"the autoencoder in {src.path} encodes every training image alike")
    s = float(f"{sigma_data / std:.4g}")
    entry = LatentSection(src.kind, str(src.path), sha256(weights), s, tuple(image_shape))
    return Batch(unscaled.x0 * s, unscaled.cond), entry


def load_codec(entry: LatentSection) -> Codec:
    """The codec a latent run recorded, if its autoencoder's weights are still the same."""
    src = Source(entry.kind, Path(entry.path))
    if not src.path.is_dir():
        raise UserError(f"this run's autoencoder folder {src.path} is missing")
    weights = weights_file(src)
    if not weights.is_file():
        raise UserError(f"this run's autoencoder weights {weights} are missing")
    found = sha256(weights)
    if found != entry.sha256:
        raise UserError(
            f"{weights} changed since this run was trained (sha256 {found[:12]}…, the run's "
            f"{entry.sha256[:12]}…); its latents came from the old autoencoder: restore it or "
            "train the run again"
        )
    return Codec(open_autoencoder(src, entry.image_shape), entry.scaling_factor)


def run_latents(entry: LatentSection, pixels: Samples) -> Batch:
    """A recorded run's training latents: its images encoded and scaled as when it started."""
    return encode_rows(load_codec(entry), pixels)
