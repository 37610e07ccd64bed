"""Class labels beside the data: where `--labels` finds them, and what is accepted.

Labels are integer class ids 0..K−1, one per sample of the data spec they belong to, read
from the same place as the data: an .npz archive's label array (y_train, y, labels, targets,
or `--label-key`; class names from a `classes` array when it has K entries), the class
subfolders of an image folder (names sorted), the labels file beside an IDX image file
(MNIST's train-labels-idx1-ubyte beside train-images-idx3-ubyte), the digit of the
built-in digits and tinted-digits, or the part of a toy (the moon of moons, the centre of
8gaussians, the ring of rings). A run keeps the class names; ids index them.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from cmkit.data import BUILTIN_TOYS, is_idx, read_array, read_idx, split_holdout, toy
from cmkit.errors import UserError
from cmkit.image_files import image_folder_files

LABEL_KEYS = ("y_train", "y", "labels", "targets")  # an .npz's label array, first match
NAME_KEYS = ("classes", "class_names")  # an .npz's class names, when it has one per class
MAX_CLASSES = 100_000
WHERE = (
    "an .npz with y_train, y, labels or targets (or --label-key), an image folder with one "
    "subfolder per class, an IDX image file with its labels file beside it, digits, "
    "tinted-digits, moons, 8gaussians or rings"
)


@dataclass(frozen=True)
class Labels:
    """Class ids y (N,) int64 in 0..K−1 and the K class names."""

    y: np.ndarray
    classes: tuple[str, ...]


def load_labels(spec: str, count: int, key: str | None = None) -> Labels:
    """The labels of the data spec `spec`, which holds `count` samples; a UserError in one
    line when there are none, or when they are not `count` dense non-negative integers."""
    path = Path(spec).expanduser()
    if key is not None and not (path.is_file() and path.suffix.lower() == ".npz"):
        raise UserError(f"--label-key {key!r} names an array of an .npz archive; {spec} is not one")
    if spec in ("digits", "tinted-digits"):
        y, names = load_digits().target, [str(d) for d in range(10)]
    elif spec in BUILTIN_TOYS and toy(spec)[1] is not None:
        y, names = toy(spec)[1], []
    elif path.is_file() and path.suffix.lower() == ".npz":
        y, names = _npz_labels(path, key)
    elif path.is_dir():
        _, y, names = image_folder_files(path)
        if not names:
            raise UserError(
                f"--labels: the images of {spec} are not in class subfolders; expected one "
                "subfolder per class"
            )
    elif path.is_file() and is_idx(path):
        y, names = read_idx(_idx_labels_file(path)), []
    else:
        raise UserError(f"--labels: {spec} has no labels; labels come from {WHERE}")
    y = checked_labels(np.asarray(y), count, spec)
    k = int(y.max()) + 1
    return Labels(y, tuple(names) if len(names) == k else tuple(str(i) for i in range(k)))


def _npz_labels(path: Path, key: str | None) -> tuple[np.ndarray, list[str]]:
    with np.load(path, allow_pickle=False) as archive:
        files = archive.files
    if key is None:
        key = next((k for k in LABEL_KEYS if k in files), None)
        if key is None:
            raise UserError(
                f"--labels: {path} holds arrays {files}; expected labels named "
                f"{', '.join(LABEL_KEYS)} (or name one with --label-key)"
            )
    elif key not in files:
        raise UserError(f"--label-key: {path} has no array {key!r}; it holds {files}")
    return read_array(path, key), _class_names(path, files)


def _class_names(path: Path, files: list[str]) -> list[str]:
    """The archive's class names, if it holds them as strings or numbers (else none)."""
    key = next((k for k in NAME_KEYS if k in files), None)
    try:
        names = read_array(path, key) if key else np.array([])
    except UserError:  # an object array: names are a nicety, not worth refusing the labels
        return []
    if names.dtype.kind not in "USiu":
        return []
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names.ravel()]


def _idx_labels_file(images: Path) -> Path:
    """MNIST's naming: the labels of *-images-idx3-ubyte[.gz] are *-labels-idx1-ubyte[.gz]."""
    name = images.name.replace("images", "labels").replace("idx3", "idx1")
    labels = images.with_name(name)
    if name == images.name or not labels.is_file():
        raise UserError(f"--labels: no labels file {labels} beside the IDX images {images}")
    return labels


def checked_labels(y: np.ndarray, count: int, source: str) -> np.ndarray:
    """y as int64 class ids, if it is `count` whole numbers ≥ 0 whose ids 0..max are mostly
    used (a few absent classes are fine; ids like 0, 7, 50000 mean the labels need remapping)."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise UserError(
            f"--labels: {source} has labels of shape {y.shape}; expected one class id per "
            "sample, shape (N,) (one-hot labels: take their argmax)"
        )
    if len(y) != count:
        raise UserError(f"--labels: {source} has {len(y)} labels for {count} samples")
    if len(y) == 0:
        raise UserError(f"--labels: {source} has no labels")
    if y.dtype.kind not in "biuf" or (y.dtype.kind == "f" and not np.all(np.isfinite(y))):
        raise UserError(f"--labels: {source} has {y.dtype} labels; expected integer class ids")
    if y.dtype.kind == "f" and not np.array_equal(y, np.round(y)):
        raise UserError(f"--labels: {source} has fractional labels; expected integer class ids")
    if y.min() < 0:
        raise UserError(f"--labels: {source} has label {y.min():g}; expected class ids >= 0")
    k = int(y.max()) + 1
    used = len(np.unique(y))
    if k > MAX_CLASSES or 2 * used < k:
        raise UserError(
            f"--labels: {source} uses {used} of the class ids 0..{k - 1}; expected ids "
            "0..K−1 with most of them present (remap the labels to consecutive ids)"
        )
    return y.astype(np.int64)


def run_labels(section, count: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(training, held-out) labels of a run's data section of `count` samples, split as its
    data is; None for an unlabelled run."""
    if section.classes is None:
        return None
    return split_holdout(load_labels(section.spec, count, section.label_key).y, section.holdout)
