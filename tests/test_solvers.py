"""PF-ODE solvers, measured against the closed-form solution for Gaussian data (reference §1, §5).

For data N(0, s²·I) the denoiser is D(x, σ) = s²/(s²+σ²)·x and the PF-ODE dx/dσ = (x − D)/σ
has the solution x(σ) = x_T·√(s²+σ²)/√(s²+T²).
"""

import math

import pytest
import torch

from cmkit.process import EDMProcess
from cmkit.solvers import drift, euler_step, heun_step, nfe, solve


def gaussian_denoiser(s):
    def D(x, t):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return s**2 / (s**2 + t**2) * x

    return D


class Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.fn(x, t)


def x_T(T=80.0):
    return T * torch.tensor([[1.0, -0.5], [-2.0, 0.25], [0.3, 1.5]], dtype=torch.float64)


def relative_error(solver, k, s):
    times = EDMProcess().sampling_times(k)
    x = solve(gaussian_denoiser(s), x_T(), times, solver)
    exact = x_T() * s / math.sqrt(s**2 + 80.0**2)
    return ((x - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize("s", [0.5, 1.0])
def test_heun_is_second_order(s):
    errors = [relative_error("heun", k, s) for k in (10, 20, 40)]
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(r > 3.0 for r in ratios), (errors, ratios)  # ≈ 4 per doubling
    assert errors[-1] < 0.02


@pytest.mark.parametrize("s", [0.5, 1.0])
def test_euler_is_first_order(s):
    errors = [relative_error("euler", k, s) for k in (10, 20, 40)]
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(1.5 < r < 2.5 for r in ratios), (errors, ratios)  # ≈ 2 per doubling
    assert errors[-1] < 0.1


def test_heun_beats_euler_at_equal_steps():
    assert relative_error("heun", 20, 0.5) < 0.5 * relative_error("euler", 20, 0.5)


@pytest.mark.parametrize("k", [2, 5, 18])
def test_nfe_counts_real_calls(k):
    times = EDMProcess().sampling_times(k)
    for solver, expected in (("heun", 2 * k - 1), ("euler", k)):
        D = Counting(gaussian_denoiser(0.5))
        solve(D, x_T(), times, solver)
        assert D.calls == expected == nfe(solver, times)
    # a grid that stops at σ_min (no step to 0): Heun uses 2 per step
    stop = times[:-1]
    D = Counting(gaussian_denoiser(0.5))
    solve(D, x_T(), stop, "heun")
    assert D.calls == 2 * (k - 1) == nfe("heun", stop)


def test_drift_and_euler_step_by_hand():
    s, t, t_next = 0.5, 2.0, 1.5
    x = x_T(1.0)
    D = gaussian_denoiser(s)
    d = (x - s**2 / (s**2 + t**2) * x) / t
    torch.testing.assert_close(drift(D, x, t), d, rtol=1e-14, atol=0)
    torch.testing.assert_close(euler_step(D, x, t, t_next), x + (t_next - t) * d)


def test_heun_step_by_hand():
    s, t, t_next = 0.5, 2.0, 1.5
    x = x_T(1.0)
    D = gaussian_denoiser(s)
    d = (x - s**2 / (s**2 + t**2) * x) / t
    x_e = x + (t_next - t) * d
    d2 = (x_e - s**2 / (s**2 + t_next**2) * x_e) / t_next
    torch.testing.assert_close(heun_step(D, x, t, t_next), x + (t_next - t) * (d + d2) / 2)


def test_heun_step_with_zero_next_time_is_euler_for_those_rows():
    s = 0.5
    D = gaussian_denoiser(s)
    x = x_T(1.0)
    t = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    t_next = torch.tensor([0.0, 0.25, 0.0], dtype=torch.float64)
    out = heun_step(D, x, t, t_next)
    assert torch.isfinite(out).all()
    for i in (0, 2):  # Euler to 0: x − t·(x − D)/t = D(x, t)
        ti = t[i].item()
        euler = x[i] + (0.0 - ti) * (x[i] - s**2 / (s**2 + ti**2) * x[i]) / ti
        torch.testing.assert_close(out[i], euler, rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(out[i], s**2 / (s**2 + ti**2) * x[i])
    # row 1 is a true Heun step
    ti, tn = 0.5, 0.25
    d = (x[1] - s**2 / (s**2 + ti**2) * x[1]) / ti
    x_e = x[1] + (tn - ti) * d
    d2 = (x_e - s**2 / (s**2 + tn**2) * x_e) / tn
    torch.testing.assert_close(out[1], x[1] + (tn - ti) * (d + d2) / 2)
    # all rows to 0: one evaluation only
    D1 = Counting(D)
    heun_step(D1, x, t, torch.zeros(3, dtype=torch.float64))
    assert D1.calls == 1


def test_heun_steps_agree_per_sample_and_scalar():
    D = gaussian_denoiser(0.5)
    x = x_T(1.0)
    per_sample = heun_step(D, x, torch.full((3,), 3.0), torch.full((3,), 1.0))
    torch.testing.assert_close(per_sample, heun_step(D, x, 3.0, 1.0))


def test_solve_identity_denoiser_on_flow_grid():
    # D(x, t) = 0 (data is a point mass at 0): dx/dt = x/t, so x(t) = x_1·t and x(0) = 0
    x1 = x_T(1.0)
    times = torch.linspace(1.0, 0.0, 5, dtype=torch.float64)
    for solver in ("euler", "heun"):
        out = solve(lambda x, t: torch.zeros_like(x), x1, times, solver)
        torch.testing.assert_close(out, torch.zeros_like(x1))
        stop = solve(lambda x, t: torch.zeros_like(x), x1, times[:-1], solver)
        torch.testing.assert_close(stop, 0.25 * x1)  # exact: the drift is linear in t
