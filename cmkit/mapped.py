"""Training data that stays on disk: a .npy file memory-mapped and read a batch at a time.

A data set larger than memory (ImageNet-64 takes 60 GB as float32) trains from its .npy
file: the held-out split is a list of row numbers, the scaler is fitted on a seeded sample
of at most SAMPLE_BYTES of training rows, and each batch reads its rows from the map and
scales them, so memory holds a batch and the sample, not the data set. Rows are put in model
units as an in-memory copy is (float32, then the scaler), so a batch is bit for bit that
copy's rows; a file whose training rows fit in the sample trains exactly as it did when it
was loaded whole. Values are checked on the sample; a NaN elsewhere stops training at the
step that meets it, through the loop's NaN guard.
"""

from dataclasses import dataclass

import numpy as np
import torch

from cmkit.batch import Batch, Shard
from cmkit.data import Scaler, as_float32, holdout_index, map_npy, validate
from cmkit.errors import UserError

SAMPLE_BYTES = 64 * 2**20  # the scaler's sample, as float32


@dataclass(frozen=True)
class MappedRows:
    """The training rows `index` of `raw` (a memory map in the user's units), read as
    Batches in model units by `scaler`."""

    raw: np.ndarray
    index: np.ndarray
    scaler: Scaler

    def __len__(self) -> int:
        return len(self.index)

    def rows(self, idx: torch.Tensor, shard: Shard | None = None) -> Batch:
        """The training rows `idx`, read from disk into model units, C-contiguous like an
        in-memory copy (rows of a channels-last file are a transposed view until then)."""
        x = np.ascontiguousarray(self.raw[self.index[idx.numpy()]])
        return Batch(torch.from_numpy(self.scaler.to_model(as_float32(x))), shard=shard)

    def to(self, device: torch.device | str) -> "MappedRows":
        """Itself: rows stay on disk, and the loop moves each batch to the device."""
        return self


def sample_rows(index: np.ndarray, row_bytes: int, seed: int = 0) -> np.ndarray:
    """Every row of `index` when they fit in SAMPLE_BYTES as float32, else a seeded sample
    of as many as fit, ascending (reads in file order)."""
    count = max(1, SAMPLE_BYTES // row_bytes)
    if len(index) <= count:
        return index
    return np.sort(np.random.default_rng(seed).choice(index, count, replace=False))


def map_training_rows(
    spec: str, holdout: float, sigma_data: float, layout: str | None = None
) -> MappedRows:
    """A .npy file's training split with a scaler fitted (and values checked) on a sample."""
    raw = map_npy(spec, layout)
    train, _ = holdout_index(len(raw), holdout)
    row_bytes = 4 * int(np.prod(raw.shape[1:]))
    sample = sample_rows(train, row_bytes)
    if len(sample) == len(train):  # all of it: checked and fitted as a whole file is
        x = validate(np.asarray(raw), spec)
        return MappedRows(raw, train, Scaler.fit(x[train], sigma_data))
    x = as_float32(raw[sample])
    finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if not finite.all():
        row = int(sample[np.argmin(finite)])
        raise UserError(f"{spec}: row {row} holds NaN or inf (as float32); expected finite numbers")
    return MappedRows(raw, train, Scaler.fit(x, sigma_data))


def mapped_rows(spec: str, holdout: float, scaler: Scaler, layout: str | None) -> MappedRows:
    """A run's training split of a .npy file, with the scaler its config recorded."""
    raw = map_npy(spec, layout)
    return MappedRows(raw, holdout_index(len(raw), holdout)[0], scaler)
