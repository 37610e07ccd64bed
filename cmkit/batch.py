"""A batch is data plus optional conditioning, which reaches every network call.

Conditioning is a mapping of per-sample tensors (class labels, a guidance scale, …) that
travels beside x through losses, solvers, samplers and editing, and arrives at the plain
network as keyword arguments: `net(c_in·x, c_noise, **cond)`. Networks take what they use
and ignore the rest; an unconditional run passes the empty mapping and computes exactly
what it did before conditioning existed.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

Cond = Mapping[str, torch.Tensor]
NO_COND: Cond = MappingProxyType({})


@dataclass(frozen=True)
class Batch:
    """x0 (B, ...) in model units and its conditioning, each tensor with B rows."""

    x0: torch.Tensor
    cond: Cond = field(default_factory=lambda: NO_COND)

    def __post_init__(self) -> None:
        for key, value in self.cond.items():
            if len(value) != len(self.x0):
                raise ValueError(f"cond[{key!r}] has {len(value)} rows for {len(self.x0)} samples")

    def __len__(self) -> int:
        return len(self.x0)

    def rows(self, index: torch.Tensor) -> "Batch":
        """The samples at `index` (moved to the data's device first)."""
        index = index.to(self.x0.device)
        return Batch(self.x0[index], {k: v[index] for k, v in self.cond.items()})

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.x0.to(device), {k: v.to(device) for k, v in self.cond.items()})


def cond_rows(cond: Cond, start: int, stop: int, device: torch.device | str) -> Cond:
    """Rows start:stop of every conditioning tensor, on `device` (for chunked sampling)."""
    return {k: v[start:stop].to(device) for k, v in cond.items()}
