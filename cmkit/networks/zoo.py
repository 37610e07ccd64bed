"""The network zoo: default networks per data shape, the backbones, and building a spec.

A spec is config.NetworkSpec(type, kwargs); every network is a plain F(x, c_noise, **cond)
that knows nothing of σ or consistency (the wrappers in cmkit.param own the scalings).
"""

import torch
from torch import nn

from cmkit.config import NetworkSpec
from cmkit.errors import OptionError, UserError
from cmkit.networks.diffusers_unet import DiffusersUNet
from cmkit.networks.diffusers_vp import DiffusersVP
from cmkit.networks.mlp import MLP
from cmkit.networks.unet import UNet

BACKBONES = ("builtin", "diffusers-unet")
NETWORK_TYPES = ("mlp", "unet", "diffusers-unet", "diffusers-vp", "lora")
DIFFUSERS_TYPES = ("diffusers-unet", "diffusers-vp")  # each wraps a UNet2DModel


def build_network(spec: NetworkSpec) -> nn.Module:
    """Rebuild a plain network from its spec (type mlp, unet, diffusers-unet or diffusers-vp;
    lora: a base run's network with adapters, see cmkit.lora)."""
    kwargs = dict(spec.kwargs)
    if spec.type == "mlp":
        return MLP(**kwargs)
    if spec.type == "unet":
        kwargs["channel_mult"] = tuple(kwargs.get("channel_mult", (1, 2)))
        kwargs["attention_levels"] = tuple(kwargs.get("attention_levels", ()))
        return UNet(**kwargs)
    if spec.type == "diffusers-unet":
        return DiffusersUNet(**kwargs)
    if spec.type == "diffusers-vp":
        return DiffusersVP(**kwargs)
    if spec.type == "lora":
        from cmkit.lora import build_lora  # it reads runs, which build networks with this

        return build_lora(spec)
    raise UserError(
        f"unknown network type {spec.type!r}; expected {', '.join(map(repr, NETWORK_TYPES))}"
    )


def build_for_data(spec: NetworkSpec, shape: tuple[int, ...]) -> nn.Module:
    """The network, tried on one zero input of the data's shape (in eval mode, so no random
    numbers are drawn), so that a bad setting or an image size the network cannot take is
    reported now as a user error, not as a traceback from the first training step."""
    try:
        net = build_network(spec)
        with torch.no_grad():  # a label, for networks that need one (ignored by the others)
            net.eval()(torch.zeros(1, *shape), torch.zeros(1), labels=torch.zeros(1).long())
    except UserError:
        raise
    except (TypeError, ValueError, RuntimeError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise OptionError(
            "network", f"{spec.kwargs} does not fit data of shape {shape}: {reason}"
        ) from None
    return net.train()


def default_network(
    shape: tuple[int, ...],
    overrides: dict | None = None,
    backbone: str = "builtin",
    num_classes: int | None = None,
) -> NetworkSpec:
    """An MLP for vectors, a small UNet for images (two levels, or three from 32 px up),
    taking class labels 0..num_classes−1 (and the null label) when num_classes is given.

    backbone "diffusers-unet" puts a diffusers UNet2DModel of the same widths in the UNet's
    place (one ResNet per level, attention in the middle block), which export-diffusers needs.
    """
    if backbone not in BACKBONES:
        raise OptionError("backbone", f"{backbone!r} is unknown; expected {' or '.join(BACKBONES)}")
    if len(shape) == 1:
        if backbone != "builtin":
            raise OptionError("backbone", f"{backbone} needs images (C, H, W); got vectors {shape}")
        spec = NetworkSpec("mlp", {"dim": shape[0], "hidden": 256, "depth": 4})
    else:
        channels, height, width = shape
        deep = min(height, width) >= 32 and height % 4 == 0 and width % 4 == 0
        if backbone == "diffusers-unet":
            spec = NetworkSpec(backbone, _diffusers_unet_kwargs(shape, deep))
        else:
            mult = [1, 2, 2] if deep else [1, 2]
            spec = NetworkSpec(
                "unet", {"in_channels": channels, "channels": 32, "channel_mult": mult}
            )
    if num_classes is not None:
        key = "num_class_embeds" if backbone == "diffusers-unet" else "num_classes"
        spec.kwargs[key] = num_classes + (key == "num_class_embeds")  # + ∅ for diffusers
    spec.kwargs.update(overrides or {})
    return spec


def _diffusers_unet_kwargs(shape: tuple[int, ...], deep: bool) -> dict:
    channels, height, _ = shape
    widths = [32, 64, 64] if deep else [32, 64]
    return {
        "sample_size": height,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": widths,
        "down_block_types": ["DownBlock2D"] * len(widths),
        "up_block_types": ["UpBlock2D"] * len(widths),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "attention_head_dim": 8,
    }


NO_NULL_LABEL = (
    "needs the teacher's unconditional model, and this imported UNet has no null label; "
    "import it again with --null-label (its last class id, if it was trained with one)"
)


def has_null_label(spec: NetworkSpec) -> bool:
    """Whether a labelled network has the null label ∅ that classifier-free guidance needs:
    every network built here does; an imported one only if told which class it is."""
    if spec.type == "diffusers-vp":
        return spec.kwargs.get("null_label") is not None
    return True


def backbone_of(spec: NetworkSpec) -> str:
    """The backbone name of a network spec's type (diffusers-vp: an imported teacher's, which
    no other backbone starts from)."""
    return spec.type if spec.type in DIFFUSERS_TYPES else "builtin"
