"""A run's training split in model units: read from a data spec when a run starts
(load_training_data), or again from its saved data section when a student, an evaluation or
a resume needs exactly the rows the run trained on (run_data).

Every kind of data lands here as one `Samples`: an in-memory array, an .npy read a batch at
a time (cmkit.mapped), an image folder decoded lazily (cmkit.folder), or the latents of an
autoencoder (cmkit.latent).
"""

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from cmkit import data as datalib
from cmkit import latent as latentlib
from cmkit.batch import Batch, Samples
from cmkit.config import DataSection
from cmkit.errors import OptionError
from cmkit.folder import FolderRows, fit_folder, folder_rows, training_files
from cmkit.labels import Labels, load_labels, run_labels
from cmkit.mapped import map_training_rows, mapped_rows
from cmkit.units import Scaler


@dataclass(frozen=True)
class _Read:
    """What load_training_data was asked to read, handed whole to the reader of each kind."""

    spec: str
    holdout: float
    sigma_data: float
    key: str | None
    layout: str | None
    labels: bool
    label_key: str | None


def load_training_data(
    spec: str,
    holdout: float,
    sigma_data: float,
    key: str | None = None,
    layout: str | None = None,
    labels: bool = False,
    label_key: str | None = None,
    autoencoder: latentlib.Source | None = None,
    workers: int = 0,
) -> tuple[Samples, DataSection]:
    """Training split in model units (vectors scaled to std σ_data), with its class labels as
    the `labels` conditioning when asked for, and its config section (with the .npz keys and
    layout the user gave, so every later read is the same). With an `autoencoder` the split
    is encoded once into its latents (cmkit.latent), and the section records it. `workers`
    ≥ 1 decodes an image folder lazily in that many processes (cmkit.folder)."""
    if label_key is not None and not labels:
        raise OptionError("label_key", f"{label_key!r} names the labels of --labels; add --labels")
    check_workers(spec, workers, autoencoder is not None)
    read = _Read(spec, holdout, sigma_data, key, layout, labels, label_key)
    if workers:
        return _lazy_folder(read, workers)
    data, section = _training_pixels(read)
    if autoencoder is None:
        return data, section
    latents, entry = latentlib.fit(autoencoder, data, section.shape, sigma_data)
    return latents, replace(section, shape=tuple(latents.x0.shape[1:]), latent=entry)


def check_workers(spec: str, workers: int, latent: bool) -> None:
    """--workers decodes an image folder lazily: one line for anything else."""
    if workers < 0:
        raise OptionError("workers", f"must be >= 0, got {workers}")
    if workers and latent:
        raise OptionError(
            "workers", "applies to image folders; a latent run encodes its images once"
        )
    if workers and not Path(spec).expanduser().is_dir():
        raise OptionError("workers", f"applies to image folders; {spec} is not one")


def _lazy_folder(read: _Read, workers: int) -> tuple[Samples, DataSection]:
    """An image folder's training split decoded lazily, and its (lazy) section; the options
    of arrays are refused as an in-memory folder refuses them."""
    datalib.check_array_options(read.spec, read.key, read.layout, False, False)
    spec = str(Path(read.spec).expanduser().resolve())
    files, train = training_files(spec, read.holdout)
    decoder = fit_folder(files, train, read.sigma_data)
    found = load_labels(spec, len(files), read.label_key) if read.labels else None
    classes = None if found is None else found.classes
    shape = (1 if decoder.gray else 3, decoder.size[1], decoder.size[0])
    section = DataSection(spec, read.holdout, shape, decoder.scaler, classes=classes, lazy=True)
    y = None if found is None else found.y[train]
    return FolderRows(decoder, y, workers), section


def _training_pixels(read: _Read) -> tuple[Samples, DataSection]:
    """load_training_data of the data itself: the samples in model units and their section."""
    path = Path(read.spec)
    spec = str(path.resolve()) if path.exists() else read.spec
    key, layout, label_key = read.key, read.layout, read.label_key

    def section(x, scaler: Scaler, found: Labels | None) -> DataSection:
        classes = None if found is None else found.classes
        shape = tuple(x.shape[1:])
        return DataSection(spec, read.holdout, shape, scaler, key, layout, classes, label_key)

    def labels_of(x) -> Labels | None:
        return load_labels(spec, len(x), label_key) if read.labels else None

    if datalib.is_npy(spec):  # its rows stay on disk, read a batch at a time
        rows = map_training_rows(spec, read.holdout, read.sigma_data, layout)
        return rows, section(rows.file, rows.scaler, labels_of(rows.file))
    x = datalib.load_data(spec, key, layout)
    found = labels_of(x)
    scaler = Scaler.fit(datalib.split_holdout(x, read.holdout)[0], read.sigma_data)
    data = section(x, scaler, found)
    return run_data(data, x, None if found is None else found.y), data


def run_data(
    section: DataSection,
    raw: np.ndarray | None = None,
    y: np.ndarray | None = None,
    workers: int = 0,
) -> Samples:
    """The training split of a run's data section in model units, with its labels if it has
    them (a student reads its teacher's data exactly as the teacher did; a latent run's
    images encoded again). `raw` and `y`: the data and its labels already loaded, so they are
    not read twice."""
    if section.latent is not None:
        pixels = run_data(replace(section, latent=None), raw, y)
        return latentlib.run_latents(section.latent, pixels)
    if section.lazy:
        files, train = training_files(section.spec, section.holdout)
        labels = run_labels(section, len(files))
        y = None if labels is None else labels[0]
        return folder_rows(files, train, section.shape, section.scaler, y, workers)
    if datalib.is_npy(section.spec):
        return mapped_rows(section.spec, section.holdout, section.scaler, section.layout)
    raw = datalib.load_data(section.spec, section.key, section.layout) if raw is None else raw
    train_x, _ = datalib.split_holdout(raw, section.holdout)
    x0 = torch.from_numpy(section.scaler.to_model(train_x))
    if y is not None:
        labels = datalib.split_holdout(y, section.holdout)
    else:
        labels = run_labels(section, len(raw))
    return Batch(x0) if labels is None else Batch(x0, {"labels": torch.from_numpy(labels[0])})
