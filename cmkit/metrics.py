"""Sample-quality metrics on raw arrays or feature vectors. Pure functions; no weights loaded.

Vectors and 2-D points: energy distance, sliced Wasserstein, MMD. Images: a Fréchet distance
and KID computed by torchmetrics on the features of an extractor (see cmkit.features), its
sample-size-free extrapolation FD∞, k-NN precision/recall, and the pixel-range statistics a
person sees. Every estimate is seeded, so the same inputs give the same number.
"""

from collections.abc import Sequence
from dataclasses import dataclass

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


def gaussian_frechet(
    mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> float:
    """Fréchet (2-Wasserstein²) distance of N(μ₁, Σ₁) and N(μ₂, Σ₂), in float64:
    ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁Σ₂)^½ (Dowson & Landau 1982).

    tr (Σ₁Σ₂)^½ is the sum of the square roots of the eigenvalues of Σ₁Σ₂, which are real and
    ≥ 0 for covariances (tiny negative or imaginary parts are rounding)."""
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(a, dtype=torch.float64)
                                for a in (mu1, mu2, sigma1, sigma2))  # fmt: skip
    eig = torch.linalg.eigvals(sigma1 @ sigma2).real.clamp(min=0)
    trace = sigma1.trace() + sigma2.trace() - 2 * eig.sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + trace)


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance of (n, F) rows, as torchmetrics' FID fits them."""
    return x.mean(0), torch.cov(x.T)


def fd_inf_sizes(n: int, features: int, count: int = 8) -> list[int]:
    """`count` subset sizes evenly spaced in 1/N from N_min to n (Chong & Forsyth 2020 fit
    down to N/10). N_min = n/5, but at least 2F where n allows: below about 2F samples the
    covariance of F features is so poorly fitted that FD(N) is no longer linear in 1/N."""
    n_min = max(n // 5, min(2 * features, n // 2), 2)
    inverse = np.linspace(1 / n_min, 1 / n, count)
    return sorted({int(round(1 / v)) for v in inverse})


def frechet_distance_inf(
    real: torch.Tensor, fake: torch.Tensor, sizes: Sequence[int] | None = None, seed: int = 0
) -> float:
    """FD∞: the Fréchet distance extrapolated to infinitely many samples (Chong & Forsyth 2020,
    "Effectively Unbiased FID and Inception Score and where to find them").

    FD of the full reference against random subsets (seeded) of N fake rows, for each N in
    `sizes` (default `fd_inf_sizes`), fitted by least squares as FD(N) = FD∞ + k/N; returns
    the intercept. The bias of plain FD grows as 1/N, so FD∞ compares sample sets of
    different sizes fairly; it can be slightly negative for two samples of one distribution.
    real: (m, F), fake: (n, F) features.
    """
    real, fake = _pair(real, fake)
    sizes = list(sizes) if sizes is not None else fd_inf_sizes(len(fake), fake.shape[1])
    if len(set(sizes)) < 2 or min(sizes) < 2 or max(sizes) > len(fake):
        raise ValueError(f"need >= 2 distinct sizes in [2, {len(fake)}], got {sizes}")
    mu, sigma = _moments(real)
    gen = torch.Generator().manual_seed(seed)
    fd = []
    for n in sizes:
        rows = fake[torch.randperm(len(fake), generator=gen)[:n]]
        fd.append(gaussian_frechet(mu, sigma, *_moments(rows)))
    design = np.stack([np.ones(len(sizes)), 1 / np.asarray(sizes, dtype=np.float64)], axis=1)
    (intercept, _), *_ = np.linalg.lstsq(design, np.asarray(fd), rcond=None)
    return float(intercept)


@dataclass(frozen=True)
class PixelStats:
    """Shares of pixels: near the background (|u| ≤ 1/32) and outside [0, 1]."""

    near_background: float
    out_of_range: float


def pixel_range_stats(images_unit: np.ndarray) -> PixelStats:
    """What a person sees in images (N, C, H, W) on the unit scale (cmkit.units.to_unit of model
    units, before any clipping): the share of pixels within 1/32 of 0, the background (on the
    digits' 0..16 scale: within 0.5 of 0; real digits ≈ 0.49), and the share outside [0, 1]."""
    u = np.asarray(images_unit, dtype=np.float64)
    if u.ndim != 4 or u.size == 0:
        raise ValueError(f"expected (N, C, H, W) images, got shape {u.shape}")
    return PixelStats(
        near_background=float((np.abs(u) <= 1 / 32).mean()),
        out_of_range=float(((u < 0) | (u > 1)).mean()),
    )


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
