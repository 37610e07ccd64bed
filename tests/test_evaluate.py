"""cmkit eval and tune-times: samplers per NFE, stored times, reports and one-line errors."""

import json
import math

import numpy as np
import pytest
from conftest import run_cli

from cmkit.evaluate import MMD_POINTS, Scorer, _golden_min, plans, reference_splits
from cmkit.features import make_extractor
from cmkit.generate import load_model
from cmkit.units import Scaler


@pytest.fixture(scope="module")
def runs(tmp_path_factory, moons_runs):
    """The shared moons teacher and CD runs, and a 10-step digits iCT run."""
    root = tmp_path_factory.mktemp("eval")
    for name in ("teacher", "cd"):
        (root / name).symlink_to(moons_runs / name)
    digits = ["--steps", "10", "--batch-size", "64", "--no-progress"]
    assert run_cli("train", "--data", "digits", "--out", root / "digits", *digits) == 0
    return root


def test_teacher_plans_report_the_evaluations_they_use(runs):
    teacher = load_model(str(runs / "teacher"))
    got = [(p.label, p.nfe, p.options["steps"]) for p in plans(teacher, [1, 2, 4, 35])]
    # Euler: K points, K evaluations; Heun: 2K − 1, so an even request rounds down
    assert got == [
        ("euler", 1, 1),
        ("euler", 2, 2),
        ("euler", 4, 4),
        ("euler", 35, 35),
        ("heun", 1, 1),
        ("heun", 3, 2),
        ("heun", 35, 18),
    ]
    cm = load_model(str(runs / "cd"))
    assert [(p.nfe, p.options) for p in plans(cm, [1, 2])] == [(1, {"steps": 1}), (2, {"steps": 2})]


def test_golden_section_finds_a_parabolas_minimum():
    calls = []

    def f(u):
        calls.append(u)
        return (u - 1.3) ** 2

    arg, best = _golden_min(f, -2.0, 3.0, iters=30)
    assert arg == pytest.approx(1.3, abs=1e-5) and best == pytest.approx(0.0, abs=1e-9)
    assert len(calls) == 32 and all(-2 < u < 3 for u in calls)


def test_eval_writes_rows_per_nfe_and_repeats_exactly(runs, tmp_path, capsys):
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path in paths:
        args = ["eval", "--model", runs / "cd", "--nfe", "1,2", "--n", 300, "--json", path]
        assert run_cli(*args) == 0
    a, b = (json.loads(p.read_text()) for p in paths)
    assert a["rows"] == b["rows"]
    assert [r["nfe"] for r in a["rows"]] == [1, 2]
    assert set(a["rows"][0]) == {"sampler", "nfe", "ED", "SWD", "MMD"}
    assert a["reference_size"] == 2000  # moons: 10% of 20000 held out
    assert "| 1 step | 1 |" in capsys.readouterr().out


def test_eval_of_images_uses_named_features(runs, tmp_path):
    out = tmp_path / "d.json"
    assert run_cli("eval", "--model", runs / "digits", "--nfe", "1", "--n", 200, "--json", out) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert set(row) == {"sampler", "nfe", "FD-digitsnet", "KID-digitsnet", "precision", "recall",
                        "FD-pixels", "near-bg", "out-of-range"}  # fmt: skip
    assert row["FD-digitsnet"] > 0 and 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
    assert row["FD-pixels"] > 0 and 0 <= row["near-bg"] <= 1 and 0 <= row["out-of-range"] <= 1
    assert run_cli("eval", "--model", runs / "digits", "--nfe", "1", "--n", 200, "--features",
                   "pixels", "--json", out) == 0  # fmt: skip
    row = json.loads(out.read_text())["rows"][0]
    assert "FD-pixels" in row and "KID-pixels" in row and "near-bg" in row


def test_eval_reference_choice_and_fd_inf(runs, tmp_path, capsys):
    out = tmp_path / "d.json"
    args = ["eval", "--model", runs / "digits", "--nfe", "1", "--n", 200, "--json", out]
    assert run_cli(*args, "--reference", "train", "--fd-inf") == 0
    report = json.loads(out.read_text())
    assert report["reference_size"] == 1617 and report["reference"] == "training split (1617)"
    row = report["rows"][0]
    assert math.isfinite(row["FD∞-digitsnet"]) and "FD∞-digitsnet" in capsys.readouterr().out
    assert run_cli(*args, "--reference", "all") == 0
    assert json.loads(out.read_text())["reference_size"] == 1797


def test_reference_splits_pair_each_reference_with_real_data_outside_it(runs):
    model = load_model(str(runs / "digits"))
    sizes = {w: (len(r.data), len(r.floor)) for w in ("heldout", "train", "all")
             for r in [reference_splits(model, w)]}  # fmt: skip
    assert sizes == {"heldout": (180, 1617), "train": (1617, 180), "all": (1797, 180)}
    with pytest.raises(ValueError, match="reference expected one of heldout, train, all"):
        reference_splits(model, "test")


def test_scorer_pixel_columns_on_real_digits():
    """Real digits scored against themselves: FD 0 on pixels, and their pixel statistics."""
    from sklearn.datasets import load_digits

    x = load_digits().images[:, None].astype(np.float32)
    row = Scorer(x, Scaler.fit(x), make_extractor(None, (1, 8, 8)), fd_inf=True)(x)
    assert row["FD-pixels"] == pytest.approx(0, abs=1e-6)
    assert row["near-bg"] == pytest.approx(0.49, abs=0.01) and row["out-of-range"] == 0
    # subsets of a set against the whole: FD(N) ≈ k(1/N − 1/M), so FD∞ ≈ −k/M, just below 0
    assert -0.5 < row["FD∞-digitsnet"] < 0 and abs(row["FD-digitsnet"]) < 1e-3


def test_tune_times_stores_times_that_sample_uses(runs, tmp_path, capsys):
    run = tmp_path / "cd"
    run.mkdir()
    for f in (runs / "cd").iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    assert run_cli("tune-times", "--model", run, "--n", 200, "--iters", 3) == 0
    config = json.loads((run / "config.json").read_text())
    (tau,) = config["sampling"]["times"]["2"]
    assert 0.002 < tau < 80 and config["sampling"]["tuning"]["2"]["metric"] == "ED"
    assert math.isfinite(config["sampling"]["tuning"]["2"]["value"])
    stored, explicit = tmp_path / "s.npy", tmp_path / "e.npy"
    assert run_cli("sample", "--model", run, "--steps", 2, "--out", stored) == 0
    assert run_cli("sample", "--model", run, "--times", tau, "--out", explicit) == 0
    assert np.array_equal(np.load(stored), np.load(explicit))
    assert run_cli("tune-times", "--model", run, "--steps", 3, "--n", 200, "--iters", 2) == 0
    taus = json.loads((run / "config.json").read_text())["sampling"]["times"]["3"]
    assert 80 > taus[0] > taus[1] > 0.002


@pytest.mark.parametrize(
    "args,needle",
    [
        (["tune-times", "--model", "{teacher}"], "consistency runs"),
        (["tune-times", "--model", "{cd}", "--steps", "1"], "--steps must be >= 2"),
        (["eval", "--model", "{cd}", "--nfe", "0"], "--nfe values must be >= 1"),
        (["eval", "--model", "{cd}", "--features", "pixels"], "--features applies to image"),
        (["eval", "--model", "{cd}", "--fd-inf"], "--fd-inf applies to image"),
        (["eval", "--model", "{cd}", "--data", "moons", "--reference", "train"], "pass one"),
        (["eval", "--model", "{cd}", "--features", "mnistnet"], "--features applies to image"),
        (["eval", "--model", "{digits}", "--features", "mnistnet"], "mnistnet reads 1x28x28"),
        (["eval", "--model", "{cd}", "--data", "digits"], "reference data has samples of shape"),
        (["eval", "--model", "{digits}", "--features", "nope.pt"], "expected digitsnet, mnistnet"),
        (["eval", "--model", "{digits}", "--features", "{bogus}"], "expected a TorchScript"),
        (["eval", "--model", "{cd}", "--n", "3"], "--n must be >= 10"),
        (["eval"], "--model is required"),
    ],
)
def test_bad_input_is_one_line_exit_2(runs, tmp_path, capsys, args, needle):
    bogus = tmp_path / "bogus.pt"
    bogus.write_text("not a module")
    paths = {"teacher": runs / "teacher", "cd": runs / "cd", "digits": runs / "digits"}
    args = [a.format(bogus=bogus, **paths) for a in args]
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def _scores_as_given_and_sorted(reference, samples, extractor=None) -> tuple[dict, dict]:
    """The samples' scores against the reference, and against it sorted by its first coordinate."""
    ordered = reference[np.argsort(reference.reshape(len(reference), -1)[:, 0])]
    return tuple(Scorer(r, Scaler.fit(r), extractor)(samples) for r in (reference, ordered))


def test_scores_do_not_depend_on_the_reference_row_order():
    """MMD and precision/recall score 2000 points per side: a random subset, not the first rows,
    which on a reference sorted by its first coordinate are its lower half (MMD 0.10 instead of
    about 0, precision 0.49 instead of 0.97). Sorting changes which points the subset holds, so
    those metrics agree to their subsampling noise; the others use every point and agree up to
    float rounding, KID to the noise of its torchmetrics subsets."""
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(2 * MMD_POINTS, 2))
    samples = rng.normal(size=(1000, 2))
    flat, ordered = _scores_as_given_and_sorted(reference, samples)
    assert flat["ED"] == pytest.approx(ordered["ED"], rel=1e-9, abs=1e-12)
    assert flat["SWD"] == pytest.approx(ordered["SWD"], rel=1e-9)
    assert flat["MMD"] == pytest.approx(ordered["MMD"], abs=3e-3)

    # images whose first pixel spreads over [-1, 1] and the others hardly vary
    images = rng.normal(scale=0.05, size=(2 * MMD_POINTS, 1, 2, 2))
    images[:, 0, 0, 0] = rng.uniform(-1, 1, size=len(images))
    fakes = images[rng.choice(len(images), 1000, replace=False)] + 0.01
    flat, ordered = _scores_as_given_and_sorted(images, fakes, make_extractor("pixels", (1, 2, 2)))
    assert flat["FD-pixels"] == pytest.approx(ordered["FD-pixels"], rel=1e-9)
    assert flat["KID-pixels"] == pytest.approx(ordered["KID-pixels"], abs=1e-3)
    for metric in ("precision", "recall"):
        assert flat[metric] == pytest.approx(ordered[metric], abs=0.03), metric


def test_eval_of_a_28x28_run_reports_mnistnet_features(tmp_path):
    """An MNIST-shaped run (IDX file, as MNIST ships) is scored on the shipped mnistnet."""
    images = np.random.default_rng(0).integers(0, 256, size=(100, 28, 28), dtype=np.uint8)
    data = tmp_path / "train-images-idx3-ubyte"
    data.write_bytes(b"\0\0\x08\x03" + np.array(images.shape, ">u4").tobytes() + images.tobytes())
    run, out = tmp_path / "run", tmp_path / "m.json"
    args = ["--steps", "2", "--batch-size", "8", "--no-progress"]
    assert run_cli("train", "--data", data, "--out", run, *args) == 0
    assert run_cli("eval", "--model", run, "--nfe", "1", "--n", 20, "--json", out) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert {"FD-mnistnet", "KID-mnistnet", "FD-pixels", "near-bg"} <= set(row)
