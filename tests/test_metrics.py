"""Metrics against values worked out by hand on tiny inputs, and their basic behaviour."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cmkit.features import (
    MNISTNET_WEIGHTS,
    accuracy,
    load_digitsnet,
    load_mnistnet,
    make_extractor,
    train_classifier,
)
from cmkit.metrics import (
    energy_distance,
    extract_features,
    fd_inf_sizes,
    frechet_distance,
    frechet_distance_inf,
    gaussian_frechet,
    kernel_distance,
    knn_precision_recall,
    mmd_rbf,
    pixel_range_stats,
    sliced_wasserstein,
)


def col(*v: float) -> np.ndarray:
    return np.array(v, dtype=np.float64)[:, None]


def test_energy_distance_by_hand():
    # cross mean (0 + 2 + 1 + 1)/4 = 1; within x: 1; within y: 2  →  2·1 − 1 − 2
    assert energy_distance(col(0, 1), col(0, 2)) == pytest.approx(-1.0)


def test_sliced_wasserstein_is_w2_in_one_dimension():
    assert sliced_wasserstein(col(0, 1), col(1, 2)) == pytest.approx(1.0)
    # unequal sizes: quantiles at 4 levels, x → 0,1,2,3 and y → 0,0,2,2
    assert sliced_wasserstein(col(0, 1, 2, 3), col(0, 2)) == pytest.approx(math.sqrt(0.5))


def test_sliced_wasserstein_is_rotation_invariant_in_expectation():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(500, 2)), rng.normal(size=(500, 2)) + [3.0, 0.0]
    # a shift by 3 along one axis: mean of (3·cos θ)² over directions is 4.5
    assert sliced_wasserstein(x, y, projections=2000) == pytest.approx(math.sqrt(4.5), rel=0.1)


def test_mmd_by_hand():
    x, y = col(0, 1), col(3, 4)
    k = lambda d: math.exp(-(d**2) / 2)  # noqa: E731  bandwidth 1
    expected = 2 * k(1) - 2 * (k(3) + k(4) + k(2) + k(3)) / 4
    assert mmd_rbf(x, y, bandwidth=1.0) == pytest.approx(expected)


def test_mmd_median_bandwidth_by_hand():
    x, y = col(0, 1), col(3, 4)
    # pooled pairwise distances 1,3,4,2,3,1 → median 2.5
    k = lambda d: math.exp(-(d**2) / (2 * 2.5**2))  # noqa: E731
    expected = 2 * k(1) - 2 * (k(3) + k(4) + k(2) + k(3)) / 4
    assert mmd_rbf(x, y) == pytest.approx(expected)


def test_precision_recall_by_hand():
    real, fake = col(0, 1, 2, 10), col(0.5, 5, 20)
    # real radii (k=1): 1,1,1,8 → 0.5 and 5 are inside, 20 is not; fake radii 4.5,4.5,15
    precision, recall = knn_precision_recall(real, fake, k=1)
    assert precision == pytest.approx(2 / 3) and recall == 1.0


def test_sample_metrics_near_zero_for_one_distribution():
    rng = np.random.default_rng(1)
    x, y, far = rng.normal(size=(800, 2)), rng.normal(size=(800, 2)), rng.normal(size=(800, 2)) + 1
    assert abs(energy_distance(x, y)) < 0.02 < energy_distance(x, far)
    assert abs(mmd_rbf(x, y)) < 0.01 < mmd_rbf(x, far)
    assert sliced_wasserstein(x, y) < 0.15 < sliced_wasserstein(x, far)


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    # features (a, b) with diagonal empirical covariance: FD = ‖Δμ‖² + Σ (σ₁ − σ₂)²
    pts = np.array([[1, 0], [-1, 0], [0, 2], [0, -2]], dtype=np.float32)
    real, fake = torch.as_tensor(pts).double(), torch.as_tensor(3 * pts + [0.5, 0]).double()
    var = pts.var(axis=0, ddof=1)  # torchmetrics uses the unbiased covariance
    expected = 0.25 + sum((np.sqrt(v) - np.sqrt(9 * v)) ** 2 for v in var)
    assert frechet_distance(real, fake) == pytest.approx(expected, rel=1e-5)


def _gaussian(mu, sigma, n, gen) -> torch.Tensor:
    return (
        mu
        + torch.randn(n, len(mu), generator=gen, dtype=torch.float64)
        @ torch.linalg.cholesky(sigma).T
    )


def test_gaussian_frechet_by_hand():
    one = lambda v: torch.tensor([[v]], dtype=torch.float64)  # noqa: E731
    # 1-D: (μ₁ − μ₂)² + (σ₁ − σ₂)² = 4 + (2 − 3)²
    assert gaussian_frechet(torch.tensor([0.0]), one(4), torch.tensor([2.0]), one(9)) == (
        pytest.approx(5.0)
    )
    # commuting covariances: Σ (√a − √b)² over the eigenvalues, whatever the rotation
    q = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)).double())[0]
    a, b = torch.tensor([1.0, 4.0, 9.0]).double(), torch.tensor([4.0, 1.0, 16.0]).double()
    zero = torch.zeros(3, dtype=torch.float64)
    got = gaussian_frechet(zero, q @ a.diag() @ q.T, zero, q @ b.diag() @ q.T)
    assert got == pytest.approx(float((a.sqrt() - b.sqrt()).pow(2).sum()), rel=1e-9)


def test_gaussian_frechet_of_fitted_moments_is_the_torchmetrics_fd():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(300, 5, generator=gen).double(), torch.randn(200, 5, generator=gen).double()
    y = y @ torch.rand(5, 5, generator=gen).double() + 0.3
    fitted = gaussian_frechet(x.mean(0), torch.cov(x.T), y.mean(0), torch.cov(y.T))
    assert fitted == pytest.approx(frechet_distance(x, y), rel=1e-6)


def test_fd_inf_is_closer_than_fd_to_the_closed_form():
    """200 fake samples of 8 features: plain FD overshoots the true distance (its bias grows as
    1/N); FD∞ removes that bias, on average over 20 draws, at the cost of more spread."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(8, 8, generator=gen, dtype=torch.float64) / 3
    mu, sigma = torch.zeros(8, dtype=torch.float64), a @ a.T + 0.5 * torch.eye(8).double()
    true = gaussian_frechet(mu, sigma, mu + 0.2, 1.5 * sigma)
    fd, fd_inf = [], []
    for _ in range(20):
        real, fake = _gaussian(mu, sigma, 20000, gen), _gaussian(mu + 0.2, 1.5 * sigma, 200, gen)
        fd.append(frechet_distance(real, fake))
        fd_inf.append(frechet_distance_inf(real, fake))
    bias, bias_inf = np.mean(fd) - true, np.mean(fd_inf) - true
    assert bias > 0.2 and abs(bias_inf) < bias / 2, (true, bias, bias_inf)


def test_fd_inf_sizes_are_even_in_one_over_n_and_seeded():
    sizes = fd_inf_sizes(2000, 64)
    assert sizes[0] == 400 and sizes[-1] == 2000 and len(sizes) == 8
    steps = np.diff(1 / np.asarray(sizes, dtype=np.float64))
    assert np.allclose(steps, steps[0], rtol=0.02)
    assert fd_inf_sizes(180, 64)[0] == 90  # n/5 would fit 64 features on 36 rows
    gen = torch.Generator().manual_seed(2)
    real, fake = torch.randn(500, 3, generator=gen), torch.randn(100, 3, generator=gen)
    assert frechet_distance_inf(real, fake) == frechet_distance_inf(real, fake, seed=0)
    assert frechet_distance_inf(real, fake) != frechet_distance_inf(real, fake, seed=1)
    with pytest.raises(ValueError, match="distinct sizes"):
        frechet_distance_inf(real, fake, sizes=[50, 50])


def test_pixel_range_stats_by_hand():
    # 8 pixels: 0, 1/64 and −1/32 are near the background; −1/32, −0.1 and 1.2 out of range
    u = np.array([0, 1 / 64, -1 / 32, 0.05, 0.5, 1.0, -0.1, 1.2]).reshape(2, 1, 2, 2)
    stats = pixel_range_stats(u)
    assert stats.near_background == pytest.approx(3 / 8)
    assert stats.out_of_range == pytest.approx(3 / 8)
    digits = load_digits_unit()
    assert pixel_range_stats(digits).near_background == pytest.approx(0.49, abs=0.01)
    assert pixel_range_stats(digits).out_of_range == 0
    with pytest.raises(ValueError, match="N, C, H, W"):
        pixel_range_stats(np.zeros((4, 4)))


def load_digits_unit() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().images[:, None] / 16


def test_kid_matches_the_cubic_kernel_mmd_when_subsets_hold_every_point():
    rng = np.random.default_rng(2)
    f = torch.as_tensor(rng.normal(size=(20, 3)))
    g = torch.as_tensor(rng.normal(size=(20, 3)) + 0.5)

    def k(a, b):
        return (a @ b.T / 3 + 1) ** 3

    def off(m):
        return (m.sum() - m.diagonal().sum()) / (20 * 19)

    expected = off(k(f, f)) + off(k(g, g)) - 2 * k(f, g).mean()
    got = kernel_distance(f, g, subsets=3)
    assert got == pytest.approx(float(expected), rel=1e-6)


def test_frechet_distance_falls_as_samples_approach_the_data():
    from sklearn.datasets import load_digits

    digits = (load_digits().images[:, None] / 16).astype(np.float32)
    order = np.random.default_rng(3).permutation(len(digits))
    real, base = digits[order[:800]], digits[order[800:1600]]
    extractor = make_extractor(None, (1, 8, 8))
    assert extractor.name == "digitsnet"
    rng = np.random.default_rng(3)
    noise = rng.normal(size=base.shape).astype(np.float32)
    real_f = extract_features(extractor, real)
    fds = [
        frechet_distance(real_f, extract_features(extractor, np.clip(base + s * noise, 0, 1)))
        for s in (0.6, 0.3, 0.1, 0)
    ]
    assert all(a > b for a, b in zip(fds, fds[1:], strict=False)), fds
    assert frechet_distance(real_f, real_f) == pytest.approx(0.0, abs=1e-3)


def test_digitsnet_classifies_held_out_digits():
    from sklearn.datasets import load_digits

    from cmkit.data import split_holdout

    d = load_digits()
    held = split_holdout(np.arange(len(d.images)), 0.1)[1]
    x = torch.as_tensor(d.images[held, None] / 16, dtype=torch.float32)
    with torch.no_grad():
        acc = (load_digitsnet()(x).argmax(1).numpy() == d.target[held]).mean()
    assert acc > 0.97


def test_mnistnet_is_the_default_for_28x28_and_ships_small():
    assert MNISTNET_WEIGHTS.stat().st_size < 1_000_000
    extractor = make_extractor(None, (1, 28, 28))
    assert extractor.name == "mnistnet" and extractor.num_features == 48
    features = extractor(torch.rand(3, 1, 28, 28))
    assert features.shape == (3, 48) and torch.isfinite(features).all()
    assert make_extractor(None, (1, 27, 27)).name == "pixels"


@pytest.mark.skipif(not Path("/work/shared/data/mnist.npz").is_file(), reason="no local MNIST copy")
def test_mnistnet_classifies_mnist_test_images():
    with np.load("/work/shared/data/mnist.npz") as f:
        x, y = f["x_test"][:2000, None] / 255.0, f["y_test"][:2000]
    assert accuracy(load_mnistnet(), x, y) > 0.97


def test_classifier_training_is_reproducible():
    rng = np.random.default_rng(4)
    x, y = rng.random((64, 1, 8, 8)).astype(np.float32), rng.integers(0, 3, 64)
    a, b = train_classifier(x, y, epochs=2), train_classifier(x, y, epochs=2)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
