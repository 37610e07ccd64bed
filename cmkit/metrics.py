"""Sample-quality metrics on raw arrays. Pure functions; no weights are loaded."""

import numpy as np
import torch


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Energy distance 2·E‖X−Y‖ − E‖X−X'‖ − E‖Y−Y'‖ (Székely & Rizzo), unbiased form.

    The within-sample means exclude the zero diagonal, so the estimate is centred on 0 for
    two samples of one distribution. x: (n, ...), y: (m, ...) flattened to vectors.
    """
    a = torch.as_tensor(np.asarray(x, dtype=np.float64)).flatten(1)
    b = torch.as_tensor(np.asarray(y, dtype=np.float64)).flatten(1)
    if a.shape[0] < 2 or b.shape[0] < 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two sets of >= 2 vectors of one size, got {a.shape}, {b.shape}")
    n, m = a.shape[0], b.shape[0]
    cross = torch.cdist(a, b).mean()
    within_a = torch.cdist(a, a).sum() / (n * (n - 1))
    within_b = torch.cdist(b, b).sum() / (m * (m - 1))
    return float(2 * cross - within_a - within_b)
