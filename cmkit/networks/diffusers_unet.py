"""A `diffusers.UNet2DModel` as a cmkit backbone F(x, c_noise), so a run exports to diffusers.

diffusers' ConsistencyModelPipeline feeds its UNet the timestep 250·ln(σ) as a float tensor;
cmkit's wrappers pass c_noise = ln(σ)/4, so the adapter multiplies by 1000 and the two
compute the same function. The import of diffusers happens when a network is built, never
when cmkit is imported: diffusers is an optional extra.
"""

import torch
from torch import nn

from cmkit.errors import UserError

TIMESTEP_PER_C_NOISE = 1000.0  # 250·ln σ = 1000 · (ln σ / 4)


def require_diffusers():
    """The diffusers module, or a UserError saying how to install it."""
    try:
        import diffusers
    except ImportError:
        raise UserError(
            "the diffusers backbone and export need the diffusers package; "
            "install it with pip install 'cmkit[diffusers]'"
        ) from None
    return diffusers


class DiffusersUNet(nn.Module):
    """F(x, c_noise) = UNet2DModel(x, 1000·c_noise). Shapes: x (B, C, H, W), c_noise (B,).

    The timestep goes in as a float tensor: UNet2DModel truncates a Python float to an integer.
    With num_class_embeds = K + 1 the `labels` input goes in as class_labels, the last class
    being the null label ∅ = K that stands in when no labels are given (as in the built-in
    networks).
    """

    def __init__(self, **unet_kwargs) -> None:
        super().__init__()
        self.unet = require_diffusers().UNet2DModel(**unet_kwargs)
        classes = unet_kwargs.get("num_class_embeds")
        self.null_label = None if classes is None else classes - 1

    def forward(
        self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None, **cond
    ) -> torch.Tensor:
        if self.null_label is None:
            labels = None  # an unconditional UNet2DModel takes no class_labels
        elif labels is None:
            labels = torch.full((len(x),), self.null_label, dtype=torch.long, device=x.device)
        timestep = TIMESTEP_PER_C_NOISE * c_noise
        return self.unet(x, timestep, class_labels=labels, return_dict=False)[0]
