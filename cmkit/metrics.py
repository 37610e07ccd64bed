"""Sample-quality metrics on raw arrays or feature vectors. Pure functions; no weights loaded.

Vectors and 2-D points: energy distance, sliced Wasserstein, MMD. Images: a Fréchet distance
and KID computed by torchmetrics on the features of an extractor (see cmkit.features), and
k-NN precision/recall. Every estimate is seeded, so the same inputs give the same number.
"""

import numpy as np
import torch
from torch import nn


def _vectors(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float64)).flatten(1)


def _pair(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (n, d) float64 sets of one dimension with at least two vectors each."""
    a, b = _vectors(x), _vectors(y)
    if a.shape[0] < 2 or b.shape[0] < 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two sets of >= 2 vectors of one size, got {a.shape}, {b.shape}")
    return a, b


def _off_diagonal_mean(k: torch.Tensor) -> torch.Tensor:
    n = k.shape[0]
    return (k.sum() - k.diagonal().sum()) / (n * (n - 1))


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Energy distance 2·E‖X−Y‖ − E‖X−X'‖ − E‖Y−Y'‖ (Székely & Rizzo), unbiased form.

    The within-sample means exclude the zero diagonal, so the estimate is centred on 0 for
    two samples of one distribution. x: (n, ...), y: (m, ...) flattened to vectors.
    """
    a, b = _pair(x, y)
    cross = torch.cdist(a, b).mean()
    return float(
        2 * cross - _off_diagonal_mean(torch.cdist(a, a)) - _off_diagonal_mean(torch.cdist(b, b))
    )


def _quantiles(v: torch.Tensor, levels: int) -> torch.Tensor:
    """Empirical quantile function of each column of v (n, p) at (i + ½)/levels, i < levels."""
    n = v.shape[0]
    idx = ((torch.arange(levels, dtype=torch.float64) + 0.5) / levels * n).floor().long()
    return v.sort(dim=0).values[idx]


def sliced_wasserstein(
    x: np.ndarray, y: np.ndarray, projections: int = 256, seed: int = 0
) -> float:
    """Sliced 2-Wasserstein distance: √(mean over random unit directions of W₂² in 1-D).

    Each 1-D W₂ matches the two empirical quantile functions at max(n, m) levels, which is
    exact for equal sizes. In one dimension the two directions ±1 make it exactly W₂.
    """
    a, b = _pair(x, y)
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(a.shape[1], projections, generator=gen, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    levels = max(a.shape[0], b.shape[0])
    diff = _quantiles(a @ theta, levels) - _quantiles(b @ theta, levels)
    return float(diff.pow(2).mean().sqrt())


def mmd_rbf(x: np.ndarray, y: np.ndarray, bandwidth: float | None = None) -> float:
    """Unbiased MMD² with k(a, b) = exp(−‖a − b‖² / (2h²)).

    h defaults to the median pairwise distance of the pooled sample (the median heuristic),
    so the number does not depend on the data's units.
    """
    a, b = _pair(x, y)
    pooled = torch.cat([a, b])
    d2 = torch.cdist(pooled, pooled).pow(2)
    if bandwidth is None:
        bandwidth = float(np.median(torch.pdist(pooled).numpy())) or 1.0
    k = torch.exp(-d2 / (2 * bandwidth**2))
    n = a.shape[0]
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    return float(_off_diagonal_mean(kxx) + _off_diagonal_mean(kyy) - 2 * kxy.mean())


def knn_precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) on feature vectors.

    Each set's manifold is the union of balls reaching each point's k-th nearest neighbour;
    precision is the share of fake points inside the real manifold, recall the share of real
    points inside the fake one.
    """
    a, b = _pair(real, fake)
    if min(a.shape[0], b.shape[0]) <= k:
        raise ValueError(
            f"need more than k={k} vectors in each set, got {a.shape[0]}, {b.shape[0]}"
        )

    def coverage(support: torch.Tensor, queries: torch.Tensor) -> float:
        radii = torch.cdist(support, support).kthvalue(k + 1, dim=1).values  # +1: self at 0
        inside = torch.cdist(queries, support) <= radii[None, :]
        return float(inside.any(dim=1).double().mean())

    return coverage(a, b), coverage(b, a)


def extract_features(extractor: nn.Module, images: np.ndarray, batch: int = 500) -> torch.Tensor:
    """(N, F) float64 features of images, in batches, without gradients."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    with torch.no_grad():
        return torch.cat([extractor(x[i : i + batch]) for i in range(0, len(x), batch)]).double()


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two (n, F) feature sets (torchmetrics).

    This is FID only when the features are the standard Inception network's; name it after
    the features otherwise (e.g. "FD-digitsnet"). See `extract_features`.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def kernel_distance(
    real: torch.Tensor, fake: torch.Tensor, subsets: int = 50, seed: int = 0
) -> float:
    """KID (cubic-kernel MMD², torchmetrics) of two (n, F) feature sets, averaged over seeded
    subsets of ≤ 1000 points."""
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(1000, len(real), len(fake))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # its note on keeping features in memory
        metric = KernelInceptionDistance(
            feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=size
        )
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # torchmetrics draws its subsets from the global generator
        return float(metric.compute()[0])


class _Precomputed(nn.Module):
    """Identity 'extractor' for torchmetrics: features are extracted once, outside it."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features
