"""How a step is computed: bf16 autocast on the network forwards only (weights, optimiser,
EMA and loss stay float32, and a CPU says it is slower), and torch.compile of the online
network's forward, compiled once."""

import copy
import json

import pytest
import torch
from conftest import run_cli

from cmkit.batch import Batch
from cmkit.distributed import World
from cmkit.engine import make_engine
from cmkit.losses import EDMLoss
from cmkit.networks.mlp import MLP
from cmkit.process import EDMProcess
from cmkit.train import TrainState, train

NET = ["--network", '{"hidden": 16, "depth": 1}']
TEACHER = ["train-teacher", "--data", "moons", *NET, "--batch-size", 16, "--no-progress"]
DATA = Batch(0.5 * torch.randn(256, 2, generator=torch.Generator().manual_seed(5)))


def _state() -> TrainState:
    torch.manual_seed(0)
    net = MLP(2, hidden=16, depth=1)
    online = EDMProcess().denoiser(net)
    optimizer = torch.optim.Adam(online.parameters(), lr=1e-3)
    ema = copy.deepcopy(net).requires_grad_(False)
    return TrainState(online, optimizer, torch.Generator().manual_seed(0), ema)


def test_bf16_lowers_the_network_matmuls_and_keeps_the_rest_float32():
    state = _state()
    seen, losses = [], []
    state.online.net.inp.register_forward_hook(lambda m, i, out: seen.append(out.dtype))

    def loss_fn(*args):
        loss = EDMLoss(EDMProcess())(*args)
        losses.append(loss.dtype)
        return loss

    engine = make_engine(World(), state.online.net, "bf16")
    train(state, loss_fn, DATA, 3, 16, 0.9, progress=False, engine=engine)
    assert seen == [torch.bfloat16] * 3 and losses == [torch.float32] * 3
    assert all(p.dtype == torch.float32 for p in state.online.parameters())
    assert all(t.dtype == torch.float32 for t in state.ema.state_dict().values())
    moments = state.optimizer.state_dict()["state"].values()
    assert all(slot["exp_avg"].dtype == torch.float32 for slot in moments)
    plain = _state()
    train(plain, EDMLoss(EDMProcess()), DATA, 3, 16, 0.9, progress=False)
    assert state.losses != plain.losses  # autocast did act
    assert state.losses == pytest.approx(plain.losses, rel=0.05)


def test_bf16_on_a_cpu_says_so_is_recorded_and_resume_checks_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(*TEACHER, "--steps", 3, "--precision", "bf16", "--out", out) == 0
    (notice,) = capsys.readouterr().err.strip().splitlines()
    assert notice.startswith("cmkit: ") and "bf16 autocast" in notice and "slower" in notice
    assert json.loads((out / "config.json").read_text())["training"]["precision"] == "bf16"
    assert run_cli(*TEACHER, "--steps", 6, "--out", out, "--resume") == 2
    assert "training.precision: 'bf16' -> 'fp32'" in capsys.readouterr().err


@pytest.mark.slow
def test_compile_trains_the_same_run_compiling_once(tmp_path):
    """Times arrive as tensors and the batch shape is fixed: one graph for the whole run."""
    try:
        torch.compile(lambda x: x + 1)(torch.zeros(1))
    except Exception:  # no compiler toolchain, or a platform torch.compile does not support
        pytest.skip("torch.compile is unavailable here")
    from torch._dynamo.utils import counters

    counters.clear()
    args = [*TEACHER, "--steps", 8, "--checkpoint-every", 4]
    assert run_cli(*args, "--compile", "--out", tmp_path / "compiled") == 0
    assert counters["stats"]["unique_graphs"] == 1
    assert run_cli(*args, "--out", tmp_path / "eager") == 0
    curves = [
        json.loads((tmp_path / name / "state.json").read_text())["losses"]
        for name in ("compiled", "eager")
    ]
    assert curves[0] == pytest.approx(curves[1], rel=1e-4)
