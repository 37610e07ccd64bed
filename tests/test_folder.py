"""Image folders decoded lazily (--workers, cmkit.folder): a batch is the in-memory decoding
of its rows bit for bit, a lazy run resumes and changes world size exactly, workers stop
cleanly, and what --workers does not apply to is refused in one line."""

import json
import os
import signal

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image
from safetensors.torch import load_file
from test_resume import _start, _wait_for_checkpoint, assert_identical, trained

from cmkit.batch import Shard
from cmkit.errors import OptionError, UserError
from cmkit.folder import FolderRows, step_rows
from cmkit.training_data import load_training_data

NET = ["--network", '{"channels": 8}']
RUN = ["train-teacher", *NET, "--batch-size", 8, "--no-progress", "--checkpoint-every", 3]


def write_folder(root, mode: str = "RGB", per_class: int = 10, size: int = 8):
    """Two class subfolders of random PNGs of `mode`; returns the folder."""
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).convert(mode).save(root / name / f"{i:03}.png")
    return root


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_lazy_batches_are_the_in_memory_rows(tmp_path, mode):
    folder = str(write_folder(tmp_path / "images", mode))
    memory, section = load_training_data(folder, 0.2, 0.5, labels=True)
    lazy, lazy_section = load_training_data(folder, 0.2, 0.5, labels=True, workers=1)
    assert isinstance(lazy, FolderRows) and lazy_section.lazy and not section.lazy
    assert lazy_section.scaler == section.scaler and lazy_section.shape == section.shape
    assert lazy_section.classes == section.classes and len(lazy) == len(memory) == 16
    idx = torch.tensor([0, 5, 5, 15, 3])
    for got in (lazy.rows(idx), memory.rows(idx)):
        assert got.x0.dtype == torch.float32
    assert torch.equal(lazy.rows(idx).x0, memory.rows(idx).x0)
    assert torch.equal(lazy.rows(idx).cond["labels"], memory.rows(idx).cond["labels"])
    shard = Shard(slice(3, 6), 6)
    for step in (0, 1, 2, 7):  # prefetched by a worker, a jump restarts the stream
        batch = lazy.batch_at(11, step, 6, shard)
        rows = torch.from_numpy(step_rows(11, step, 16, 6)[3:6])
        assert torch.equal(batch.x0, memory.rows(rows).x0) and batch.shard == shard
        assert torch.equal(batch.cond["labels"], memory.rows(rows).cond["labels"])
    lazy.close()


def test_step_rows_depend_on_seed_and_step_only():
    a = step_rows(3, 5, 100, 8)
    assert np.array_equal(a, step_rows(3, 5, 100, 8))
    assert not np.array_equal(a, step_rows(3, 6, 100, 8))
    assert not np.array_equal(a, step_rows(4, 5, 100, 8))


def test_a_corrupt_image_is_one_line_naming_it(tmp_path):
    folder = write_folder(tmp_path / "images")
    lazy, _ = load_training_data(str(folder), 0.0, 0.5, workers=1)
    broken = lazy.decoder.files[4]
    broken.write_bytes(b"not a png")  # after the scaler's sample was read
    with pytest.raises(UserError, match=f"cannot read image {broken};") as err:
        for step in range(50):
            lazy.batch_at(0, step, 8, None)
    assert "\n" not in str(err.value)
    lazy.close()


def test_a_corrupt_image_in_a_run_exits_2(tmp_path, capsys):
    folder = write_folder(tmp_path / "images")
    (folder / "dog" / "004.png").write_bytes(b"not a png")
    code = run_cli(*RUN, "--data", folder, "--workers", 2, "--steps", 2, "--out", tmp_path / "r")
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "004.png" in err[0]


def test_resume_at_a_step_is_bit_identical_and_workers_may_change(tmp_path):
    """Stopped after step 3 and resumed with other --workers: the same weights, optimiser
    and generator as a run that never stopped (the loss curve has the stop's extra entry)."""
    folder = write_folder(tmp_path / "images")
    args = [*RUN, "--data", folder, "--labels"]
    assert run_cli(*args, "--workers", 2, "--steps", 6, "--out", tmp_path / "whole") == 0
    assert run_cli(*args, "--workers", 1, "--steps", 3, "--out", tmp_path / "parts") == 0
    assert (
        run_cli(*args, "--steps", 6, "--out", tmp_path / "parts", "--resume", "--workers", 2) == 0
    )
    whole, parts = trained(tmp_path / "whole"), trained(tmp_path / "parts")
    assert whole["tensors"].keys() == parts["tensors"].keys()
    assert all(torch.equal(v, parts["tensors"][k]) for k, v in whole["tensors"].items())
    config = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert config["data"]["lazy"] is True


def test_resume_does_not_switch_between_lazy_and_in_memory(tmp_path, capsys):
    folder = write_folder(tmp_path / "images")
    out = tmp_path / "run"
    assert run_cli(*RUN, "--data", folder, "--workers", 1, "--steps", 3, "--out", out) == 0
    assert run_cli(*RUN, "--data", folder, "--steps", 6, "--out", out, "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.lazy" in err[0]


def test_workers_0_reads_in_memory_as_before(tmp_path):
    folder = write_folder(tmp_path / "images")
    out = tmp_path / "run"
    assert run_cli(*RUN, "--data", folder, "--steps", 2, "--out", out) == 0
    assert "lazy" not in json.loads((out / "config.json").read_text())["data"]


@pytest.mark.parametrize(
    ("data", "extra", "message"),
    [
        ("moons", ["--workers", 1], "--workers applies to image folders; moons is not one"),
        ("FOLDER", ["--workers", -1], "--workers must be >= 0, got -1"),
        ("FOLDER", ["--workers", 1, "--layout", "nhwc"], "--layout applies to .npy/.npz"),
    ],
)
def test_refusals_are_one_line(tmp_path, capsys, data, extra, message):
    folder = write_folder(tmp_path / "images")
    data = folder if data == "FOLDER" else data
    assert run_cli(*RUN, "--data", data, *extra, "--steps", 2, "--out", tmp_path / "r") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_a_latent_run_is_refused(tmp_path):
    folder = write_folder(tmp_path / "images")
    with pytest.raises(OptionError, match="a latent run encodes its images once"):
        load_training_data(str(folder), 0.1, 0.5, autoencoder=object(), workers=1)


@pytest.mark.skipif(os.name != "posix", reason="sends signals to a subprocess")
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_signal_saves_ends_the_workers_and_resumes_exactly(tmp_path, signum, code):
    folder = write_folder(tmp_path / "images")
    out = tmp_path / "run"
    args = [*RUN, "--data", folder, "--steps", 40, "--checkpoint-every", 1]
    proc = _start([*args, "--workers", 2, "--out", out], tmp_path)
    _wait_for_checkpoint(proc, out)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "worker" not in err.lower()
    assert run_cli(*args, "--workers", 1, "--out", out, "--resume") == 0
    assert run_cli(*args, "--workers", 2, "--out", tmp_path / "whole") == 0
    assert_identical(tmp_path / "whole", out)


@pytest.mark.slow
def test_two_processes_follow_one(tmp_path):
    folder = write_folder(tmp_path / "images")
    args = [*RUN, "--data", folder, "--workers", 1, "--steps", 4]
    assert run_cli(*args, "--out", tmp_path / "one") == 0
    assert run_cli(*args, "--nproc", 2, "--out", tmp_path / "two") == 0
    one, two = (load_file(tmp_path / r / "ema.safetensors") for r in ("one", "two"))
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, atol=1e-5, rtol=0)


def test_a_student_of_a_lazy_teacher_reads_the_folder_lazily(tmp_path):
    folder = write_folder(tmp_path / "images")
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    assert (
        run_cli(*RUN, "--data", folder, "--labels", "--workers", 1, "--steps", 2, "--out", teacher)
        == 0
    )
    assert run_cli("distill", "--teacher", teacher, *RUN[3:], "--steps", 2, "--out", student) == 0
    assert json.loads((student / "config.json").read_text())["data"]["lazy"] is True
