"""Training data that stays on disk: a .npy file read a batch of rows at a time.

A data set larger than memory (ImageNet-64 takes 60 GB as float32) trains from its .npy
file: the held-out split is a list of row numbers, the scaler is fitted on a seeded sample
of at most SAMPLE_BYTES of training rows, and each batch reads its rows from the file and
scales them, so memory holds a batch and the sample, not the data set. Rows are put in model
units as an in-memory copy is (float32, then the scaler), so a batch is bit for bit that
copy's rows; a file whose training rows fit in the sample trains exactly as it did when it
was loaded whole. Values are checked on the sample; a NaN elsewhere stops training at the
step that meets it, through the loop's NaN guard.

Rows are read with explicit reads at header + row · row bytes (NpyRows), not through a memory
map. Every page of a map that is touched joins the process's resident set and stays there,
and a fault maps the pages around it too: the seeded sample alone mapped 0.8 GB of a 2 GB
file, and random batches add pages until all of it is resident. A read puts the bytes in
the page cache, which the kernel shares and reclaims and which is not the process's RSS, and
copies only the rows asked for (peak RSS training on that file: 547 MiB, 1170 MiB mapped).
A Fortran-order file stores each row's values N apart across the whole file, so no few reads
fetch a row: it is read through its map (FortranRows), whose pages may count up to its size.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from cmkit.batch import Batch, Shard
from cmkit.data import as_float32, holdout_index, map_npy, validate
from cmkit.errors import UserError
from cmkit.units import Scaler

SAMPLE_BYTES = 64 * 2**20  # the scaler's sample, as float32


@dataclass(frozen=True)
class NpyRows:
    """The rows of a C-order .npy file, read by number with explicit reads. `stored` is the
    array's shape in the file; `shape` is (N, D) or (N, C, H, W), as rows are returned."""

    path: Path
    offset: int  # bytes before row 0: the header
    stored: tuple[int, ...]
    dtype: np.dtype
    channels_last: bool  # rows stored (H, W, C), returned (C, H, W)

    @property
    def shape(self) -> tuple[int, ...]:
        n, *rest = self.stored
        return (n, rest[2], rest[0], rest[1]) if self.channels_last else self.stored

    @property
    def row_bytes(self) -> int:
        return self.dtype.itemsize * int(np.prod(self.stored[1:]))

    def __len__(self) -> int:
        return self.stored[0]

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The rows `rows` in that order (repeats too), C-contiguous in the file's dtype. Each
        distinct row is read once and in file order, one read per run of consecutive rows; the
        file is opened per call (microseconds), so no position or descriptor is shared."""
        wanted, order = np.unique(rows, return_inverse=True)
        x = np.empty((len(wanted), *self.stored[1:]), self.dtype)
        buffer, size = memoryview(x.reshape(-1).view(np.uint8)), self.row_bytes
        try:
            with open(self.path, "rb", buffering=0) as f:
                for start, stop in runs(wanted):
                    f.seek(self.offset + int(wanted[start]) * size)
                    read_into(f, buffer[start * size : stop * size], self.path)
        except OSError as e:
            raise UserError(f"cannot read the training data {self.path}: {e.strerror}") from None
        x = x[order]
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if self.channels_last else x


@dataclass(frozen=True)
class FortranRows:
    """The rows of a Fortran-order .npy file read through its memory map, `view` (N, D) or
    (N, C, H, W): the one layout whose rows explicit reads cannot fetch (module docstring)."""

    view: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.view.shape

    def __len__(self) -> int:
        return len(self.view)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The rows `rows` in that order, C-contiguous in the file's dtype."""
        return np.ascontiguousarray(self.view[rows])


def runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) positions of each run of consecutive numbers in ascending `rows`."""
    cuts = (np.flatnonzero(np.diff(rows) != 1) + 1).tolist()
    edges = [0, *cuts, len(rows)] if len(rows) else []
    return list(zip(edges[:-1], edges[1:], strict=True))


def read_into(f: BinaryIO, buffer: memoryview, path: Path) -> None:
    """Fill `buffer` from f's position: one read may return less than asked (Linux returns at
    most 2 GiB − 4 KiB)."""
    while buffer:
        count = f.readinto(buffer)
        if not count:
            raise UserError(f"{path} ended before its last row; was it changed while training?")
        buffer = buffer[count:]


def open_rows(spec: str, layout: str | None) -> NpyRows | FortranRows:
    """The rows of a .npy file (header checked by map_npy), read explicitly unless they are
    stored in Fortran order; the map itself is kept only for a Fortran-order file."""
    stored, channels_last = map_npy(spec, layout)
    if stored.flags.c_contiguous:
        path = Path(stored.filename)
        return NpyRows(path, stored.offset, stored.shape, stored.dtype, channels_last)
    return FortranRows(stored.transpose(0, 3, 1, 2) if channels_last else stored)


@dataclass(frozen=True)
class MappedRows:
    """The training rows `index` of `file` (in the user's units), read as Batches in model
    units by `scaler`."""

    file: NpyRows | FortranRows
    index: np.ndarray
    scaler: Scaler

    def __len__(self) -> int:
        return len(self.index)

    def rows(self, idx: torch.Tensor, shard: Shard | None = None) -> Batch:
        """The training rows `idx`, read from disk into model units, C-contiguous like an
        in-memory copy."""
        x = self.file.read(self.index[idx.numpy()])
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
    file = open_rows(spec, layout)
    train, _ = holdout_index(len(file), holdout)
    row_bytes = 4 * int(np.prod(file.shape[1:]))
    sample = sample_rows(train, row_bytes)
    if len(sample) == len(train):  # all of it: checked and fitted as a whole file is
        x = validate(file.read(np.arange(len(file))), spec)
        return MappedRows(file, train, Scaler.fit(x[train], sigma_data))
    x = as_float32(file.read(sample))
    finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if not finite.all():
        row = int(sample[np.argmin(finite)])
        raise UserError(f"{spec}: row {row} holds NaN or inf (as float32); expected finite numbers")
    return MappedRows(file, train, Scaler.fit(x, sigma_data))


def mapped_rows(spec: str, holdout: float, scaler: Scaler, layout: str | None) -> MappedRows:
    """A run's training split of a .npy file, with the scaler its config recorded."""
    file = open_rows(spec, layout)
    return MappedRows(file, holdout_index(len(file), holdout)[0], scaler)
