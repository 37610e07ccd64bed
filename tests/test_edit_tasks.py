"""`cmkit edit` on tiny runs: units and files, determinism under a seed, one-line errors."""

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from cmkit import editing
from cmkit.data import load_data
from cmkit.edit_tasks import DEFAULT_STEPS, EditOptions, edit_times, run_task
from cmkit.generate import generate, load_model

TINY = ["--steps", "3", "--batch-size", "8", "--no-progress", "--network", '{"channels": 8}']


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Consistency runs on digits and tinted digits, a digits teacher and a moons CM, 3 steps."""
    root = tmp_path_factory.mktemp("edit_runs")
    for name, command, data in [
        ("cm", "train", "digits"),
        ("rgb", "train", "tinted-digits"),
        ("teacher", "train-teacher", "digits"),
    ]:
        assert run_cli(command, "--data", data, "--out", root / name, *TINY) == 0
    assert run_cli("train", "--data", "moons", "--out", root / "moons", *TINY[:5]) == 0
    sct = ["train", "--recipe", "sct", "--data", "digits", "--out", root / "sct", *TINY]
    assert run_cli(*sct) == 0
    digits = load_data("digits")[:4]
    np.save(root / "digits.npy", digits)
    np.save(root / "low.npy", digits.reshape(4, 1, 4, 2, 4, 2).mean((3, 5)))
    np.save(root / "tinted.npy", load_data("tinted-digits")[:3])
    np.save(root / "gray.npy", digits[:3])
    np.save(root / "z.npy", np.random.default_rng(0).standard_normal((2, 1, 8, 8)))
    np.save(root / "z2.npy", np.random.default_rng(1).standard_normal((2, 1, 8, 8)))
    return root


def edit(runs, task, model, out, *extra):
    return run_cli("edit", task, "--model", runs / model, "--out", out, "--no-progress", *extra)


TASK_ARGS = {
    "inpaint": ("cm", ["--input", "digits.npy", "--mask", "strokes"]),
    "colorize": ("rgb", ["--input", "gray.npy"]),
    "superres": ("cm", ["--input", "low.npy"]),
    "denoise": ("cm", ["--input", "digits.npy", "--sigma", "2"]),
    "interpolate": ("cm", ["--input", "z.npy", "--input", "z2.npy", "--frames", "3"]),
    "sdedit": ("cm", ["--input", "digits.npy"]),
}


def task_args(runs, task):
    model, args = TASK_ARGS[task]
    return model, [str(runs / a) if a.endswith(".npy") else a for a in args]


@pytest.mark.parametrize("task", editing.TASKS)
def test_every_task_is_deterministic_under_a_seed(runs, tmp_path, task):
    model, args = task_args(runs, task)
    outs = [tmp_path / f"{i}.npy" for i in range(3)]
    for out, seed in zip(outs, (4, 4, 5), strict=True):
        assert edit(runs, task, model, out, *args, "--seed", seed) == 0
    a, b, c = (np.load(o) for o in outs)
    assert a.dtype == np.float32 and np.isfinite(a).all()
    assert np.array_equal(a, b)
    assert np.array_equal(a, c) == (task in ("denoise", "interpolate"))  # no fresh noise
    assert (tmp_path / "0_grid.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("task", [t for t in editing.TASKS if t != "colorize"])
def test_every_task_runs_on_a_trigflow_run_through_the_process_protocol(runs, tmp_path, task):
    _, args = task_args(runs, task)
    out = tmp_path / "o.npy"
    assert edit(runs, task, "sct", out, *args, "--seed", 1) == 0
    assert np.isfinite(np.load(out)).all()


@pytest.mark.parametrize("model", ["cm", "sct"])
def test_inpainting_in_data_units_keeps_known_pixels(runs, tmp_path, model):
    out, digits = tmp_path / "o.npy", runs / "digits.npy"
    assert edit(runs, "inpaint", model, out, "--input", digits, "--mask", "center") == 0
    x, y = np.load(runs / "digits.npy"), np.load(out)
    hole = editing.builtin_mask("center", 8, 8, None).numpy()
    np.testing.assert_allclose(y[..., ~hole], x[..., ~hole], atol=1e-5)
    assert not np.allclose(y[..., hole], x[..., hole], atol=0.1)
    grid = Image.open(tmp_path / "o_grid.png")  # 4 rows of before | after, 8 px + 1 px gaps, ×4
    assert grid.size == (4 * (2 * 9 + 1), 4 * (4 * 9 + 1))


def test_mask_file_and_image_file_in_and_out(runs, tmp_path):
    """An 8x8 PNG in, the edited 8x8 PNG out; a PNG mask (white = fill) or a 0/1 .npy mask."""
    pixels = (np.load(runs / "digits.npy")[0, 0] * 255 / 16).round().astype(np.uint8)
    Image.fromarray(pixels, "L").save(tmp_path / "in.png")
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 5:] = 255
    Image.fromarray(mask, "L").save(tmp_path / "mask.png")
    np.save(tmp_path / "mask.npy", (mask > 0).astype(np.int64))
    results = []
    for mask_file in ("mask.png", "mask.npy"):
        out = tmp_path / f"out_{mask_file}.png"
        args = ["--input", tmp_path / "in.png", "--mask", tmp_path / mask_file]
        assert edit(runs, "inpaint", "cm", out, *args) == 0
        results.append(np.asarray(Image.open(out)))
    assert results[0].shape == (8, 8)
    assert np.array_equal(results[0][:, :5], pixels[:, :5])
    assert np.array_equal(results[0], results[1])


def test_superres_average_pools_to_the_input_in_data_units(runs, tmp_path):
    out = tmp_path / "o.npy"
    assert edit(runs, "superres", "cm", out, "--input", runs / "low.npy", "--steps", 2) == 0
    y = np.load(out)
    assert y.shape == (4, 1, 8, 8)
    np.testing.assert_allclose(
        y.reshape(4, 1, 4, 2, 4, 2).mean((3, 5)), np.load(runs / "low.npy"), atol=1e-4
    )


def test_colorize_keeps_the_luminance_of_a_gray_input(runs, tmp_path):
    out = tmp_path / "o.npy"
    assert edit(runs, "colorize", "rgb", out, "--input", runs / "gray.npy") == 0
    gray, rgb = np.load(runs / "gray.npy"), np.load(out)
    assert rgb.shape == (3, 3, 8, 8)
    luma = np.tensordot(np.array(editing.LUMA), rgb, axes=([0], [1]))
    np.testing.assert_allclose(luma, gray[:, 0] * sum(editing.LUMA), atol=1e-4)
    assert rgb.std(axis=1).max() > 0.01  # colour, not gray copies


def test_interpolation_ends_are_the_one_step_samples_of_the_seed(runs, tmp_path):
    """Without inputs the pair is the seed's noise and the next draw; frame 0 is `sample --n 1`."""
    out = tmp_path / "o.npy"
    assert edit(runs, "interpolate", "cm", out, "--seed", 9, "--frames", 5) == 0
    frames = np.load(out)
    assert frames.shape == (5, 1, 8, 8)
    model = load_model(str(runs / "cm"))
    np.testing.assert_allclose(frames[0], generate(model, 1, seed=9)[0], atol=1e-5)
    gen = torch.Generator().manual_seed(9)
    z_b = [torch.randn((1, 1, 8, 8), generator=gen) for _ in range(2)][1]
    one_step = model.fn(model.process.prior(z_b), model.process.t_max).detach().numpy()
    np.testing.assert_allclose(frames[-1], model.scaler.to_raw(one_step)[0], atol=1e-5)


def test_interpolation_of_given_noises(runs):
    model = load_model(str(runs / "cm"))
    z_a, z_b = (
        np.load(runs / "z.npy").astype(np.float32),
        np.load(runs / "z2.npy").astype(np.float32),
    )
    out = run_task(model, "interpolate", [z_a, z_b], EditOptions(frames=4)).after.reshape(
        2, 4, 1, 8, 8
    )
    for z, frame in ((z_a, out[:, 0]), (z_b, out[:, -1])):
        x = model.fn(model.process.prior(torch.from_numpy(z)), model.process.t_max).detach().numpy()
        np.testing.assert_allclose(frame, x, atol=1e-6)


def test_runs_with_clip_denoised_clamp_f_as_sampling_does(runs):
    """Runs imported from diffusers with clip_denoised clamp f to [−1, 1] before re-noising."""
    model = load_model(str(runs / "cm"))
    z = [1000 * np.random.default_rng(i).standard_normal((1, 1, 8, 8), np.float32) for i in (0, 1)]
    assert np.abs(run_task(model, "interpolate", z, EditOptions(frames=2)).after).max() > 1
    model.config.sampling.clip_denoised = True
    assert np.abs(run_task(model, "interpolate", z, EditOptions(frames=2)).after).max() <= 1


def test_denoise_works_on_a_teacher_and_uses_the_data_units_sigma(runs):
    model = load_model(str(runs / "teacher"))
    y = model.scaler.to_model(np.load(runs / "digits.npy"))
    out = run_task(model, "denoise", [y], EditOptions(sigma=4.0)).after
    scale = model.scaler.scale[0]  # digits: 8 data units per model unit, so σ = 0.5 here
    expected = model.fn(torch.from_numpy(y), 4.0 / scale).detach().numpy()
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_default_times(runs):
    model = load_model(str(runs / "cm"))
    assert edit_times(model, "inpaint", EditOptions(steps=1)) == [80.0]
    two = edit_times(model, "superres", EditOptions(steps=2))
    assert two == [80.0, *model.process.default_times(2)]
    assert len(edit_times(model, "colorize", EditOptions())) == DEFAULT_STEPS["colorize"]
    sd = edit_times(model, "sdedit", EditOptions(steps=2))
    assert sd == model.process.default_times(4)[1:] and sd[0] == pytest.approx(2.515, abs=1e-3)
    assert edit_times(model, "inpaint", EditOptions(times=[3.0, 0.5])) == [3.0, 0.5]


def test_vector_runs_inpaint_with_a_mask_over_dimensions(runs, tmp_path):
    points = load_data("moons")[:5]
    np.save(tmp_path / "p.npy", points)
    np.save(tmp_path / "m.npy", np.array([0, 1]))
    out = tmp_path / "o.npy"
    assert (
        edit(
            runs,
            "inpaint",
            "moons",
            out,
            "--input",
            tmp_path / "p.npy",
            "--mask",
            tmp_path / "m.npy",
        )
        == 0
    )
    y = np.load(out)
    np.testing.assert_allclose(y[:, 0], points[:, 0], atol=1e-5)
    assert not (tmp_path / "o_grid.png").exists()


def _bad_edits(runs, tmp_path):
    np.save(tmp_path / "mask7.npy", np.ones((7, 7)))
    np.save(tmp_path / "mask2.npy", np.full((8, 8), 2))
    np.save(tmp_path / "p.npy", load_data("moons")[:5])
    d, low, o = str(runs / "digits.npy"), str(runs / "low.npy"), str(tmp_path / "o.npy")
    return {
        "mask shape": (
            ["inpaint", "cm", o, "--input", d, "--mask", tmp_path / "mask7.npy"],
            "(7, 7)",
        ),
        "mask values": (
            ["inpaint", "cm", o, "--input", d, "--mask", tmp_path / "mask2.npy"],
            "0 (keep)",
        ),
        "mask name": (["inpaint", "cm", o, "--input", d, "--mask", "circle"], "left-half"),
        "no mask": (["inpaint", "cm", o, "--input", d], "--mask"),
        "factor": (["superres", "cm", o, "--input", low, "--factor", "3"], "--factor 3"),
        "low shape": (["superres", "cm", o, "--input", d], "(1, 4, 4)"),
        "gray run": (["colorize", "cm", o, "--input", d], "RGB"),
        "teacher": (["sdedit", "teacher", o, "--input", d], "consistency run"),
        "no sigma": (["denoise", "cm", o, "--input", d], "--sigma"),
        "sigma range": (["denoise", "cm", o, "--input", d, "--sigma", "1000"], "outside"),
        "times order": (
            ["inpaint", "cm", o, "--input", d, "--mask", "center", "--times", "1,2"],
            "decrease",
        ),
        "steps and times": (
            ["sdedit", "cm", o, "--input", d, "--steps", "2", "--times", "1"],
            "not both",
        ),
        "times on denoise": (
            ["denoise", "cm", o, "--input", d, "--sigma", "1", "--times", "1"],
            "--times",
        ),
        "frames": (["interpolate", "cm", o, "--frames", "1"], "--frames"),
        "one noise": (["interpolate", "cm", o, "--input", d], "two"),
        "two inputs": (["sdedit", "cm", o, "--input", d, "--input", d], "one input"),
        "out kind": (["sdedit", "cm", str(tmp_path / "o.png"), "--input", d], ".npy"),
        "missing input": (["sdedit", "cm", o, "--input", tmp_path / "nope.npy"], "no such file"),
        "input shape": (["sdedit", "cm", o, "--input", low], "(1, 8, 8)"),
        "vector mask name": (
            ["inpaint", "moons", o, "--input", tmp_path / "p.npy", "--mask", "center"],
            "image run",
        ),
        "vector denoise": (
            ["denoise", "moons", o, "--input", tmp_path / "p.npy", "--sigma", "1"],
            "one scale",
        ),
    }


def test_bad_edits_give_one_line_and_exit_2(runs, tmp_path, capsys):
    for name, ((task, model, out, *extra), needle) in _bad_edits(runs, tmp_path).items():
        assert edit(runs, task, model, out, *extra) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, (name, err)
        assert err.startswith("cmkit: error:") and needle in err, (name, err)


def test_readme_editing_example_runs(tmp_path, monkeypatch):
    """The README's editing command chain, with the training shortened to a few steps."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Editing", 1)[1]
    (chain,) = re.findall(r"```bash\n(.*?)\n```", section.split("\n## ", 1)[0], re.S)
    monkeypatch.chdir(tmp_path)
    for command in chain.split("&&"):
        args = shlex.split(command)
        assert args[0] == "cmkit"
        extra = TINY if args[1] == "train" else []
        assert run_cli(*args[1:], *extra) == 0, command
    assert np.load(tmp_path / "filled.npy").shape == (4, 1, 8, 8)
