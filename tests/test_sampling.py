"""Samplers (reference §5, §6) and the energy-distance metric."""

import math

import numpy as np
import pytest
import torch

from cmkit.errors import UserError
from cmkit.metrics import energy_distance
from cmkit.networks.mlp import MLP
from cmkit.process import EDMProcess, FlowProcess
from cmkit.sampling import check_times, sample_multistep, sample_ode, sample_onestep

S = 0.5


class Recorder:
    """A consistency function that records its inputs and returns a fixed map of them."""

    def __init__(self, fn=lambda x, t: 0.5 * x):
        self.fn, self.calls = fn, []

    def __call__(self, x, t):
        self.calls.append((x.clone(), t))
        return self.fn(x, t)


def noise(shape=(5, 2), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def edm_gaussian_denoiser(x, t):
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return S**2 / (S**2 + t**2) * x


def flow_gaussian_denoiser(x, t):
    """E[x₀ | x_t] for x_t = (1 − t)x₀ + t·x₁, x₀ ~ N(0, S²): (1 − t)S²/((1 − t)²S² + t²)·x_t."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return (1 - t) * S**2 / ((1 - t) ** 2 * S**2 + t**2) * x


# ---------------------------------------------------------------- one step and multistep


@pytest.mark.parametrize("proc, scale", [(EDMProcess(), 80.0), (FlowProcess(), 1.0)])
def test_onestep_uses_prior_and_t_max(proc, scale):
    z = noise((4, 1, 3, 3))
    f = Recorder()
    out = sample_onestep(f, proc, z)
    ((x, t),) = f.calls
    assert t == proc.t_max
    torch.testing.assert_close(x, scale * z, rtol=0, atol=0)
    assert out.shape == z.shape
    torch.testing.assert_close(out, 0.5 * scale * z)


@pytest.mark.parametrize("proc", [EDMProcess(), FlowProcess()])
def test_multistep_without_times_is_onestep(proc):
    z = noise()
    f = Recorder()
    assert torch.equal(sample_multistep(f, proc, z, [], []), sample_onestep(Recorder(), proc, z))
    assert len(f.calls) == 1


def test_multistep_edm_follows_algorithm_1():
    proc = EDMProcess()
    z, e1, e2 = noise(seed=0), noise(seed=1), noise(seed=2)
    taus = [5.0, 0.821]
    f = Recorder()
    out = sample_multistep(f, proc, z, taus, [e1, e2])
    assert [t for _, t in f.calls] == [80.0, 5.0, 0.821]
    x = 0.5 * 80.0 * z
    x_hat = x + math.sqrt(5.0**2 - 0.002**2) * e1
    torch.testing.assert_close(f.calls[1][0], x_hat)
    x = 0.5 * x_hat
    x_hat = x + math.sqrt(0.821**2 - 0.002**2) * e2
    torch.testing.assert_close(f.calls[2][0], x_hat)
    torch.testing.assert_close(out, 0.5 * x_hat)


def test_multistep_flow_uses_reflow_iteration():
    proc = FlowProcess()
    z, e1 = noise(seed=0), noise(seed=1)
    f = Recorder()
    out = sample_multistep(f, proc, z, [0.4], [e1])
    x_hat = 0.6 * (0.5 * z) + 0.4 * e1
    torch.testing.assert_close(f.calls[1][0], x_hat)
    assert f.calls[1][1] == 0.4
    torch.testing.assert_close(out, 0.5 * x_hat)


@pytest.mark.parametrize(
    "proc, times",
    [
        (EDMProcess(), [1.0, 2.0]),  # increasing
        (EDMProcess(), [1.0, 1.0]),  # not strictly decreasing
        (EDMProcess(), [80.0]),  # = t_max
        (EDMProcess(), [100.0]),  # above t_max
        (EDMProcess(), [0.002]),  # = t_min
        (EDMProcess(), [1.0, 0.0]),  # below t_min
        (FlowProcess(), [1.0]),
        (FlowProcess(), [0.5, 0.0]),
        (FlowProcess(), [0.3, 0.6]),
    ],
)
def test_check_times_rejects(proc, times):
    with pytest.raises(UserError, match="decrease strictly"):
        check_times(proc, times)
    with pytest.raises(UserError):
        sample_multistep(Recorder(), proc, noise(), times, [noise() for _ in times])


@pytest.mark.parametrize(
    "proc, times", [(EDMProcess(), []), (EDMProcess(), [40.0, 0.821, 0.01]), (FlowProcess(), [0.5])]
)
def test_check_times_accepts(proc, times):
    check_times(proc, times)


def test_same_inputs_same_outputs_with_a_network():
    torch.manual_seed(0)
    f = EDMProcess().consistency(MLP(2, hidden=16, depth=1, emb_dim=8)).eval()
    z = noise(seed=3).float()
    noises = [noise(seed=4).float()]
    a = sample_multistep(f, EDMProcess(), z, [0.821], noises)
    b = sample_multistep(f, EDMProcess(), z.clone(), [0.821], [n.clone() for n in noises])
    assert torch.equal(a, b)
    assert not torch.equal(a, sample_onestep(f, EDMProcess(), z))


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_default_times_are_valid(steps):
    for proc in (EDMProcess(), FlowProcess()):
        times = proc.default_times(steps)
        assert len(times) == steps - 1
        check_times(proc, times)
    assert FlowProcess().default_times(4) == [0.75, 0.5, 0.25]
    with pytest.raises(UserError):
        EDMProcess().default_times(0)


# ---------------------------------------------------------------- ODE sampling


@pytest.mark.parametrize("solver, steps, tol", [("heun", 40, 0.02), ("heun", 80, 0.005)])
def test_sample_ode_edm_exact_denoiser(solver, steps, tol):
    z = noise((256, 2), seed=5)
    out = sample_ode(edm_gaussian_denoiser, EDMProcess(), z, steps, solver)
    exact = 80.0 * z * S / math.sqrt(S**2 + 80.0**2)  # x(0) = x_T·S/√(S² + T²)
    assert ((out - exact).norm() / exact.norm()).item() < tol
    assert out.std().item() == pytest.approx(S, rel=0.15)


def test_sample_ode_edm_default_solver_is_euler():
    z = noise((64, 2), seed=6)
    exact = 80.0 * z * S / math.sqrt(S**2 + 80.0**2)
    euler = sample_ode(edm_gaussian_denoiser, EDMProcess(), z, 40)
    err = ((euler - exact).norm() / exact.norm()).item()
    assert 0.01 < err < 0.1  # first order: a few percent at 40 steps
    torch.testing.assert_close(
        euler, sample_ode(edm_gaussian_denoiser, EDMProcess(), z, 40, "euler"), rtol=0, atol=0
    )


@pytest.mark.parametrize("solver, tol", [("heun", 0.005), ("euler", 0.05)])
def test_sample_ode_flow_exact_denoiser(solver, tol):
    # x_t ∝ √((1 − t)²S² + t²): from x₁ = z the exact endpoint is S·z
    z = noise((256, 2), seed=7)
    out = sample_ode(flow_gaussian_denoiser, FlowProcess(), z, 40, solver)
    assert ((out - S * z).norm() / (S * z).norm()).item() < tol


# ---------------------------------------------------------------- energy distance


def test_energy_distance_by_hand_1d():
    x = np.array([[0.0], [1.0]])
    y = np.array([[2.0], [4.0]])
    # cross: |0−2|, |0−4|, |1−2|, |1−4| -> mean 2.5; within x: 1; within y: 2
    assert energy_distance(x, y) == pytest.approx(2 * 2.5 - 1 - 2, abs=1e-12)
    assert energy_distance(y, x) == pytest.approx(2.0, abs=1e-12)


def test_energy_distance_by_hand_2d():
    x = np.array([[0.0, 0.0], [3.0, 4.0]])  # within: 5
    y = np.array([[0.0, 0.0], [0.0, 1.0]])  # within: 1
    cross = (0 + 1 + 5 + math.sqrt(9 + 9)) / 4
    assert energy_distance(x, y) == pytest.approx(2 * cross - 5 - 1, abs=1e-12)


def test_energy_distance_same_distribution_near_zero():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(1500, 2)), rng.normal(size=(1500, 2))
    assert abs(energy_distance(a, b)) < 0.01


@pytest.mark.parametrize("delta", [0.5, 1.0, 3.0])
def test_energy_distance_closed_form_two_gaussians_1d(delta):
    # X ~ N(0, 1), Y ~ N(δ, 1): X − Y ~ N(−δ, 2), E|N(μ, σ²)| = σ√(2/π)e^{−μ²/2σ²} + μ(1 − 2Φ(−μ/σ))
    rng = np.random.default_rng(1)
    sigma = math.sqrt(2)
    phi = 0.5 * (1 + math.erf(-delta / sigma / math.sqrt(2)))
    cross = sigma * math.sqrt(2 / math.pi) * math.exp(-(delta**2) / (2 * sigma**2)) + delta * (
        1 - 2 * phi
    )
    within = 2 / math.sqrt(math.pi)  # E|X − X'| for unit variance
    expected = 2 * cross - 2 * within  # δ = 1: ≈ 0.2695
    got = energy_distance(rng.normal(size=(3000, 1)), delta + rng.normal(size=(3000, 1)))
    assert got == pytest.approx(expected, abs=0.03)


def test_energy_distance_grows_with_shift():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(500, 2))
    b = rng.normal(size=(500, 2))
    values = [energy_distance(a, b + [s, 0.0]) for s in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(v2 > v1 for v1, v2 in zip(values, values[1:], strict=False))


def test_energy_distance_accepts_images_and_rejects_bad_shapes():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(4, 1, 2, 2)), rng.normal(size=(5, 1, 2, 2))
    assert energy_distance(a, b) == pytest.approx(
        energy_distance(a.reshape(4, 4), b.reshape(5, 4)), abs=1e-12
    )
    with pytest.raises(ValueError):
        energy_distance(a[:1], b)
    with pytest.raises(ValueError):
        energy_distance(a, rng.normal(size=(5, 3)))
