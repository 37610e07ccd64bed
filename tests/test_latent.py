"""Latent runs: the built-in autoencoder, diffusers VAE folders, the codec and the CLI."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from cmkit import data as datalib
from cmkit.autoencoder import KLAutoencoder, build, crop, load_autoencoder, pad, psnr, reconstruct
from cmkit.config import RunConfig
from cmkit.latent import Codec, Source, open_autoencoder
from cmkit.runs import load_config, save_tensors
from cmkit.training_data import load_training_data, run_data
from cmkit.units import Scaler

QUICK = ["--batch-size", "32", "--no-progress", "--checkpoint-every", "20"]
TRAINED_STEPS = 100  # digits at batch 32: 18.7 dB held-out PSNR after them (7.4 dB untrained)
PSNR_FLOOR = 16.0


def heldout_digits() -> torch.Tensor:
    """The held-out split of digits in model units, as train-autoencoder scores it."""
    train, held = datalib.split_holdout(datalib.load_data("digits"), 0.1)
    return torch.from_numpy(Scaler.fit(train).to_model(held))


def heldout_psnr(ae: torch.nn.Module) -> float:
    x = heldout_digits()
    return psnr(float((reconstruct(ae, x) - x).double().square().mean()))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A built-in autoencoder trained briefly on digits (a few seconds)."""
    out = tmp_path_factory.mktemp("latent") / "ae"
    steps = ["--steps", TRAINED_STEPS]
    assert run_cli("train-autoencoder", "--data", "digits", "--out", out, *steps, *QUICK) == 0
    return out


@pytest.fixture
def untrained(tmp_path) -> Path:
    """An autoencoder folder of 2 training steps: a codec whose properties need no training."""
    out = tmp_path / "ae"
    assert run_cli("train-autoencoder", "--data", "digits", "--out", out, "--steps", 2, *QUICK) == 0
    return out


def test_padding_28_to_32_and_back():
    x = torch.randn(3, 1, 28, 28)
    padded = pad(x, 16)
    assert padded.shape == (3, 1, 32, 32)
    assert torch.equal(padded[:, :, 2:30, 2:30], x)  # centred: 2 pixels a side
    assert torch.equal(padded[:, :, 0, 2:30], x[:, :, 0])  # edges repeated
    assert torch.equal(crop(padded, 28, 28), x)
    ae = KLAutoencoder((1, 28, 28), latent_channels=4, levels=2)
    posterior = ae.encode(x)
    assert ae.latent_shape == (4, 8, 8) == tuple(posterior.mean.shape[1:])
    assert ae.decode(posterior.mean).shape == (3, 1, 28, 28)


def test_training_improves_the_round_trip(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    config, ae = load_autoencoder(trained)
    torch.manual_seed(0)
    fresh = build(config.architecture).eval()
    assert heldout_psnr(ae) == pytest.approx(metrics["psnr"], abs=1e-6)
    assert heldout_psnr(ae) > max(PSNR_FLOOR, heldout_psnr(fresh) + 6)
    assert metrics["steps"] == TRAINED_STEPS and metrics["latent_shape"] == [2, 4, 4]
    assert {"autoencoder.json", "autoencoder.safetensors", "reconstructions.png"} <= {
        p.name for p in trained.iterdir()
    }


def test_resume_continues_and_a_second_run_is_refused(untrained, capsys):
    assert run_cli("train-autoencoder", "--data", "digits", "--out", untrained, *QUICK) == 2
    assert "already holds an autoencoder" in capsys.readouterr().err
    again = ["--steps", 4, "--resume", *QUICK]
    assert run_cli("train-autoencoder", "--data", "digits", "--out", untrained, *again) == 0
    assert json.loads((untrained / "metrics.json").read_text())["steps"] == 4
    changed = ["--steps", 6, "--resume", "--lr", "0.01", *QUICK]
    assert run_cli("train-autoencoder", "--data", "digits", "--out", untrained, *changed) == 2
    assert "only --steps may change" in capsys.readouterr().err


def tiny_vae():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8,
    ).eval()


def test_vae_folder_gives_the_in_memory_latents(tmp_path):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    ae = open_autoencoder(Source("diffusers", tmp_path / "vae"), (1, 8, 8))
    x = heldout_digits()[:16]
    with torch.no_grad():
        expected = vae.encode(x).latent_dist.mean  # 8×8 needs no padding at 2 levels
    assert torch.equal(Codec(ae).encode(x), expected)
    assert Codec(ae).decode(expected).shape == x.shape


def test_pickled_vae_weights_are_refused_unread(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "vae"
    tiny_vae().save_pretrained(folder)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"weights": 1}))

    def unpickle(*args, **kwargs):
        raise AssertionError("a pickle was read")

    monkeypatch.setattr(torch, "load", unpickle)
    monkeypatch.setattr(pickle, "load", unpickle)
    monkeypatch.setattr(pickle, "loads", unpickle)
    out = tmp_path / "run"
    assert run_cli("train-teacher", "--data", "digits", "--vae", folder, "--out", out) == 2
    err = capsys.readouterr().err
    assert "pickled weights (diffusion_pytorch_model.bin)" in err and err.count("\n") == 1


def test_scaled_latents_have_std_sigma_data_and_keep_labels(untrained):
    src = Source("builtin", untrained.resolve())
    for sigma_data in (1.0, 0.5):
        data, section = load_training_data("digits", 0.1, sigma_data, autoencoder=src)
        assert float(data.x0.double().std()) == pytest.approx(sigma_data, rel=1e-3)
        assert section.shape == (2, 4, 4) and section.sample_shape == (1, 8, 8)
    labelled, section = load_training_data("digits", 0.1, 0.5, labels=True, autoencoder=src)
    assert len(labelled.cond["labels"]) == len(labelled) == 1617
    config = section.latent
    assert config.kind == "builtin" and config.path == str(untrained.resolve())
    assert run_data(section).x0.equal(labelled.x0)  # a student re-encodes bit for bit
    assert run_data(section).cond["labels"].equal(labelled.cond["labels"])


def test_arrays_read_from_disk_encode_as_loaded_ones(untrained, tmp_path):
    np.save(tmp_path / "digits.npy", datalib.load_data("digits"))
    src = Source("builtin", untrained.resolve())
    on_disk, section = load_training_data(str(tmp_path / "digits.npy"), 0.1, 0.5, autoencoder=src)
    loaded, _ = load_training_data("digits", 0.1, 0.5, autoencoder=src)
    assert on_disk.x0.equal(loaded.x0) and run_data(section).x0.equal(loaded.x0)


def latent_teacher(root: Path, ae: Path, steps: int = 2) -> Path:
    out = root / "teacher"
    args = ["--steps", steps, *QUICK]
    assert run_cli("train-teacher", "--data", "digits", "--latent", ae, "--out", out, *args) == 0
    return out


def test_config_records_the_autoencoder(untrained, tmp_path):
    teacher = latent_teacher(tmp_path, untrained)
    saved = json.loads((teacher / "config.json").read_text())["data"]
    assert saved["shape"] == [2, 4, 4] and saved["latent"]["image_shape"] == [1, 8, 8]
    assert set(saved["latent"]) == {"kind", "path", "sha256", "scaling_factor", "image_shape"}
    config = load_config(teacher)
    assert RunConfig.from_dict(config.to_dict()) == config
    resume = ["--steps", 4, "--resume", *QUICK]
    assert (
        run_cli(
            "train-teacher", "--data", "digits", "--latent", untrained, "--out", teacher, *resume
        )
        == 0
    )
    assert load_config(teacher).data.latent == config.data.latent


def test_changed_autoencoder_is_refused(untrained, tmp_path, capsys):
    teacher = latent_teacher(tmp_path, untrained)
    _, ae = load_autoencoder(untrained)
    save_tensors(
        untrained / "autoencoder.safetensors", {k: v + 1 for k, v in ae.state_dict().items()}
    )
    assert run_cli("sample", "--model", teacher, "--n", 4, "--out", tmp_path / "x.npy") == 2
    err = capsys.readouterr().err
    assert "changed since this run was trained" in err and err.count("\n") == 1
    out = tmp_path / "cd"
    assert run_cli("distill", "--teacher", teacher, "--out", out, "--steps", 2, *QUICK) == 2
    assert "changed since" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--latent", "missing"], "--latent missing is not a folder"),
        (["--vae", "missing"], "--vae missing is not a folder"),
        (["--latent", "AE", "--vae", "AE"], "--latent and --vae both choose"),
        (["--latent", "."], "is not a cmkit autoencoder folder"),
        (["--latent", "AE", "--data", "tinted-digits"], "trained on images of shape (1, 8, 8)"),
        (["--latent", "AE", "--data", "moons"], "needs image data"),
    ],
)
def test_bad_latent_flags_are_one_line(untrained, tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    flags = [str(untrained) if f == "AE" else f for f in flags]
    data = [] if "--data" in flags else ["--data", "digits"]
    assert run_cli("train-teacher", *data, *flags, "--out", tmp_path / "run", *QUICK) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_edit_and_export_refuse_latent_runs(untrained, tmp_path, capsys):
    teacher = latent_teacher(tmp_path, untrained)
    cd = tmp_path / "cd"
    assert run_cli("distill", "--teacher", teacher, "--out", cd, "--steps", 2, *QUICK) == 0
    np.save(tmp_path / "x.npy", datalib.load_data("digits")[:2])
    edit = ["edit", "inpaint", "--model", cd, "--input", tmp_path / "x.npy", "--mask", "center"]
    assert run_cli(*edit, "--out", tmp_path / "y.npy") == 2
    assert "latent space" in capsys.readouterr().err
    assert run_cli("export", "--model", cd, "--format", "pt2", "--out", tmp_path / "s.pt2") == 2
    assert "export takes pixel runs" in capsys.readouterr().err


@pytest.mark.slow
def test_autoencoder_teacher_distill_sample_eval(trained, tmp_path):
    """The whole latent pipeline on digits: samples and scores are decoded 8×8 images."""
    tiny = ["--steps", 40, "--batch-size", 64, "--no-progress", "--checkpoint-every", 20]
    teacher = latent_teacher(tmp_path, trained, 40)
    cd = tmp_path / "cd"
    assert run_cli("distill", "--teacher", teacher, "--out", cd, *tiny) == 0
    assert load_config(cd).data.latent == load_config(teacher).data.latent
    for suffix in (".npy", ".png"):
        assert run_cli("sample", "--model", cd, "--n", 16, "--out", tmp_path / f"s{suffix}") == 0
    samples = np.load(tmp_path / "s.npy")
    assert samples.shape == (16, 1, 8, 8) and np.isfinite(samples).all()
    report = tmp_path / "eval.json"
    assert run_cli("eval", "--model", cd, "--n", 50, "--nfe", 1, "--json", report) == 0
    row = json.loads(report.read_text())["rows"][0]
    assert np.isfinite(row["FD-digitsnet"]) and row["nfe"] == 1
    ict = tmp_path / "ict"
    assert run_cli("train", "--data", "digits", "--latent", trained, "--out", ict, *tiny) == 0
    assert run_cli("sample", "--model", ict, "--n", 4, "--out", tmp_path / "i.npy") == 0
    assert np.load(tmp_path / "i.npy").shape == (4, 1, 8, 8)
