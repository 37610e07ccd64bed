"""Jacobian-vector products of a network: exact forward-mode AD, or a finite difference.

Continuous-time consistency training needs dF/dt along the PF-ODE, one JVP of the network per
step (Lu & Song 2024). `torch.func.jvp` computes it exactly in one forward pass carrying
tangents; the central difference (two forwards at ±h along the tangent) is the fallback for a
layer without a forward-mode rule (NVlabs/FastGen offers both), at O(h²) truncation error.
"""

from collections.abc import Callable

import torch

from cmkit.rng import device_rng_state, set_device_rng_state

JVP_METHODS = ("exact", "finite-difference")
FD_STEP = 1e-3  # h of the central difference, relative to the tangent's scale


def jvp(
    fn: Callable[..., torch.Tensor],
    primals: tuple[torch.Tensor, ...],
    tangents: tuple[torch.Tensor, ...],
    method: str = "exact",
    h: float = FD_STEP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(*primals), J·tangents) without building a backward graph.

    Dropout masks: the caller fixes the RNG state; the finite difference draws the masks of
    both of its forwards from that same state, so they agree with each other and with fn."""
    if method == "exact":
        with torch.no_grad():
            return torch.func.jvp(fn, primals, tangents)
    if method == "finite-difference":
        return _central_difference(fn, primals, tangents, h)
    raise ValueError(f"unknown jvp method {method!r}; expected {' or '.join(JVP_METHODS)}")


@torch.no_grad()
def _central_difference(fn, primals, tangents, h: float):
    device = primals[0].device
    state = device_rng_state(device)

    def at(sign: float) -> torch.Tensor:
        set_device_rng_state(state, device)
        return fn(*(p + sign * h * v for p, v in zip(primals, tangents, strict=True)))

    plus, minus = at(1.0), at(-1.0)
    value = at(0.0)
    return value, (plus - minus) / (2 * h)
