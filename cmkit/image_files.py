"""Image files: list an image folder (one class per subfolder or none), decode one file or a
whole folder to float32 arrays in 0..255, and name the file PIL cannot read.

cmkit.data reads a folder at once through these; cmkit.folder decodes one file at a time.
"""

from pathlib import Path

import numpy as np
from PIL import Image

from cmkit.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GRAY_MODES = ("1", "L", "I", "I;16", "I;16B", "I;16L", "F")


def image_folder_files(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    """(files, class index of each, class names) of an image folder, in the order read.

    Images directly in the folder are one unnamed class; a folder holding none but with
    subfolders of images (torchvision's ImageFolder layout) has one class per subfolder,
    names sorted, files sorted by name within each.
    """
    try:
        files = _images_in(folder)
        classes = [] if files else sorted(d for d in folder.iterdir() if d.is_dir())
        per_class = [_images_in(d) for d in classes]
    except OSError as e:
        raise UserError(f"cannot list folder {folder}: {e.strerror}") from None
    if files:
        return files, [0] * len(files), []
    kept = [(d.name, f) for d, f in zip(classes, per_class, strict=True) if f]
    if not kept:
        raise UserError(
            f"folder {folder} has no images; expected .png, .jpg or .jpeg files, directly "
            "or in one subfolder per class"
        )
    names = [name for name, _ in kept]
    return (
        [p for _, f in kept for p in f],
        [i for i, (_, f) in enumerate(kept) for _ in f],
        names,
    )


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_image_folder(folder: Path) -> np.ndarray:
    """All images of the folder (see image_folder_files): (N, 1, H, W) if all are grayscale,
    else RGB."""
    files, _, _ = image_folder_files(folder)
    images = [open_image(p) for p in files]
    for path, image in zip(files, images, strict=True):
        if image.size != images[0].size:
            w, h = image.size
            raise UserError(
                f"image {path} is {w}x{h} pixels; expected {images[0].size[0]}x"
                f"{images[0].size[1]} like {files[0].name} (all images must have one size)"
            )
    gray = all(image.mode in GRAY_MODES for image in images)
    return np.stack([image_array(image, gray) for image in images])


def load_image(path: str | Path) -> np.ndarray:
    """One image file as (1, C, H, W) float32 in 0..255: C = 1 for grayscale files, else 3."""
    image = open_image(Path(path))
    return image_array(image, image.mode in GRAY_MODES)[None]


def image_array(image: Image.Image, gray: bool) -> np.ndarray:
    """(1, H, W) luminance or (3, H, W) RGB, float32 in 0..255."""
    if gray:
        return np.asarray(image.convert("L"), dtype=np.float32)[None]
    return np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)


def open_image(path: Path) -> Image.Image:
    """The decoded image, or a UserError naming the file PIL cannot read."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except Exception as e:  # PIL's decoders raise many types on corrupt or hostile files
        raise UserError(f"cannot read image {path}; expected a valid .png or .jpg file") from e
