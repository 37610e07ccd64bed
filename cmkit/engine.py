"""How the loop computes a step: in how many processes, in which precision, compiled or not.

The loss stays the same callable; while it computes, the online wrapper's plain network is
called through its training form (DistributedDataParallel and/or torch.compile of it), and
the network forwards run under bf16 autocast when asked. Master weights, the optimiser, the
EMA, the scalings and the loss stay float32: autocast lowers only matmuls and convolutions,
whose outputs meet float32 scalings and so come back to float32 (the loss is cast too).
Checkpoints, the EMA and the target keep seeing the plain network.
"""

import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from cmkit.distributed import World
from cmkit.errors import OptionError

PRECISIONS = ("fp32", "bf16")


@dataclass
class Engine:
    """world: the processes sharing each step; autocast: the dtype of the network forwards
    (None: float32); forward: what the online network's calls go through (None: itself)."""

    world: World = field(default_factory=World)
    autocast: torch.dtype | None = None
    forward: nn.Module | None = None

    @contextmanager
    def computing(self, online: nn.Module, seed: int, step: int) -> Iterator[None]:
        """The context of one loss evaluation of `online` at `step`.

        With several processes each draws its dropout masks from a device RNG seeded by
        (seed, step, rank): masks differ between the processes' rows, as they would in one
        batch, and a run resumed at any step draws the masks it would have drawn."""
        if self.world.size > 1:
            torch.manual_seed(hash((seed, step, self.world.rank)) % 2**63)
        device = self.world.device.type
        autocast = (
            nullcontext() if self.autocast is None else torch.autocast(device, dtype=self.autocast)
        )
        plain = online.net
        if self.forward is not None:
            online.net = self.forward
        try:
            with autocast:
                yield
        finally:
            online.net = plain


def check_precision(precision: str, device: str) -> torch.dtype | None:
    """The autocast dtype of `precision` on `device` (None for fp32), refusing in one line a
    device that has no bf16 autocast."""
    if precision not in PRECISIONS:
        raise OptionError("precision", f"must be 'fp32' or 'bf16', got {precision!r}")
    if precision == "fp32":
        return None
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise OptionError("precision", f"bf16: {device} has no bf16 support")
    if kind not in ("cpu", "cuda"):
        raise OptionError("precision", f"bf16 autocast runs on cpu or cuda, not {kind}")
    return torch.bfloat16


def precision_notice(device: str) -> str | None:
    """What a user of bf16 on this device should know before training (a CPU: that it is
    slower, never a silent no-op), or None."""
    if torch.device(device).type != "cpu":
        return None
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return "cmkit: bf16 autocast on a CPU may be slower than fp32; measure it"
    return (
        "cmkit: this CPU has no bf16 units (AVX512-BF16 or AMX): bf16 autocast will be slower "
        "than fp32 here; it pays off on recent GPUs"
    )


def make_engine(
    world: World, net: nn.Module, precision: str, compile_forward: bool = False
) -> Engine:
    """The engine of a run whose online network is `net`: DDP around it with several
    processes, torch.compile around that when asked (the batch shape is fixed and times
    arrive as tensors, so it compiles once), bf16 autocast for precision "bf16"."""
    autocast = check_precision(precision, str(world.device))
    notice = precision_notice(str(world.device)) if autocast is not None else None
    if notice is not None and world.main:
        print(notice, file=sys.stderr)
    forward = world.wrap(net) if world.size > 1 else None
    if compile_forward:
        forward = torch.compile(net if forward is None else forward, dynamic=False)
    return Engine(world, autocast, forward)
