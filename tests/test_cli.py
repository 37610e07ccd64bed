"""End-to-end CLI runs on tiny configs: the contract flags, files, resume and one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import TINY, run_cli

from cmkit import recipes


@pytest.fixture
def runs(moons_runs):
    return moons_runs


def test_run_directories_hold_config_weights_and_options(runs):
    for name in ("teacher", "cd", "ict"):
        files = {p.name for p in (runs / name).iterdir()}
        assert {
            "config.json",
            "online.safetensors",
            "ema.safetensors",
            "trainer.safetensors",
            "state.json",
            "options.json",
        } <= files
        assert not any(f.endswith(".tmp") for f in files)
    config = json.loads((runs / "cd" / "config.json").read_text())
    assert config["kind"] == "consistency" and config["training"]["recipe"] == "cd"
    assert config["training"]["steps"] == 40
    assert "target.safetensors" in {p.name for p in (runs / "cd").iterdir()}


@pytest.mark.parametrize(
    "run,extra",
    [
        ("teacher", ["--steps", "4"]),
        ("cd", []),
        ("cd", ["--steps", "2"]),
        ("ict", ["--times", "1.0"]),
        ("cd", ["--ode", "--steps", "3"]),
    ],
)
def test_sample_same_seed_same_samples(runs, tmp_path, run, extra):
    paths = [tmp_path / f"{i}.npy" for i in range(3)]
    for path, seed in zip(paths, (7, 7, 8), strict=True):
        assert (
            run_cli(
                "sample", "--model", runs / run, "--n", 50, "--out", path, "--seed", seed, *extra
            )
            == 0
        )
    a, b, c = (np.load(p) for p in paths)
    assert a.shape == (50, 2) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sample_times_and_a_disagreeing_step_count_are_refused(runs, tmp_path, capsys):
    base = ["sample", "--model", runs / "ict", "--n", 8, "--times", "1.0"]
    assert run_cli(*base, "--steps", 2, "--out", tmp_path / "a.npy") == 0
    capsys.readouterr()
    assert run_cli(*base, "--steps", 3, "--out", tmp_path / "b.npy") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--steps is 3, but 1 intermediate time(s) make 2 steps" in err


def test_samples_come_back_in_data_units(runs, tmp_path):
    """moons spans about ±3 by ±1.8 in its own units; model units would be near ±1."""
    out = tmp_path / "s.npy"
    assert run_cli("sample", "--model", runs / "teacher", "--n", 400, "--out", out) == 0
    x = np.load(out)
    assert 1.0 < x[:, 0].std() < 4.0


def test_sample_png_scatter_and_image_grid(runs, tmp_path):
    assert run_cli("sample", "--model", runs / "cd", "--n", 100, "--out", tmp_path / "a.png") == 0
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_continues_to_more_steps(runs, tmp_path):
    out = tmp_path / "t"
    assert run_cli("train-teacher", "--data", "moons", "--out", out, *TINY) == 0
    assert (
        run_cli(
            "train-teacher", "--data", "moons", "--out", out, *TINY[2:], "--steps", "60", "--resume"
        )
        == 0
    )
    state = json.loads((out / "state.json").read_text())
    assert state["step"] == 60


def test_config_file_sets_options(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        'data = "8gaussians"\nsteps = 20\nbatch-size = 32\nno_progress = true\nrecipe = "ct"\n'
    )
    assert run_cli("train", "--config", cfg, "--out", tmp_path / "r") == 0
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["training"]["recipe"] == "ct" and config["training"]["batch_size"] == 32
    assert config["data"]["spec"] == "8gaussians"


def test_flow_process_teacher_and_ct(tmp_path):
    assert (
        run_cli(
            "train-teacher", "--data", "rings", "--process", "flow", "--out", tmp_path / "ft", *TINY
        )
        == 0
    )
    assert run_cli("distill", "--teacher", tmp_path / "ft", "--out", tmp_path / "fcd", *TINY) == 0
    assert (
        run_cli(
            "train",
            "--data",
            "rings",
            "--process",
            "flow",
            "--recipe",
            "ct",
            "--out",
            tmp_path / "fct",
            *TINY,
        )
        == 0
    )
    for run, steps in (("ft", 3), ("fcd", 3), ("fct", 2)):
        out = tmp_path / f"{run}.npy"
        assert (
            run_cli("sample", "--model", tmp_path / run, "--n", 20, "--out", out, "--steps", steps)
            == 0
        )
        assert np.isfinite(np.load(out)).all()


def _bad_inputs(tmp_path):
    np.save(tmp_path / "shape.npy", np.zeros((5, 2, 2)))
    nan = np.zeros((20, 2))
    nan[3, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text('{"model": "something else"}')
    t = ["--out", tmp_path / "o", "--steps", "5"]
    return {
        "unknown data": (["train", "--data", "nope", *t], "nope"),
        "wrong shape": (["train", "--data", tmp_path / "shape.npy", *t], "shape"),
        "nan": (["train-teacher", "--data", tmp_path / "nan.npy", *t], "non-finite"),
        "missing run": (["sample", "--model", tmp_path / "missing", "--out", "x.npy"], "missing"),
        "foreign run": (["sample", "--model", tmp_path / "foreign", "--out", "x.npy"], "format"),
        "sigma order": (
            ["train", "--data", "moons", "--sigma-min", "5", "--sigma-max", "1", *t],
            "sigma_min",
        ),
        "ict s0": (["train", "--data", "moons", "--s0", "0", *t], "s0"),
        "bad steps": (
            ["train", "--data", "moons", "--steps", "0", "--out", tmp_path / "o"],
            "--steps",
        ),
        "bad out": (["sample", "--model", tmp_path / "foreign", "--out", "x.txt"], ".npy"),
    }


def test_bad_input_gives_one_line_and_exit_2(tmp_path, capsys):
    for name, (args, needle) in _bad_inputs(tmp_path).items():
        assert run_cli(*args) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, (name, err)
        assert err.startswith("cmkit: error:") and needle in err, (name, err)


def test_distill_rejects_num_scales_below_2_and_consistency_teacher(runs, capsys):
    assert (
        run_cli("distill", "--teacher", runs / "teacher", "--num-scales", "1", "--out", runs / "x")
        == 2
    )
    assert "N >= 2" in capsys.readouterr().err
    assert run_cli("distill", "--teacher", runs / "cd", "--out", runs / "y") == 2
    assert "teacher" in capsys.readouterr().err


@pytest.mark.slow
def test_subprocess_error_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cmkit.cli",
            "train",
            "--data",
            "nope",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("module", ["cmkit", "cmkit.cli"])
def test_help_lists_contract_commands(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for command in ("train-teacher", "distill", "train", "sample", "quickstart", "export"):
        assert command in proc.stdout


@pytest.mark.slow
def test_quickstart_smoke(tmp_path, capsys):
    """The main job end to end at a tiny scale: the teacher and ECT by default, the PNG and
    the report; --recipes adds CD and iCT to the same teacher."""
    quick = ["quickstart", "--out", tmp_path, "--scale", "0.003", "--no-progress"]
    assert run_cli(*quick) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["ect", "teacher"]
    assert (tmp_path / "samples.png").read_bytes()[:4] == b"\x89PNG"
    report = (tmp_path / "report.md").read_text()
    for title in ("teacher Heun | 35", "ECT 1 step | 1", "ECT 2 steps | 2"):
        assert title in report
    assert "CD 1 step" not in report
    assert run_cli(*quick, "--recipes", "ict,cd") == 0
    report = (tmp_path / "report.md").read_text()
    assert report.index("CD 1 step | 1") < report.index("iCT 2 steps | 2")
    assert "ECT" not in report and (tmp_path / "cd" / "config.json").is_file()
    capsys.readouterr()
    assert run_cli(*quick, "--recipes", "ect,lcm") == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--recipes must be some of ect, cd, ict, got 'ect,lcm'"), err


def test_image_run_samples_png_grid(tmp_path):
    from PIL import Image

    run = tmp_path / "digits"
    assert (
        run_cli(
            "train-teacher",
            "--data",
            "digits",
            "--out",
            run,
            "--steps",
            "3",
            "--batch-size",
            "8",
            "--no-progress",
        )
        == 0
    )
    assert (
        run_cli("sample", "--model", run, "--n", 16, "--steps", 2, "--out", tmp_path / "g.png") == 0
    )
    grid = Image.open(tmp_path / "g.png")
    assert grid.mode == "L" and grid.size == (4 * 37, 4 * 37)  # 4×4 tiles of 8 px, 1 px gaps, ×4
    assert run_cli("sample", "--model", run, "--n", 4, "--out", tmp_path / "g.npy") == 0
    assert np.load(tmp_path / "g.npy").shape == (4, 1, 8, 8)


@pytest.mark.parametrize(
    "text,needle",
    [
        ('steps = "many"', "integer"),
        ("recipe = 'xct'", "ct, ict"),
        ("colour = 1", "unknown"),
        ("resume = 1", "true or false"),
        ("steps = [", "cannot read"),
        ("grad-clip = 0", "grad-clip = 0; expected a number > 0 or 'none'"),
    ],
)
def test_bad_config_file_is_one_line(tmp_path, capsys, text, needle):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text + "\n")
    assert run_cli("train", "--config", cfg, "--data", "moons", "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_options_json_reruns_with_config(runs, tmp_path):
    """options.json written by a run is accepted back by --config."""
    assert (
        run_cli(
            "train",
            "--config",
            runs / "ict" / "options.json",
            "--out",
            tmp_path / "again",
            "--steps",
            "5",
        )
        == 0
    )


@pytest.mark.parametrize("command", ["train-teacher", "train", "distill"])
def test_checkpoint_minutes_also_checkpoints_by_wall_time(runs, tmp_path, monkeypatch, command):
    """Every training command takes it; a few microseconds means a checkpoint after each step,
    where --checkpoint-every alone would write only the last one."""
    steps = []
    real = recipes.common.save_checkpoint
    monkeypatch.setattr(
        recipes.common, "save_checkpoint", lambda out, c, s: (steps.append(s.step), real(out, c, s))
    )
    source = ["--teacher", runs / "teacher"] if command == "distill" else ["--data", "moons"]
    args = [command, *source, "--steps", 3, "--batch-size", 16, "--no-progress"]
    assert run_cli(*args, "--out", tmp_path / "run", "--checkpoint-minutes", 1e-7) == 0
    assert steps == [1, 2, 3]


@pytest.mark.parametrize("minutes", ["0", "-1"])
def test_checkpoint_minutes_must_be_positive(tmp_path, capsys, minutes):
    args = ["train", "--data", "moons", "--out", tmp_path / "o", "--checkpoint-minutes", minutes]
    assert run_cli(*args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"cmkit: error: --checkpoint-minutes must be > 0, got {float(minutes)}"


TRAINING = {  # every training command, with what it needs besides --out
    "train-teacher": ["train-teacher", "--data", "moons"],
    "distill": ["distill", "--teacher", "{teacher}"],
    "train": ["train", "--data", "moons"],
}


def _grad_clip_of(run) -> float | None:
    return json.loads((run / "config.json").read_text())["training"]["options"]["grad_clip"]


@pytest.mark.parametrize("command", TRAINING)
def test_grad_clip_none_is_recorded_and_reruns_from_options_json(runs, tmp_path, command):
    args = [a.format(teacher=runs / "teacher") for a in TRAINING[command]]
    tiny = ["--steps", "3", "--batch-size", "16", "--no-progress"]
    assert run_cli(*args, *tiny, "--out", tmp_path / "a", "--grad-clip", "off") == 0
    assert json.loads((tmp_path / "a" / "options.json").read_text())["grad_clip"] == "none"
    again = tmp_path / "b"
    assert run_cli(command, "--config", tmp_path / "a" / "options.json", "--out", again) == 0
    assert _grad_clip_of(tmp_path / "a") is None and _grad_clip_of(again) is None
    assert run_cli(*args, *tiny, "--out", tmp_path / "c", "--grad-clip", "0.5") == 0
    assert _grad_clip_of(tmp_path / "c") == 0.5


@pytest.mark.parametrize("command", TRAINING)
@pytest.mark.parametrize("value", ["0", "-1", "abc"])
def test_bad_grad_clip_is_one_line_exit_2(runs, tmp_path, capsys, command, value):
    args = [a.format(teacher=runs / "teacher") for a in TRAINING[command]]
    with pytest.raises(SystemExit) as info:  # argparse's error, through Parser.error
        run_cli(*args, "--out", tmp_path / "o", "--grad-clip", value)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2
    assert f"--grad-clip: expected a number > 0 or 'none', got '{value}'" in line
    assert not (tmp_path / "o").exists()
