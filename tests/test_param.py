"""Parameterisations: the boundary condition f(x, σ_min) = x and the scalings (reference §1, §6)."""

import math

import pytest
import torch
from torch import nn

from cmkit.networks.mlp import MLP
from cmkit.param import (
    ConsistencyFunction,
    EDMDenoiser,
    FlowParam,
    consistency_scalings,
    edm_scalings,
)


def perturbed_mlp(dtype=torch.float32, seed=0, dim=2):
    """A tiny MLP with every weight moved off its initial value: non-zero, non-trivial output."""
    torch.manual_seed(seed)
    net = MLP(dim=dim, hidden=16, depth=2, emb_dim=8)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return net.to(dtype)


class Affine(nn.Module):
    """F(x, c) = 2x + 3c + 1: simple enough to write every composition out by hand."""

    def forward(self, x, c_noise):
        return 2 * x + 3 * c_noise.reshape(-1, *([1] * (x.ndim - 1))) + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(
    "sigma_data, sigma_min", [(0.5, 0.002), (1.0, 0.01), (0.3, 0.5), (0.6, 0.002), (1.3, 0.002)]
)
def test_boundary_is_exact(dtype, sigma_data, sigma_min):
    net = perturbed_mlp(dtype)
    f = ConsistencyFunction(net, sigma_data, sigma_min)
    x = 3 * torch.randn(64, 2, generator=torch.Generator().manual_seed(1)).to(dtype)
    # the network output is far from zero, so the boundary cannot hold by accident
    c_noise = torch.full((64,), math.log(sigma_min) / 4, dtype=dtype)
    assert net(x, c_noise).abs().mean() > 0.1
    with torch.no_grad():
        assert torch.equal(f(x, sigma_min), x)  # python float time
        t_vec = torch.full((64,), sigma_min, dtype=torch.float64)  # (B,) float64 time
        assert torch.equal(f(x, t_vec), x)
        assert torch.equal(f(x, torch.tensor(sigma_min, dtype=dtype)), x)  # 0-dim time
        # and slightly above the boundary it is no longer the identity
        assert not torch.allclose(f(x, 2 * sigma_min + 0.01), x)


def test_boundary_exact_with_mixed_batch_times():
    net = perturbed_mlp()
    f = ConsistencyFunction(net, 0.5, 0.002)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.002, 1.0, 0.002, 80.0])
    with torch.no_grad():
        y = f(x, t)
    assert torch.equal(y[0], x[0]) and torch.equal(y[2], x[2])
    assert not torch.allclose(y[1], x[1]) and not torch.allclose(y[3], x[3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_flow_boundary_is_exact(dtype):
    net = perturbed_mlp(dtype)
    f = FlowParam(net)
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(3)).to(dtype)
    with torch.no_grad():
        assert net(x, torch.zeros(32, dtype=dtype)).abs().mean() > 0.1
        assert torch.equal(f(x, 0.0), x)
        assert torch.equal(f(x, torch.zeros(32, dtype=dtype)), x)
        assert not torch.allclose(f(x, 0.5), x)


@pytest.mark.parametrize("t", [0.002, 0.01, 0.5, 1.0, 80.0])
@pytest.mark.parametrize("sigma_data, sigma_min", [(0.5, 0.002), (1.0, 0.01)])
def test_consistency_scalings_by_hand(t, sigma_data, sigma_min):
    x = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    s = consistency_scalings(torch.tensor([t], dtype=torch.float64), x, sigma_data, sigma_min)
    sd, eps = sigma_data, sigma_min
    assert s.c_skip.shape == (1, 1, 1, 1) and s.c_noise.shape == (1,)
    assert s.c_skip.item() == pytest.approx(sd**2 / ((t - eps) ** 2 + sd**2), rel=1e-14)
    assert s.c_out.item() == pytest.approx(sd * (t - eps) / math.sqrt(sd**2 + t**2), abs=1e-15)
    assert s.c_in.item() == pytest.approx(1 / math.sqrt(t**2 + sd**2), rel=1e-14)
    assert s.c_noise.item() == pytest.approx(math.log(t) / 4, rel=1e-14)


def test_consistency_scalings_known_numbers():
    # σ_d = 0.5, ε = 0.002, t = 80: c_skip = 0.25/(79.998² + 0.25), c_out = 0.5·79.998/√6400.25
    s = consistency_scalings(
        torch.tensor([80.0], dtype=torch.float64), torch.zeros(1, 2), 0.5, 0.002
    )
    assert s.c_skip.item() == pytest.approx(3.9063e-5, rel=1e-4)
    assert s.c_out.item() == pytest.approx(0.499978, rel=1e-5)
    assert s.c_in.item() == pytest.approx(0.01249976, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(
    "sigma_data, sigma_min", [(0.5, 0.002), (0.7, 0.05), (2.0, 0.3), (0.3, 0.002), (1.3, 0.002)]
)
def test_scalings_at_boundary_are_exact(dtype, sigma_data, sigma_min):
    x = torch.zeros(2, 2, dtype=dtype)
    t = torch.full((2,), sigma_min, dtype=dtype)
    s = consistency_scalings(t, x, sigma_data, sigma_min)
    assert torch.equal(s.c_skip, torch.ones(2, 1, dtype=dtype))
    assert torch.equal(s.c_out, torch.zeros(2, 1, dtype=dtype))


@pytest.mark.parametrize("sigma", [0.002, 0.1, 0.5, 2.0, 80.0])
def test_edm_scalings_by_hand(sigma):
    sd = 0.5
    s = edm_scalings(torch.tensor([sigma], dtype=torch.float64), torch.zeros(1, 2), sd)
    assert s.c_skip.item() == pytest.approx(sd**2 / (sigma**2 + sd**2), rel=1e-14)
    assert s.c_out.item() == pytest.approx(sigma * sd / math.sqrt(sigma**2 + sd**2), rel=1e-14)
    assert s.c_in.item() == pytest.approx(1 / math.sqrt(sigma**2 + sd**2), rel=1e-14)
    assert s.c_noise.item() == pytest.approx(math.log(sigma) / 4, rel=1e-14)


def test_edm_denoiser_equals_hand_composition_with_same_net():
    net = perturbed_mlp(torch.float64)
    sd = 0.5
    D = EDMDenoiser(net, sd)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sigma = torch.tensor([0.01, 1.0, 50.0], dtype=torch.float64)
    with torch.no_grad():
        got = D(x, sigma)
        rows = []
        for i in range(3):
            s = sigma[i].item()
            c_skip = sd**2 / (s**2 + sd**2)
            c_out = s * sd / math.sqrt(s**2 + sd**2)
            c_in = 1 / math.sqrt(s**2 + sd**2)
            F = net(c_in * x[i : i + 1], torch.tensor([math.log(s) / 4], dtype=torch.float64))
            rows.append(c_skip * x[i] + c_out * F[0])
    torch.testing.assert_close(got, torch.stack(rows), rtol=1e-12, atol=1e-12)


def test_wrappers_with_affine_net_by_hand():
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    sd, eps, t = 0.5, 0.002, 2.0
    f = ConsistencyFunction(Affine(), sd, eps)
    c_in = 1 / math.sqrt(t**2 + sd**2)
    F = 2 * c_in * x + 3 * math.log(t) / 4 + 1
    expected = sd**2 / ((t - eps) ** 2 + sd**2) * x + sd * (t - eps) / math.sqrt(sd**2 + t**2) * F
    torch.testing.assert_close(f(x, t), expected, rtol=1e-14, atol=0)
    # FlowParam: c_noise = t and x₀ = x − t·v
    v = 2 * x + 3 * 0.25 + 1
    torch.testing.assert_close(FlowParam(Affine())(x, 0.25), x - 0.25 * v, rtol=1e-14, atol=0)
    torch.testing.assert_close(FlowParam(Affine()).velocity(x, 0.25), v, rtol=1e-14, atol=0)


def test_consistency_function_images():
    class Zero(nn.Module):
        def forward(self, x, c):
            return torch.zeros_like(x)

    f = ConsistencyFunction(Zero(), 0.5, 0.002)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0.002, 1.0], dtype=torch.float64)
    y = f(x, t)
    assert y.shape == x.shape
    assert torch.equal(y[0], x[0])
    torch.testing.assert_close(y[1], 0.25 / (0.998**2 + 0.25) * x[1], rtol=1e-14, atol=0)


@pytest.mark.parametrize("t", [0.002, 0.7, 80.0])
def test_one_float_time_matches_per_sample_times(t):
    """Samplers pass one float for the batch; it must compute what a (B,) tensor does."""
    torch.manual_seed(0)
    net = MLP(2, hidden=16, depth=2)
    x = torch.randn(5, 2)
    for wrap in (ConsistencyFunction(net), EDMDenoiser(net)):
        a, b = wrap(x, t), wrap(x, torch.full((5,), t))
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert torch.equal(ConsistencyFunction(net)(x, 0.002), x)  # the boundary, exactly
