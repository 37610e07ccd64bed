"""Training in several processes (CPU, gloo, 2 ranks): the random stream does not depend on
the number of processes, ranks hold identical weights, 2 ranks follow 1 process, decisions
(NaN, Ctrl-C) are agreed, a killed launcher's run resumes exactly, and torchrun works too."""

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import run_cli
from safetensors.torch import load_file, save_file
from test_resume import ROOT, _default_signals, _wait_for_checkpoint, assert_identical

from cmkit import recipes
from cmkit.batch import Batch
from cmkit.distributed import World, joined
from cmkit.engine import make_engine
from cmkit.guidance import LabelDropout, WithGuidance
from cmkit.losses import EDMLoss
from cmkit.networks.mlp import MLP
from cmkit.process import EDMProcess, TrigFlowProcess
from cmkit.recipes.ict import ict_loss
from cmkit.recipes.scm import scm_loss
from cmkit.train import TrainState, train
from cmkit.training_data import load_training_data

NET = ["--network", '{"hidden": 16, "depth": 1}']
RUN = ["train", "--data", "moons", *NET, "--steps", 200, "--batch-size", 16, "--no-progress"]
POSIX = pytest.mark.skipif(os.name != "posix", reason="sends signals to subprocesses")


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def _start(args: list, cwd: Path, **env) -> subprocess.Popen:
    """`cmkit ARGS` in a subprocess with Ctrl-C and SIGTERM as in a terminal."""
    return subprocess.Popen(
        [sys.executable, "-m", "cmkit", *map(str, args)],
        env=_env(**env),
        cwd=cwd,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_signals,
    )


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _ranks(args: list, cwd: Path, nproc: int = 2, **env) -> list[subprocess.Popen]:
    """The ranks of one world started by hand, as torchrun would (but keeping exit codes)."""
    world = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": _free_port(), "WORLD_SIZE": str(nproc)}
    world["LOCAL_WORLD_SIZE"] = str(nproc)
    return [_start(args, cwd, **world, **env, RANK=str(r), LOCAL_RANK=str(r)) for r in range(nproc)]


# ---------------------------------------------------------------- the random stream


def test_shards_draw_the_rows_of_the_global_batch():
    """Two halves, each drawing for the whole batch from the same generator state, see the
    rows the whole batch sees, for every per-sample draw of the losses and loss wrappers."""
    x0, labels = torch.randn(8, 2), torch.arange(8) % 3
    whole = Batch(x0, {"labels": labels})
    halves = [whole.rows(torch.arange(4 * h, 4 * h + 4), World(h, 2).shard(8)) for h in (0, 1)]
    for draw in (
        lambda b, g: b.randn(b.x0.shape[1:], g),
        lambda b, g: b.rand(g),
        lambda b, g: b.draw(lambda n: torch.randint(0, 5, (n,), generator=g)),
    ):
        parts = [draw(half, torch.Generator().manual_seed(3)) for half in halves]
        assert torch.equal(torch.cat(parts), draw(whole, torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("wrap", ["none", "label-dropout", "guidance"])
def test_a_loss_over_two_shards_is_the_loss_over_the_batch(wrap):
    """The mean of the halves' losses is the whole batch's loss: same noise levels, same
    noise, same dropped labels and guidance scales row for row."""
    torch.manual_seed(0)
    denoiser = EDMProcess().denoiser(MLP(2, hidden=8, depth=1, num_classes=4, guidance_dim=8))
    loss = {
        "none": EDMLoss(EDMProcess()),
        "label-dropout": LabelDropout(EDMLoss(EDMProcess()), 0.5, 3),
        "guidance": WithGuidance(EDMLoss(EDMProcess()), 1.0, 3.0),
    }[wrap]
    whole = Batch(torch.randn(8, 2), {"labels": torch.arange(8) % 3})
    halves = [whole.rows(torch.arange(4 * h, 4 * h + 4), World(h, 2).shard(8)) for h in (0, 1)]
    value = loss(denoiser, None, whole, 0, torch.Generator().manual_seed(1))
    parts = [loss(denoiser, None, h, 0, torch.Generator().manual_seed(1)) for h in halves]
    assert torch.allclose((parts[0] + parts[1]) / 2, value, rtol=1e-6)


# ---------------------------------------------------------------- the loop in two processes


def _state_and_loss(recipe: str, steps: int):
    """A tiny MLP's fresh state on moons with the recipe's loss, the same in every process."""
    torch.manual_seed(0)
    process = EDMProcess() if recipe == "ict" else TrigFlowProcess()
    data, section = load_training_data("moons", 0.1, process.sigma_data)
    net = MLP(2, hidden=16, depth=1)
    online, target = process.consistency(net), process.consistency(copy.deepcopy(net))
    target.requires_grad_(False)
    if recipe == "ict":
        loss, schedule = ict_loss(recipes.ICTOptions(), process, steps, section.shape)
        aux, target_mu = None, schedule.target_mu
    else:
        loss = scm_loss(recipes.SCTOptions(warmup=50), process)
        aux, target_mu = loss.weight, lambda step: 0.0
    params = [*online.parameters(), *([] if aux is None else aux.parameters())]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    ema = copy.deepcopy(net).requires_grad_(False)
    state = TrainState(online, optimizer, torch.Generator().manual_seed(0), ema, target, aux)
    return state, loss, data, target_mu


def _trained(world: World, recipe: str, steps: int) -> dict[str, torch.Tensor]:
    """Every weight and optimiser moment after `steps` steps of batch 64 in `world`."""
    state, loss, data, target_mu = _state_and_loss(recipe, steps)
    engine = make_engine(world, state.online.net, "fp32")
    train(state, loss, data, steps, 64, 0.99, target_mu, progress=False, engine=engine)
    modules = {"online": state.online.net, "ema": state.ema, "target": state.target.net}
    if state.aux is not None:
        modules["aux"] = state.aux
    out = {
        f"{m}.{k}": v.clone()
        for m, module in modules.items()
        for k, v in module.state_dict().items()
    }
    for i, slots in state.optimizer.state_dict()["state"].items():
        out |= {f"adam.{i}.{k}": v.clone() for k, v in slots.items()}
    return out


def _rank(rank: int, port: str, out: Path, recipe: str, steps: int) -> None:
    world = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2"}
    os.environ.update(world, RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with joined("cpu") as world:
        save_file(_trained(world, recipe, steps), str(out / f"rank{rank}.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("recipe,steps", [("ict", 300), ("sct", 100)])
def test_two_ranks_hold_identical_weights_and_follow_one_process(recipe, steps, tmp_path):
    """iCT (EMA target) and sCT (the loss's own weights w_φ, averaged outside DDP): after the
    run both ranks hold the same weights, EMA, target and Adam moments bit for bit, and they
    agree with one process training on the whole batch to 1e-5."""
    mp.spawn(_rank, args=(_free_port(), tmp_path, recipe, steps), nprocs=2)
    rank0, rank1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    alone = _trained(World(), recipe, steps)
    worst = max((rank0[k] - alone[k]).abs().max().item() for k in alone if k.startswith("online"))
    assert worst < 1e-5


# ---------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """An iCT run of 200 steps in 2 processes started by --nproc."""
    out = tmp_path_factory.mktemp("nproc") / "run"
    assert run_cli(*RUN, "--nproc", 2, "--out", out) == 0
    return out


@pytest.mark.slow
def test_a_repeated_two_process_run_is_bit_identical(two_processes, tmp_path):
    assert run_cli(*RUN, "--nproc", 2, "--out", tmp_path / "again") == 0
    assert_identical(two_processes, tmp_path / "again")
    sizes = json.loads((two_processes / "state.json").read_text())["world_sizes"]
    assert sizes == [[0, 2]]


@pytest.mark.slow
def test_plain_torchrun_trains_the_same_run(two_processes, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", _free_port(), "-m", "cmkit", *map(str, RUN)]
    done = subprocess.run(command + ["--out", tmp_path / "run"], env=_env(), cwd=tmp_path)
    assert done.returncode == 0
    assert_identical(two_processes, tmp_path / "run")


@pytest.mark.slow
def test_a_batch_that_does_not_divide_exits_2_with_one_line(tmp_path):
    proc = _start([*RUN, "--batch-size", 15, "--nproc", 2, "--out", "run"], tmp_path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.strip().splitlines() == [
        "cmkit: error: --batch-size 15 does not divide among 2 processes; the global batch "
        "is split evenly"
    ]


NAN_ON_RANK_1 = """
import os
from cmkit import losses
real = losses.ConsistencyLoss.__call__
def poisoned(self, online, target, batch, step, generator):
    loss = real(self, online, target, batch, step, generator)
    return loss * float("nan") if step == 6 and os.environ["RANK"] == "1" else loss
losses.ConsistencyLoss.__call__ = poisoned
"""


@pytest.mark.slow
@POSIX
def test_a_nan_on_one_rank_stops_both_at_the_same_step(tmp_path):
    """Rank 1's loss is NaN at step 7 (a sitecustomize patches it in): both ranks exit 3,
    rank 0 alone says where, and the checkpoint after step 4 is intact."""
    (tmp_path / "sitecustomize.py").write_text(NAN_ON_RANK_1)
    path = f"{tmp_path}{os.pathsep}{ROOT}"
    args = [*RUN, "--checkpoint-every", 4, "--out", "run"]
    procs = _ranks(args, tmp_path, PYTHONPATH=path)
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [3, 3]
    assert errs[0].strip().splitlines() == [
        "cmkit: training stopped: the loss is nan at step 7; the checkpoint after step 4 is kept"
    ]
    assert errs[1].strip() == ""
    assert json.loads((tmp_path / "run" / "state.json").read_text())["step"] == 4
    weights = load_file(tmp_path / "run" / "online.safetensors")
    assert all(bool(v.isfinite().all()) for v in weights.values())


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux's /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _gone(pid: int) -> bool:
    """Ended: no such process, or a zombie nobody reaps (a container's init may not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the ranks through /proc")
def test_sigkill_of_the_launcher_then_resume_is_bit_identical(two_processes, tmp_path):
    """The ranks end with their launcher (nothing keeps training behind it); the killed run,
    checkpointed every step, resumes with --resume --nproc 2 to the uninterrupted run."""
    out = tmp_path / "killed"
    proc = _start([*RUN, "--nproc", 2, "--checkpoint-every", 1, "--out", out], tmp_path)
    _wait_for_checkpoint(proc, out)
    ranks = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 30
    while not all(_gone(pid) for pid in ranks):
        assert time.monotonic() < deadline, "the ranks outlived their launcher"
        time.sleep(0.01)
    assert len(ranks) == 2
    assert json.loads((out / "state.json").read_text())["step"] < 200
    assert run_cli(*RUN, "--nproc", 2, "--out", out, "--resume") == 0
    assert_identical(two_processes, out)


@pytest.mark.slow
@POSIX
@pytest.mark.parametrize(
    "signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_a_stop_signal_to_the_launcher_stops_both_with_one_checkpoint(tmp_path, signum, code):
    """Ctrl-C (or SIGTERM) reaches both ranks once, through the launcher: they stop after the
    same step, rank 0 commits one checkpoint there and the launcher exits 128 + n with one
    line."""
    args = [*RUN, "--steps", 10**6, "--checkpoint-every", 5, "--keep-history"]
    proc = _start([*args, "--nproc", 2, "--out", "run"], tmp_path)
    _wait_for_checkpoint(proc, tmp_path / "run")
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    done = json.loads((tmp_path / "run" / "state.json").read_text())["step"]
    assert err.strip().splitlines() == [
        f"cmkit: interrupted by {signum.name} after step {done} and saved a checkpoint; "
        "continue with --resume"
    ]
    history = json.loads((tmp_path / "run" / "history" / "index.json").read_text())
    by_steps = list(range(5, done + 1, 5))
    assert [int(step) for step in history] == by_steps + ([done] if done % 5 else [])
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_resume_with_another_number_of_processes_says_so(tmp_path, capsys):
    """A run's processes are recorded per stretch; a resume alone after 2 processes notes it
    (state.json edited to stand for a 2-process run: one process keeps the test fast)."""
    out = tmp_path / "run"
    args = ["train", "--data", "moons", *NET, "--batch-size", 16, "--no-progress"]
    assert run_cli(*args, "--steps", 4, "--out", out) == 0
    state = json.loads((out / "state.json").read_text())
    (out / "state.json").write_text(json.dumps({**state, "world_sizes": [[0, 2]]}))
    capsys.readouterr()
    assert run_cli(*args, "--steps", 8, "--out", out, "--resume") == 0
    assert capsys.readouterr().err.strip().splitlines() == [
        f"cmkit: {out} was trained in 2 processes up to step 4; continuing in 1 process, the same "
        "run up to all-reduce rounding (not bit-identical)"
    ]
    state = json.loads((out / "state.json").read_text())
    assert state["world_sizes"] == [[0, 2], [4, 1]] and state["step"] == 8
