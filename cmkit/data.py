"""Data: resolve a spec (a built-in, an array file, an IDX file, an image folder) to raw
data in the user's units, validate it, and hold some out.

Its Scaler to model units lives in cmkit.units, the decoding of image files in
cmkit.image_files. Nothing is downloaded: built-ins are scikit-learn's bundled digits or
generated from a fixed seed.
"""

import gzip
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits, make_moons, make_swiss_roll

from cmkit.errors import UserError
from cmkit.image_files import load_image_folder

TOY_SAMPLES = 20000
IDX_UBYTE = 0x08  # the IDX type code of unsigned bytes: magic 0x00000803 for (N, H, W) images
NPZ_DATA_KEYS = ("x_train", "x", "images", "data")  # an .npz's data array, first match
CHANNELS = (1, 3, 4)  # gray, RGB, RGBA: what a channel axis of saved images holds


Toy = tuple[np.ndarray, np.ndarray | None]  # points (N, 2), and their class where they have one


def _moons(n: int, rng: np.random.Generator) -> Toy:
    """Two interleaved half circles, centred and doubled: x in [-3, 3], y in [-1.5, 1.5];
    class 0 the upper moon, 1 the lower."""
    x, moon = make_moons(n, noise=0.05, random_state=int(rng.integers(2**31)))
    return (x - [0.5, 0.25]) * 2, moon


def _eight_gaussians(n: int, rng: np.random.Generator) -> Toy:
    """FFJORD's 8 Gaussians: centres at radius 2√2, every 45°, std 0.5/√2; class k the
    centre at k·45°."""
    centre = rng.integers(8, size=n)
    angles = centre * (np.pi / 4)
    centres = 2 * np.sqrt(2) * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return centres + rng.normal(scale=0.5 / np.sqrt(2), size=(n, 2)), centre


def _checkerboard(n: int, rng: np.random.Generator) -> Toy:
    """Uniform on the 8 dark squares of a 4x4 board covering [-2, 2]²."""
    x = rng.uniform(-2, 2, size=n)
    column = np.floor(x + 2)
    row = 2 * rng.integers(2, size=n) + column % 2  # rows with the same parity as the column
    return np.stack([x, row - 2 + rng.uniform(size=n)], axis=1), None


def _swissroll(n: int, rng: np.random.Generator) -> Toy:
    """scikit-learn's swiss roll projected on (x, z) and divided by 5: a spiral of radius ≲ 3."""
    x, _ = make_swiss_roll(n, noise=0.5, random_state=int(rng.integers(2**31)))
    return x[:, [0, 2]] / 5, None


def _rings(n: int, rng: np.random.Generator) -> Toy:
    """Four concentric circles of radius 0.75, 1.5, 2.25 and 3, Gaussian noise 0.08, shuffled;
    class k the ring of radius 0.75·(k + 1)."""
    ring = np.arange(n) % 4
    radius = 0.75 * (1 + ring)
    angle = rng.uniform(0, 2 * np.pi, size=n)
    points = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    noisy = points + rng.normal(scale=0.08, size=(n, 2))
    order = rng.permutation(n)  # the rows rng.permutation(noisy) would shuffle into
    return noisy[order], ring[order]


_TOYS: dict[str, Callable[[int, np.random.Generator], Toy]] = {
    "moons": _moons,
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "swissroll": _swissroll,
    "rings": _rings,
}
BUILTIN_TOYS: tuple[str, ...] = tuple(_TOYS)


def toy(name: str) -> Toy:
    """The built-in toy `name`: TOY_SAMPLES points, the same on every call, and their classes."""
    return _TOYS[name](TOY_SAMPLES, np.random.default_rng(0))


def _tinted_digits() -> np.ndarray:
    """sklearn's digits in colour: each digit times an RGB tint drawn from a fixed seed.

    Tints are uniform in [0, 1]³ scaled so the brightest channel is 1, so every digit keeps
    its 0..16 range in one channel and the hue varies: (1797, 3, 8, 8), the same on every call.
    """
    images = load_digits().images
    tint = np.random.default_rng(0).uniform(size=(len(images), 3))
    tint /= tint.max(axis=1, keepdims=True)
    return (images[:, None] * tint[:, :, None, None]).astype(np.float32)


def load_data(spec: str, key: str | None = None, layout: str | None = None) -> np.ndarray:
    """Raw data in the user's units, float32, shape (N, D) or (N, C, H, W).

    spec is "digits" (sklearn's 8x8 digits, 0..16), "tinted-digits" (the same in colour,
    3x8x8), a name from BUILTIN_TOYS (20000 2-D points, the same on every call), a .npy/.npz
    file, an IDX image file such as MNIST's train-images-idx3-ubyte (optionally .gz; 0..255),
    or a folder of .png/.jpg images (0..255). For .npy/.npz files, `key` names the archive's
    array (else the first of NPZ_DATA_KEYS, or its only one) and `layout` ("nchw", "nhwc")
    says how 4-D images are laid out (else channels-last is detected, see is_channels_last).
    """
    path = Path(spec).expanduser()
    arrays = path.is_file() and path.suffix.lower() in (".npy", ".npz")
    check_array_options(spec, key, layout, arrays, path.suffix.lower() == ".npz")
    if arrays:
        x = _laid_out(_load_numpy(path, key), spec, layout)
        return validate(np.ascontiguousarray(x), spec)
    if spec == "digits":
        return load_digits().images[:, None].astype(np.float32)
    if spec == "tinted-digits":
        return _tinted_digits()
    if spec in _TOYS:
        return toy(spec)[0].astype(np.float32)
    if path.is_dir():
        return validate(load_image_folder(path), spec)
    if path.is_file() and is_idx(path):
        return validate(_load_idx_images(path), spec)
    builtins = ", ".join(("digits", "tinted-digits", *BUILTIN_TOYS))
    raise UserError(
        f"unknown data {spec!r}: expected a built-in ({builtins}) "
        "or a path to an existing .npy/.npz file, IDX file (*-ubyte[.gz]) or folder of images"
    )


def is_npy(spec: str) -> bool:
    """A .npy file: the data spec whose training rows are read from disk (cmkit.mapped)."""
    path = Path(spec).expanduser()
    return path.is_file() and path.suffix.lower() == ".npy"


def map_npy(spec: str, layout: str | None = None) -> tuple[np.memmap, bool]:
    """The array of a .npy file memory-mapped as stored, in the file's dtype, and whether it
    holds (N, H, W, C) images (as `layout` says or as detected); its header is checked
    (numeric, non-empty, 2-D or 4-D, no more data than the file holds), its values are not.
    cmkit.mapped takes the map's offset and shape and reads rows without it (see there)."""
    check_array_options(spec, None, layout, True, False)
    x = read_array(Path(spec).expanduser())
    channels_last = _stored_channels_last(x.shape, spec, layout)
    _check_kind(x, spec)
    return x, channels_last


def is_idx(path: Path) -> bool:
    """MNIST's naming: train-images-idx3-ubyte, t10k-labels.idx1-ubyte, either gzipped."""
    return path.name.lower().removesuffix(".gz").endswith("ubyte")


def read_idx(path: Path) -> np.ndarray:
    """The uint8 array of an IDX file (LeCun's MNIST format), optionally gzipped.

    Header: two zero bytes, the type code 0x08 (unsigned byte), the number of dimensions, then
    each dimension as a big-endian uint32; the data follows in C order. Images of MNIST are
    (N, 28, 28) (magic 0x00000803), its labels (N,) (magic 0x00000801).
    """
    try:
        raw = (
            gzip.decompress(path.read_bytes())
            if path.suffix.lower() == ".gz"
            else path.read_bytes()
        )
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"cannot read {path} ({e}); expected an IDX file, gzipped or not") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != IDX_UBYTE or not 1 <= raw[3] <= 4:
        raise UserError(
            f"{path} does not start with an IDX header of unsigned bytes; expected magic "
            "0x00000803 (images) or 0x00000801 (labels)"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4)) if len(raw) >= header else ()
    if len(dims) != ndim or len(raw) - header != int(np.prod(dims, dtype=np.int64)):
        raise UserError(
            f"{path} holds {max(len(raw) - header, 0)} data bytes; its IDX header promises "
            f"shape {dims or '(truncated)'}, expected exactly one byte per value"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _load_idx_images(path: Path) -> np.ndarray:
    """IDX images (N, H, W) -> (N, 1, H, W); a label file is refused by name."""
    x = read_idx(path)
    if x.ndim != 3:
        raise UserError(
            f"{path} is an IDX array of shape {x.shape}; expected (N, H, W) images "
            "(magic 0x00000803), not labels"
        )
    return x[:, None]


LAYOUTS = ("nchw", "nhwc")


def check_array_options(
    spec: str, key: str | None, layout: str | None, arrays: bool, npz: bool
) -> None:
    """--data-key names an .npz member and --layout an array's axes: one line elsewhere."""
    if layout is not None and layout not in LAYOUTS:
        raise UserError(f"layout must be 'nchw' or 'nhwc', got {layout!r}")
    if key is not None and not npz:
        raise UserError(f"--data-key {key!r} names an array of an .npz archive; {spec} is not one")
    if layout is not None and not arrays:
        raise UserError(f"--layout applies to .npy/.npz arrays; {spec} is not one")


def _load_numpy(path: Path, key: str | None = None) -> np.ndarray:
    """A .npy array, or the chosen array of a .npz archive with (N, H, W) -> (N, 1, H, W)."""
    x = read_array(path, key)
    return x[:, None] if x.ndim == 3 and path.suffix.lower() == ".npz" else x


def read_array(path: Path, key: str | None = None) -> np.ndarray:
    """The array of a .npy file, or of a .npz archive its member `key` (else found by name).

    Never unpickles (allow_pickle=False: an object array is an error, not code to run).
    A .npy file is memory-mapped, so a header claiming more data than the file holds is
    refused before anything is allocated.
    """
    try:
        loaded = np.load(path, mmap_mode="r", allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            return loaded
        with loaded:
            key = _npz_key(loaded.files, path) if key is None else _named(key, loaded.files, path)
            x = loaded[key]
        if not isinstance(x, np.ndarray):  # numpy hands back the raw bytes of non-.npy members
            raise ValueError(f"member {key!r} is not a .npy array")
    except UserError:
        raise
    except MemoryError:
        raise UserError(f"{path} holds an array too large for this machine's memory") from None
    except (OSError, ValueError, OverflowError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(
            f"cannot read {path} as a numpy array; expected a numeric array saved with "
            "numpy.save or numpy.savez (object arrays and pickles are not accepted)"
        ) from e
    return x


def _npz_key(keys: list[str], path: Path) -> str:
    """The first of NPZ_DATA_KEYS present, else the only array; other archives are an error."""
    key = next((k for k in NPZ_DATA_KEYS if k in keys), None)
    if key is not None:
        return key
    if len(keys) == 1:
        return keys[0]
    raise UserError(
        f"{path} holds arrays {keys}; expected one named {', '.join(NPZ_DATA_KEYS)}, "
        "or exactly one array"
    )


def _named(key: str, keys: list[str], path: Path) -> str:
    if key not in keys:
        raise UserError(f"{path} has no array {key!r}; it holds {keys}")
    return key


def is_channels_last(shape: tuple[int, ...]) -> bool:
    """(N, H, W, C) with C = 1, 3 or 4 and H not: how PIL, TensorFlow and most saved image
    arrays lay images out. Anything else with four axes is cmkit's own (N, C, H, W)."""
    four = len(shape) == 4 and 0 not in shape  # an empty array is refused as it came
    return four and shape[3] in CHANNELS and shape[1] not in CHANNELS


_NOTICED: set[str] = set()  # sources whose layout notice was printed (once per process)


def _laid_out(x: np.ndarray, source: str, layout: str | None) -> np.ndarray:
    """(N, C, H, W) images from an array the user laid out as `layout`, or as detected."""
    return x.transpose(0, 3, 1, 2) if _stored_channels_last(x.shape, source, layout) else x


def _stored_channels_last(shape: tuple[int, ...], source: str, layout: str | None) -> bool:
    """Whether an array of `shape` holds (N, H, W, C) images: as `layout` says, else as
    detected by is_channels_last (and said once on stderr)."""
    if layout is not None and len(shape) != 4:
        raise UserError(f"{source}: --layout {layout} needs 4-D images; the array is {shape}")
    if layout is not None:
        return layout == "nhwc"
    if not is_channels_last(shape):
        return False
    _notice_channels_last(shape, source)
    return True


def _notice_channels_last(shape: tuple[int, ...], source: str) -> None:
    """Say once per source on stderr that its images were detected as channels-last."""
    if source in _NOTICED:
        return
    _NOTICED.add(source)
    n, h, w, c = shape
    print(
        f"cmkit: {source}: read the {shape} array as {n} channels-last images of "
        f"{h}x{w} with {c} channel(s), stored as ({n}, {c}, {h}, {w}) (--layout nchw if not)",
        file=sys.stderr,
    )


def _check_kind(x: np.ndarray, source: str) -> None:
    """Numeric, (N, D) or (N, C, H, W), non-empty: what the header of an array can tell."""
    if x.dtype.kind not in "biuf":
        raise UserError(f"{source}: dtype {x.dtype} is not numeric; expected integers or floats")
    if x.ndim not in (2, 4) or 0 in x.shape:
        raise UserError(
            f"{source}: array has shape {x.shape}; expected (N, D) vectors or (N, C, H, W) "
            "images with every size at least 1"
        )


def validate(x: np.ndarray, source: str) -> np.ndarray:
    """x as float32 after checking it is numeric, (N, D) or (N, C, H, W), non-empty and finite."""
    _check_kind(x, source)
    x = as_float32(x)
    bad = ~np.isfinite(x)
    if bad.any():
        first = tuple(int(i) for i in np.unravel_index(np.argmax(bad), x.shape))
        raise UserError(
            f"{source}: {int(bad.sum())} non-finite values (NaN or inf as float32), "
            f"first at index {first}; expected finite numbers"
        )
    return x


def as_float32(x: np.ndarray) -> np.ndarray:
    """The values as float32; a float64 beyond float32's range becomes inf (and is refused)."""
    with np.errstate(over="ignore"):
        return x.astype(np.float32)


def holdout_index(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows) of n samples, each ascending: round(fraction·n) rows
    held out by a seeded permutation, fraction in [0, 1)."""
    if not 0 <= fraction < 1:
        raise UserError(f"holdout fraction must be in [0, 1), got {fraction}")
    n_held = round(fraction * n)
    if n_held >= n:
        raise UserError(
            f"holding out {n_held} of {n} samples leaves none to train on; "
            "expected a smaller holdout fraction"
        )
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_held:]), np.sort(order[:n_held])


def split_holdout(x: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, held_out) split by holdout_index; both parts keep the original
    order, so fraction 0 returns x unchanged and an empty (0, ...) held-out array."""
    train, held = holdout_index(len(x), fraction, seed)
    return x[train], x[held]


def run_splits(section) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) split of a run's data, from its config's data section."""
    return split_holdout(load_data(section.spec, section.key, section.layout), section.holdout)


def describe(x: np.ndarray) -> str:
    """One line such as '1797 samples of shape 1x8x8' for progress and report messages."""
    noun = "sample" if len(x) == 1 else "samples"
    return f"{len(x)} {noun} of shape {'x'.join(map(str, x.shape[1:]))}"
