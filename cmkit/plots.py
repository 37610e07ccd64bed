"""Pictures a person would rather look at than read: image grids and 2-D scatter plots."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def image_grid(images: np.ndarray, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile (N, C, H, W) images in [0, 1] into one (rows·H, cols·W, C) uint8 array."""
    n, c, h, w = images.shape
    cols = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.float32)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[top : top + h, left : left + w] = img.transpose(1, 2, 0)
    return (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)


def save_image_grid(
    images: np.ndarray, path: str | Path, scale: int = 4, nrow: int | None = None
) -> None:
    """Save images in [0, 1] as a PNG grid (`nrow` per row), enlarged `scale` times (nearest)."""
    grid = image_grid(images, nrow)
    mode = "L" if grid.shape[2] == 1 else "RGB"
    pil = Image.fromarray(grid[..., 0] if mode == "L" else grid[..., :3], mode)
    pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST).save(path)


def save_scatter(
    points: np.ndarray, path: str | Path, reference: np.ndarray | None = None, title: str = ""
) -> None:
    """Scatter plot of (N, 2) samples, over the reference data in grey when given."""
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    if reference is not None:
        ax.scatter(reference[:, 0], reference[:, 1], s=2, c="0.75", label="data")
    ax.scatter(points[:, 0], points[:, 1], s=2, c="tab:blue", label="samples")
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.legend(loc="upper right", markerscale=4)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_panels(panels: list[tuple[str, np.ndarray]], path: str | Path) -> None:
    """Side-by-side titled panels of image grids (H, W, C uint8), e.g. one per sampler."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), dpi=110)
    for ax, (title, grid) in zip(np.atleast_1d(axes), panels, strict=True):
        ax.imshow(grid[..., 0] if grid.shape[2] == 1 else grid, cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
