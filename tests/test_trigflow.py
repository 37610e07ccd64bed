"""The TrigFlow process and parameterisation, the EDM view of every process, and TrigFlow
sampling, checked against closed forms (reference §9, §12).

For data N(0, s²·I) under TrigFlow x_t = cos t·x₀ + sin t·σ_d·z, x_t has std
std(t) = √(cos²t·s² + sin²t·σ_d²), the PF-ODE keeps x_t/std(t) fixed, so its velocity is
v = x·sin t·cos t·(σ_d² − s²)/std(t)², and the consistency function is x_t·s/std(t).
"""

import json
import math
from itertools import pairwise

import numpy as np
import pytest
import torch
from conftest import TINY, run_cli

from cmkit.batch import Batch
from cmkit.errors import UserError
from cmkit.losses import EDMLoss, TrigFlowLoss
from cmkit.networks.mlp import MLP
from cmkit.noise import karras_sigmas
from cmkit.param import EDMDenoiser, TrigFlowParam
from cmkit.process import (
    EDMProcess,
    FlowProcess,
    TrigFlowProcess,
    make_process,
    process_from_dict,
    trigflow_velocity,
)
from cmkit.sampling import check_times, sample_multistep, sample_ode, sample_onestep
from cmkit.solvers import euler_step, heun_step, solve

SD = 0.5
HALF_PI = math.pi / 2


def column(t, x):
    return torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def gaussian_std(t, s):
    return torch.sqrt(torch.cos(t) ** 2 * s**2 + torch.sin(t) ** 2 * SD**2)


def gaussian_velocity(x, t, s):
    tc = column(t, x)
    return x * torch.sin(tc) * torch.cos(tc) * (SD**2 - s**2) / gaussian_std(tc, s) ** 2


class FromFunction(torch.nn.Module):
    """A 'network' F(x/σ_d, c_noise = t) given as a function of (x_t, t)."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x_scaled, c_noise):
        return self.fn(SD * x_scaled, c_noise)


def exact_trigflow_teacher(s) -> TrigFlowParam:
    """σ_d·F = the exact velocity, so the param is the exact x₀-prediction."""
    return TrigFlowParam(FromFunction(lambda x, t: gaussian_velocity(x, t, s) / SD), SD)


def exact_consistency(s) -> TrigFlowParam:
    """F chosen so that cos t·x − sin t·σ_d·F = x·s/std(t) (for t > 0)."""

    def F(x, t):
        tc = column(t, x)
        return (torch.cos(tc) * x - x * s / gaussian_std(tc, s)) / (SD * torch.sin(tc))

    return TrigFlowParam(FromFunction(F), SD)


def random_mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    net = MLP(dim=2, hidden=16, depth=2, emb_dim=8)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return net.to(dtype)


def draws(seed=0, n=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, generator=g, dtype=dtype) for _ in range(2))


# ---------------------------------------------------------------- the process


def test_trigflow_process_formulas():
    proc = TrigFlowProcess()
    x0, z = draws()
    t = torch.tensor([0.0, 0.3, 0.7, 1.2, HALF_PI], dtype=torch.float64)
    expected = torch.stack([math.cos(t[i]) * x0[i] + math.sin(t[i]) * SD * z[i] for i in range(5)])
    torch.testing.assert_close(proc.perturb(x0, t, z), expected, rtol=1e-14, atol=1e-15)
    assert torch.equal(proc.perturb(x0, t, z)[0], x0[0])  # t = 0 is the data
    torch.testing.assert_close(proc.prior(z), SD * z, rtol=0, atol=0)
    torch.testing.assert_close(
        proc.renoise(x0, 1.1, z), math.cos(1.1) * x0 + math.sin(1.1) * SD * z, rtol=1e-15, atol=0
    )
    assert (proc.t_min, proc.t_max, proc.noise_levels) == (0.0, HALF_PI, (0.0, math.inf))
    assert proc.to_search(0.7) == proc.from_search(0.7) == 0.7
    assert proc.diffusers_scheduler() is None
    assert isinstance(proc.teacher_loss(), TrigFlowLoss)
    assert isinstance(proc.consistency(torch.nn.Identity()), TrigFlowParam)
    assert proc.denoiser(torch.nn.Identity()).sigma_data == SD


def test_trigflow_dict_round_trip_and_parameters():
    proc = TrigFlowProcess(sigma_data=0.7)
    assert proc.to_dict() == {"name": "trigflow", "sigma_data": 0.7, "time_input": "t"}
    assert process_from_dict(json.loads(json.dumps(proc.to_dict()))) == proc
    assert process_from_dict({"name": "trigflow"}) == TrigFlowProcess()
    with pytest.raises(UserError, match="sigma_data"):
        make_process("trigflow", sigma_min=0.01)
    with pytest.raises(UserError, match="sigma_data > 0"):
        TrigFlowProcess(sigma_data=0.0)
    with pytest.raises(UserError, match="time_input must be 't' or 'edm', got 'sigma'"):
        TrigFlowProcess(time_input="sigma")


@pytest.mark.parametrize("sd", [0.5, 1.0])
def test_grid_is_the_edm_grid_mapped(sd):
    grid = TrigFlowProcess(sd).grid(11)
    torch.testing.assert_close(
        grid, torch.atan(karras_sigmas(11, 0.002, 80.0) / sd), rtol=0, atol=0
    )
    assert (grid.diff() > 0).all() and 0 < grid[0] < grid[-1] < HALF_PI


@pytest.mark.parametrize("k", [1, 2, 3, 18])
def test_sampling_times(k):
    proc = TrigFlowProcess()
    times = proc.sampling_times(k)
    assert times.shape == (k + 1,) and times.dtype == torch.float64
    assert times[0].item() == HALF_PI and times[-1].item() == 0.0
    assert (times.diff() < 0).all()
    if k > 1:
        torch.testing.assert_close(times[1:-1], proc.grid(k).flip(0)[1:], rtol=0, atol=0)


def test_default_times():
    proc = TrigFlowProcess()
    assert proc.default_times(1) == []
    assert proc.default_times(2) == [1.1]
    assert proc.default_times(3) == pytest.approx([1.1, 0.55])
    for k in (2, 4, 8):
        check_times(proc, proc.default_times(k))  # strictly decreasing inside (0, π/2)


def test_denoise_point_is_the_process_point():
    """y = x + σ·z becomes cos t·y = cos t·x + sin t·σ_d·z, t = arctan(σ/σ_d)."""
    proc = TrigFlowProcess()
    x, z = draws(1)
    for sigma in (0.01, 0.5, 3.0, 80.0):
        x_t, t = proc.denoise_point(x + sigma * z, sigma)
        assert isinstance(t, float) and t == pytest.approx(math.atan(sigma / SD), rel=1e-15)
        torch.testing.assert_close(
            x_t, proc.perturb(x, torch.tensor(t, dtype=torch.float64), z), rtol=1e-13, atol=1e-14
        )
    with pytest.raises(UserError, match="outside"):
        proc.denoise_point(x, 0.0)


def test_denoise_point_of_edm_and_flow_unchanged():
    y, _ = draws(2)
    assert EDMProcess().denoise_point(y, 0.5) == (y, 0.5)
    x_t, t = FlowProcess().denoise_point(y, 0.5)
    assert t == 0.5 / 1.5 and torch.equal(x_t, (1 - 0.5 / 1.5) * y)


# ---------------------------------------------------------------- the EDM view


@pytest.mark.parametrize(
    "proc", [EDMProcess(), FlowProcess(), TrigFlowProcess(), TrigFlowProcess(1.3)]
)
@pytest.mark.parametrize("as_float", [False, True], ids=["tensor", "float"])
def test_edm_round_trip(proc, as_float):
    x, _ = draws(3, n=4)
    ts = {"edm": [0.002, 0.5, 3.0, 80.0], "flow": [0.001, 0.3, 0.7, 0.99]}
    times = ts.get(proc.name, [0.001, 0.4, 1.1, 1.5])
    for t in [*times] if as_float else [torch.tensor(times, dtype=torch.float64)]:
        x_back, t_back = proc.from_edm(*proc.to_edm(x, t))
        torch.testing.assert_close(x_back, x, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(torch.as_tensor(t_back), torch.as_tensor(t), rtol=1e-12, atol=0)
        if as_float:
            assert isinstance(proc.to_edm(x, t)[1], float)


def test_to_edm_formulas():
    x, _ = draws(4, n=3)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    x_s, s = FlowProcess().to_edm(x, t)
    torch.testing.assert_close(s, t / (1 - t))
    torch.testing.assert_close(x_s, x / (1 - t[:, None]))
    x_s, s = TrigFlowProcess().to_edm(x, t)
    torch.testing.assert_close(s, SD * torch.tan(t))
    torch.testing.assert_close(x_s, x / torch.cos(t[:, None]))


@pytest.mark.parametrize("s", [0.3, 1.0])
def test_velocity_from_exact_teachers_is_closed_form(s):
    """The exact EDM and flow denoisers of N(0, s²) give TrigFlow's closed-form velocity."""

    def D_edm(x, sigma):
        return s**2 / (s**2 + column(sigma, x) ** 2) * x

    def D_flow(x, t):
        tc = column(t, x)
        return (1 - tc) * s**2 / ((1 - tc) ** 2 * s**2 + tc**2) * x

    x, _ = draws(5, n=6)
    t = torch.tensor([0.01, 0.2, 0.6, 1.0, 1.4, 1.56], dtype=torch.float64)
    exact = gaussian_velocity(x, t, s)
    for proc, D in ((EDMProcess(), D_edm), (FlowProcess(), D_flow)):
        v = trigflow_velocity(proc, D, SD)(x, t)
        torch.testing.assert_close(v, exact, rtol=1e-10, atol=1e-12)


def test_velocity_of_a_trigflow_teacher_is_its_drift():
    param = TrigFlowParam(random_mlp(), SD)
    x, _ = draws(6)
    t = torch.tensor([0.05, 0.3, 0.8, 1.2, 1.5], dtype=torch.float64)
    with torch.no_grad():
        v = trigflow_velocity(TrigFlowProcess(), param, SD)(x, t)
        torch.testing.assert_close(v, param.drift(x, t), rtol=1e-10, atol=1e-12)


def test_edm_denoiser_round_trips_through_trigflow():
    """EDM D → TrigFlow F = v/σ_d → x₀-prediction at the EDM point: D again."""
    D = EDMDenoiser(random_mlp(seed=1), SD)
    v = trigflow_velocity(EDMProcess(), D, SD)
    param = TrigFlowParam(FromFunction(lambda x_t, t: v(x_t, t) / SD), SD)
    x, _ = draws(7)
    sigma = torch.tensor([0.01, 0.3, 1.0, 5.0, 60.0], dtype=torch.float64)
    with torch.no_grad():
        back = param(*TrigFlowProcess(SD).from_edm(x, sigma))
        torch.testing.assert_close(back, D(x, sigma), rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------- the parameterisation


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("sd", [0.5, 1.3])
def test_boundary_is_exact(dtype, sd):
    net = random_mlp(dtype)
    f = TrigFlowParam(net, sd)
    x = 3 * torch.randn(64, 2, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        assert net(x / sd, torch.zeros(64, dtype=dtype)).abs().mean() > 0.1
        assert torch.equal(f(x, 0.0), x)
        assert torch.equal(f(x, torch.zeros(64, dtype=dtype)), x)
        assert torch.equal(f(x, torch.zeros(64, dtype=torch.float64)), x)
        assert torch.equal(f(x, torch.tensor([0.0, 0.4] * 32, dtype=dtype))[::2], x[::2])
        assert not torch.allclose(f(x, 0.01), x)


def test_param_formula_float_and_tensor_times():
    net = random_mlp()
    f = TrigFlowParam(net, SD)
    x, _ = draws(8)
    t = torch.tensor([0.1, 0.4, 0.9, 1.3, HALF_PI], dtype=torch.float64)
    with torch.no_grad():
        F = net(x / SD, t)
        torch.testing.assert_close(f.F(x, t), F, rtol=0, atol=0)
        torch.testing.assert_close(f.drift(x, t), SD * F, rtol=0, atol=0)
        expected = torch.cos(t)[:, None] * x - torch.sin(t)[:, None] * SD * F
        torch.testing.assert_close(f(x, t), expected, rtol=1e-14, atol=1e-15)
        same_t = torch.full((5,), 0.7, dtype=torch.float64)
        torch.testing.assert_close(f(x, 0.7), f(x, same_t), rtol=1e-14, atol=1e-15)


def test_trigflow_loss_equals_edm_loss_on_the_same_draws():
    param = TrigFlowParam(random_mlp(seed=2), SD)
    trig = TrigFlowProcess(SD)

    def D(x_sigma, sigma):  # the same model seen as an EDM denoiser
        return param(*trig.from_edm(x_sigma, sigma))

    x0 = SD * torch.randn(256, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    batch = Batch(x0)
    ours = trig.teacher_loss()(param, None, batch, 0, torch.Generator().manual_seed(3))
    edm = EDMLoss(EDMProcess(sigma_data=SD))(D, None, batch, 0, torch.Generator().manual_seed(3))
    assert ours.item() > 0.01
    torch.testing.assert_close(ours, edm, rtol=1e-10, atol=0)


# ---------------------------------------------------------------- solvers and samplers


def relative_error(solver, k, s):
    proc = TrigFlowProcess(SD)
    x_T = SD * torch.tensor([[1.0, -0.5], [-2.0, 0.25], [0.3, 1.5]], dtype=torch.float64)
    x = solve(exact_trigflow_teacher(s), x_T, proc.sampling_times(k), solver)
    exact = x_T * s / SD
    return ((x - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize("s", [0.3, 1.0])
def test_heun_is_second_order_and_euler_first_order(s):
    """Over sampling_times(k); Euler's error only settles to halving from k ≈ 100 on, as the
    mapped Karras grid takes a few large steps through the middle of [0, π/2]."""
    heun = [relative_error("heun", k, s) for k in (10, 20, 40)]
    euler = [relative_error("euler", k, s) for k in (160, 320, 640)]
    assert all(a / b > 3.5 for a, b in pairwise(heun)), heun  # ≈ 4 per doubling
    assert all(1.6 < a / b < 2.4 for a, b in pairwise(euler)), euler  # ≈ 2
    assert heun[-1] < 5e-3 and euler[-1] < 1e-3


def test_heun_step_to_zero_is_euler():
    param = exact_trigflow_teacher(1.0)
    x, _ = draws(10)
    torch.testing.assert_close(heun_step(param, x, 0.004, 0.0), euler_step(param, x, 0.004, 0.0))
    # and the Euler step uses the drift σ_d·F, not (x − f)/t
    torch.testing.assert_close(euler_step(param, x, 1.0, 0.5), x - 0.5 * param.drift(x, 1.0))


def test_samplers_on_exact_gaussian_models():
    s, proc = 1.0, TrigFlowProcess(SD)
    z, noise = draws(11, n=8)
    torch.testing.assert_close(
        sample_ode(exact_trigflow_teacher(s), proc, z, 80, "heun"), s * z, rtol=2e-3, atol=2e-3
    )
    f = exact_consistency(s)
    torch.testing.assert_close(sample_onestep(f, proc, z), s * z, rtol=1e-12, atol=1e-12)
    x = sample_multistep(f, proc, z, [1.1], [noise])
    renoised = math.cos(1.1) * s * z + math.sin(1.1) * SD * noise
    torch.testing.assert_close(
        x,
        renoised * s / gaussian_std(torch.tensor(1.1, dtype=torch.float64), s),
        rtol=1e-12,
        atol=1e-12,
    )


# ---------------------------------------------------------------- through the CLI


def test_cli_trigflow_teacher_ict_cd_sample_and_export(tmp_path, capsys):
    steps = [*TINY, "--steps", "30"]
    teacher, ict, cd = tmp_path / "teacher", tmp_path / "ict", tmp_path / "cd"
    common = ["--data", "moons", "--process", "trigflow"]
    assert run_cli("train-teacher", *common, "--out", teacher, *steps) == 0
    assert run_cli("train", "--recipe", "ict", *common, "--out", ict, *steps) == 0
    assert run_cli("distill", "--teacher", teacher, "--out", cd, *steps) == 0  # Heun on σ_d·F
    for run in (teacher, ict, cd):
        config = json.loads((run / "config.json").read_text())
        assert process_from_dict(config["process"]) == TrigFlowProcess()
    runs = ((teacher, 4, []), (ict, 1, []), (ict, 2, []), (ict, 4, ["--ode"]), (cd, 2, []))
    for i, (run, k, extra) in enumerate(runs):
        out = tmp_path / f"s{i}.npy"
        args = ["--n", 16, "--out", out, "--steps", k, "--no-progress", *extra]
        assert run_cli("sample", "--model", run, *args) == 0
        assert np.isfinite(np.load(out)).all() and np.load(out).shape == (16, 2)
    capsys.readouterr()
    assert run_cli("export-diffusers", "--model", ict, "--out", tmp_path / "pipe") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trigflow" in err, err
    bad = ["train", *common, "--sigma-min", "0.01", "--out", tmp_path / "x", *steps]
    assert run_cli(*bad) == 2
    assert "--sigma-min" in capsys.readouterr().err
