"""`cmkit export`: ONNX and .pt2 samplers that compute `cmkit sample --noise`, run without
cmkit, take conditioning as inputs, and refuse bad values in one line."""

import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file
from torch import nn

from cmkit.config import DataSection, NetworkSpec, RunConfig, SamplingSection, TrainingSection
from cmkit.export import BATCH, Sampler, TensorSpec, exported_program
from cmkit.generate import Model, generate
from cmkit.networks.mlp import MLP
from cmkit.process import EDMProcess, FlowProcess, TrigFlowProcess
from cmkit.units import Scaler

HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))
NO_ONNX = "onnx, onnxscript or onnxruntime not installed: pip install 'cmkit[export]'"
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason=NO_ONNX)
FORMATS = ["pt2", pytest.param("onnx", marks=needs_onnx)]
TINY_UNET = '{"channels": 8, "channel_mult": [1], "emb_dim": 16}'
N = 5  # samples per check: the graphs were traced at batch 2, and also run at batch 1
README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)

# Run in a fresh interpreter where importing cmkit fails: each exported file on its noise.
WITHOUT_CMKIT = """
import sys
sys.modules["cmkit"] = None  # from here on, `import cmkit` raises ImportError
import numpy as np
import torch

def run(path, noise):
    if path.endswith(".onnx"):
        import onnxruntime
        return onnxruntime.InferenceSession(path).run(None, {"noise": noise})[0]
    return torch.export.load(path).module()(torch.from_numpy(noise)).numpy()

for path, noise_path in zip(sys.argv[1::2], sys.argv[2::2]):
    noise = np.load(noise_path)
    np.save(path + ".out.npy", run(path, noise))
    np.save(path + ".out1.npy", run(path, noise[:, :1]))
"""


def _python(code: str, cwd: Path | None, *args: str) -> subprocess.CompletedProcess:
    """`python -c code args` in `cwd` (None: this one, where `import cmkit` finds this tree)."""
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd
    )


def _randomize(weights) -> None:
    """Random weights in place of two steps' worth (the UNet's output conv starts at zero):
    samples that vary, so that agreeing to 1e-4 means something."""
    gen = torch.Generator().manual_seed(0)
    tensors = {k: 0.3 * torch.randn(v.shape, generator=gen) for k, v in load_file(weights).items()}
    save_file(tensors, weights)


@pytest.fixture(scope="module")
def exports(moons_runs, tmp_path_factory):
    """For an image run (digits, a tiny UNet) and a vector run (the moons CD student), at 1 and
    2 steps: a noise file, `cmkit sample --noise` on it, the .pt2 and .onnx exports, and what
    the exports computed on that noise in a python that cannot import cmkit."""
    root = tmp_path_factory.mktemp("export")
    train = ["--steps", "2", "--batch-size", "8", "--no-progress", "--network", TINY_UNET]
    assert run_cli("train", "--data", "digits", "--out", root / "digits", *train) == 0
    _randomize(root / "digits" / "ema.safetensors")
    runs = {"image": (root / "digits", (1, 8, 8)), "vector": (moons_runs / "cd", (2,))}
    rng = np.random.default_rng(0)
    files = []
    for name, (run, shape) in runs.items():
        for k in (1, 2):
            stem = root / f"{name}-{k}"
            noise = rng.standard_normal((k, N, *shape), dtype=np.float32)
            np.save(f"{stem}-noise.npy", noise)
            sample = ["sample", "--model", run, "--steps", k, "--noise", f"{stem}-noise.npy"]
            assert run_cli(*sample, "--out", f"{stem}-sample.npy", "--no-progress") == 0
            for fmt in ("pt2", "onnx") if HAS_ONNX else ("pt2",):
                export = ["export", "--model", run, "--format", fmt, "--steps", k]
                assert run_cli(*export, "--out", f"{stem}.{fmt}") == 0
                files += [f"{stem}.{fmt}", f"{stem}-noise.npy"]
    proc = _python(WITHOUT_CMKIT, root, *files)
    assert proc.returncode == 0, proc.stderr
    return root, runs


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("kind", ["image", "vector"])
def test_export_computes_sample_noise_without_cmkit(exports, kind, steps, fmt):
    root, _ = exports
    stem = root / f"{kind}-{steps}"
    expected = np.load(f"{stem}-sample.npy")
    got, got_one = np.load(f"{stem}.{fmt}.out.npy"), np.load(f"{stem}.{fmt}.out1.npy")
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(got_one, expected[:1], rtol=0, atol=1e-4)
    assert expected.std() > 0.1, expected.std()  # samples that vary, in the data's units


@pytest.mark.slow
def test_manifest_names_inputs_output_units_and_run(exports):
    root, runs = exports
    run, shape = runs["image"]
    manifest = json.loads((root / "image-2.pt2.json").read_text())
    (noise,) = manifest["inputs"]
    assert noise["name"] == "noise" and noise["dtype"] == "float32"
    assert noise["shape"] == [2, BATCH, *shape] and "standard normal" in noise["units"]
    (out,) = manifest["outputs"]
    assert out["name"] == "samples" and out["shape"] == [BATCH, *shape]
    assert "digits" in out["units"]
    assert manifest["format"] == "pt2" and manifest["file"] == "image-2.pt2"
    sampler = manifest["sampler"]
    assert sampler["steps"] == 2 and len(sampler["times"]) == 2 and sampler["times"][0] == 80.0
    record = manifest["run"]
    assert record["path"] == str(run.resolve()) and record["step"] == 2
    assert record["sha256"] == hashlib.sha256((run / "ema.safetensors").read_bytes()).hexdigest()
    assert record["data"]["scaler"] == {"shift": [8.0], "scale": [8.0]}


@pytest.mark.slow
@needs_onnx
def test_readme_snippet_runs_without_cmkit(exports, tmp_path):
    """The README's onnxruntime lines, on an export named as there, give `cmkit sample`'s
    samples for the noise they save."""
    root, runs = exports
    (snippet,) = [block for block in PYTHON_BLOCKS if "onnxruntime" in block]
    for name in ("image-1.onnx", "image-1.onnx.json"):
        shutil.copy(root / name, tmp_path / name.replace("image-1", "ict"))
    code = f"import sys\nsys.modules['cmkit'] = None\n{snippet}\nnp.save('samples.npy', samples)"
    proc = _python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    sample = ["sample", "--model", runs["image"][0], "--noise", tmp_path / "noise.npy"]
    assert run_cli(*sample, "--out", tmp_path / "check.npy", "--no-progress") == 0
    got, expected = np.load(tmp_path / "samples.npy"), np.load(tmp_path / "check.npy")
    assert got.shape == (16, 1, 8, 8)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_sample_noise_is_the_draw_of_its_seed(moons_runs, tmp_path):
    """The documented layout: K tensors (n, *shape) from torch.Generator(seed), in order."""
    gen = torch.Generator().manual_seed(3)
    noise = torch.stack([torch.randn(6, 2, generator=gen) for _ in range(2)]).numpy()
    np.save(tmp_path / "noise.npy", noise)
    common = ["sample", "--model", moons_runs / "ict", "--steps", 2, "--no-progress"]
    assert run_cli(*common, "--seed", 3, "--n", 6, "--out", tmp_path / "a.npy") == 0
    assert run_cli(*common, "--noise", tmp_path / "noise.npy", "--out", tmp_path / "b.npy") == 0
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


def _one_line_error(capsys) -> str:
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("cmkit")
    return line


@pytest.mark.parametrize(
    "make, args, needle",
    [
        (lambda d: np.zeros((2, 4, 2), np.float32), [], "has shape (2, 4, 2); expected (1, 4, 2)"),
        (lambda d: np.zeros((1, 4, 2), np.float32), ["--n", 3], "expected (1, 3, 2)"),
        (lambda d: np.zeros((1, 4, 3), np.float32), [], "expected (1, 4, 2)"),
        (lambda d: np.zeros((1, 4, 2)), [], "--noise holds float64; expected a float32 array"),
        (lambda d: None, [], "cannot read it"),
        (lambda d: (d / "noise.npy").write_text("not an array"), [], "cannot read it"),
    ],
    ids=["steps", "n", "shape", "dtype", "missing", "garbage"],
)
def test_bad_noise_is_one_line_exit_2(moons_runs, tmp_path, capsys, make, args, needle):
    noise = make(tmp_path)
    if isinstance(noise, np.ndarray):
        np.save(tmp_path / "noise.npy", noise)
    sample = ["sample", "--model", moons_runs / "cd", "--noise", tmp_path / "noise.npy", *args]
    assert run_cli(*sample, "--out", tmp_path / "x.npy") == 2
    assert needle in _one_line_error(capsys)
    assert not (tmp_path / "x.npy").exists()


def test_noise_must_be_a_npy_file(moons_runs, tmp_path, capsys):
    noise = tmp_path / "noise.txt"
    noise.write_text("0")
    assert run_cli("sample", "--model", moons_runs / "cd", "--noise", noise, "--out", "x.npy") == 2
    assert "expected a .npy file" in _one_line_error(capsys)


@pytest.mark.parametrize(
    "run, args, needle",
    [
        ("cd", ["--steps", 0], "--steps must be >= 1, got 0"),
        ("cd", ["--times", "90"], "sampling times must decrease strictly inside"),
        ("teacher", ["--steps", 1], "this is a teacher run"),
        ("cd", ["--out", "no/such/folder/x.pt2"], "folder no/such/folder does not exist"),
    ],
)
def test_bad_export_values_are_one_line_exit_2(moons_runs, tmp_path, capsys, run, args, needle):
    out = ["--out", tmp_path / "x.pt2"] if "--out" not in args else []
    export = ["export", "--model", moons_runs / run, "--format", "pt2", *out, *args]
    assert run_cli(*export) == 2
    assert needle in _one_line_error(capsys)
    assert not (tmp_path / "x.pt2").exists()


def test_diffusers_backbone_is_refused_in_one_line(tmp_path, capsys):
    pytest.importorskip("diffusers", reason="diffusers not installed: pip install cmkit[diffusers]")
    backbone = ["--backbone", "diffusers-unet", "--network", '{"block_out_channels": [16, 32]}']
    train = ["--steps", "1", "--batch-size", "4", "--no-progress"]
    assert run_cli("train", "--data", "digits", "--out", tmp_path / "r", *backbone, *train) == 0
    capsys.readouterr()
    export = ["export", "--model", tmp_path / "r", "--format", "pt2", "--out", tmp_path / "x.pt2"]
    assert run_cli(*export) == 2
    assert "use cmkit export-diffusers" in _one_line_error(capsys)


def test_unknown_format_is_one_line_exit_2(moons_runs, tmp_path, capsys):
    export = ["export", "--model", moons_runs / "cd", "--format", "tflite", "--out", "x.tflite"]
    with pytest.raises(SystemExit) as info:  # argparse's choices, through Parser.error
        run_cli(*export)
    assert info.value.code == 2
    assert "invalid choice: 'tflite'" in _one_line_error(capsys)


@pytest.mark.slow
def test_onnx_without_its_packages_says_how_to_install(moons_runs, tmp_path):
    code = (
        "import sys; sys.modules['onnx'] = sys.modules['onnxscript'] = None\n"
        "from cmkit.cli import main\n"
        f"sys.exit(main(['export', '--model', {str(moons_runs / 'cd')!r}, '--format', 'onnx', "
        f"'--out', {str(tmp_path / 'x.onnx')!r}]))\n"
    )
    proc = _python(code, None)
    assert proc.returncode == 2
    assert proc.stderr == (
        "cmkit: error: --format onnx needs the onnx and onnxscript packages (and onnxruntime "
        "to run the graph); install them with pip install 'cmkit[export]'\n"
    )


def _model(process, net: nn.Module, clip: bool = False) -> Model:
    data = DataSection("test", 0.0, (2,), Scaler((1.0, -2.0), (3.0, 0.5)))
    sampling = SamplingSection(clip_denoised=clip)
    config = RunConfig(
        "consistency", process, NetworkSpec("test"), data, TrainingSection("t"), sampling
    )
    return Model(config, process.consistency(net.eval()))


def _program_and_generate(model: Model, times: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """The exported program's samples and generate's, for one noise array of 7 samples."""
    noise = np.random.default_rng(1).standard_normal((1 + len(times), 7, 2), dtype=np.float32)
    program = exported_program(Sampler(model, times).eval().requires_grad_(False)).module()
    got = program(torch.from_numpy(noise)).numpy()
    return got, generate(model, 7, times=times, noise=noise)


@pytest.mark.parametrize(
    "process, times",
    [(FlowProcess(), [0.5, 0.25]), (TrigFlowProcess(), [1.1]), (EDMProcess(), [])],
    ids=["flow", "trigflow", "edm"],
)
def test_program_is_generate_on_each_process(process, times):
    torch.manual_seed(0)
    got, expected = _program_and_generate(model=_model(process, MLP(2, 16, 1, 8)), times=times)
    np.testing.assert_allclose(got, expected, atol=1e-5)


class Gain(nn.Module):
    """F(x, c_noise[, labels]) = a·x (+ labels): outputs as large as a makes them, and labels
    that change every evaluation's output."""

    def __init__(self, a: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))

    def forward(self, x, c_noise, labels=None):
        return self.a * x + (0 if labels is None else labels[:, None].to(x.dtype))


def test_program_clamps_where_the_run_does():
    """A run imported with clip_denoised: each f clamped to [−1, 1] model units, as generate."""
    got, expected = _program_and_generate(_model(EDMProcess(), Gain(10.0), clip=True), [2.0])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    model_units = (got - np.array([1.0, -2.0])) / np.array([3.0, 0.5])
    assert np.abs(model_units).max() == pytest.approx(1.0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_conditioning_becomes_graph_inputs(tmp_path, fmt):
    model = _model(EDMProcess(), Gain(0.1))
    label = TensorSpec("labels", (BATCH,), "int64", "class index")
    sampler = Sampler(model, [2.0], cond=(label,)).eval().requires_grad_(False)
    noise = np.random.default_rng(0).standard_normal((2, 3, 2), dtype=np.float32)
    labels = np.array([0, 3, 7])
    expected = generate(model, 3, times=[2.0], noise=noise, cond={"labels": torch.tensor(labels)})
    program = exported_program(sampler)
    if fmt == "pt2":
        got = program.module()(torch.from_numpy(noise), torch.from_numpy(labels)).numpy()
    else:
        import onnxruntime

        from cmkit.export import write_onnx

        write_onnx(program, tmp_path / "c.onnx", sampler)
        session = onnxruntime.InferenceSession(str(tmp_path / "c.onnx"))
        assert [i.name for i in session.get_inputs()] == ["noise", "labels"]
        got = session.run(None, {"noise": noise, "labels": labels})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not np.allclose(got[0], got[1])
