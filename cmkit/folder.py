"""Training images that stay on disk: an image folder decoded a batch at a time (--workers).

The folder's files are listed (cmkit.image_files.image_folder_files), the held-out split is by
index as in memory, and the scaler is fitted on a seeded sample of at most SAMPLE_BYTES of
training images (cmkit.mapped), which also decides whether the images are read as gray
(all of the sample is) or RGB. Each image is decoded as the in-memory path decodes it and
scaled on its own: the scaler is elementwise, so a batch is bit for bit the in-memory
decoding of its rows, and a folder whose training images fit in the sample gets the scaler
an in-memory run fits. Labels (class subfolders) are tiny and stay in memory.

Decoding is prefetched by a torch DataLoader with `workers` processes. A prefetch must know
the next steps' rows, which the loop's shared generator cannot tell before the step runs
(its noise is drawn from the same stream), so a lazy source draws its own rows: step k's are
drawn from a generator seeded by (run seed, k). They depend on neither the number of
processes (each rank draws the global batch and decodes its shard) nor the number of
workers, and a run resumed at step k reads what it would have read, but they are not the
rows an in-memory run of the same folder draws, so a lazy run is bit-identical to itself
(across resume, world sizes and --workers), not to the in-memory run. The run's config
records that it reads lazily, so resume does not switch between the two.

Workers hold no randomness, and the DataLoader seeds them from a generator of its own, so
the global torch generator (dropout's, saved in checkpoints) is left alone. They ignore
SIGINT and SIGTERM: the training process stops between steps and shuts them down. A file
that cannot be decoded comes back as its one-line error, raised in the training process.
"""

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from cmkit.batch import Batch, Shard
from cmkit.data import holdout_index
from cmkit.errors import UserError
from cmkit.image_files import GRAY_MODES, image_array, image_folder_files, open_image
from cmkit.mapped import sample_rows
from cmkit.units import Scaler

PREFETCH = 4  # batches decoded ahead per worker


@dataclass(frozen=True)
class Decoder:
    """Image files → (C, H, W) float32 model units, decoded as an in-memory folder is."""

    files: tuple[Path, ...]
    gray: bool
    size: tuple[int, int]  # (W, H), PIL's order
    scaler: Scaler

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor | str:
        """Image i in model units, or its one-line error (a worker cannot raise it cleanly)."""
        try:
            return torch.from_numpy(self.decode(i))
        except UserError as e:
            return str(e)

    def decode(self, i: int) -> np.ndarray:
        path = self.files[i]
        image = open_image(path)
        if image.size != self.size:
            raise UserError(
                f"image {path} is {image.size[0]}x{image.size[1]} pixels; expected "
                f"{self.size[0]}x{self.size[1]} (all images must have one size)"
            )
        return self.scaler.to_model(image_array(image, self.gray)[None])[0]


def collate(items: list[torch.Tensor | str]) -> torch.Tensor | str:
    """The images stacked (B, C, H, W), or the first error among them."""
    errors = [item for item in items if isinstance(item, str)]
    return errors[0] if errors else torch.stack(items)


def step_rows(seed: int, step: int, n: int, batch_size: int) -> np.ndarray:
    """Step `step`'s global batch: `batch_size` rows of n drawn with replacement from a
    generator seeded by (seed, step), so any step's rows are known ahead."""
    return np.random.default_rng([seed % 2**64, step]).integers(0, n, batch_size)


@dataclass(frozen=True)
class StepSampler:
    """The DataLoader's batch sampler: this shard's rows of steps start, start + 1, …"""

    seed: int
    start: int
    n: int
    batch_size: int
    rows: slice

    def __iter__(self) -> Iterator[list[int]]:
        for step in count(self.start):
            yield step_rows(self.seed, step, self.n, self.batch_size)[self.rows].tolist()


def quiet_worker(worker_id: int) -> None:
    """Stop signals are the training process's: it stops between steps and ends the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class FolderRows:
    """The training images of an image folder in model units, decoded lazily; `labels` (N,)
    int64 of those images or None; `workers` decoding processes (0: decoded in this one)."""

    def __init__(self, decoder: Decoder, labels: np.ndarray | None, workers: int = 0) -> None:
        self.decoder, self.workers = decoder, workers
        self.labels = None if labels is None else torch.from_numpy(labels)
        self._stream: tuple[tuple, Iterator] | None = None  # (what it reads, its batches)
        self._next_step = 0

    def __len__(self) -> int:
        return len(self.decoder)

    def to(self, device: torch.device | str) -> "FolderRows":
        """Itself: images stay on disk, and the loop moves each batch to the device."""
        return self

    def rows(self, idx: torch.Tensor, shard: Shard | None = None) -> Batch:
        """The training images `idx`, decoded in this process."""
        return self._batch(torch.stack([self._decoded(int(i)) for i in idx]), idx, shard)

    def batch_at(self, seed: int, step: int, batch_size: int, shard: Shard | None) -> Batch:
        """This shard's rows of step `step`'s global batch (step_rows of `seed`), prefetched
        by the workers when there are any."""
        rows = slice(None) if shard is None else shard.rows
        idx = torch.from_numpy(step_rows(seed, step, len(self), batch_size)[rows])
        if self.workers == 0:
            return self.rows(idx, shard)
        key = (seed, batch_size, rows.start, rows.stop)
        if self._stream is None or self._stream[0] != key or self._next_step != step:
            self.close()
            self._stream = (key, iter(self._loader(seed, step, batch_size, rows)))
        x = next(self._stream[1])
        self._next_step = step + 1
        if isinstance(x, str):
            self.close()
            raise UserError(x)
        return self._batch(x, idx, shard)

    def close(self) -> None:
        """End the workers (dropping the DataLoader's iterator shuts them down)."""
        self._stream = None

    def _loader(self, seed: int, start: int, batch_size: int, rows: slice) -> DataLoader:
        return DataLoader(
            self.decoder,
            batch_sampler=StepSampler(seed, start, len(self), batch_size, rows),
            num_workers=self.workers,
            collate_fn=collate,
            prefetch_factor=PREFETCH,
            worker_init_fn=quiet_worker,
            generator=torch.Generator().manual_seed(0),  # its workers' seeds: not torch's own
        )

    def _decoded(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.decoder.decode(i))

    def _batch(self, x: torch.Tensor, idx: torch.Tensor, shard: Shard | None) -> Batch:
        cond = {} if self.labels is None else {"labels": self.labels[idx]}
        return Batch(x, cond, shard)


def training_files(folder: str, holdout: float) -> tuple[tuple[Path, ...], np.ndarray]:
    """(every image file of the folder, the training split's indices)."""
    files, _, _ = image_folder_files(Path(folder))
    return tuple(files), holdout_index(len(files), holdout)[0]


def fit_folder(files: tuple[Path, ...], train: np.ndarray, sigma_data: float) -> Decoder:
    """The decoder of the training split `train` of a folder's `files` (training_files), with
    its scaler fitted on a sample of its images."""
    size = open_image(files[0]).size
    sample = sample_rows(train, 4 * 3 * size[0] * size[1])
    images = [open_image(files[i]) for i in sample]
    for i, image in zip(sample, images, strict=True):
        if image.size != size:
            w, h = image.size
            raise UserError(
                f"image {files[i]} is {w}x{h} pixels; expected {size[0]}x{size[1]} like "
                f"{files[0].name} (all images must have one size)"
            )
    gray = all(image.mode in GRAY_MODES for image in images)
    scaler = Scaler.fit(np.stack([image_array(image, gray) for image in images]), sigma_data)
    return Decoder(tuple(files[i] for i in train), gray, size, scaler)


def folder_rows(
    files: tuple[Path, ...],
    train: np.ndarray,
    shape: tuple[int, ...],
    scaler: Scaler,
    labels,
    workers: int,
) -> FolderRows:
    """A run's training split `train` of a folder's `files` (training_files), as its config
    recorded it (shape (C, H, W), the scaler), with `labels` the split's labels or None."""
    decoder = Decoder(tuple(files[i] for i in train), shape[0] == 1, (shape[2], shape[1]), scaler)
    return FolderRows(decoder, labels, workers)
