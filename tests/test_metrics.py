"""Metrics against values worked out by hand on tiny inputs, and their basic behaviour."""

import math

import numpy as np
import pytest
import torch

from cmkit.features import load_digitsnet, make_extractor, train_classifier
from cmkit.metrics import (
    energy_distance,
    extract_features,
    frechet_distance,
    kernel_distance,
    knn_precision_recall,
    mmd_rbf,
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


def test_classifier_training_is_reproducible():
    rng = np.random.default_rng(4)
    x, y = rng.random((64, 1, 8, 8)).astype(np.float32), rng.integers(0, 3, 64)
    a, b = train_classifier(x, y, epochs=2), train_classifier(x, y, epochs=2)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
