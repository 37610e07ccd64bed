"""Class-conditional runs: labels beside the data, label and guidance inputs of the networks,
classifier-free guidance, guided distillation (fixed w and a w input), and their commands."""

import ast
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image
from safetensors.torch import load_file, save_file
from test_resume import assert_identical

from cmkit import recipes
from cmkit.batch import Batch
from cmkit.data import load_data
from cmkit.errors import UserError
from cmkit.generate import conditioning, generate, load_model
from cmkit.guidance import GuidedDenoiser, LabelDropout, WithGuidance, parse_guidance
from cmkit.labels import checked_labels, load_labels
from cmkit.networks.embedding import guidance_embedding
from cmkit.networks.mlp import MLP
from cmkit.networks.unet import UNet
from cmkit.param import ConsistencyFunction, EDMDenoiser, TrigFlowParam
from cmkit.runs import load_config

SMALL_UNET = ["--network", '{"channels": 8}']
FAST = ["--batch-size", "8", "--no-progress", "--checkpoint-every", "5"]


# ---------------------------------------------------------------- labels beside the data


def test_digits_labels_are_their_digits():
    labels = load_labels("digits", 1797)
    assert labels.classes == tuple("0123456789")
    assert labels.y.dtype == np.int64 and labels.y.shape == (1797,)
    assert np.bincount(labels.y).min() > 170  # every digit, about equally often


@pytest.mark.parametrize(("name", "k"), [("moons", 2), ("8gaussians", 8), ("rings", 4)])
def test_toys_with_parts_label_them(name, k):
    x, y = load_data(name), load_labels(name, 20000).y
    assert np.bincount(y).min() > 20000 / k * 0.9 and y.max() == k - 1
    radius = np.linalg.norm(x, axis=1)
    if name == "rings":  # class k is the ring of radius 0.75·(k + 1)
        np.testing.assert_allclose(radius, 0.75 * (y + 1), atol=0.5)
    if name == "8gaussians":  # class k is the centre at k·45°
        angle = np.arctan2(x[:, 1], x[:, 0]) % (2 * np.pi)
        near = np.abs((angle - y * np.pi / 4 + np.pi) % (2 * np.pi) - np.pi) < np.pi / 8
        assert near.mean() > 0.97


def test_cifar_style_npz_loads_with_its_names(tmp_path, capsys):
    """keys x, y, classes; channels-last uint8 images (the new user's CIFAR file)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "cifar.npz"
    x = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    y = np.arange(12) % 3
    np.savez(path, x=x, y=y, classes=np.array(["cat", "dog", "frog"]))
    run = tmp_path / "run"
    code = run_cli("train-teacher", "--data", path, "--labels", "--out", run, "--steps", 2, *FAST)
    assert code == 0
    assert "channels-last" in capsys.readouterr().err
    section = load_config(run).data
    assert section.shape == (3, 8, 8) and section.classes == ("cat", "dog", "frog")


def test_image_folder_with_class_subfolders(tmp_path):
    for name, count in (("b-circle", 2), ("a-square", 3)):
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.fromarray(np.full((4, 4), 40 * i, np.uint8)).save(tmp_path / name / f"{i}.png")
    labels = load_labels(str(tmp_path), 5)
    assert labels.classes == ("a-square", "b-circle")  # sorted names
    np.testing.assert_array_equal(labels.y, [0, 0, 0, 1, 1])


def test_idx_images_find_their_labels_file(tmp_path):
    images = np.zeros((3, 2, 2), np.uint8)
    header = bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in images.shape)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(header + images.tobytes())
    labels = np.array([1, 0, 1], np.uint8)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(
        bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + labels.tobytes()
    )
    loaded = load_labels(str(tmp_path / "train-images-idx3-ubyte"), 3)
    np.testing.assert_array_equal(loaded.y, labels)
    assert loaded.classes == ("0", "1")


@pytest.mark.parametrize(
    ("y", "needle"),
    [
        (np.arange(5), "5 labels for 6 samples"),
        (np.array([0, 1, 2, 0, 1, 2.5]), "fractional"),
        (np.array([0, 1, -1, 0, 1, 0]), "label -1"),
        (np.array([0, 1, 99, 0, 1, 0]), "uses 3 of the class ids 0..99"),
        (np.eye(6, 3), "one-hot"),
        (np.array(["a"] * 6), "expected integer class ids"),
    ],
    ids=["length", "fractional", "negative", "sparse", "one-hot", "strings"],
)
def test_bad_labels_are_refused_in_one_line(tmp_path, capsys, y, needle):
    path = tmp_path / "data.npz"
    np.savez(path, x=np.zeros((6, 2), np.float32), labels=y)
    code = run_cli("train-teacher", "--data", path, "--labels", "--out", tmp_path / "r", *FAST)
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--data", "swissroll", "--labels"], "swissroll has no labels"),
        (["--data", "digits", "--label-key", "y"], "add --labels"),
        (["--data", "digits", "--p-uncond", "0.2"], "applies to runs trained with --labels"),
        (["--data", "digits", "--labels", "--p-uncond", "1"], "must be in [0, 1)"),
    ],
)
def test_label_options_are_checked(tmp_path, capsys, args, needle):
    assert run_cli("train-teacher", *args, "--out", tmp_path / "r", *FAST) == 2
    assert needle in capsys.readouterr().err


def test_npz_without_labels_names_the_keys_it_looked_for(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((4, 2)))
    with pytest.raises(UserError, match="y_train, y, labels, targets"):
        load_labels(str(path), 4)
    np.savez(path, x=np.zeros((4, 2)), cls=np.array([0, 1, 0, 1]))
    np.testing.assert_array_equal(load_labels(str(path), 4, "cls").y, [0, 1, 0, 1])


def test_integral_float_and_column_labels_are_accepted():
    y = checked_labels(np.array([[0.0], [2.0], [1.0]]), 3, "test")
    assert y.dtype == np.int64 and y.tolist() == [0, 2, 1]


# ---------------------------------------------------------------- networks and guidance


def _nets() -> dict:
    torch.manual_seed(0)
    return {
        "mlp": (MLP(2, hidden=16, depth=1, num_classes=3), torch.randn(4, 2)),
        "unet": (UNet(1, channels=8, num_classes=3), torch.randn(4, 1, 8, 8)),
    }


@pytest.mark.parametrize("kind", ["mlp", "unet", "diffusers-unet"])
def test_null_label_is_the_unconditional_evaluation(kind):
    if kind == "diffusers-unet":
        pytest.importorskip("diffusers")
        from cmkit.networks.zoo import build_network, default_network

        net = build_network(default_network((1, 8, 8), backbone=kind, num_classes=3))
        x = torch.randn(4, 1, 8, 8)
    else:
        net, x = _nets()[kind]
    net = _trained_like(net)
    c = torch.linspace(-1, 1, 4)
    with torch.no_grad():
        plain = net(x, c)
        null = net(x, c, labels=torch.full((4,), 3))
        labelled = net(x, c, labels=torch.tensor([0, 1, 2, 0]))
    torch.testing.assert_close(plain, null, rtol=0, atol=0)
    assert not torch.allclose(plain, labelled)


def _trained_like(net: torch.nn.Module) -> torch.nn.Module:
    """Every weight random, so no zero-initialised layer hides a difference."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return net


def test_guided_denoiser_is_affine_in_w_and_the_conditional_at_zero():
    net, x = _nets()["unet"]
    D = EDMDenoiser(_trained_like(net))
    guided = GuidedDenoiser(D, null_label=3)
    labels, sigma = torch.tensor([0, 1, 2, 1]), torch.tensor([0.1, 1.0, 5.0, 40.0])
    with torch.no_grad():
        conditional = D(x, sigma, labels=labels)
        unconditional = D(x, sigma, labels=torch.full((4,), 3))
        at = {w: guided(x, sigma, labels=labels, guidance=torch.full((4,), w)) for w in (0, 1, 3)}
        per_sample = guided(x, sigma, labels=labels, guidance=torch.tensor([0.0, 1.0, 3.0, 1.0]))
    torch.testing.assert_close(at[0], conditional, rtol=0, atol=0)
    expected = conditional + 3 * (conditional - unconditional)  # two separate evaluations
    torch.testing.assert_close(at[3], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(at[3] - at[1], 2 * (at[1] - at[0]), rtol=1e-4, atol=1e-4)
    for i, w in enumerate((0, 1, 3, 1)):
        torch.testing.assert_close(per_sample[i], at[w][i], rtol=1e-5, atol=1e-5)


def test_guided_trigflow_drift_is_the_drift_of_the_guided_denoiser():
    net, x = _nets()["unet"]
    f = TrigFlowParam(_trained_like(net))
    guided = GuidedDenoiser(f, null_label=3)
    labels, t, w = torch.tensor([0, 1, 2, 1]), torch.tensor([0.2, 0.7, 1.1, 1.4]), 2.0
    with torch.no_grad():
        D_w = guided(x, t, labels=labels, guidance=torch.full((4,), w))
        drift = guided.drift(x, t, labels=labels, guidance=torch.full((4,), w))
    cos, sin = torch.cos(t)[:, None, None, None], torch.sin(t)[:, None, None, None]
    torch.testing.assert_close(drift, (cos * x - D_w) / sin, rtol=1e-4, atol=1e-4)


def test_w_input_student_ignores_w_at_init_and_keeps_the_boundary():
    torch.manual_seed(0)
    net = UNet(1, channels=8, num_classes=3, guidance_dim=256)
    f = ConsistencyFunction(net)
    x, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        net.conv_out.weight.normal_()  # a non-zero output, so w could show if it entered
        outs = [f(x, 1.5, labels=labels, guidance=torch.full((4,), w)) for w in (0.0, 2.0, 7.5)]
        boundary = f(x, f.sigma_min, labels=labels, guidance=torch.full((4,), 3.0))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)
    torch.testing.assert_close(boundary, x, rtol=0, atol=0)
    _trained_like(net)
    with torch.no_grad():
        moved = [f(x, 1.5, labels=labels, guidance=torch.full((4,), w)) for w in (0.0, 2.0)]
        boundary = f(x, f.sigma_min, labels=labels, guidance=torch.full((4,), 3.0))
    assert not torch.allclose(*moved)
    torch.testing.assert_close(boundary, x, rtol=0, atol=0)


def _diffusers_guidance_embedding():
    """diffusers' own get_guidance_scale_embedding, read from its LCM pipeline's source (the
    module itself imports transformers, which the test extra does not install)."""
    spec = importlib.util.find_spec("diffusers")
    if spec is None:
        pytest.skip("diffusers is not installed")
    path = Path(spec.origin).parent / "pipelines/latent_consistency_models"
    source = (path / "pipeline_latent_consistency_text2img.py").read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == "get_guidance_scale_embedding":
            namespace = {"torch": torch}
            exec(compile(ast.Module([node], []), str(path), "exec"), namespace)
            return namespace[node.name]
    pytest.fail("diffusers' LCM pipeline has no get_guidance_scale_embedding")


@pytest.mark.parametrize("dim", [256, 7])
def test_guidance_embedding_equals_diffusers(dim):
    theirs = _diffusers_guidance_embedding()
    w = torch.tensor([0.0, 1.0, 2.5, 7.5])
    torch.testing.assert_close(guidance_embedding(w, dim), theirs(None, w, embedding_dim=dim))


def test_label_dropout_and_guidance_draws_come_from_the_generator():
    seen = {}

    def loss(online, target, batch, step, generator):
        seen["batch"] = batch
        return torch.zeros(())

    batch = Batch(torch.zeros(4000, 2), {"labels": torch.zeros(4000, dtype=torch.long)})
    LabelDropout(loss, 0.1, 5)(None, None, batch, 0, torch.Generator().manual_seed(0))
    dropped = (seen["batch"].cond["labels"] == 5).float().mean()
    assert 0.085 < dropped < 0.115 and set(seen["batch"].cond["labels"].tolist()) == {0, 5}
    WithGuidance(loss, 1.0, 3.0)(None, None, batch, 0, torch.Generator().manual_seed(0))
    w = seen["batch"].cond["guidance"]
    assert 1.0 <= w.min() < 1.01 and 2.99 < w.max() <= 3.0 and "labels" in seen["batch"].cond
    WithGuidance(loss, 2.0, 2.0)(None, None, batch, 0, torch.Generator().manual_seed(0))
    assert torch.equal(seen["batch"].cond["guidance"], torch.full((4000,), 2.0))


@pytest.mark.parametrize(
    ("text", "expected"), [("2", (2.0, 2.0)), ("0:4", (0.0, 4.0)), ("1.5:1.5", (1.5, 1.5))]
)
def test_parse_guidance(text, expected):
    assert parse_guidance(text) == expected


@pytest.mark.parametrize("text", ["-1", "3:1", "a", "1:2:3", "inf", "nan"])
def test_parse_guidance_refuses(text):
    with pytest.raises(ValueError):
        parse_guidance(text)


# ---------------------------------------------------------------- commands end to end


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """A labelled digits teacher (tiny UNet), a fixed-w CD student and a w-input one."""
    root = tmp_path_factory.mktemp("labelled")
    teacher = ["train-teacher", "--data", "digits", "--labels", *SMALL_UNET]
    assert run_cli(*teacher, "--out", root / "teacher", "--steps", 10, *FAST) == 0
    for name, w in (("fixed", "2"), ("range", "0:4")):
        student = ["distill", "--teacher", root / "teacher", "--guidance", w]
        assert run_cli(*student, "--out", root / name, "--steps", 6, *FAST) == 0
    return root


def test_labelled_runs_store_their_classes_and_guidance(labelled):
    teacher, fixed, ranged = (load_config(labelled / n) for n in ("teacher", "fixed", "range"))
    assert teacher.data.classes == tuple("0123456789")
    assert teacher.network.kwargs["num_classes"] == 10
    assert teacher.training.options["p_uncond"] == 0.1
    assert fixed.training.options["guidance"] == [2.0, 2.0]
    assert "guidance_dim" not in fixed.network.kwargs
    assert ranged.training.options["guidance"] == [0.0, 4.0]
    assert ranged.network.kwargs["guidance_dim"] == 256


def test_sampling_a_label_gives_that_labels_conditioning(labelled, tmp_path):
    model = load_model(str(labelled / "range"))
    cond = conditioning(model, 5, "3", 1.5)
    assert cond["labels"].tolist() == [3] * 5 and cond["guidance"].tolist() == [1.5] * 5
    assert conditioning(model, 12, None, None)["labels"].tolist() == [*range(10), 0, 1]
    online = load_model(str(labelled / "range"), which="online")  # the EMA has barely moved
    a = generate(online, 5, seed=0, cond=cond)
    b = generate(online, 5, seed=0, cond=conditioning(model, 5, "3", 3.5))
    assert not np.array_equal(a, b)  # w is an input of this student
    out = tmp_path / "grid.png"
    assert run_cli("sample", "--model", labelled / "teacher", "--out", out, "--steps", 4,
                   "--label", "all", "--guidance", "2", "--no-progress") == 0  # fmt: skip
    assert out.exists()


def test_eval_scores_one_class_against_that_class(labelled, tmp_path, capsys):
    report = tmp_path / "r.json"
    args = ["eval", "--model", labelled / "fixed", "--label", "7", "--nfe", "1", "--n", "20"]
    assert run_cli(*args, "--json", report, "--no-progress") == 0
    held = json.loads(report.read_text())["reference_size"]
    assert 10 < held < 30  # the held-out sevens of 180 held-out digits


@pytest.mark.parametrize(
    ("which", "args", "needle"),
    [
        ("teacher", ["--label", "10"], "must be a class id 0..9 or all"),
        ("fixed", ["--guidance", "3"], "distilled at w = 2"),
        ("unlabelled", ["--label", "1"], "applies to runs trained with --labels"),
    ],
)
def test_sampling_refuses_what_the_run_was_not_trained_for(
    labelled, moons_runs, tmp_path, capsys, which, args, needle
):
    model = moons_runs / "cd" if which == "unlabelled" else labelled / which
    code = run_cli("sample", "--model", model, "--out", tmp_path / "s.npy", *args)
    assert code == 2 and needle in capsys.readouterr().err


def test_guided_distillation_needs_a_labelled_teacher(moons_runs, tmp_path, capsys):
    args = ["distill", "--teacher", moons_runs / "teacher", "--guidance", "1"]
    assert run_cli(*args, "--out", tmp_path / "s", *FAST) == 2
    assert "needs a teacher trained with --labels" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["cd", "scd"])
def test_guided_students_start_as_the_guided_teacher_at_every_w(labelled, tmp_path, recipe):
    """Step 0 of a w-input student: its network is the teacher's, the w input adds zero."""
    out = tmp_path / recipe
    args = ["distill", "--recipe", recipe, "--teacher", labelled / "teacher"]
    assert run_cli(*args, "--guidance", "0:4", "--out", out, "--steps", 1, "--lr", 1e-12,
                   *FAST) == 0  # fmt: skip
    student, teacher = load_model(str(out)), load_model(str(labelled / "teacher"))
    x = torch.randn(3, 1, 8, 8)
    labels = torch.tensor([1, 2, 3])
    with torch.no_grad():
        ours = [student.fn.net(x, torch.zeros(3), labels=labels, guidance=torch.full((3,), w))
                for w in (0.0, 4.0)]  # fmt: skip
        theirs = teacher.fn.denoiser.net(x, torch.zeros(3), labels=labels)
    torch.testing.assert_close(ours[0], ours[1], rtol=0, atol=0)
    scale = -1.0 if recipe == "scd" else 1.0  # sCD reads an EDM net as F = −F_EDM
    torch.testing.assert_close(ours[0], theirs, rtol=1e-4, atol=1e-4 * scale**2)


def test_labelled_runs_resume_bit_identical(labelled, tmp_path, monkeypatch):
    class Crash(BaseException):
        pass

    args = ["distill", "--teacher", labelled / "teacher", "--guidance", "0:4", "--steps", 12]
    assert run_cli(*args, *FAST, "--out", tmp_path / "straight") == 0
    real_save = recipes.common.save_checkpoint

    def dies_at_step_10(out, config, state):
        if state.step == 10:  # the disk holds step 5
            raise Crash
        real_save(out, config, state)

    with monkeypatch.context() as m:
        m.setattr(recipes.common, "save_checkpoint", dies_at_step_10)
        with pytest.raises(Crash):
            run_cli(*args, *FAST, "--out", tmp_path / "stopped")
    assert run_cli(*args, *FAST, "--out", tmp_path / "stopped", "--resume") == 0
    assert_identical(tmp_path / "straight", tmp_path / "stopped")


def test_export_of_a_w_input_student_takes_labels_and_w(labelled, tmp_path):
    """The graph's inputs are noise, labels and guidance, and it computes `generate`'s
    samples for the same three (weights randomised so labels and w matter)."""
    run = tmp_path / "range"
    shutil.copytree(labelled / "range", run)
    weights = load_file(run / "ema.safetensors")
    torch.manual_seed(2)
    save_file({k: 0.3 * torch.randn_like(v) for k, v in weights.items()}, run / "ema.safetensors")
    out = tmp_path / "s.pt2"
    assert run_cli("export", "--model", run, "--format", "pt2", "--out", out, "--steps", 2) == 0
    manifest = json.loads(Path(f"{out}.json").read_text())
    assert [i["name"] for i in manifest["inputs"]] == ["noise", "labels", "guidance"]
    program = torch.export.load(out).module()
    noise = np.random.default_rng(0).standard_normal((2, 3, 1, 8, 8), dtype=np.float32)
    labels, w = torch.tensor([0, 4, 9]), torch.tensor([0.0, 1.0, 3.0])
    got = program(torch.from_numpy(noise), labels, w).numpy()
    model = load_model(str(run))
    expected = generate(model, 3, steps=2, noise=noise, cond={"labels": labels, "guidance": w})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
