"""Distances, lower points (CD/CT) and the consistency loss; short CT/CD training on a 2-D toy."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from cmkit.batch import Batch
from cmkit.data import load_data
from cmkit.losses import (
    ConsistencyLoss,
    EDMLoss,
    TeacherStep,
    UnbiasedEstimate,
    inverse_gap_weight,
    l1_distance,
    l2_distance,
    make_distance,
    pseudo_huber_distance,
    unit_weight,
)
from cmkit.metrics import energy_distance
from cmkit.networks.mlp import MLP
from cmkit.noise import FixedScales, ICTCurriculum
from cmkit.param import EDMDenoiser
from cmkit.process import EDMProcess, FlowProcess
from cmkit.sampling import sample_onestep
from cmkit.solvers import euler_step
from cmkit.train import TrainState, train
from cmkit.training_times import GridPairs, LognormalIndices
from cmkit.units import Scaler

S = 0.5  # std of the Gaussian test data
EPS = 0.002


def gaussian_denoiser(x, t, **cond):
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return S**2 / (S**2 + t**2) * x


def exact_consistency(x, t, **cond):
    """The true consistency function of N(0, S²) data: follow the PF-ODE from t down to ε."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return x * math.sqrt(S**2 + EPS**2) / torch.sqrt(S**2 + t**2)


def identity(x, t, **cond):
    return x


class Zero(nn.Module):
    def forward(self, x, c_noise, **cond):
        return torch.zeros_like(x)


def ct_loss(proc, curriculum, distance=l2_distance, indices=None, weighting=unit_weight):
    pairs = GridPairs(proc, curriculum) if indices is None else GridPairs(proc, curriculum, indices)
    return ConsistencyLoss(proc, pairs, UnbiasedEstimate(proc.perturb), distance, weighting)


def cd_loss(proc, n_scales, teacher, solver="heun"):
    pairs = GridPairs(proc, FixedScales(n_scales))
    return ConsistencyLoss(proc, pairs, TeacherStep(teacher, solver), l2_distance)


def batch(n=8, seed=0, dtype=torch.float64):
    return S * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- distances


def test_l2_l1_shapes_and_values():
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])  # (2, 1, 2, 2)
    b = torch.tensor([[[[0.0, 0.0], [1.0, 6.0]]], [[[1.0, -1.0], [1.0, -1.0]]]])
    l2, l1 = l2_distance(a, b), l1_distance(a, b)
    assert l2.shape == (2,) and l1.shape == (2,)
    # differences: [1, 2, 2, −2] and [−1, 1, −1, 1]
    torch.testing.assert_close(l2, torch.tensor([(1 + 4 + 4 + 4) / 4, 1.0]))
    torch.testing.assert_close(l1, torch.tensor([(1 + 2 + 2 + 2) / 4, 1.0]))


@pytest.mark.parametrize("c", [0.0, 0.03, 1.0])
def test_pseudo_huber_is_over_whole_sample(c):
    a = torch.tensor([[[[1.0, 2.0], [2.0, 0.0]]], [[[0.5, 0.0], [0.0, 0.0]]]], dtype=torch.float64)
    b = torch.zeros_like(a)
    # sample 0: ‖a − b‖² = 1 + 4 + 4 = 9; sample 1: 0.25
    expected = torch.tensor(
        [math.sqrt(9 + c**2) - c, math.sqrt(0.25 + c**2) - c], dtype=torch.float64
    )
    got = pseudo_huber_distance(c)(a, b)
    assert got.shape == (2,)
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-15)
    # the per-pixel mean version (two public ports) is a different function
    diff = (a - b).flatten(1)
    per_pixel = (torch.sqrt(diff**2 + c**2) - c).mean(1)
    assert not torch.allclose(got, per_pixel)


@pytest.mark.parametrize("d", [2, 64, 3072])
def test_make_distance_pseudo_huber_default_c(d):
    c = 0.00054 * math.sqrt(d)
    a = torch.zeros(1, d, dtype=torch.float64)
    b = a.clone()
    b[0, 0], b[0, -1] = 0.3, -0.4  # ‖a − b‖ = 0.5
    got = make_distance("pseudo-huber", d)(a, b).item()
    assert got == pytest.approx(math.sqrt(0.25 + c**2) - c, rel=1e-12)
    assert make_distance("pseudo-huber", d, c=0.1)(a, b).item() == pytest.approx(
        math.sqrt(0.25 + 0.01) - 0.1, rel=1e-12
    )
    # near 0 it behaves like ‖·‖²/(2c), far away like ‖·‖
    tiny = b * 1e-5
    assert make_distance("pseudo-huber", d)(a, tiny).item() == pytest.approx(
        0.25e-10 / (2 * c), rel=1e-3
    )


def test_make_distance_names():
    assert make_distance("l2", 4) is l2_distance
    assert make_distance("l1", 4) is l1_distance
    with pytest.raises(ValueError, match="lpips"):
        make_distance("lpips", 4)


# ---------------------------------------------------------------- lower points


def test_unbiased_estimate_is_x0_plus_tn_z():
    x0, z = batch(4, 0), batch(4, 1) / S
    t_hi = torch.tensor([1.0, 2.0, 3.0, 80.0], dtype=torch.float64)
    t_lo = torch.tensor([0.002, 1.0, 2.5, 60.0], dtype=torch.float64)
    x_hi = x0 + t_hi[:, None] * z
    out = UnbiasedEstimate(EDMProcess().perturb)(x0, x_hi, z, t_hi, t_lo, {})
    torch.testing.assert_close(out, x0 + t_lo[:, None] * z, rtol=1e-15, atol=0)
    # CT is CD with the teacher's denoiser replaced by x₀: one Euler step with D := x₀
    euler = euler_step(lambda x, t: x0, x_hi, t_hi, t_lo)
    torch.testing.assert_close(out, euler, rtol=1e-12, atol=1e-12)
    # flow: (1 − t_n)·x₀ + t_n·z
    t = torch.tensor([0.0, 0.2, 0.5, 1.0], dtype=torch.float64)
    out = UnbiasedEstimate(FlowProcess().perturb)(x0, None, z, None, t, {})
    torch.testing.assert_close(out, (1 - t[:, None]) * x0 + t[:, None] * z)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_teacher_step_by_hand(solver):
    x = batch(3, 2) * 10
    th, tl = 2.0, 1.8
    t_hi, t_lo = (torch.full((3,), t, dtype=torch.float64) for t in (th, tl))
    d1 = (x - S**2 / (S**2 + th**2) * x) / th
    x_e = x + (tl - th) * d1
    if solver == "euler":
        expected = x_e
    else:
        d2 = (x_e - S**2 / (S**2 + tl**2) * x_e) / tl
        expected = x + (tl - th) * (d1 + d2) / 2
    out = TeacherStep(gaussian_denoiser, solver)(None, x, None, t_hi, t_lo, {})
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=1e-14)
    # and it approximates the exact PF-ODE flow x·√(S² + t_lo²)/√(S² + t_hi²)
    exact = x * math.sqrt(S**2 + tl**2) / math.sqrt(S**2 + th**2)
    error = ((out - exact).norm() / exact.norm()).item()
    euler_error = ((x_e - exact).norm() / exact.norm()).item()
    assert euler_error < 1e-3
    if solver == "heun":
        assert error < 0.2 * euler_error


# ---------------------------------------------------------------- consistency loss


@pytest.mark.parametrize("weighting", [unit_weight, inverse_gap_weight])
def test_consistency_loss_by_hand_on_two_point_grid(weighting):
    """N = 2: every pair is (σ_min, σ_max); with F = 0, f(x, t) = c_skip(t)·x."""
    proc = EDMProcess()
    loss_fn = ct_loss(proc, FixedScales(2), weighting=weighting)
    f = proc.consistency(Zero())
    x0 = batch(16, 3)
    loss = loss_fn(f, f, Batch(x0), 0, torch.Generator().manual_seed(0))
    p = loss_fn.draw(Batch(x0), 0, torch.Generator().manual_seed(0))  # the pair it drew
    assert (p.t == 80.0).all() and (p.r == 0.002).all()
    torch.testing.assert_close(p.x_t, x0 + 80.0 * p.z, rtol=1e-15, atol=0)
    torch.testing.assert_close(p.x_r, x0 + 0.002 * p.z, rtol=1e-15, atol=0)
    c_skip = 0.25 / ((80.0 - 0.002) ** 2 + 0.25)
    per_sample = ((c_skip * (x0 + 80.0 * p.z) - (x0 + 0.002 * p.z)) ** 2).mean(1)
    weight = 1.0 / (80.0 - 0.002) if weighting is inverse_gap_weight else 1.0
    assert loss.item() == pytest.approx(weight * per_sample.mean().item(), rel=1e-12)


@pytest.mark.parametrize("pairs", ["uniform", "lognormal"])
def test_consistency_loss_pairs_are_adjacent_grid_points(pairs):
    proc = EDMProcess()
    indices = LognormalIndices() if pairs == "lognormal" else None
    loss_fn = ct_loss(proc, ICTCurriculum(1000), indices=indices)
    x0 = batch(4000, 4)
    p = loss_fn.draw(Batch(x0), 0, torch.Generator().manual_seed(1))
    x_hi, z, t_hi, t_lo = p.x_t, p.z, p.t, p.r
    grid = proc.grid(11)
    n = torch.searchsorted(grid, t_lo)
    assert torch.equal(grid[n], t_lo)
    assert torch.equal(grid[n + 1], t_hi)
    torch.testing.assert_close(x_hi, x0 + t_hi[:, None] * z, rtol=1e-15, atol=0)
    freq = torch.bincount(n, minlength=10).double() / len(n)
    if pairs == "uniform":
        expected = torch.full((10,), 0.1, dtype=torch.float64)
    else:
        cdf = [math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0)) for s in grid.tolist()]
        raw = torch.tensor([b - a for a, b in zip(cdf, cdf[1:], strict=False)])
        expected = (raw / raw.sum()).double()
    torch.testing.assert_close(freq, expected, atol=0.025, rtol=0)


def test_consistency_loss_uses_curriculum_grid():
    proc = EDMProcess()
    cur = ICTCurriculum(800)  # K' = 100: N = 11 at k < 100, 21 at k = 100
    loss_fn = ct_loss(proc, cur)
    t_lo = loss_fn.draw(Batch(batch(2000, 5)), 100, torch.Generator().manual_seed(2)).r
    assert set(t_lo.tolist()) <= set(proc.grid(21).tolist())
    assert len(set(t_lo.tolist())) == 20


def test_consistency_loss_reproducible_and_gradients_only_online():
    proc = EDMProcess()
    torch.manual_seed(0)
    online = proc.consistency(MLP(2, hidden=16, depth=1, emb_dim=8))
    target = copy.deepcopy(online)  # deliberately left with requires_grad=True
    loss_fn = ct_loss(proc, ICTCurriculum(100), make_distance("l2", 2))
    x0 = Batch(batch(32, 6, torch.float32))
    a = loss_fn(online, target, x0, 0, torch.Generator().manual_seed(7))
    b = loss_fn(online, target, x0, 0, torch.Generator().manual_seed(7))
    c = loss_fn(online, target, x0, 0, torch.Generator().manual_seed(8))
    assert a.ndim == 0 and torch.isfinite(a)
    assert a.item() == b.item()
    assert a.item() != c.item()
    a.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in online.parameters())
    assert any(p.grad.abs().sum() > 0 for p in online.parameters())
    assert all(p.grad is None for p in target.parameters())


def test_consistency_loss_target_sees_online_dropout_masks():
    class DropoutFn(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def forward(self, x, t, **cond):
            return self.drop(x)

    f = DropoutFn().train()
    x = torch.ones(64, 8)
    assert not torch.equal(f(x, 1.0), f(x, 1.0))  # two plain calls draw different masks
    proc = EDMProcess()
    same_point = lambda x0, x_t, z, t, r, cond: x_t  # noqa: E731
    loss_fn = ConsistencyLoss(proc, GridPairs(proc, FixedScales(5)), same_point, l2_distance)
    loss = loss_fn(f, f, Batch(torch.randn(64, 8)), 0, torch.Generator().manual_seed(0))
    assert loss.item() == 0.0  # identical inputs and identical masks


@pytest.mark.parametrize("n_scales", [18, 40])
def test_cd_loss_with_exact_teacher_vanishes_on_exact_consistency_function(n_scales):
    x0 = Batch(batch(2048, 8))
    losses = {}
    for solver in ("euler", "heun"):
        loss_fn = cd_loss(EDMProcess(), n_scales, gaussian_denoiser, solver)
        for name, f in (("exact", exact_consistency), ("identity", identity)):
            g = torch.Generator().manual_seed(9)
            losses[solver, name] = loss_fn(f, f, x0, 0, g).item()
    # the identity is far from consistent; the true consistency function is consistent up to
    # the teacher's local truncation error, which is much smaller for Heun
    assert losses["heun", "exact"] < 1e-4 * losses["heun", "identity"]
    assert losses["euler", "exact"] < 1e-4 * losses["euler", "identity"]
    assert losses["heun", "exact"] < 0.3 * losses["euler", "exact"]


def test_edm_loss_finite_and_reproducible():
    torch.manual_seed(0)
    D = EDMDenoiser(MLP(2, hidden=16, depth=1, emb_dim=8))
    x0 = Batch(batch(64, 10, torch.float32))
    edm_loss = EDMLoss(EDMProcess())
    a = edm_loss(D, None, x0, 0, torch.Generator().manual_seed(0))
    b = edm_loss(D, None, x0, 0, torch.Generator().manual_seed(0))
    assert a.ndim == 0 and torch.isfinite(a) and a.item() == b.item()

    class Exact(nn.Module):
        """A 'network' whose EDM denoiser is exactly the Gaussian posterior mean: F = 0 when
        σ_d = S, because c_skip·x = S²/(S²+σ²)·x already is E[x₀ | x]."""

        def forward(self, x, c, **cond):
            return torch.zeros_like(x)

    exact_loss = EDMLoss(EDMProcess(sigma_data=S))
    g = torch.Generator().manual_seed(1)
    exact = exact_loss(EDMDenoiser(Exact(), S), None, Batch(batch(4096, 11)), 0, g)
    # weighted MSE of the posterior mean: λ(σ)·(posterior variance per dim) = 1 exactly
    assert exact.item() == pytest.approx(1.0, rel=0.05)


# ---------------------------------------------------------------- training reduces a metric


def _toy():
    raw = load_data("8gaussians")
    scaler = Scaler.fit(raw)
    data = torch.from_numpy(scaler.to_model(raw))
    # the exact denoiser of the scaled mixture: 8 components, diagonal covariance
    angles = np.arange(8) * np.pi / 4
    centres = 2 * np.sqrt(2) * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    mu = torch.tensor((centres - np.array(scaler.shift)) / np.array(scaler.scale))
    var = torch.tensor((0.5 / np.sqrt(2) / np.array(scaler.scale)) ** 2)

    def mixture_denoiser(x, t, **cond):
        xd = x.double()
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1, 1)
        total = var + t**2  # (B, 1, 2)
        diff = xd[:, None, :] - mu[None]
        log_p = -0.5 * (diff**2 / total).sum(-1) - 0.5 * torch.log(total).sum(-1)
        w = torch.softmax(log_p, dim=1)
        posterior = mu[None] + var / total * diff
        return (w[..., None] * posterior).sum(1).to(x.dtype)

    return data, mixture_denoiser


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["ict", "cd"])
def test_training_reduces_energy_distance(recipe):
    data, teacher = _toy()
    proc = EDMProcess()
    steps = 300
    torch.manual_seed(0)
    net = MLP(2, hidden=64, depth=2)
    online = proc.consistency(net)
    target = proc.consistency(copy.deepcopy(net)).requires_grad_(False)
    ema = copy.deepcopy(net).requires_grad_(False)
    state = TrainState(
        online,
        torch.optim.Adam(online.parameters(), lr=3e-3 if recipe == "ict" else 1e-3),
        torch.Generator().manual_seed(0),
        ema,
        target,
    )
    if recipe == "ict":
        schedule = ICTCurriculum(steps, 10, 160)
        pseudo_huber = make_distance("pseudo-huber", 2)
        loss_fn = ct_loss(proc, schedule, pseudo_huber, LognormalIndices(), inverse_gap_weight)
    else:
        schedule = FixedScales(18, 0.0)
        loss_fn = cd_loss(proc, 18, teacher)
    reference = data[torch.randperm(len(data), generator=torch.Generator().manual_seed(1))[:1000]]
    z = torch.randn(1000, 2, generator=torch.Generator().manual_seed(2))

    def score():
        return energy_distance(sample_onestep(online, proc, z).numpy(), reference.numpy())

    before = score()
    train(state, loss_fn, Batch(data), steps, 256, 0.99, schedule.target_mu, progress=False)
    after = score()
    assert state.step == steps
    assert all(math.isfinite(v) for v in state.losses)
    assert before > 0.2
    assert after < 0.5 * before, (before, after)
