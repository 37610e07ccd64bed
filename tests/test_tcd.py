"""TCD's strategic stochastic sampling (reference §16): γ = 1 is Algorithm 1 bit for bit,
γ = 0 uses no noise, an intermediate γ matches the step written out by hand, and the CLI's
--gamma samples a consistency run and refuses what it cannot apply to."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import run_cli

from cmkit.errors import OptionError
from cmkit.evaluate import plans
from cmkit.generate import generate, load_model
from cmkit.networks.mlp import MLP
from cmkit.process import EDMProcess, FlowProcess, TrigFlowProcess
from cmkit.sampling import sample_multistep, sample_tcd

PROCESSES = [EDMProcess(), FlowProcess(), TrigFlowProcess()]


def noise(seed: int, shape=(6, 2), dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def network_f(process):
    """A small untrained network as the process's consistency function: f is nonlinear."""
    torch.manual_seed(0)
    return process.consistency(MLP(2, hidden=16, depth=1, emb_dim=8)).eval()


def halve(x, t):
    """f(x, t) = x/2: every x̂₀ below follows from it by hand."""
    return 0.5 * x


# ---------------------------------------------------------------- γ = 1 and γ = 0


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.name)
def test_gamma_1_is_the_multistep_sampler_bit_for_bit(process):
    f, z, noises = network_f(process), noise(0), [noise(1), noise(2), noise(3)]
    times = process.default_times(4)
    tcd = sample_tcd(f, process, z, times, noises, gamma=1.0)
    assert torch.equal(tcd, sample_multistep(f, process, z, times, noises))


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.name)
def test_gamma_0_uses_no_noise(process):
    f, z, times = network_f(process), noise(0), process.default_times(4)
    a = sample_tcd(f, process, z, times, [noise(1), noise(2), noise(3)], gamma=0.0)
    b = sample_tcd(f, process, z, times, [noise(4), noise(5), noise(6)], gamma=0.0)
    assert torch.equal(a, b)
    c = sample_tcd(f, process, z, times, [noise(4), noise(5), noise(6)], gamma=0.3)
    assert not torch.allclose(a, c)  # any γ > 0 does re-noise


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.name)
def test_no_intermediate_times_is_one_step(process):
    z = noise(0)
    assert torch.equal(sample_tcd(halve, process, z, [], [], gamma=0.3), 0.5 * process.prior(z))


# ---------------------------------------------------------------- γ = 0.5 by hand


def test_edm_two_steps_at_gamma_half_by_hand():
    """EDM: x_σ = x, σ = t. s = τ/2, x_s = x̂₀ + s·(x − x̂₀)/t, x_τ = x_s + √(τ² − s²)·e."""
    z, e1, e2 = (noise(i, dtype=torch.float64) for i in range(3))
    out = sample_tcd(halve, EDMProcess(), z, [5.0, 0.8], [e1, e2], gamma=0.5)
    x = 80.0 * z  # x_T = σ_max·z, x̂₀ = 40z, ε̂ = (80z − 40z)/80 = z/2
    x = 40.0 * z + 2.5 * 0.5 * z + math.sqrt(5.0**2 - 2.5**2) * e1
    x0 = 0.5 * x  # at τ = 5: ε̂ = (x − x/2)/5
    x = x0 + 0.4 * (x - x0) / 5.0 + math.sqrt(0.8**2 - 0.4**2) * e2
    torch.testing.assert_close(out, 0.5 * x, rtol=1e-12, atol=1e-12)


def test_flow_one_step_at_gamma_half_by_hand():
    """Flow: σ = t/(1 − t), x_t = (1 − t)·x_σ. From t = 1, x = z is the noise itself: ε̂ = z.
    τ = 0.5, s = 0.25: s_σ = 1/3, τ_σ = 1."""
    z, e = noise(0, dtype=torch.float64), noise(1, dtype=torch.float64)
    out = sample_tcd(halve, FlowProcess(), z, [0.5], [e], gamma=0.5)
    x_s = 0.5 * z + z / 3  # x̂₀ + s_σ·ε̂
    x_tau = (1 - 0.5) * (x_s + math.sqrt(1 - 1 / 9) * e)
    torch.testing.assert_close(out, 0.5 * x_tau, rtol=1e-12, atol=1e-12)


def test_trigflow_one_step_at_gamma_half_by_hand():
    """TrigFlow: σ = σ_d·tan t, x_t = cos t·x_σ. From t = π/2, x = σ_d·z: ε̂ = z.
    τ = 1.1, s = 0.55."""
    sd = 0.5
    z, e = noise(0, dtype=torch.float64), noise(1, dtype=torch.float64)
    out = sample_tcd(halve, TrigFlowProcess(sd), z, [1.1], [e], gamma=0.5)
    s_sigma, tau_sigma = sd * math.tan(0.55), sd * math.tan(1.1)
    x_s = 0.5 * sd * z + s_sigma * z
    x_tau = math.cos(1.1) * (x_s + math.sqrt(tau_sigma**2 - s_sigma**2) * e)
    torch.testing.assert_close(out, 0.5 * x_tau, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gamma", [-0.1, 1.5, math.nan])
def test_gamma_outside_0_1_is_refused(gamma):
    with pytest.raises(OptionError, match=r"gamma must be in \[0, 1\]"):
        sample_tcd(halve, EDMProcess(), noise(0), [1.0], [noise(1)], gamma)


# ---------------------------------------------------------------- generate, eval, CLI


def test_generate_gamma_1_equals_the_default_sampler(moons_runs):
    model = load_model(str(moons_runs / "cd"))
    default = generate(model, 20, seed=3, steps=3)
    assert np.array_equal(generate(model, 20, seed=3, steps=3, gamma=1.0), default)
    assert not np.array_equal(generate(model, 20, seed=3, steps=3, gamma=0.3), default)


def test_eval_plans_name_gamma(moons_runs):
    model = load_model(str(moons_runs / "cd"))
    got = [(p.label, p.options) for p in plans(model, [1, 2], gamma=0.3)]
    assert got == [
        ("1 step, TCD γ = 0.3", {"steps": 1, "gamma": 0.3}),
        ("2 steps, TCD γ = 0.3", {"steps": 2, "gamma": 0.3}),
    ]
    with pytest.raises(OptionError, match="gamma applies to consistency runs"):
        plans(load_model(str(moons_runs / "teacher")), [1], gamma=0.3)


def test_cli_sample_with_gamma_writes_samples(moons_runs, tmp_path):
    out = tmp_path / "tcd.npy"
    args = ["sample", "--model", moons_runs / "cd", "--n", 30, "--out", out, "--steps", 4]
    assert run_cli(*args, "--gamma", 0.3, "--no-progress") == 0
    x = np.load(out)
    assert x.shape == (30, 2) and x.dtype == np.float32 and np.isfinite(x).all()


def test_cli_eval_with_gamma_labels_its_rows(moons_runs, tmp_path, capsys):
    out = tmp_path / "e.json"
    args = ["eval", "--model", moons_runs / "cd", "--nfe", "2", "--n", 50, "--json", out]
    assert run_cli(*args, "--gamma", 0.3) == 0
    report = json.loads(out.read_text())
    assert report["gamma"] == 0.3 and report["rows"][0]["sampler"] == "2 steps, TCD γ = 0.3"
    assert "| 2 steps, TCD γ = 0.3 | 2 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "run, extra, needle",
    [
        ("cd", ["--gamma", "-0.1"], "--gamma must be in [0, 1]"),
        ("cd", ["--gamma", "1.5"], "--gamma must be in [0, 1]"),
        ("cd", ["--gamma", "nan"], "--gamma must be a finite number"),
        ("teacher", ["--gamma", "0.3"], "--gamma applies to consistency runs"),
        ("cd", ["--gamma", "0.3", "--ode"], "--gamma applies to consistency runs"),
    ],
)
def test_cli_refuses_bad_or_inapplicable_gamma_in_one_line(
    moons_runs, tmp_path, capsys, run, extra, needle
):
    args = ["sample", "--model", moons_runs / run, "--n", 4, "--out", tmp_path / "x.npy"]
    assert run_cli(*args, *extra) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("cmkit: error:") and needle in line
    assert not (tmp_path / "x.npy").exists()


def test_cli_eval_refuses_gamma_for_a_teacher(moons_runs, capsys):
    args = ["eval", "--model", moons_runs / "teacher", "--n", 50, "--gamma", "0.3"]
    assert run_cli(*args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--gamma applies to consistency runs" in line
