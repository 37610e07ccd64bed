"""Flow maps (MeanFlow, shortcut models): the identities their targets rest on, exactly, and
runs that train, sample at any step count, edit, evaluate, export and refuse bad values."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import run_cli

from cmkit.batch import Batch
from cmkit.flowmap import FlowMap, sample_jumps
from cmkit.flowmap_losses import MeanFlowLoss, ShortcutLoss, logit_normal_pairs
from cmkit.generate import generate, load_model
from cmkit.networks.mlp import MLP
from cmkit.networks.unet import UNet
from cmkit.process import FlowProcess
from cmkit.sampling import sample_onestep

TINY = ["--batch-size", "32", "--no-progress", "--checkpoint-every", "10"]
NET = ["--network", '{"hidden": 32, "depth": 2}']


class GaussianAverageVelocity(torch.nn.Module):
    """The exact u(x_t, t, h) of the flow ODE for data N(μ, s²) per dimension: the marginal at t
    is N(m_t, σ_t²), m_t = (1 − t)μ, σ_t² = (1 − t)²s² + t², and the ODE map is affine,
    F(x, t → r) = m_r + (σ_r/σ_t)(x − m_t); u = (x − F)/h, and at h = 0 the velocity v."""

    def __init__(self, mu: float, s: float) -> None:
        super().__init__()
        self.mu, self.s = mu, s
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # a device for generate

    def m(self, t):
        return (1 - t) * self.mu

    def sigma(self, t):
        return torch.sqrt((1 - t) ** 2 * self.s**2 + t**2)

    def velocity(self, x, t):
        tc = t[:, None]
        dsigma = (-(1 - tc) * self.s**2 + tc) / self.sigma(tc)
        return -self.mu + dsigma / self.sigma(tc) * (x - self.m(tc))

    def forward(self, x, t, interval=None, **cond):
        tc, hc = t[:, None], interval[:, None]
        r = tc - hc
        flowed = self.m(r) + self.sigma(r) / self.sigma(tc) * (x - self.m(tc))
        u = (x - flowed) / torch.where(hc > 0, hc, torch.ones_like(hc))
        return torch.where(hc > 0, u, self.velocity(x, t))


def gaussian_batch(n: int = 256, dim: int = 3):
    gen = torch.Generator().manual_seed(0)
    t = torch.rand(n, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    h = (t - 0.01) * torch.rand(n, generator=gen, dtype=torch.float64) + 0.01  # FD steps ±1e-3
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    return t, h, x


@pytest.mark.parametrize("method,tol", [("exact", 1e-10), ("finite-difference", 1e-5)])
def test_meanflow_target_is_the_analytic_average_velocity_on_a_gaussian(method, tol):
    """With u_θ the exact average velocity and v the exact velocity field, the MeanFlow
    identity u = v − h·du/dt holds, so the target the loss regresses on is u itself."""
    net = GaussianAverageVelocity(mu=0.7, s=0.4)
    F = FlowMap(net)
    t, h, x = gaussian_batch()
    v = net.velocity(x, t)
    loss = MeanFlowLoss(jvp=method)
    u_tgt = loss.target(F, Batch(x), t, h, x, v)
    u = F.average_velocity(x, t, h)
    assert torch.allclose(u_tgt, u, rtol=0, atol=tol)


def test_meanflow_target_at_r_equal_t_is_the_instantaneous_velocity():
    net = GaussianAverageVelocity(mu=0.3, s=0.8)
    t, _, x = gaussian_batch()
    v = torch.randn_like(x)
    zero = torch.zeros_like(t)
    assert torch.equal(MeanFlowLoss().target(FlowMap(net), Batch(x), t, zero, x, v), v)
    F = FlowMap(net)  # u(z, t, t) reduces to v, and a zero-length jump stays put
    assert torch.equal(F.average_velocity(x, t, 0.0), net.velocity(x, t))
    assert torch.equal(F.jump(x, t, t), x)


def test_flow_map_boundary_and_its_consistency_view():
    """F(x, 0 → 0) = x bit for bit; called as f(x, t) it is the jump to 0."""
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=16, depth=1, interval=True)
    torch.nn.init.normal_(net.cond.interval[1].weight)  # a trained-looking interval input
    F = FlowMap(net)
    x = torch.randn(64, 2)
    assert torch.equal(F(x, 0.0), x)
    t = torch.rand(64)
    assert torch.equal(F(x, t), F.jump(x, t, torch.zeros(64)))


def test_a_fresh_interval_input_leaves_the_velocity_network_unchanged():
    """The interval embedding starts at zero: a new flow map is its network's velocity field
    for every h, so a flow-matching network's weights give the same outputs."""
    torch.manual_seed(0)
    plain = UNet(in_channels=1, channels=8, channel_mult=(1, 2))
    torch.manual_seed(0)
    with_h = UNet(in_channels=1, channels=8, channel_mult=(1, 2), interval=True)
    missing, _ = with_h.load_state_dict(plain.state_dict(), strict=False)
    assert all(k.startswith("cond.interval.") for k in missing)
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    assert torch.equal(with_h(x, t, interval=torch.rand(4)), plain(x, t))


class Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a = torch.nn.Parameter(torch.randn(3, 3, dtype=torch.float64) * 0.5)
        self.b = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))

    def forward(self, x, t, interval=None, **cond):
        return x @ self.a.T + self.b + t[:, None] * 0.3


def test_shortcut_target_is_two_half_jumps_exactly_for_a_linear_field():
    F = FlowMap(Linear())
    x = torch.randn(32, 3, dtype=torch.float64)
    t = torch.full((32,), 0.75, dtype=torch.float64)
    h = torch.full((32,), 0.5, dtype=torch.float64)
    target = ShortcutLoss(max_steps=8).bootstrap(F, x, t, h, {})
    one_jump = x - 0.5 * target
    two_halves = F.jump(F.jump(x, 0.75, 0.5), 0.5, 0.25)
    assert torch.allclose(one_jump, two_halves, rtol=0, atol=1e-14)


def test_shortcut_draws_jumps_on_their_dyadic_grid():
    loss = ShortcutLoss(fraction=0.5, max_steps=8)
    gen = torch.Generator().manual_seed(0)
    t, h, _, _, rows = loss.draw(Batch(torch.zeros(4000, 2)), gen)
    assert 0.45 < rows.float().mean() < 0.55
    assert torch.all(h[~rows] == 0)
    hs = h[rows]
    assert set(hs.tolist()) == {1.0, 0.5, 0.25, 0.125}
    d = hs / 2
    steps = (1 - t[rows]) / d  # t = 1 − i·d with t − 2d >= 0
    assert torch.allclose(steps, steps.round()) and torch.all(t[rows] - hs >= -1e-7)


def test_logit_normal_pairs_sort_t_above_r_and_keep_the_fraction():
    gen = torch.Generator().manual_seed(0)
    t, r = logit_normal_pairs(20000, -0.4, 1.0, 0.25, gen)
    assert torch.all(r <= t) and torch.all((0 < r) & (t < 1))
    assert abs((r < t).float().mean().item() - 0.25) < 0.02


@pytest.fixture(scope="module")
def flow_maps(tmp_path_factory):
    root = tmp_path_factory.mktemp("flowmaps")
    for recipe in ("meanflow", "shortcut"):
        args = ["train", "--recipe", recipe, "--data", "moons", "--steps", "30", *NET, *TINY]
        assert run_cli(*args, "--out", root / recipe) == 0
    digits = [*TINY, "--network", '{"channels": 8}', "--steps", "4"]
    assert run_cli("train", "--recipe", "meanflow", "--data", "digits", *digits,
                   "--out", root / "digits") == 0  # fmt: skip
    return root


def test_one_jump_is_the_one_step_consistency_sample(flow_maps):
    model = load_model(str(flow_maps / "meanflow"))
    z = torch.randn(100, 2)
    one_jump = sample_jumps(model.fn, z, [1.0, 0.0])
    assert torch.equal(one_jump, sample_onestep(model.fn, FlowProcess(), z))
    assert np.array_equal(generate(model, 100, steps=1), generate(model, 100, steps=1, gamma=1.0))
    # --gamma samples the consistency view F(x, t → 0) with re-noising, not the jumps
    assert not np.allclose(generate(model, 100, steps=2), generate(model, 100, steps=2, gamma=1.0))


def test_k_jumps_use_k_evaluations_on_the_uniform_grid(flow_maps):
    model = load_model(str(flow_maps / "meanflow"))
    calls = []
    forward = model.fn.net.forward
    model.fn.net.forward = lambda x, t, **cond: (
        calls.append((t[0].item(), cond)) or forward(x, t, **cond)
    )
    generate(model, 10, steps=4)
    assert [round(t, 6) for t, _ in calls] == [1.0, 0.75, 0.5, 0.25]
    assert all(torch.allclose(c["interval"], torch.tensor(0.25)) for _, c in calls)


def test_flow_map_runs_record_their_kind_and_sample_eval_and_ode(flow_maps, tmp_path, capsys):
    config = json.loads((flow_maps / "shortcut" / "config.json").read_text())
    kwargs = config["network"]["kwargs"]
    assert config["kind"] == "flowmap" and kwargs["interval"] is True and kwargs["max_freq"] == 20
    assert config["training"]["options"]["max_steps"] == 128
    out = tmp_path / "s.npy"
    run = flow_maps / "meanflow"
    assert run_cli("sample", "--model", run, "--steps", "8", "--n", "50", "--out", out) == 0
    assert np.load(out).shape == (50, 2)
    assert run_cli("sample", "--model", run, "--ode", "--steps", "5", "--out", out) == 0
    capsys.readouterr()
    assert run_cli("eval", "--model", run, "--n", "200") == 0  # 1, 2, 4, 8, 16 by default
    table = capsys.readouterr().out
    assert all(f"| {k} step" in table for k in (1, 2, 4, 8, 16))


def test_tune_times_searches_meanflow_jumps_and_refuses_shortcut(flow_maps, tmp_path, capsys):
    run = tmp_path / "mf"
    shutil.copytree(flow_maps / "meanflow", run)
    args = ["--steps", "2", "--iters", "2", "--n", "100"]
    assert run_cli("tune-times", "--model", run, *args) == 0
    (tau,) = json.loads((run / "config.json").read_text())["sampling"]["times"]["2"]
    calls = []
    model = load_model(str(run))
    forward = model.fn.net.forward
    model.fn.net.forward = lambda x, t, **c: calls.append(t[0].item()) or forward(x, t, **c)
    generate(model, 10, steps=2)
    assert calls == pytest.approx([1.0, tau])
    capsys.readouterr()
    assert run_cli("tune-times", "--model", flow_maps / "shortcut", *args) == 2
    assert "no times to tune" in capsys.readouterr().err


@pytest.mark.parametrize("steps", ["3", "256"])
def test_shortcut_refuses_jumps_it_was_not_trained_for(flow_maps, tmp_path, capsys, steps):
    run = flow_maps / "shortcut"
    code = run_cli("sample", "--model", run, "--steps", steps, "--out", tmp_path / "x.npy")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "power-of-two" in err
    assert run_cli("sample", "--model", run, "--steps", "4", "--out", tmp_path / "x.npy") == 0


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--recipe", "meanflow", "--fraction", "1.5"], "fraction"),
        (["--recipe", "shortcut", "--fraction", "-0.1"], "fraction"),
        (["--recipe", "shortcut", "--max-steps", "100"], "power of two"),
        (["--recipe", "meanflow", "--jvp", "magic"], "jvp"),
        (["--recipe", "meanflow", "--process", "edm"], "flow process"),
        (["--recipe", "shortcut", "--power", "1"], "does not apply"),
    ],
)
def test_bad_flow_map_options_are_one_line_errors(tmp_path, capsys, args, needle):
    code = run_cli("train", "--data", "moons", *args, "--out", tmp_path / "r", *TINY)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "r" / "config.json").exists()


def test_editing_with_a_flow_map_keeps_the_known_pixels(flow_maps, tmp_path):
    """Inpainting jumps along the grid and imposes the known part after each jump, so the
    pixels outside the hole come back exactly."""
    run = flow_maps / "digits"
    ref = tmp_path / "ref.npy"
    assert run_cli("sample", "--model", run, "--n", "4", "--out", ref) == 0
    out = tmp_path / "edited.npy"
    args = ["edit", "inpaint", "--model", run, "--input", ref, "--mask", "center"]
    assert run_cli(*args, "--steps", "4", "--seed", "1", "--out", out) == 0
    y, x = np.load(ref), np.load(out)
    hole = np.zeros((8, 8), bool)
    hole[2:6, 2:6] = True
    assert np.allclose(x[..., ~hole], y[..., ~hole], atol=1e-5)
    assert not np.allclose(x[..., hole], y[..., hole])


def test_export_of_a_flow_map_is_its_jump_sampler(flow_maps, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    run = flow_maps / "meanflow"
    path = tmp_path / "fm.onnx"
    assert run_cli("export", "--model", run, "--format", "onnx", "--steps", "4", "--out", path) == 0
    noise = np.random.default_rng(0).standard_normal((1, 16, 2)).astype(np.float32)
    (got,) = ort.InferenceSession(str(path)).run(None, {"noise": noise})
    want = generate(load_model(str(run)), 16, steps=4, noise=noise)
    assert np.allclose(got, want, atol=1e-5)
    sampler = json.loads(path.with_name("fm.onnx.json").read_text())["sampler"]
    assert sampler["kind"] == "jumps" and sampler["steps"] == 4
    assert np.allclose(sampler["times"], [1, 0.75, 0.5, 0.25])
