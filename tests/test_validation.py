"""Validation at the edges: random malformed configs, arrays, archives and image folders get one
clear line and exit 2 (never a traceback or a hang), untrusted files are never unpickled, and
every command checks the run directories it reads."""

import ast
import contextlib
import io
import json
import pickle
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays
from PIL import Image

from cmkit.cli import build_parser, main
from cmkit.data import is_channels_last, load_data
from cmkit.errors import UserError

PACKAGE = Path(__file__).resolve().parent.parent / "cmkit"
FAST = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def run_cli(argv: list) -> tuple[int, str]:
    """Exit code and stderr of `cmkit argv`, in this process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def assert_clean_failure(code: int, err: str) -> None:
    """Exit 0, or 2/3 with exactly one 'cmkit: ...' line on stderr (after, with a random
    `resume = true`, the notice that the new --out has no checkpoint to resume)."""
    assert code in (0, 2, 3), (code, err)
    if code:
        assert "Traceback" not in err
        (line,) = [x for x in err.strip().splitlines() if "has no checkpoint yet" not in x]
        assert line.startswith("cmkit: error: " if code == 2 else "cmkit: training stopped: ")


# ---------------------------------------------------------------- config files

_train = build_parser()._subparsers._group_actions[0].choices["train"]
OPTIONS = sorted(a.dest for a in _train._actions if a.dest not in ("help", "config"))
WORDS = ["ct", "ict", "edm", "flow", "l2", "l1", "pseudo-huber", "paper", "openai", "uniform"]
WORDS += ["lognormal", "stop", "skip", "cpu", "cuda", "cuda:3", "meta", "cpu:1", ""]
NUMBERS = st.one_of(
    st.integers(-3, 2000),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 2**63, 2**64, 10**400, 5e-324, 1e-300, 1e300, 0.5, 0.999999]),
)
NETWORK = st.dictionaries(  # small sizes only: a valid huge network is slow, not an error
    st.sampled_from(["hidden", "depth", "emb_dim", "dropout", "dim", "channels", "width"]),
    st.one_of(st.integers(-2, 24), st.floats(-1, 2), st.text(max_size=3), st.none()),
    max_size=3,
)
VALUES = st.one_of(
    NUMBERS,
    st.booleans(),
    st.sampled_from(WORDS),
    st.text(max_size=8),
    st.lists(NUMBERS, max_size=3),
    NETWORK,
)
CONFIGS = st.dictionaries(
    st.one_of(
        st.sampled_from(OPTIONS),
        st.sampled_from(OPTIONS).map(lambda k: k.replace("_", "-")),
        st.text(max_size=6),
    ),
    VALUES,
    max_size=5,
).map(lambda options: {"network": {"hidden": 8, "depth": 1}, **options})  # small unless drawn
# flags on the command line win over the file: a config that turns out valid trains 2 tiny steps
TRAIN = ["train", "--data", "moons", "--steps", 2, "--batch-size", 4, "--no-progress"]


@settings(max_examples=25, deadline=None)
@given(options=CONFIGS)
def test_random_json_config_gives_a_clear_result(options):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.json"
        path.write_text(json.dumps(options))  # NaN/Infinity literals included
        assert_clean_failure(*run_cli([*TRAIN, "--config", path, "--out", Path(tmp) / "o"]))


@settings(max_examples=25, deadline=None)
@given(text=st.text(max_size=60), suffix=st.sampled_from([".toml", ".json", ".cfg"]))
def test_random_config_text_gives_a_clear_result(text, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"c{suffix}"
        path.write_text(text)
        argv = [*TRAIN, "--config", path, "--out", Path(tmp) / "o", "--network", '{"hidden": 8}']
        assert_clean_failure(*run_cli(argv))


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--sigma-max", "inf"], "--sigma-max must be a finite number"),
        (["--seed", str(2**64)], "--seed must be in"),
        (["--seed", "-1"], "--seed must be in"),
        (["--lr", "1e38"], "--lr must be below"),
        (["--device", "meta"], "expected cpu, cuda"),
        (["--rho", "1e-300"], "no strictly increasing grid"),
        (["--s1", "10000000"], "s1 <"),
        (["--recipe", "ct", "--mu0", "1"], "--mu0 must be in (0, 1)"),
        (["--pairs", "lognormal", "--p-mean", "1e6"], "put no probability"),
        (["--pairs", "lognormal", "--p-std", "0"], "put no probability"),
        (["--network", '{"dim": 3}'], "does not fit data of shape (2,)"),
        (["--network", '{"hidden": -4}'], "does not fit data"),
        (["--data", "digits", "--network", '{"channel_mult": [1, 1, 1, 1, 1]}'], "divisible by 16"),
    ],
)
def test_bad_values_are_named_before_training(tmp_path, argv, needle):
    code, err = run_cli([*TRAIN, "--out", tmp_path / "o", *argv])
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o" / "state.json").exists()


def test_sample_sizes_that_cannot_work(tmp_path):
    run = tmp_path / "run"
    assert run_cli([*TRAIN, "--out", run, "--network", '{"hidden": 8, "depth": 1}'])[0] == 0
    sample = ["sample", "--model", run, "--out", tmp_path / "x.npy", "--no-progress"]
    code, err = run_cli([*sample, "--steps", 0])
    assert code == 2 and "--steps must be >= 1" in err
    code, err = run_cli([*sample, "--n", 10**13])  # 80 TB of noise
    assert code == 2 and err.startswith("cmkit: error: out of memory") and err.count("\n") == 1


def test_config_value_out_of_float_range(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"lr": 1' + "0" * 400 + "}")
    code, err = run_cli([*TRAIN, "--config", path, "--out", tmp_path / "o"])
    assert code == 2 and "expected a finite number" in err


# ---------------------------------------------------------------- arrays

DTYPES = st.sampled_from(["f2", "f4", "f8", "i1", "u1", "i8", "u8", "?", "c8", "U2", "S2", "M8[s]"])
ODD_ARRAYS = arrays(
    dtype=DTYPES.map(np.dtype),
    shape=array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=4),
)


def check_load(path: Path, original: np.ndarray | None = None) -> None:
    """load_data either returns a usable float32 array or raises a one-line UserError."""
    try:
        x = load_data(str(path))
    except UserError as err:
        assert "\n" not in str(err) and path.name in str(err)
        return
    assert x.dtype == np.float32 and x.ndim in (2, 4) and x.size > 0
    assert np.isfinite(x).all()
    if original is not None:
        expected = original[:, None] if original.ndim == 3 else original
        if is_channels_last(expected.shape):
            expected = expected.transpose(0, 3, 1, 2)
        np.testing.assert_array_equal(x, expected.astype(np.float32))


@FAST
@given(x=ODD_ARRAYS)
def test_random_npy_arrays(x):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.npy"
        np.save(path, x)
        check_load(path, x if x.ndim != 3 else None)


@FAST
@given(
    members=st.dictionaries(st.sampled_from(["x_train", "y_train", "a"]), ODD_ARRAYS, max_size=3)
)
def test_random_npz_archives(members):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.npz"
        np.savez(path, **members)
        chosen = members.get("x_train", next(iter(members.values())) if len(members) == 1 else None)
        check_load(path, chosen)


@FAST
@given(
    shape=st.lists(st.integers(0, 2**40), max_size=4),
    dtype=st.sampled_from(["<f4", ">f8", "|u1", "<i8"]),
    payload=st.binary(max_size=64),
)
def test_npy_headers_that_lie_about_their_size(shape, dtype, payload):
    """A header may claim terabytes the file does not hold: refused without allocating."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.npy"
        with open(path, "wb") as fh:
            header = {"descr": dtype, "fortran_order": False, "shape": tuple(shape)}
            np.lib.format.write_array_header_1_0(fh, header)
            fh.write(payload)
        check_load(path)


@FAST
@given(
    data=st.binary(max_size=300), cut=st.integers(0, 400), suffix=st.sampled_from([".npy", ".npz"])
)
def test_garbage_and_truncated_numpy_files(data, cut, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"x{suffix}"
        if data:
            path.write_bytes(data)
        else:  # a valid file cut short
            buffer = io.BytesIO()
            save = np.save if suffix == ".npy" else lambda f, a: np.savez(f, x_train=a)
            save(buffer, np.arange(40.0).reshape(10, 4))
            path.write_bytes(buffer.getvalue()[:cut])
        check_load(path)


# ---------------------------------------------------------------- image folders

IMAGE = st.tuples(
    st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "I;16"]),
    st.integers(1, 5),
    st.integers(1, 5),
)
ENTRY = st.one_of(
    IMAGE.map(lambda spec: ("image", spec)),
    st.binary(max_size=80).map(lambda b: ("junk", b)),
    st.tuples(IMAGE, st.integers(0, 60)).map(lambda spec: ("truncated", spec)),
)


def _png_bytes(mode: str, width: int, height: int) -> bytes:
    pixels = np.arange(width * height * 3, dtype=np.uint8).reshape(height, width, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


@FAST
@given(entries=st.lists(ENTRY, max_size=4), suffix=st.sampled_from([".png", ".jpg"]))
def test_random_image_folders(entries, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i, (kind, spec) in enumerate(entries):
            if kind == "image":
                data = _png_bytes(*spec)
            elif kind == "junk":
                data = spec
            else:
                data = _png_bytes(*spec[0])[: spec[1]]
            (folder / f"{i}{suffix}").write_bytes(data)
        check_load(folder)


# ---------------------------------------------------------------- nothing is unpickled


class Payload:
    """Unpickling this creates the marker file: the test fails if that ever happens."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_data_files_are_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = np.array([Payload(str(marker))], dtype=object)
    (tmp_path / "raw.npy").write_bytes(pickle.dumps(payload))  # a bare pickle named .npy
    np.save(tmp_path / "object.npy", payload, allow_pickle=True)
    np.savez(tmp_path / "object.npz", x_train=payload)
    for name in ("raw.npy", "object.npy", "object.npz"):
        code, err = run_cli(["train", "--data", tmp_path / name, "--out", tmp_path / "o"])
        assert code == 2 and "pickles are not accepted" in err, (name, err)
    assert not marker.exists()


def test_pickled_config_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "c.json").write_bytes(pickle.dumps(Payload(str(marker))))
    code, err = run_cli([*TRAIN, "--config", tmp_path / "c.json", "--out", tmp_path / "o"])
    assert code == 2 and "cannot read --config" in err and not marker.exists()


def test_pickled_checkpoint_is_refused_on_resume(tmp_path):
    out = tmp_path / "run"
    assert run_cli([*TRAIN, "--out", out, "--network", '{"hidden": 8, "depth": 1}'])[0] == 0
    marker = tmp_path / "pwned"
    (out / "trainer.safetensors").write_bytes(pickle.dumps(Payload(str(marker))))
    code, err = run_cli(
        [*TRAIN, "--out", out, "--network", '{"hidden": 8, "depth": 1}', "--resume"]
    )
    assert code == 2 and "cannot load" in err and "trainer.safetensors" in err
    assert not marker.exists()


def _calls(name: str):
    """(call node, source file) for every call of something named `name` in the package."""
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(name):
                yield node, path.name


def test_the_package_has_no_unsafe_loader():
    """No pickle import; np.load always with allow_pickle=False; torch.load only weights_only."""
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        } | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not imported & {"pickle", "dill", "joblib", "cloudpickle"}, path.name
    np_loads = list(_calls("np.load"))
    assert np_loads, "the scan found np.load in data.py"
    for call, name in np_loads + list(_calls("torch.load")):
        keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
        assert keywords.get("allow_pickle") == "False" or keywords.get("weights_only") == "True", (
            name,
            ast.unparse(call),
        )


# ---------------------------------------------------------------- run directories


def _foreign_runs(root: Path) -> dict[str, Path]:
    """Directories that are not runs this cmkit can use, one per way of being wrong."""
    runs = {}
    contents = {
        "other format": {"format": 2, "kind": "teacher"},
        "wrong kind": {"format": 1, "kind": "diffusion"},
        "not a run": {"model": "something else"},
    }
    for name, config in contents.items():
        runs[name] = root / name.replace(" ", "_")
        runs[name].mkdir()
        (runs[name] / "config.json").write_text(json.dumps(config))
    runs["invalid json"] = root / "invalid"
    runs["invalid json"].mkdir()
    (runs["invalid json"] / "config.json").write_bytes(b"\x80\x04not json")
    runs["empty"] = root / "empty"
    runs["empty"].mkdir()
    return runs


def test_every_command_checks_the_run_directories_it_reads(tmp_path):
    tiny = ["--steps", 2, "--batch-size", 4, "--no-progress", "--network", '{"hidden": 8}']
    teacher, ct = tmp_path / "teacher", tmp_path / "ct"
    assert run_cli(["train-teacher", "--data", "moons", "--out", teacher, *tiny])[0] == 0
    assert run_cli(["train", "--data", "moons", "--out", ct, *tiny])[0] == 0
    for name, run in _foreign_runs(tmp_path).items():
        commands = {
            "sample": ["sample", "--model", run, "--out", tmp_path / "x.npy"],
            "eval": ["eval", "--model", run],
            "tune-times": ["tune-times", "--model", run],
            "edit": ["edit", "sdedit", "--model", run, "--out", tmp_path / "e.npy"],
            "export-diffusers": ["export-diffusers", "--model", run, "--out", tmp_path / "p"],
            "distill": ["distill", "--teacher", run, "--out", tmp_path / "d"],
            "resume train": ["train", "--data", "moons", "--out", run, "--resume", *tiny],
            "resume teacher": ["train-teacher", "--data", "moons", "--out", run, "--resume", *tiny],
            "resume distill": ["distill", "--teacher", teacher, "--out", run, "--resume"],
        }
        for command, argv in commands.items():
            if name == "empty" and command.startswith("resume"):
                continue  # a run killed before its first checkpoint: --resume starts it
            code, err = run_cli(argv)
            assert code == 2 and len(err.strip().splitlines()) == 1, (name, command, err)
            assert "Traceback" not in err
    # a consistency run is not a teacher, and a teacher run cannot be resumed as CT
    code, err = run_cli(["distill", "--teacher", ct, "--out", tmp_path / "cd", "--steps", 2])
    assert code == 2 and "consistency run; expected a teacher run" in err
    code, err = run_cli(["train", "--data", "moons", "--out", teacher, "--resume", *tiny])
    assert code == 2 and "'teacher' run; expected 'consistency'" in err
    # quickstart resumes the stages it finds, so it checks them too
    (tmp_path / "qs" / "teacher").mkdir(parents=True)
    (tmp_path / "qs" / "teacher" / "config.json").write_text('{"format": 99, "kind": "teacher"}')
    code, err = run_cli(["quickstart", "--out", tmp_path / "qs", "--scale", 0.001, "--no-progress"])
    assert code == 2 and "has run format 99" in err


# ---------------------------------------------------------------- editing masks


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    """A 2-step iCT run on digits with a tiny UNet, and 3 digits to edit."""
    root = tmp_path_factory.mktemp("image_run")
    args = ["train", "--data", "digits", "--out", root / "cm", "--steps", 2, "--batch-size", 4]
    assert run_cli([*args, "--no-progress", "--network", '{"channels": 8}'])[0] == 0
    np.save(root / "digits.npy", load_data("digits")[:3])
    return root


MASKS = arrays(
    dtype=st.sampled_from(["?", "u1", "i8", "f4", "f8", "U1"]).map(np.dtype),
    shape=st.one_of(st.sampled_from([(8, 8), (1, 8, 8)]), array_shapes(max_dims=4, max_side=9)),
    elements=None,
)


@settings(max_examples=25, deadline=None)
@given(mask=MASKS)
def test_random_inpainting_masks(image_run, mask):
    """A mask file is used when it is 0/1 of a shape that broadcasts to the images; anything
    else (shape, values, NaN, dtype) is one line and exit 2."""
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "mask.npy", mask)
        code, err = run_cli(
            ["edit", "inpaint", "--model", image_run / "cm", "--input", image_run / "digits.npy"]
            + ["--mask", Path(tmp) / "mask.npy", "--out", Path(tmp) / "o.npy", "--no-progress"]
        )
    usable = mask.shape in ((8, 8), (1, 8, 8), (3, 1, 8, 8)) and mask.dtype.kind != "U"
    usable = usable and bool(np.isin(mask, (0, 1)).all())
    assert code == (0 if usable else 2), (code, err)
    if code:
        (line,) = err.strip().splitlines()
        assert line.startswith("cmkit: error: --mask") or "cannot read" in line, line


def test_pickled_mask_is_refused_not_executed(image_run, tmp_path):
    marker = tmp_path / "pwned"
    np.save(
        tmp_path / "mask.npy", np.array([Payload(str(marker))], dtype=object), allow_pickle=True
    )
    code, err = run_cli(
        ["edit", "inpaint", "--model", image_run / "cm", "--input", image_run / "digits.npy"]
        + ["--mask", tmp_path / "mask.npy", "--out", tmp_path / "o.npy", "--no-progress"]
    )
    assert code == 2 and "pickles are not accepted" in err and not marker.exists()


def test_out_that_cannot_be_a_run_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    code, err = run_cli([*TRAIN, "--out", tmp_path / "file"])
    assert code == 2 and "cannot be a run directory" in err
    code, err = run_cli(["sample", "--model", tmp_path, "--out", tmp_path / "no" / "x.npy"])
    assert code == 2 and "does not exist" in err


def test_zip_that_is_not_numpy(tmp_path):
    with zipfile.ZipFile(tmp_path / "x.npz", "w") as archive:
        archive.writestr("x_train.npy", b"not an array")
    with pytest.raises(UserError, match="x.npz"):
        load_data(str(tmp_path / "x.npz"))
