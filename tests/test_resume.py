"""Runs that stop (SIGKILL, Ctrl-C, SIGTERM, a crash between checkpoints) and resume end
bit-identical to runs that never stopped; a diverging run exits with 3; resume refuses a
different run and starts one killed before its first checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from cmkit import recipes
from cmkit.cli import main

ROOT = Path(__file__).resolve().parent.parent
NET = ["--network", '{"hidden": 16, "depth": 1}']
SMALL = ["--batch-size", "16", "--no-progress", "--checkpoint-every", "4"]
COMMANDS = {  # every recipe, each on moons with a tiny MLP (distill inherits its teacher's)
    "teacher": ["train-teacher", "--data", "moons", *NET],
    "distill": ["distill"],  # --teacher is added by the fixture
    "ict": ["train", "--data", "moons", *NET],
    "ct": ["train", "--data", "moons", "--recipe", "ct", *NET],
    "ect": [
        "train",
        "--data",
        "moons",
        "--recipe",
        "ect",
        "--double",
        "20",
        "--dropout",
        "0.1",
        *NET,
    ],
    "ect-tuned": ["train", "--data", "moons", "--recipe", "ect", "--double", "20", *NET],
    "sct": ["train", "--data", "moons", "--recipe", "sct", "--warmup", "10", *NET],
    "scd": ["distill", "--recipe", "scd", "--warmup", "10"],
    "meanflow": [
        "train",
        "--data",
        "moons",
        "--recipe",
        "meanflow",
        "--network",
        '{"hidden": 16, "depth": 1, "dropout": 0.1}',
    ],
    "shortcut": ["train", "--data", "moons", "--recipe", "shortcut", *NET],
}
FROM_TEACHER = {"distill": "--teacher", "ect-tuned": "--init-from", "scd": "--teacher"}


def cli(*args) -> int:
    return main([str(a) for a in args])


def trained(run_dir: Path) -> dict:
    """Everything a run leaves that must match bit for bit: weights, optimiser moments, RNG
    states, the step, the loss curve and the loss buffer (not the wall time)."""
    out = {}
    for name in ("online", "ema", "target", "aux", "trainer"):
        if (run_dir / f"{name}.safetensors").exists():
            out |= {f"{name}/{k}": v for k, v in load_file(run_dir / f"{name}.safetensors").items()}
    state = json.loads((run_dir / "state.json").read_text())
    state.pop("seconds")
    return {"tensors": out, "state": state}


def assert_identical(a: Path, b: Path) -> None:
    ta, tb = trained(a), trained(b)
    assert ta["state"] == tb["state"]
    assert ta["tensors"].keys() == tb["tensors"].keys()
    for key, value in ta["tensors"].items():
        assert np.array_equal(value.numpy(), tb["tensors"][key].numpy()), key


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "run"
    assert cli(*COMMANDS["teacher"], "--out", out, "--steps", 8, *SMALL) == 0
    return out


def command(recipe: str, teacher: Path) -> list:
    return COMMANDS[recipe] + ([FROM_TEACHER[recipe], teacher] if recipe in FROM_TEACHER else [])


class Crash(BaseException):
    """A process death between two checkpoints: nothing catches it."""


@pytest.mark.parametrize("recipe", list(COMMANDS))
def test_crash_between_checkpoints_then_resume_is_bit_identical(
    recipe, teacher, tmp_path, monkeypatch
):
    args = [*command(recipe, teacher), "--steps", 30, *SMALL]
    assert cli(*args, "--out", tmp_path / "straight") == 0

    real_save = recipes.common.save_checkpoint

    def dies_at_step_12(out, config, state):
        if state.step == 12:  # steps 9..12 are done in memory, the disk holds step 8
            raise Crash
        real_save(out, config, state)

    with monkeypatch.context() as m:
        m.setattr(recipes.common, "save_checkpoint", dies_at_step_12)
        with pytest.raises(Crash):
            cli(*args, "--out", tmp_path / "stopped")
    assert json.loads((tmp_path / "stopped" / "state.json").read_text())["step"] == 8
    assert cli(*args, "--out", tmp_path / "stopped", "--resume") == 0
    assert_identical(tmp_path / "straight", tmp_path / "stopped")


def _default_signals() -> None:
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_DFL)


def _start(args: list, tmp_path: Path) -> subprocess.Popen:
    """The CLI in a subprocess on this checkout, with Ctrl-C and SIGTERM as in a terminal."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "cmkit.cli", *map(str, args)],
        env=env,
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        # a shell may start background jobs with SIGINT ignored; a terminal does not
        preexec_fn=_default_signals,
    )


def _wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path) -> None:
    deadline = time.monotonic() + 120
    while not (run_dir / "state.json").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.005)


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")
@pytest.mark.parametrize("recipe", ["ict", "ect-tuned", "sct", "scd", "meanflow", "shortcut"])
def test_sigkill_mid_run_then_resume_is_bit_identical(recipe, teacher, tmp_path):
    """The killed process checkpoints every step (which does not change the results), so it is
    slow enough to be caught mid-run and the kill most likely lands inside a checkpoint write."""
    args = [*command(recipe, teacher), "--steps", 200, "--batch-size", "16", "--no-progress"]
    proc = _start([*args, "--checkpoint-every", 1, "--out", tmp_path / "killed"], tmp_path)
    _wait_for_checkpoint(proc, tmp_path / "killed")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert cli(*args, "--out", tmp_path / "killed", "--resume") == 0  # finishes the commit
    assert cli(*args, "--out", tmp_path / "straight") == 0
    assert_identical(tmp_path / "straight", tmp_path / "killed")


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="sends signals to a subprocess")
@pytest.mark.parametrize(
    "signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_stop_signal_saves_the_current_step_exits_128_plus_n_and_resumes_exactly(
    tmp_path, signum, code
):
    """Ctrl-C, or SIGTERM from `kill`, a scheduler or a container stop. A teacher's loss does
    not depend on the total step count, so stopping a long run at step N and resuming it to
    N + 6 must equal a run of N + 6 steps."""
    base = [*COMMANDS["teacher"], "--batch-size", "16", "--no-progress"]
    proc = _start([*base, "--steps", 10**6, "--checkpoint-every", 3, "--out", "stopped"], tmp_path)
    _wait_for_checkpoint(proc, tmp_path / "stopped")
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    (line,) = err.strip().splitlines()
    done = json.loads((tmp_path / "stopped" / "state.json").read_text())["step"]
    assert line == (
        f"cmkit: interrupted by {signum.name} after step {done} and saved a checkpoint; "
        "continue with --resume"
    )
    args = [*base, "--steps", done + 6, "--checkpoint-every", 1000]
    assert cli(*args, "--out", tmp_path / "stopped", "--resume") == 0
    assert cli(*args, "--out", tmp_path / "straight") == 0
    assert_identical(tmp_path / "straight", tmp_path / "stopped")


def test_diverging_run_exits_3_keeping_the_last_good_checkpoint(tmp_path, capsys):
    """lr = 1e37: the first Adam step moves weights to about 1e38 (still finite, so it is
    checkpointed); the next forward pass overflows."""
    args = [*COMMANDS["teacher"], "--steps", 5, "--batch-size", 16, "--no-progress", "--lr", 1e37]
    assert cli(*args, "--out", tmp_path, "--checkpoint-every", 1) == 3
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("cmkit: training stopped: the loss is ")
    assert line.endswith(" at step 2; the checkpoint after step 1 is kept")
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 1
    weights = load_file(tmp_path / "online.safetensors")
    assert all(bool(v.isfinite().all()) for v in weights.values())


def test_skip_option_counts_skipped_batches(tmp_path, capsys):
    args = [*COMMANDS["teacher"], "--steps", 4, "--batch-size", 16, "--no-progress", "--lr", 1e37]
    assert cli(*args, "--out", tmp_path, "--on-nonfinite", "skip") == 0
    err = capsys.readouterr().err
    assert "step 2: the loss is" in err and "step 4: the loss is" in err
    assert json.loads((tmp_path / "state.json").read_text())["skipped"] == 3


@pytest.mark.parametrize(
    "change,needle",
    [
        (["--recipe", "ct"], "training.recipe: 'ict' -> 'ct'"),
        (["--lr", "0.01"], "training.lr"),
        (["--data", "rings"], "data."),
        (["--network", '{"hidden": 8, "depth": 1}'], "network.kwargs.hidden: 16 -> 8"),
    ],
)
def test_resume_refuses_other_settings(tmp_path, capsys, change, needle):
    out = tmp_path / "run"
    assert cli(*COMMANDS["ict"], "--steps", 4, *SMALL, "--out", out) == 0
    assert cli(*COMMANDS["ict"], "--steps", 8, *SMALL, *change, "--out", out, "--resume") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert needle in line and "only the step count may change" in line
    assert json.loads((out / "state.json").read_text())["step"] == 4  # untouched


def test_resume_accepts_a_run_saved_before_an_option_existed(tmp_path, capsys):
    """A run whose config predates an option (its options lack the key) was trained as that
    option's default: resume goes on (bench runs from before sCM's time_dist, for one)."""
    out = tmp_path / "run"
    assert cli(*COMMANDS["ict"], "--steps", 4, *SMALL, "--out", out) == 0
    config = json.loads((out / "config.json").read_text())
    del config["training"]["options"]["pairs"]
    (out / "config.json").write_text(json.dumps(config))
    assert cli(*COMMANDS["ict"], "--steps", 8, *SMALL, "--out", out, "--resume") == 0
    assert json.loads((out / "state.json").read_text())["step"] == 8


def test_resume_with_more_steps_continues(tmp_path):
    out = tmp_path / "run"
    assert cli(*COMMANDS["ict"], "--steps", 4, *SMALL, "--out", out) == 0
    assert cli(*COMMANDS["ict"], "--steps", 8, *SMALL, "--out", out, "--resume") == 0
    assert json.loads((out / "state.json").read_text())["step"] == 8


def test_same_seed_same_curve_and_samples(tmp_path):
    """Same seed, same machine: identical training curves, weights and samples."""
    args = [*COMMANDS["ict"], "--steps", 12, *SMALL]
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert cli(*args, "--seed", seed, "--out", tmp_path / name) == 0
        assert (
            cli("sample", "--model", tmp_path / name, "--n", 20, "--out", tmp_path / f"{name}.npy")
            == 0
        )
    assert_identical(tmp_path / "a", tmp_path / "b")
    curve = [json.loads((tmp_path / n / "state.json").read_text())["losses"] for n in "abc"]
    assert curve[0] == curve[1] != curve[2]
    a, b, c = (np.load(tmp_path / f"{n}.npy") for n in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize(
    "left", [[], ["options.json"], ["online.safetensors.tmp"]], ids=["empty", "options", "staged"]
)
def test_resume_before_the_first_checkpoint_starts_the_run(tmp_path, capsys, left):
    """A run killed before its first checkpoint leaves its directory, maybe an options.json
    and staged files without a commit: the same command with --resume starts it afresh."""
    out = tmp_path / "killed"
    out.mkdir()
    for name in left:
        (out / name).write_text("{}")
    args = [*COMMANDS["ict"], "--steps", 4, *SMALL]
    assert cli(*args, "--out", out, "--resume") == 0
    notice = f"cmkit: {out} has no checkpoint yet; starting from step 0"
    assert capsys.readouterr().err.strip().splitlines() == [notice]
    assert cli(*args, "--out", tmp_path / "straight") == 0
    assert_identical(tmp_path / "straight", out)


def test_resume_still_refuses_checkpoint_files_without_config(tmp_path, capsys):
    (tmp_path / "ema.safetensors").write_bytes(b"")
    assert cli(*COMMANDS["ict"], "--steps", 4, *SMALL, "--out", tmp_path, "--resume") == 2
    assert "is not a cmkit run directory (no config.json)" in capsys.readouterr().err
