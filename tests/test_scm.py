"""sCM's loss: the tangent against a float64 finite difference of f along the ODE, zero
tangent and zero gradient at the exact consistency function of Gaussian data, the learned
weighting's optimum, and the finite-difference JVP against the exact one."""

import math

import numpy as np
import pytest
import torch
from conftest import TINY, run_cli
from safetensors.torch import load_file
from torch import nn

from cmkit import recipes
from cmkit.batch import Batch
from cmkit.errors import OptionError
from cmkit.jvp import jvp
from cmkit.losses import AdaptiveWeight, SCMLoss, normalised_tangent
from cmkit.networks.mlp import MLP
from cmkit.noise import SIGMA_MAX, SIGMA_MIN
from cmkit.process import EDMProcess, TrigFlowProcess
from cmkit.training_times import TrigFlowTimes, karras_ramp

SD = 0.5  # σ_d


class Toy(nn.Module):
    """A smooth nonlinear F(x, t) with one trainable scale, in TrigFlow's form."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim)
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))

    def F(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.tanh((x / SD) @ self.w) * torch.cos(t)[:, None] + t[:, None]

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cos(t)[:, None] * x - torch.sin(t)[:, None] * SD * self.F(x, t)


def test_tangent_is_cos_t_times_df_dt_along_the_ode_in_float64():
    """g(r = 1) before normalisation equals cos t · d/ds f(x_t + s·ẋ, t + s) at s = 0."""
    torch.manual_seed(0)
    net = Toy(3)
    x, t = torch.randn(5, 3, dtype=torch.float64), torch.rand(5, dtype=torch.float64) * 1.4 + 0.1
    dxdt = torch.randn(5, 3, dtype=torch.float64)
    cs = (torch.cos(t) * torch.sin(t))[:, None]
    with torch.no_grad():
        F_minus, J = jvp(net.F, (x, t), (cs * dxdt, cs.flatten()))
        h = 1e-6
        df = (net(x + h * dxdt, t + h) - net(x - h * dxdt, t - h)) / (2 * h)
    expected = torch.cos(t)[:, None] * df
    c = 0.1
    g = normalised_tangent(F_minus, J, x, dxdt, t, SD, 1.0, c)
    reference = expected / (expected.norm(dim=1, keepdim=True) + c)
    assert torch.allclose(g, reference, rtol=1e-7, atol=1e-9)
    # warm-up r = 0 keeps only −cos²t·(σ_d·F⁻ − ẋ)
    g0 = normalised_tangent(F_minus, J, x, dxdt, t, SD, 0.0, c)
    raw = -(torch.cos(t)[:, None] ** 2) * (SD * F_minus - dxdt)
    assert torch.allclose(g0, raw / (raw.norm(dim=1, keepdim=True) + c), rtol=1e-12)


class GaussianCM(nn.Module):
    """The exact consistency function of data N(0, s²I) under TrigFlow:
    f*(x_t, t) = s·x_t/α(t), α² = s²cos²t + σ_d²sin²t, written as F = (cos t·x − f)/(σ_d sin t);
    `scale` = 1 is exact and lets the test take a gradient."""

    def __init__(self, s: float) -> None:
        super().__init__()
        self.s = s
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))

    def F(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cos, sin = torch.cos(t)[:, None], torch.sin(t)[:, None]
        alpha = torch.sqrt(self.s**2 * cos**2 + SD**2 * sin**2)
        return self.scale * (cos - self.s / alpha) * x / (SD * sin)


def gaussian_velocity(s: float):
    """dx_t/dt = (cos t·x_t − E[x₀|x_t])/sin t, E[x₀|x_t] = s²cos t/α²·x_t (closed form)."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cos, sin = torch.cos(t)[:, None], torch.sin(t)[:, None]
        denoised = self_s2 * cos / (self_s2 * cos**2 + SD**2 * sin**2) * x
        return (cos * x - denoised) / sin

    self_s2 = s**2
    return velocity


class TrigFlowToyProcess:
    sigma_data = SD

    def perturb(self, x0, t, z):
        return torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * SD * z


def test_scd_at_the_exact_gaussian_consistency_function_has_zero_loss_and_gradient():
    s = 0.8
    model = GaussianCM(s)
    loss = SCMLoss(TrigFlowToyProcess(), AdaptiveWeight(), velocity=gaussian_velocity(s))
    loss.weight.double()
    x0 = s * torch.randn(256, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    value = loss(model, model, Batch(x0), 5000, torch.Generator().manual_seed(0))
    value.backward()
    assert abs(value.item()) < 1e-12  # F_θ = F⁻, g = cos t·df*/dt = 0, w_φ = 0
    assert abs(model.scale.grad.item()) < 1e-9


def test_scd_gradient_moves_a_wrong_scale_towards_the_exact_one():
    s = 0.8
    model = GaussianCM(s)
    with torch.no_grad():
        model.scale.fill_(1.3)
    loss = SCMLoss(TrigFlowToyProcess(), AdaptiveWeight(), velocity=gaussian_velocity(s))
    loss.weight.double()
    x0 = s * torch.randn(512, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    loss(model, model, Batch(x0), 5000, torch.Generator().manual_seed(0)).backward()
    assert model.scale.grad.item() > 0  # descent lowers the scale towards 1


def test_learned_weighting_optimum_is_minus_log_of_the_mean_square():
    """min over w of e^w·m − w is at w = −ln m: w_φ evens the loss out over t."""
    m = torch.tensor(0.04)
    w = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.5)
    for _ in range(2000):
        opt.zero_grad()
        (torch.exp(w) * m - w).backward()
        opt.step()
    assert w.item() == pytest.approx(-math.log(0.04), rel=1e-3)


def test_finite_difference_jvp_matches_the_exact_one():
    net = Toy(3)
    x, t = torch.randn(4, 3, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.2
    v, vt = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    value, exact = jvp(net.F, (x, t), (v, vt), "exact")
    value_fd, approx = jvp(net.F, (x, t), (v, vt), "finite-difference", h=1e-5)
    assert torch.allclose(value, value_fd)
    assert torch.allclose(exact, approx, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="unknown jvp method 'forward'"):
        jvp(net.F, (x, t), (v, vt), "forward")


def test_an_edm_network_read_in_trigflow_time_is_the_edm_denoiser():
    """time_input "edm": f(x_t, t) = D(x_t/cos t, σ_d·tan t), so sCD starts at the teacher."""
    torch.manual_seed(0)
    net = MLP(3, hidden=16, depth=1).double()
    edm, trig = EDMProcess(sigma_data=SD), TrigFlowProcess(sigma_data=SD, time_input="edm")
    x_t = torch.randn(6, 3, dtype=torch.float64)
    t = torch.tensor([0.01, 0.2, 0.7, 1.1, 1.4, 1.56], dtype=torch.float64)
    f = trig.consistency(net)(x_t, t)
    D = edm.denoiser(net)(x_t / torch.cos(t)[:, None], SD * torch.tan(t))
    assert torch.allclose(f, D, rtol=1e-12, atol=1e-12)
    assert torch.equal(trig.consistency(net)(x_t, 0.0), x_t)  # the boundary, exactly


def test_trigflow_times_lognormal_and_karras_in_sigma():
    """t = arctan(σ/σ_d): lognormal σ has median e^{P_mean}; Karras σ stays in EDM's range
    with its median at the middle of the ramp."""
    gen = torch.Generator().manual_seed(0)
    t = TrigFlowTimes("lognormal", -1.0, 1.4)(40000, SD, gen)
    assert t.dtype == torch.float64 and (t > 0).all() and (t < math.pi / 2).all()
    sigma = SD * torch.tan(t)
    assert sigma.log().median().item() == pytest.approx(-1.0, abs=0.03)
    assert sigma.log().std().item() == pytest.approx(1.4, rel=0.02)
    sigma = SD * torch.tan(TrigFlowTimes("karras")(40000, SD, gen))
    assert sigma.min() >= SIGMA_MIN * (1 - 1e-9) and sigma.max() <= SIGMA_MAX * (1 + 1e-9)
    middle = karras_ramp(torch.tensor(0.5, dtype=torch.float64), SIGMA_MIN, SIGMA_MAX)
    assert sigma.median().item() == pytest.approx(middle.item(), rel=0.05)


def test_scm_time_dist_is_checked(tmp_path, capsys):
    train = ["train", "--recipe", "sct", "--data", "moons", *TINY, "--out", tmp_path / "a"]
    assert run_cli(*train, "--time-dist", "karras") == 0
    config = (tmp_path / "a" / "config.json").read_text()
    assert '"time_dist": "karras"' in config
    with pytest.raises(OptionError, match="time_dist must be 'lognormal' or 'karras'"):
        recipes.scm.check(recipes.SCTOptions(time_dist="uniform"))


def test_scd_run_refuses_a_flow_teacher_as_its_start_and_a_bad_jvp(tmp_path, capsys):
    teacher = tmp_path / "flow"
    args = ["--network", '{"hidden": 16, "depth": 1}', *TINY]
    assert (
        run_cli("train-teacher", "--data", "moons", "--process", "flow", "--out", teacher, *args)
        == 0
    )
    distill = ["distill", "--recipe", "scd", "--teacher", teacher, *TINY]
    assert run_cli(*distill, "--out", tmp_path / "a") == 2
    err = capsys.readouterr().err.strip()
    assert "flow teacher's network cannot start a TrigFlow student" in err
    assert len(err.splitlines()) == 1
    assert run_cli(*distill, "--no-init-from-teacher", "--out", tmp_path / "b") == 0
    assert run_cli(*distill, "--jvp", "forward", "--out", tmp_path / "c") == 2
    assert "--jvp must be 'exact' or 'finite-difference'" in capsys.readouterr().err
    assert run_cli(*distill, "--solver", "euler", "--out", tmp_path / "d") == 2
    assert "--solver does not apply to --recipe scd" in capsys.readouterr().err
    train = ["train", "--recipe", "sct", "--data", "moons", *TINY]
    assert run_cli(*train, "--process", "edm", "--out", tmp_path / "e") == 2
    assert "sct trains on the trigflow process" in capsys.readouterr().err


def test_sct_and_scd_sample_edit_eval_and_refuse_export(moons_runs, tmp_path, capsys):
    sct, scd = tmp_path / "sct", tmp_path / "scd"
    assert run_cli("train", "--recipe", "sct", "--data", "moons", "--out", sct, *TINY) == 0
    teacher = moons_runs / "teacher"
    assert run_cli("distill", "--recipe", "scd", "--teacher", teacher, "--out", scd, *TINY) == 0
    for run in (sct, scd):
        aux = load_file(run / "aux.safetensors")  # w_φ is saved with the run
        assert aux and all(torch.isfinite(v).all() for v in aux.values())
        for steps in ("1", "2"):
            out = tmp_path / f"{run.name}{steps}.npy"
            assert (
                run_cli("sample", "--model", run, "--n", "16", "--steps", steps, "--out", out) == 0
            )
            assert np.isfinite(np.load(out)).all()
        assert run_cli("eval", "--model", run, "--nfe", "1,2", "--n", "200") == 0
    capsys.readouterr()
    assert run_cli("export-diffusers", "--model", scd, "--out", tmp_path / "hf") == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
