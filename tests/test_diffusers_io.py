"""Export to diffusers' ConsistencyModelPipeline and back: same seed, same images."""

import json

import numpy as np
import pytest
import torch
from conftest import run_cli

from cmkit.config import RunConfig
from cmkit.errors import UserError
from cmkit.process import EDMProcess
from cmkit.units import Scaler

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers not installed: pip install 'cmkit[diffusers]'"
)
from cmkit.diffusers_io import pipeline_timesteps  # noqa: E402

N = 21  # odd: the default two-step τ (middle of a 3-point Karras grid) is grid point 10
TINY_UNET = '{"block_out_channels": [16, 32]}'
TINY = ["--steps", "2", "--batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An iCT run on 8x8 images with a tiny diffusers UNet (2 steps), and its export."""
    root = tmp_path_factory.mktemp("diffusers")
    images = np.random.default_rng(0).uniform(0, 16, size=(32, 1, 8, 8)).astype(np.float32)
    np.save(root / "images.npy", images)
    run, pipe = root / "run", root / "pipe"
    backbone = ["--backbone", "diffusers-unet", "--network", TINY_UNET]
    assert run_cli("train", "--data", root / "images.npy", "--out", run, *backbone, *TINY) == 0
    assert (
        run_cli("export-diffusers", "--model", run, "--out", pipe, "--num-train-timesteps", N) == 0
    )
    return root


@pytest.fixture(scope="module")
def pipeline(exported):
    pipe = diffusers.ConsistencyModelPipeline.from_pretrained(exported / "pipe")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cmkit_sample(run, out, seed, *extra) -> np.ndarray:
    assert run_cli("sample", "--model", run, "--n", 6, "--seed", seed, "--out", out, *extra) == 0
    return np.load(out)


def test_export_writes_a_pipeline_folder(exported):
    pipe = exported / "pipe"
    for name in ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json"):
        assert (pipe / name).is_file(), name
    assert (pipe / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    scheduler = json.loads((pipe / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "CMStochasticIterativeScheduler"
    run = json.loads((exported / "run" / "config.json").read_text())
    for key in ("sigma_min", "sigma_max", "rho", "sigma_data"):
        assert scheduler[key] == run["process"][key]
    assert scheduler["num_train_timesteps"] == N and scheduler["clip_denoised"] is False


@pytest.mark.parametrize(
    "call,extra",
    [
        ({"num_inference_steps": 1}, ["--steps", "1"]),
        ({"num_inference_steps": None, "timesteps": [10, 0]}, ["--steps", "2"]),
        ({"num_inference_steps": None, "timesteps": [7, 0]}, ["--times", "τ7"]),
    ],
)
def test_pipeline_and_cmkit_sample_agree(exported, pipeline, tmp_path, call, extra):
    tau7 = float(EDMProcess().grid(N).flip(0)[7])
    extra = [repr(tau7) if e == "τ7" else e for e in extra]
    x = cmkit_sample(exported / "run", tmp_path / "x.npy", 11, *extra)
    images = pipeline(
        batch_size=6, generator=torch.Generator().manual_seed(11), output_type="pt", **call
    ).images
    config = json.loads((exported / "run" / "config.json").read_text())
    model_units = Scaler.from_dict(config["data"]["scaler"]).to_model(x)
    ours = torch.from_numpy(model_units / 2 + 0.5).clamp(0, 1)  # the pipeline's output range
    assert (images - ours).abs().max() < 1e-5
    assert images.std() > 1e-3  # not a constant image


def test_export_import_sample_identical(exported, tmp_path):
    back = tmp_path / "back"
    assert run_cli("import-diffusers", "--pipeline", exported / "pipe", "--out", back) == 0
    original = json.loads((exported / "run" / "config.json").read_text())
    imported = json.loads((back / "config.json").read_text())
    assert imported["process"] == original["process"] and imported["data"] == original["data"]
    for extra in (["--steps", "1"], ["--steps", "2"]):
        a = cmkit_sample(exported / "run", tmp_path / "a.npy", 3, *extra)
        b = cmkit_sample(back, tmp_path / "b.npy", 3, *extra)
        assert np.array_equal(a, b)
    re_export = tmp_path / "again"
    assert run_cli("export-diffusers", "--model", back, "--out", re_export) == 0
    scheduler = json.loads((re_export / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["num_train_timesteps"] == N


def test_foreign_pipeline_with_clipping_imports_in_pixel_units(tmp_path):
    """A pipeline made in diffusers (clip_denoised=True, as diffusers defaults) samples alike."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    )
    with torch.no_grad():
        unet.conv_out.weight.mul_(20)  # outputs well outside [−1, 1], so the clamp matters
    scheduler = diffusers.CMStochasticIterativeScheduler(num_train_timesteps=N, sigma_max=40.0)
    pipe = diffusers.ConsistencyModelPipeline(unet=unet, scheduler=scheduler)
    pipe.save_pretrained(tmp_path / "foreign")
    pipe.set_progress_bar_config(disable=True)
    assert (
        run_cli("import-diffusers", "--pipeline", tmp_path / "foreign", "--out", tmp_path / "r")
        == 0
    )
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["process"]["sigma_max"] == 40.0 and config["sampling"]["clip_denoised"]
    for call, steps in (({"num_inference_steps": 1}, "1"), ({"num_inference_steps": 2}, "2")):
        x = cmkit_sample(tmp_path / "r", tmp_path / "x.npy", 5, "--steps", steps)
        ref = pipe(
            batch_size=6, generator=torch.Generator().manual_seed(5), output_type="np", **call
        ).images
        assert np.abs(ref - x.transpose(0, 2, 3, 1) / 255).max() < 1e-5
    assert (x.min(), x.max()) == (0.0, 255.0)  # clamped at both ends


def test_pipeline_timesteps_map_tau_to_grid_indices():
    process = EDMProcess()
    grid = process.grid(N).flip(0)
    assert pipeline_timesteps(process, N, [float(grid[10])]) == [10, 0]
    assert pipeline_timesteps(process, N, [float(grid[4]), float(grid[15])]) == [15, 4, 0]
    assert pipeline_timesteps(process, N, []) == [0]
    with pytest.raises(UserError, match="nearest: timestep 10"):
        pipeline_timesteps(process, N, [float(grid[10]) * 1.01])
    with pytest.raises(UserError, match="sampling times"):
        pipeline_timesteps(process, N, [100.0])


def test_format_1_configs_gain_the_final_training_grid():
    """Format 1 stored no final N: the upgrade computes it from the recipe's options."""
    cd = {"recipe": "cd", "num_scales": 18, "steps": 10, "solver": "heun"}
    assert _upgraded({"training": cd}).sampling.num_scales == 18
    ict = {
        "recipe": "ict",
        "process": "edm",
        "distance": None,
        "s0": None,
        "s1": None,
        "mu0": 0.9,
        "mu_variant": "paper",
        "edm": {},
        "pairs": "uniform",
        "weighting": None,
        "p_mean": -1.1,
        "p_std": 2.0,
        "steps": 3000,
    }
    assert _upgraded({"training": ict}).sampling.num_scales == 1281


def _upgraded(overrides: dict) -> RunConfig:
    return RunConfig.from_dict({**_config(), **overrides})


SCALER = {"shift": [8.0], "scale": [8.0]}


def _config(kind="consistency", process="edm", network="diffusers-unet", shape=(1, 8, 8)):
    proc = EDMProcess().to_dict() if process == "edm" else {"name": "flow"}
    return {
        "format": 1,
        "kind": kind,
        "process": proc,
        "network": {"type": network, "kwargs": {"sample_size": shape[-1]}},
        "data": {"spec": "digits", "holdout": 0.1, "shape": list(shape), "scaler": SCALER},
        "training": {"recipe": "cd", "num_scales": 18, "steps": 10},
        "sampling": {"times": {}},
    }


@pytest.mark.parametrize(
    "config,needle",
    [
        (_config(kind="teacher"), "teacher run"),
        (_config(process="flow"), "flow process"),
        (_config(network="unet"), "--backbone diffusers-unet"),
        (_config(network="mlp", shape=(2,)), "--backbone diffusers-unet"),
        (_config(shape=(1, 8, 16)), "square"),
    ],
)
def test_export_refuses_what_the_pipeline_cannot_run(tmp_path, capsys, config, needle):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    assert run_cli("export-diffusers", "--model", tmp_path / "run", "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "o").exists()


def test_export_and_import_refuse_bad_folders(exported, tmp_path, capsys):
    args = ["export-diffusers", "--model", exported / "run", "--out", exported / "pipe"]
    assert run_cli(*args) == 2
    assert "not empty" in capsys.readouterr().err
    assert run_cli("import-diffusers", "--pipeline", exported / "run", "--out", tmp_path / "r") == 2
    assert "model_index.json" in capsys.readouterr().err


def test_distill_into_a_diffusers_student(exported, capsys):
    root, data = exported, exported / "images.npy"
    assert run_cli("train-teacher", "--data", data, "--out", root / "teacher", *TINY) == 0
    student = ["distill", "--teacher", root / "teacher", "--backbone", "diffusers-unet"]
    assert run_cli(*student, "--out", root / "cd", *TINY) == 2
    assert "from random weights" in capsys.readouterr().err
    assert run_cli(*student, "--no-init-from-teacher", "--out", root / "cd", *TINY) == 0
    config = json.loads((root / "cd" / "config.json").read_text())
    assert config["network"]["type"] == "diffusers-unet"
    assert run_cli("export-diffusers", "--model", root / "cd", "--out", root / "cd-pipe") == 0
    out = capsys.readouterr().out  # N = 18: the default τ = 2.52 lies between grid points
    assert "--steps 1 --seed S  ==  pipe(num_inference_steps=None, timesteps=[0]" in out
    assert "--steps 2 --seed S  ==  not expressible" in out and "nearest" in out


class _Payload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_import_reads_safetensors_only(exported, tmp_path, capsys):
    """A pickled diffusion_pytorch_model.bin in place of the safetensors file is refused."""
    import pickle
    import shutil

    pipe, marker = tmp_path / "pipe", tmp_path / "pwned"
    shutil.copytree(exported / "pipe", pipe)
    (pipe / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    payload = pickle.dumps({"conv_in.weight": _Payload(str(marker))})
    (pipe / "unet" / "diffusion_pytorch_model.bin").write_bytes(payload)
    assert run_cli("import-diffusers", "--pipeline", pipe, "--out", tmp_path / "run") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "from safetensors" in line and not marker.exists()
