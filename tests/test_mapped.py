"""A .npy file trains from disk: batches read by index are the in-memory copy's rows bit for
bit, the held-out split is by index, the scaler comes from a seeded sample, and a bad value
in the sample is refused in one line."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from cmkit import mapped
from cmkit.data import load_data, split_holdout
from cmkit.errors import UserError
from cmkit.training_data import load_training_data
from cmkit.units import Scaler


def _in_memory_rows(path, scaler: Scaler) -> torch.Tensor:
    train, _ = split_holdout(load_data(str(path)), 0.1)
    return torch.from_numpy(scaler.to_model(train))


@pytest.mark.parametrize(
    "array",
    [
        np.random.default_rng(0).normal(size=(500, 3)) * [1.0, 5.0, 0.1],
        np.random.default_rng(1).integers(0, 256, size=(60, 6, 5, 3), dtype=np.uint8),
    ],
    ids=["vectors", "channels-last images"],
)
def test_rows_read_from_disk_are_the_in_memory_rows(tmp_path, array):
    path = tmp_path / "x.npy"
    np.save(path, array)
    rows, section = load_training_data(str(path), 0.1, 0.5)
    assert isinstance(rows, mapped.MappedRows) and isinstance(rows.file, mapped.NpyRows)
    assert section.shape == tuple(rows.rows(torch.tensor([0])).x0.shape[1:])
    whole = _in_memory_rows(path, section.scaler)
    assert len(rows) == len(whole)
    idx = torch.tensor([5, 0, 5, len(rows) - 1])
    batch = rows.rows(idx).x0
    assert batch.is_contiguous() and torch.equal(batch, whole[idx])
    # the sample was every training row: the scaler is the whole split's
    assert section.scaler == Scaler.fit(split_holdout(load_data(str(path)), 0.1)[0], 0.5)


_RNG = np.random.default_rng(4)
_IMAGES = _RNG.integers(0, 256, size=(50, 3, 5, 4), dtype=np.uint8)
_HWC = _RNG.integers(0, 256, size=(50, 6, 5, 3), dtype=np.uint8)
_VECTORS = _RNG.normal(size=(50, 7))


@pytest.mark.parametrize(
    ("array", "layout", "nhwc"),
    [
        (_IMAGES, None, False),
        (_VECTORS.astype(np.float32), None, False),
        (_VECTORS, None, False),
        (_VECTORS.astype(">f4"), None, False),
        (_HWC, None, True),
        (_HWC.astype(np.float32).transpose(0, 2, 3, 1), "nhwc", True),  # (50, 5, 3, 6): said
        (np.asfortranarray(_VECTORS), None, False),
        (np.asfortranarray(_HWC), None, True),
    ],
    ids=["uint8", "float32", "float64", "big-endian", "nhwc", "--layout nhwc", "F", "F nhwc"],
)
def test_rows_read_from_the_file_are_those_of_np_load(tmp_path, array, layout, nhwc):
    """Unsorted, repeated and consecutive rows come back in the order asked, laid out
    (N, C, H, W) and C-contiguous in the file's dtype; Fortran order reads through the map."""
    path = tmp_path / "x.npy"
    np.save(path, array)
    file = mapped.open_rows(str(path), layout)
    assert isinstance(file, mapped.FortranRows if np.isfortran(array) else mapped.NpyRows)
    rows = np.array([7, 3, 4, 5, 49, 0, 3, 6, 8])
    expected = np.load(path)[rows]
    expected = expected.transpose(0, 3, 1, 2) if nhwc else expected
    x = file.read(rows)
    assert x.flags.c_contiguous and x.dtype == array.dtype and x.shape == expected.shape
    np.testing.assert_array_equal(x, expected)
    assert file.shape == (50, *expected.shape[1:])


def test_a_file_cut_short_while_training_is_named_in_one_line(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, _VECTORS)
    file = mapped.open_rows(str(path), None)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 8)
    np.testing.assert_array_equal(file.read(np.array([48, 0])), _VECTORS[[48, 0]])
    with pytest.raises(UserError, match=r"x\.npy ended before its last row"):
        file.read(np.array([3, 49]))


def test_training_rows_leave_the_file_unmapped(tmp_path):
    """Batches and the sample are read, not mapped: no page of the file joins the process's
    resident set (Linux lists every mapping of the process in /proc/self/maps)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps")
    path = tmp_path / "x.npy"
    np.save(path, _IMAGES)
    rows, _ = load_training_data(str(path), 0.1, 0.5)
    rows.rows(torch.tensor([1, 2, 3, 0]))
    assert str(path) not in maps.read_text()


def test_a_large_file_is_scaled_from_a_seeded_sample(tmp_path, monkeypatch):
    monkeypatch.setattr(mapped, "SAMPLE_BYTES", 4 * 3 * 200)  # 200 rows of 3 floats
    x = np.random.default_rng(2).normal(size=(5000, 3)) * [1.0, 5.0, 0.1] + [0.0, 2.0, -1.0]
    path = tmp_path / "x.npy"
    np.save(path, x.astype(np.float32))
    rows, section = load_training_data(str(path), 0.1, 0.5)
    again, _ = load_training_data(str(path), 0.1, 0.5)
    assert section.scaler == again.scaler  # seeded
    full = Scaler.fit(split_holdout(x.astype(np.float32), 0.1)[0], 0.5)
    assert section.scaler != full
    assert np.allclose(section.scaler.shift, full.shift, atol=0.1 * np.array(full.scale))
    assert np.allclose(section.scaler.scale, full.scale, rtol=0.15)
    idx = torch.arange(0, len(rows), 7)
    assert torch.equal(rows.rows(idx).x0, _in_memory_rows(path, section.scaler)[idx])


def test_a_non_finite_value_in_the_sample_is_refused_naming_its_row(tmp_path, monkeypatch):
    monkeypatch.setattr(mapped, "SAMPLE_BYTES", 4 * 2 * 50)
    x = np.ones((1000, 2), dtype=np.float32)
    x[:, 1] = np.arange(1000)
    train, _ = split_holdout(np.arange(1000), 0.1)
    row = int(mapped.sample_rows(train, 8)[3])
    x[row, 0] = np.nan
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(UserError, match=rf"x\.npy: row {row} holds NaN or inf"):
        load_training_data(str(tmp_path / "x.npy"), 0.1, 0.5)


def test_a_student_reads_its_teachers_npy_rows(tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(3).normal(size=(400, 2)))
    common = ["--network", '{"hidden": 16, "depth": 1}', "--batch-size", 16, "--no-progress"]
    teacher = ["train-teacher", "--data", tmp_path / "x.npy", *common, "--steps", 3]
    assert run_cli(*teacher, "--out", tmp_path / "teacher") == 0
    student = ["distill", "--teacher", tmp_path / "teacher", "--steps", 3, "--no-progress"]
    assert run_cli(*student, "--batch-size", 16, "--out", tmp_path / "cd") == 0
