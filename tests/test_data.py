import gzip
import hashlib
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, run_cli
from PIL import Image

from cmkit.data import BUILTIN_TOYS, describe, load_data, read_idx, run_splits, split_holdout
from cmkit.errors import UserError
from cmkit.image_files import load_image
from cmkit.runs import load_config
from cmkit.units import Scaler


def test_digits_raw_units():
    x = load_data("digits")
    assert x.shape == (1797, 1, 8, 8)
    assert x.dtype == np.float32
    assert x.min() == 0 and x.max() == 16
    assert describe(x) == "1797 samples of shape 1x8x8"


def test_tinted_digits_are_digits_times_a_fixed_tint():
    x, digits = load_data("tinted-digits"), load_data("digits")
    assert x.shape == (1797, 3, 8, 8) and x.dtype == np.float32
    np.testing.assert_array_equal(x, load_data("tinted-digits"))
    tint = x.max(axis=(2, 3)) / digits.max(axis=(2, 3))  # per channel: max(digit)·tint
    np.testing.assert_allclose(x, digits * tint[:, :, None, None], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(tint.max(axis=1), 1.0, rtol=1e-6)  # brightest channel keeps 0..16
    assert tint.min() < 0.1 and tint.std(axis=0).min() > 0.2  # hues vary


def test_toys_are_deterministic_distinct_and_finite():
    toys = {name: load_data(name) for name in BUILTIN_TOYS}
    for name, x in toys.items():
        assert x.shape == (20000, 2) and x.dtype == np.float32, name
        assert np.isfinite(x).all(), name
        assert 0.3 < np.abs(x).max() < 5, name
        np.testing.assert_array_equal(x, load_data(name))
    names = list(toys)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not np.allclose(toys[a], toys[b]), (a, b)


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 6, 6)])
def test_npy_round_trip(tmp_path, shape):
    x = np.random.default_rng(0).normal(size=shape)
    path = tmp_path / "x.npy"
    np.save(path, x)
    loaded = load_data(str(path))
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, x.astype(np.float32))


def test_npy_int_becomes_float32(tmp_path):
    path = tmp_path / "ints.npy"
    np.save(path, np.arange(12, dtype=np.int64).reshape(6, 2))
    x = load_data(str(path))
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, np.arange(12).reshape(6, 2))


def test_npz_x_train_gets_channel_axis(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=images, y_train=np.arange(7), x_test=images[:2])
    x = load_data(str(path))
    assert x.shape == (7, 1, 28, 28) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:, 0], images)


@pytest.mark.parametrize("key", ["x", "images", "data"])
def test_npz_common_data_keys_beside_labels(tmp_path, key):
    """A CIFAR-style archive (x, y, classes) loads its images; x_train would win over x."""
    images = np.random.default_rng(0).random((5, 3, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "c.npz", **{key: images}, y=np.arange(5), classes=np.array([1, 2]))
    np.testing.assert_array_equal(load_data(str(tmp_path / "c.npz")), images)
    np.savez(tmp_path / "d.npz", x=images[:2], x_train=images)
    assert load_data(str(tmp_path / "d.npz")).shape == (5, 3, 4, 4)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_channels_last_images_are_read_channels_first_with_a_notice(tmp_path, capsys, channels):
    hwc = np.random.default_rng(0).integers(0, 256, size=(6, 16, 12, channels), dtype=np.uint8)
    path = tmp_path / f"nhwc{channels}.npy"
    np.save(path, hwc)
    x = load_data(str(path))
    assert x.shape == (6, channels, 16, 12) and x.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(x, hwc.transpose(0, 3, 1, 2))
    (notice,) = capsys.readouterr().err.strip().splitlines()
    assert "channels-last images of 16x12" in notice and f"(6, {channels}, 16, 12)" in notice
    load_data(str(path))
    assert capsys.readouterr().err == ""  # once per process


def test_channels_first_and_ambiguous_arrays_keep_their_layout(tmp_path, capsys):
    for shape in [(6, 3, 16, 16), (6, 1, 8, 3), (6, 4, 4, 3)]:  # C first, or both could be C
        np.save(tmp_path / "a.npy", np.zeros(shape, dtype=np.float32))
        assert load_data(str(tmp_path / "a.npy")).shape == shape
    assert capsys.readouterr().err == ""


def test_data_key_and_layout_are_kept_by_the_run(tmp_path, capsys):
    """--data-key picks the archive's array and --layout its axes; the run stores both, so
    every later read of its data (held-out split, eval) is the same array."""
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "c.npz", x_train=np.zeros((40, 1, 8, 8)), images=hwc, y=np.arange(40))
    net = ["--network", '{"channels": 8}']
    train = ["train-teacher", "--data", tmp_path / "c.npz", *net, *TINY]
    args = [*train, "--data-key", "images", "--layout", "nhwc", "--out", tmp_path / "run"]
    assert run_cli(*args) == 0
    assert "channels-last" not in capsys.readouterr().err  # said, not detected
    section = load_config(tmp_path / "run").data
    assert (section.key, section.layout, section.shape) == ("images", "nhwc", (3, 8, 8))
    train_x, held_out = run_splits(section)
    assert len(train_x) + len(held_out) == 40 and train_x.shape[1:] == (3, 8, 8)
    assert {float(v) for v in np.unique(held_out)} <= {float(v) for v in np.unique(hwc)}
    assert held_out.max() > 0  # the images, not the zeros of x_train


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--data-key", "labels"], "has no array 'labels'; it holds"),
        (["--data-key", "y"], "array has shape (40,)"),
        (["--layout", "nhwc", "--data", "digits"], "--layout applies to .npy/.npz arrays"),
        (["--data-key", "x", "--data", "moons"], "names an array of an .npz archive"),
    ],
)
def test_bad_data_key_or_layout_is_one_line(tmp_path, capsys, extra, message):
    np.savez(tmp_path / "c.npz", x=np.ones((40, 2)), y=np.arange(40))
    args = ["train-teacher", "--data", tmp_path / "c.npz", *TINY, "--out", tmp_path / "r"]
    assert run_cli(*args, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


MNIST_NPZ = Path("/work/shared/data/mnist.npz")  # a development copy; the library never needs it


def idx_bytes(a: np.ndarray, magic: bytes = b"\0\0\x08") -> bytes:
    """An IDX file by hand: magic, ndim, big-endian uint32 dims, then the bytes."""
    return magic + bytes([a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


@pytest.mark.parametrize("name", ["train-images-idx3-ubyte", "t10k-images.idx3-ubyte.gz"])
def test_idx_images_get_a_channel_axis(tmp_path, name):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    data = idx_bytes(images)
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    x = load_data(str(path))
    assert x.shape == (5, 1, 4, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:, 0], images)
    labels = np.arange(5, dtype=np.uint8)
    (tmp_path / "labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    np.testing.assert_array_equal(read_idx(tmp_path / "labels-idx1-ubyte"), labels)


@pytest.mark.parametrize(
    "content,needle",
    [
        (idx_bytes(np.zeros((2, 3, 3), np.uint8), b"\0\0\x0d"), "magic 0x00000803"),  # float32
        (b"\x1f\x8b garbage", "magic 0x00000803"),
        (idx_bytes(np.zeros((2, 3, 3), np.uint8))[:-1], "promises shape (2, 3, 3)"),
        (b"\0\0\x08\x03\0\0", "(truncated)"),
        (idx_bytes(np.zeros(4, np.uint8)), "not labels"),
    ],
)
def test_bad_idx_files_are_one_line_errors(tmp_path, content, needle):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(UserError, match=re.escape(needle)) as err:
        load_data(str(path))
    assert str(path) in str(err.value) and len(str(err.value).splitlines()) == 1
    gz = tmp_path / "x-ubyte.gz"
    gz.write_bytes(b"not gzip")
    with pytest.raises(UserError, match="expected an IDX file, gzipped or not"):
        load_data(str(gz))


@pytest.mark.skipif(not MNIST_NPZ.is_file(), reason="no local MNIST copy")
def test_mnist_npz_and_its_idx_form_load_alike(tmp_path):
    """The README of the copy gives the MD5 of the official train-images-idx3-ubyte."""
    x = load_data(str(MNIST_NPZ))
    assert x.shape == (60000, 1, 28, 28) and x.max() == 255
    with np.load(MNIST_NPZ) as f:
        data = idx_bytes(f["x_train"])
    assert hashlib.md5(data).hexdigest() == "6bbc9ace898e44ae57da46a324031adb"
    (tmp_path / "train-images-idx3-ubyte").write_bytes(data)
    np.testing.assert_array_equal(load_data(str(tmp_path / "train-images-idx3-ubyte")), x)


def test_npz_single_array_and_ambiguous(tmp_path):
    np.savez(tmp_path / "one.npz", points=np.ones((3, 2)))
    assert load_data(str(tmp_path / "one.npz")).shape == (3, 2)
    np.savez(tmp_path / "two.npz", a=np.ones((3, 2)), b=np.ones((3, 2)))
    with pytest.raises(UserError, match="expected one named x_train, x, images, data"):
        load_data(str(tmp_path / "two.npz"))


def _write_images(folder, arrays, mode):
    folder.mkdir()
    for i, a in enumerate(arrays):
        Image.fromarray(a).convert(mode).save(folder / f"img{i}.png")


def test_grayscale_folder(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8), dtype=np.uint8)
    _write_images(tmp_path / "gray", pixels, "L")
    x = load_data(str(tmp_path / "gray"))
    assert x.shape == (3, 1, 8, 8) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:, 0], pixels)


def test_rgb_folder(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 5, 6, 3), dtype=np.uint8)
    _write_images(tmp_path / "rgb", pixels, "RGB")
    (tmp_path / "rgb" / "notes.txt").write_text("ignored")
    x = load_data(str(tmp_path / "rgb"))
    assert x.shape == (2, 3, 5, 6)
    np.testing.assert_array_equal(x, pixels.transpose(0, 3, 1, 2))


def test_single_image_file(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 5, 6, 3), dtype=np.uint8)
    _write_images(tmp_path / "im", pixels, "RGB")
    np.testing.assert_array_equal(
        load_image(tmp_path / "im" / "img1.png")[0], pixels[1].transpose(2, 0, 1)
    )
    Image.fromarray(pixels[0, :, :, 0]).save(tmp_path / "gray.png")
    assert load_image(tmp_path / "gray.png").shape == (1, 1, 5, 6)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"broken\.png"):
        load_image(tmp_path / "broken.png")


def test_mixed_size_folder_names_file(tmp_path):
    _write_images(tmp_path / "mixed", [np.zeros((8, 8), np.uint8)] * 2, "L")
    Image.new("L", (9, 8)).save(tmp_path / "mixed" / "odd.png")
    with pytest.raises(UserError, match=r"odd\.png.*8x8"):
        load_data(str(tmp_path / "mixed"))


def test_corrupt_image_names_file(tmp_path):
    _write_images(tmp_path / "bad", [np.zeros((8, 8), np.uint8)], "L")
    (tmp_path / "bad" / "broken.png").write_bytes(np.random.default_rng(0).bytes(200))
    with pytest.raises(UserError, match=r"broken\.png"):
        load_data(str(tmp_path / "bad"))


def test_empty_folder(tmp_path):
    with pytest.raises(UserError, match="no images"):
        load_data(str(tmp_path))


def test_unknown_spec_lists_builtins():
    with pytest.raises(UserError) as info:
        load_data("nope")
    message = str(info.value)
    assert "nope" in message and "digits" in message and "moons" in message
    assert "\n" not in message


def _npy_error(tmp_path, array) -> str:
    path = tmp_path / "bad.npy"
    np.save(path, array, allow_pickle=True)
    with pytest.raises(UserError) as info:
        load_data(str(path))
    message = str(info.value)
    assert "bad.npy" in message and "\n" not in message
    return message


def test_bad_arrays_rejected(tmp_path):
    assert "(5,)" in _npy_error(tmp_path, np.ones(5))
    assert "(2, 3, 4)" in _npy_error(tmp_path, np.ones((2, 3, 4)))
    assert "(0, 2)" in _npy_error(tmp_path, np.ones((0, 2)))
    assert "(2, 0, 4, 4)" in _npy_error(tmp_path, np.ones((2, 0, 4, 4)))
    assert "<U1" in _npy_error(tmp_path, np.array([["a", "b"]]))
    assert "complex" in _npy_error(tmp_path, np.ones((2, 2), dtype=complex))
    assert "object" in _npy_error(tmp_path, np.array([[1, None]], dtype=object))


def test_non_finite_reports_count_and_index(tmp_path):
    x = np.ones((4, 3))
    x[1, 2], x[3, 0] = np.nan, np.inf
    message = _npy_error(tmp_path, x)
    assert "non-finite" in message and "2 " in message and "(1, 2)" in message


def test_garbage_npy(tmp_path):
    path = tmp_path / "junk.npy"
    path.write_bytes(b"this is not an array" * 10)
    with pytest.raises(UserError, match=r"junk\.npy"):
        load_data(str(path))


def test_split_holdout():
    x = np.arange(100, dtype=np.float32)[:, None]
    train, held = split_holdout(x, 0.2, seed=1)
    assert len(train) == 80 and len(held) == 20
    both = np.concatenate([train[:, 0], held[:, 0]])
    np.testing.assert_array_equal(np.sort(both), x[:, 0])
    again = split_holdout(x, 0.2, seed=1)
    np.testing.assert_array_equal(again[1], held)
    assert not np.array_equal(split_holdout(x, 0.2, seed=2)[1], held)
    train, held = split_holdout(x, 0.0)
    np.testing.assert_array_equal(train, x)
    assert held.shape == (0, 1)


@pytest.mark.parametrize("fraction", [1.0, -0.1, float("nan")])
def test_split_holdout_bad_fraction(fraction):
    with pytest.raises(UserError, match="fraction"):
        split_holdout(np.ones((10, 2)), fraction)


def test_split_holdout_keeps_a_train_sample():
    with pytest.raises(UserError, match="none to train"):
        split_holdout(np.ones((2, 2)), 0.9)


def test_scaler_images_to_unit_interval():
    x = load_data("digits")
    scaler = Scaler.fit(x)
    assert scaler.shift == (8.0,) and scaler.scale == (8.0,)
    model = scaler.to_model(x)
    assert model.dtype == np.float32 and model.min() == -1 and model.max() == 1
    np.testing.assert_array_equal(scaler.to_raw(model), x)


def test_scaler_vectors_mean_zero_std_sigma():
    x = np.random.default_rng(0).normal([3.0, -10.0, 0.0], [0.1, 5.0, 2.0], size=(5000, 3))
    x = x.astype(np.float32)
    scaler = Scaler.fit(x, sigma_data=0.5)
    assert len(scaler.shift) == len(scaler.scale) == 3
    model = scaler.to_model(x)
    np.testing.assert_allclose(model.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(model.std(axis=0), 0.5, rtol=1e-5)
    np.testing.assert_allclose(scaler.to_raw(model), x, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="3 features"):
        scaler.to_model(np.ones((4, 2)))


def test_scaler_dict_round_trip():
    scaler = Scaler.fit(load_data("moons"))
    restored = Scaler.from_dict(json.loads(json.dumps(scaler.to_dict())))
    assert restored == scaler
    with pytest.raises(UserError, match="shift"):
        Scaler.from_dict({"scale": [1.0]})
    with pytest.raises(UserError, match="positive"):
        Scaler.from_dict({"shift": [0.0], "scale": [0.0]})


@pytest.mark.parametrize("x", [np.full((10, 2), 3.0), np.full((2, 1, 4, 4), 7.0)])
def test_scaler_constant_data_is_finite(x):
    scaler = Scaler.fit(x.astype(np.float32))
    model = scaler.to_model(x)
    assert np.isfinite(model).all()
    np.testing.assert_array_equal(model, 0)
    np.testing.assert_array_equal(scaler.to_raw(model), x)
