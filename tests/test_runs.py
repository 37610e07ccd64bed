"""Run directories: safetensors checkpoints, config checks, atomic writes and exact resume."""

import copy
import json
import pickle

import pytest
import torch
from conftest import run_cli

from cmkit.batch import Batch
from cmkit.config import NetworkSpec, RunConfig
from cmkit.errors import UserError
from cmkit.losses import ConsistencyLoss, UnbiasedEstimate, inverse_gap_weight, make_distance
from cmkit.networks.mlp import MLP
from cmkit.networks.zoo import build_network
from cmkit.noise import ICTCurriculum
from cmkit.process import EDMProcess
from cmkit.runs import (
    atomic_write,
    load_config,
    load_network,
    read_tensors,
    restore_state,
    save_checkpoint,
    save_json,
)
from cmkit.train import TrainState, train
from cmkit.training_times import GridPairs, LognormalIndices

NET = {"type": "mlp", "kwargs": {"dim": 2, "hidden": 32, "depth": 1}}
SPEC = NetworkSpec(**NET)


def config_dict(kind="consistency", format=2):
    """A complete config.json value of the given format."""
    training = {"recipe": "ict", "steps": 20, "options": {"s0": 10, "s1": 1280}}
    if format == 1:
        training = {"recipe": "ict", "steps": 20, "s0": 10, "s1": 1280}
    return {
        "format": format,
        "kind": kind,
        "process": EDMProcess().to_dict(),
        "network": copy.deepcopy(NET),
        "data": {
            "spec": "8gaussians",
            "holdout": 0.1,
            "shape": [2],
            "scaler": {"shift": [0.0, 0.0], "scale": [4.0, 4.0]},
        },
        "training": training,
    }


def config(kind="consistency") -> RunConfig:
    return RunConfig.from_dict(config_dict(kind))


def make_state(seed=0):
    torch.manual_seed(seed)
    proc = EDMProcess()
    net = build_network(SPEC)
    online = proc.consistency(net)
    target = proc.consistency(copy.deepcopy(net)).requires_grad_(False)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(online.parameters(), lr=1e-3)
    return TrainState(online, opt, torch.Generator().manual_seed(seed), ema, target)


DATA = Batch(0.5 * torch.randn(512, 2, generator=torch.Generator().manual_seed(123)))
LOSS = ConsistencyLoss(
    EDMProcess(),
    GridPairs(EDMProcess(), ICTCurriculum(20), LognormalIndices()),
    UnbiasedEstimate(EDMProcess().perturb),
    make_distance("pseudo-huber", 2),
    inverse_gap_weight,
)


def run_to(state, steps):
    return train(state, LOSS, DATA, steps, 32, 0.9, lambda k: 0.5, progress=False)


def params(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- save / load


def test_save_then_load_network_gives_identical_outputs(tmp_path):
    state = run_to(make_state(), 5)
    save_checkpoint(tmp_path, config(), state)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    c = torch.linspace(-1, 1, 16)
    for which, module in (
        ("ema", state.ema),
        ("online", state.online.net),
        ("target", state.target.net),
    ):
        cfg, net = load_network(tmp_path, which)
        assert isinstance(net, MLP) and not net.training
        assert cfg.kind == "consistency" and cfg.network == SPEC
        assert json.loads((tmp_path / "config.json").read_text())["format"] == 2
        with torch.no_grad():
            assert torch.equal(net(x, c), module.eval()(x, c))
    # online and ema differ after training, so the test above distinguishes them
    assert not torch.equal(state.online.net(x, c), state.ema(x, c))


def test_checkpoint_files_and_no_tmp_left(tmp_path):
    state = run_to(make_state(), 3)
    save_checkpoint(tmp_path, config(), state)
    save_checkpoint(tmp_path, config(), state)  # overwriting works too
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "config.json",
        "ema.safetensors",
        "online.safetensors",
        "state.json",
        "target.safetensors",
        "trainer.safetensors",
    ]
    meta = json.loads((tmp_path / "state.json").read_text())
    assert meta["step"] == 3


def test_atomic_write_replaces_and_cleans_up(tmp_path):
    path = tmp_path / "x.json"
    save_json(path, {"a": 1})
    save_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]

    def broken(tmp):
        tmp.write_text('{"a": ')
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"a": 2}  # the old file is intact


# ---------------------------------------------------------------- config checks


def test_load_config_missing_dir(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_config(tmp_path / "nowhere")


def test_load_config_dir_without_config(tmp_path):
    (tmp_path / "ema.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="not a cmkit run directory"):
        load_config(tmp_path)


def test_load_config_other_format(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**config_dict(), "format": 3}))
    with pytest.raises(UserError, match="format 3; this cmkit reads formats 1 and 2"):
        load_config(tmp_path)
    no_format = {k: v for k, v in config_dict().items() if k != "format"}
    (tmp_path / "config.json").write_text(json.dumps(no_format))
    with pytest.raises(UserError, match="format None"):
        load_config(tmp_path)


def test_load_config_reads_format_1(tmp_path):
    """Runs written by cmkit 0.1 (format 1) load with their options moved under `options`."""
    save_json(tmp_path / "config.json", config_dict(format=1))
    old = load_config(tmp_path)
    assert old.training.steps == 20 and old.training.options["s0"] == 10
    assert old.training.options["distance"] == "pseudo-huber"  # format 1's None: the default
    assert old.sampling.num_scales == 1281  # the final N, which format 1 did not store
    assert RunConfig.from_dict(old.to_dict()) == old


def test_load_config_invalid_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="format"):
        load_config(tmp_path)


def test_load_config_wrong_kind(tmp_path):
    save_json(tmp_path / "config.json", config_dict("consistency"))
    assert load_config(tmp_path).kind == "consistency"
    assert load_config(tmp_path, "consistency").kind == "consistency"
    with pytest.raises(UserError, match="'consistency' run; expected 'teacher'"):
        load_config(tmp_path, "teacher")
    save_json(tmp_path / "config.json", config_dict("diffusion"))
    with pytest.raises(UserError, match="'diffusion' run"):
        load_config(tmp_path)


def test_build_network_unknown_type():
    with pytest.raises(UserError, match="unknown network type"):
        build_network(NetworkSpec("transformer"))


# ---------------------------------------------------------------- unsafe or broken weights


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_as_safetensors_is_refused_not_executed(tmp_path, writer):
    state = make_state()
    save_checkpoint(tmp_path, config(), state)
    marker = tmp_path / "pwned"
    path = tmp_path / "ema.safetensors"
    if writer == "pickle":
        path.write_bytes(pickle.dumps({"w": Payload(str(marker))}))
    else:
        torch.save({"w": Payload(str(marker))}, path)
    with pytest.raises(UserError, match="cannot load .*ema.safetensors"):
        load_network(tmp_path, "ema")
    assert not marker.exists()


def test_missing_or_mismatched_weights(tmp_path):
    state = make_state()
    save_checkpoint(tmp_path, config(), state)
    (tmp_path / "ema.safetensors").unlink()
    with pytest.raises(UserError, match="missing weights file"):
        load_network(tmp_path, "ema")
    cfg = config_dict()
    cfg["network"]["kwargs"]["hidden"] = 16  # architecture no longer matches the weights
    save_json(tmp_path / "config.json", cfg)
    with pytest.raises(UserError, match="cannot load"):
        load_network(tmp_path, "online")


# ---------------------------------------------------------------- resume


def test_restore_state_round_trip(tmp_path):
    state = run_to(make_state(0), 6)
    state.seconds, state.clipped = 1.5, 4
    save_checkpoint(tmp_path, config(), state)
    torch_rng = torch.get_rng_state()
    torch.manual_seed(999)  # disturb the global RNG; restore_state must put it back

    fresh = make_state(1)  # different initial weights and generator
    restore_state(tmp_path, fresh)
    assert fresh.step == 6 and fresh.losses == state.losses and fresh.seconds == 1.5
    assert fresh.clipped == 4
    assert torch.equal(fresh.generator.get_state(), state.generator.get_state())
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert_same(params(fresh.online), params(state.online))
    assert_same(params(fresh.target), params(state.target))
    assert_same(params(fresh.ema), params(state.ema))
    saved, loaded = state.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert saved["state"].keys() == loaded["state"].keys()
    for i, slots in saved["state"].items():
        assert slots.keys() == loaded["state"][i].keys()
        for name, value in slots.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(loaded["state"][i][name]))
    for g_saved, g_loaded in zip(saved["param_groups"], loaded["param_groups"], strict=True):
        assert g_saved["lr"] == g_loaded["lr"] and g_saved["params"] == g_loaded["params"]
        assert tuple(g_saved["betas"]) == tuple(g_loaded["betas"])


def _on_fake_cuda(monkeypatch, state: list[int]) -> list[list[int]]:
    """Pretend training runs on a GPU whose RNG holds `state`; returns the states set on it."""
    restored = []
    monkeypatch.setattr(TrainState, "device", property(lambda s: torch.device("cuda")))
    monkeypatch.setattr(
        torch.cuda, "get_rng_state", lambda d: torch.tensor(state, dtype=torch.uint8)
    )
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda new, d: restored.append(new.tolist()))
    return restored


def test_checkpoint_keeps_the_training_devices_rng(tmp_path, monkeypatch):
    """A GPU's RNG (which draws dropout masks there) is saved and restored; checkpoints from
    CPU runs (and from before it was saved) hold none and resume all the same."""
    save_checkpoint(tmp_path / "cpu", config(), make_state())
    with monkeypatch.context() as m:
        restored = _on_fake_cuda(m, [7, 1, 9])
        save_checkpoint(tmp_path / "cuda", config(), make_state())
        restore_state(tmp_path / "cuda", make_state(1))
        assert restored == [[7, 1, 9]]
        restore_state(tmp_path / "cpu", make_state(1))
        assert restored == [[7, 1, 9]]  # nothing to restore, no error
    saved = read_tensors(tmp_path / "cuda" / "trainer.safetensors")
    assert saved["device_rng.cuda"].tolist() == [7, 1, 9]
    assert "device_rng.cuda" not in read_tensors(tmp_path / "cpu" / "trainer.safetensors")
    restore_state(tmp_path / "cuda", make_state(1))  # resumed on the CPU: the GPU state is unused
    assert torch.equal(torch.get_rng_state(), saved["torch_rng"])


def test_resume_continues_exactly(tmp_path):
    straight = run_to(make_state(0), 12)

    first = run_to(make_state(0), 6)
    save_checkpoint(tmp_path, config(), first)
    resumed = make_state(7)
    restore_state(tmp_path, resumed)
    run_to(resumed, 12)

    assert resumed.step == 12
    assert_same(params(resumed.online), params(straight.online))
    assert_same(params(resumed.target), params(straight.target))
    assert_same(params(resumed.ema), params(straight.ema))
    assert torch.equal(resumed.generator.get_state(), straight.generator.get_state())


def test_resume_keeps_the_loss_curve(tmp_path):
    """The running loss buffer is checkpointed, so a log interval spanning the stop averages the
    same batches as an uninterrupted run."""

    def to_12(state, **kwargs):
        return train(
            state, LOSS, DATA, 12, 32, 0.9, lambda k: 0.5, progress=False, log_every=4, **kwargs
        )

    def save_at_6(state):
        if state.step == 6:
            save_checkpoint(tmp_path, config(), state)

    straight = to_12(make_state(0), checkpoint=save_at_6, checkpoint_every=6)
    resumed = make_state(3)
    restore_state(tmp_path, resumed)
    assert resumed.step == 6 and len(resumed.running) == 2
    assert to_12(resumed).losses == straight.losses and len(straight.losses) == 3


def test_checkpoints_from_before_the_counts_resume_with_zero(tmp_path):
    state = run_to(make_state(0), 2)
    state.skipped = state.clipped = 1
    save_checkpoint(tmp_path, config(), state)
    meta = json.loads((tmp_path / "state.json").read_text())
    save_json(
        tmp_path / "state.json", {k: meta[k] for k in meta if k not in ("skipped", "clipped")}
    )
    fresh = make_state(0)
    fresh.skipped = fresh.clipped = 5
    restore_state(tmp_path, fresh)
    assert fresh.step == 2 and fresh.skipped == fresh.clipped == 0


# ---------------------------------------------------------------- crashes while saving


class Crash(BaseException):
    """Stands for SIGKILL: nothing after it runs, no handler sees it."""


def _files(run_dir):
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir())}


def test_a_crash_at_any_write_leaves_one_whole_checkpoint(tmp_path, monkeypatch):
    """Kill the writer before each fsync or rename of a checkpoint in turn: after
    finish_checkpoint (what --resume runs first) the files are exactly the old checkpoint or
    exactly the new one, never a mix."""
    import os

    from cmkit import runs

    first = run_to(make_state(0), 4)
    save_checkpoint(tmp_path / "old", config(), first)
    second = run_to(first, 8)
    save_checkpoint(tmp_path / "new", config(), second)
    old, new = _files(tmp_path / "old"), _files(tmp_path / "new")
    assert old != new
    real = {"fsync": lambda fd: None, "replace": os.replace}  # durability is not under test
    outcomes = []
    for crash_at in range(40):
        run_dir = tmp_path / f"crash{crash_at}"
        run_dir.mkdir()
        for name, data in old.items():
            (run_dir / name).write_bytes(data)
        calls = []

        def counted(name, calls=calls, crash_at=crash_at):
            def op(*args):
                calls.append(name)
                if len(calls) > crash_at:
                    raise Crash
                return real[name](*args)

            return op

        with monkeypatch.context() as m:
            m.setattr(runs.os, "fsync", counted("fsync"))
            m.setattr(runs.os, "replace", counted("replace"))
            try:
                save_checkpoint(run_dir, config(), second)
            except Crash:
                pass
            else:
                break
        runs.finish_checkpoint(run_dir)
        files = _files(run_dir)
        assert files in (old, new), crash_at
        outcomes.append(files == new)
    assert outcomes.count(False) >= 7 and outcomes.count(True) >= 7  # both sides were hit
    assert _files(tmp_path / f"crash{crash_at}") == new  # the run without a crash


# ---------------------------------------------------------------- damaged trainer state


@pytest.mark.parametrize("name", ["online.safetensors", "trainer.safetensors"])
def test_pickle_in_a_resume_file_is_refused_not_executed(tmp_path, name):
    save_checkpoint(tmp_path, config(), run_to(make_state(), 2))
    marker = tmp_path / "pwned"
    torch.save({"w": Payload(str(marker))}, tmp_path / name)
    with pytest.raises(UserError, match=f"cannot load .*{name}"):
        restore_state(tmp_path, make_state())
    assert not marker.exists()


@pytest.mark.parametrize(
    "text,needle", [("{not json", "not valid JSON"), ("[1, 2]", "damaged"), ("{}", "damaged")]
)
def test_damaged_state_json(tmp_path, text, needle):
    save_checkpoint(tmp_path, config(), run_to(make_state(), 2))
    (tmp_path / "state.json").write_text(text)
    with pytest.raises(UserError, match=needle):
        restore_state(tmp_path, make_state())


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"format": 0}, "run format 0; this cmkit reads formats 1 and 2"),
        ({"training": {"recipe": "ct", "pairs": "lognormal", "steps": 5}}, "has no format 2 form"),
        ({"training": {"recipe": "ect", "steps": 5}}, "unknown recipe 'ect'"),
        ({"data": None}, "not a complete cmkit run config"),
    ],
)
def test_unreadable_old_configs_are_one_line_and_exit_2(tmp_path, capsys, change, needle):
    save_json(tmp_path / "config.json", {**config_dict(format=1), **change})
    code = run_cli("sample", "--model", tmp_path, "--out", tmp_path / "x.npy")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
