"""A batch is data plus optional conditioning, which reaches every network call.

Conditioning is a mapping of per-sample tensors (class labels, a guidance scale, …) that
travels beside x through losses, solvers, samplers and editing, and arrives at the plain
network as keyword arguments: `net(c_in·x, c_noise, **cond)`. Networks take what they use
and ignore the rest; an unconditional run passes the empty mapping and computes exactly
what it did before conditioning existed.

In multi-process training a batch is one process's rows of the global batch (its `shard`),
and losses draw their per-sample randomness through `draw`, `randn` and `rand`: for every row
of the global batch, keeping this batch's, so the random stream does not depend on how many
processes share a step.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

import torch

Cond = Mapping[str, torch.Tensor]
NO_COND: Cond = MappingProxyType({})


@dataclass(frozen=True)
class Shard:
    """The rows `rows` of a global batch of `total` samples that one process trains on."""

    rows: slice
    total: int


@dataclass(frozen=True)
class Batch:
    """x0 (B, ...) in model units and its conditioning, each tensor with B rows; `shard`
    places them in the global batch (None: they are the whole batch)."""

    x0: torch.Tensor
    cond: Cond = field(default_factory=lambda: NO_COND)
    shard: Shard | None = None

    def __post_init__(self) -> None:
        for key, value in self.cond.items():
            if len(value) != len(self.x0):
                raise ValueError(f"cond[{key!r}] has {len(value)} rows for {len(self.x0)} samples")

    def __len__(self) -> int:
        return len(self.x0)

    def rows(self, index: torch.Tensor, shard: Shard | None = None) -> "Batch":
        """The samples at `index` (moved to the data's device first), placed by `shard`."""
        index = index.to(self.x0.device)
        return Batch(self.x0[index], {k: v[index] for k, v in self.cond.items()}, shard)

    def to(self, device: torch.device | str) -> "Batch":
        cond = {k: v.to(device) for k, v in self.cond.items()}
        return Batch(self.x0.to(device), cond, self.shard)

    def draw(self, sample: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """`sample(n)` with one row per sample of the global batch, cut to this batch's rows."""
        if self.shard is None:
            return sample(len(self))
        return sample(self.shard.total)[self.shard.rows]

    def randn(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """N(0, 1) of `shape` per sample, (B, *shape) float32 on the CPU, drawn as `draw` does."""
        return self.draw(lambda n: torch.randn((n, *shape), generator=generator))

    def rand(self, generator: torch.Generator) -> torch.Tensor:
        """U(0, 1) per sample, (B,) float32 on the CPU, drawn as `draw` does."""
        return self.draw(lambda n: torch.rand(n, generator=generator))


def cond_rows(cond: Cond, start: int, stop: int, device: torch.device | str) -> Cond:
    """Rows start:stop of every conditioning tensor, on `device` (for chunked sampling)."""
    return {k: v[start:stop].to(device) for k, v in cond.items()}


class Samples(Protocol):
    """What training draws its batches from: a Batch of every sample, or rows read from disk
    a batch at a time (cmkit.mapped.MappedRows)."""

    def __len__(self) -> int: ...

    def rows(self, index: torch.Tensor, shard: Shard | None = None) -> Batch: ...

    def to(self, device: torch.device | str) -> "Samples": ...
