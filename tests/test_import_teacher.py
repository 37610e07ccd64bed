"""import-teacher: a UNet2DModel with a DDPM, DDIM or Euler scheduler becomes an EDM teacher
run whose denoiser is the scheduler's own x̂₀, and whose Euler solve in σ is DDIM (η = 0)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from cmkit.errors import UserError
from cmkit.runs import load_network
from cmkit.solvers import solve

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers not installed: pip install 'cmkit[diffusers]'"
)

UNET = {  # 1x8x8 like digits; about as small as UNet2DModel gets
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (8, 16),
    "down_block_types": ("DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "norm_num_groups": 4,
}
PREDICTIONS = ("epsilon", "v_prediction", "sample")
STEPS = 10  # DDIM steps K
TINY = ["--batch-size", "4", "--no-progress"]


def tiny_unet(seed: int = 0, **overrides) -> "diffusers.UNet2DModel":
    """A random UNet whose output is far from zero (its last conv scaled up)."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**{**UNET, **overrides})
    with torch.no_grad():
        unet.conv_out.weight.mul_(5)
    return unet.eval()


def save_pipeline(folder: Path, unet, scheduler) -> Path:
    """A DDPMPipeline folder with this UNet and scheduler, as save_pretrained writes it."""
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def imported(tmp_path: Path, unet, scheduler, *extra) -> Path:
    """The teacher run import-teacher makes of the folder, trained on digits (1x8x8)."""
    pipe = save_pipeline(tmp_path / "pipe", unet, scheduler)
    run = tmp_path / "run"
    assert (
        run_cli("import-teacher", "--pipeline", pipe, "--data", "digits", "--out", run, *extra) == 0
    )
    return run


def teacher(run: Path):
    """The run's EDM denoiser D(x_σ, σ), rebuilt from its files."""
    config, net = load_network(run, "ema")
    return config, config.process.denoiser(net)


def sigma_of(alpha_bar: torch.Tensor) -> torch.Tensor:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t), in float64."""
    alpha_bar = alpha_bar.double()
    return torch.sqrt((1 - alpha_bar) / alpha_bar)


def scaled_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours − theirs| over max(1, max |theirs|): the absolute error for samples in [−1, 1].

    Both sides are float32 and c_noise = ln(σ)/4 carries σ to ~3e-7 relative, an error D
    inherits relative to its own size. A random ε-predicting UNet is far from ε̂ ≈ x_t at
    σ_max ≈ 157, so its x̂₀ there lies in the hundreds (a trained one's in [−1, 1])."""
    return float((ours - theirs).abs().max()) / max(1.0, float(theirs.abs().max()))


@pytest.mark.parametrize(
    "scheduler_class,prediction",
    [("DDIMScheduler", p) for p in PREDICTIONS] + [("DDPMScheduler", p) for p in PREDICTIONS],
)
def test_denoiser_is_the_schedulers_own_x0(tmp_path, scheduler_class, prediction):
    """D(x_t/√ᾱ_t, σ_t) = the x̂₀ the scheduler's step computes from the UNet's output at x_t,
    at DDIM's 10-step timesteps and the ends of the table."""
    scheduler = getattr(diffusers, scheduler_class)(prediction_type=prediction, clip_sample=False)
    unet = tiny_unet()
    config, D = teacher(imported(tmp_path, unet, scheduler))
    if scheduler_class == "DDIMScheduler":
        scheduler.set_timesteps(STEPS)  # DDIM's step needs it; DDPM's steps t -> t − 1 without
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for t in [999, *range(900, -1, -100), 1]:
        x_t = torch.randn(3, 1, 8, 8, generator=gen)
        with torch.no_grad():
            out = unet(x_t, t).sample
            x0 = scheduler.step(out, t, x_t, generator=gen).pred_original_sample
            alpha_bar = scheduler.alphas_cumprod[t]
            ours = D(x_t / alpha_bar.sqrt(), float(sigma_of(alpha_bar)))
        assert x0.abs().max() > 0.1  # not a trivial output
        worst = max(worst, scaled_error(ours, x0))
    assert worst < 1e-5, worst
    alpha_bar = scheduler.alphas_cumprod
    assert config.process.sigma_min == pytest.approx(float(sigma_of(alpha_bar[0])), rel=1e-12)
    assert config.process.sigma_max == pytest.approx(float(sigma_of(alpha_bar[-1])), rel=1e-12)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddim_is_euler_in_sigma(tmp_path, prediction):
    """DDIM with η = 0 over timesteps t_0 > … > t_{K−1} (and ᾱ = 1 after the last:
    set_alpha_to_one) from x_{t_0} = z is cmkit's Euler solve over σ_k = σ(t_k), then σ = 0,
    from x_σ = z/√ᾱ_{t_0}; it ends at σ = 0, where x_σ is x₀ in both coordinates.

    One DDIM step x_{t'} = √ᾱ_{t'}·x̂₀ + √(1 − ᾱ_{t'})·ε̂, ε̂ = (x_t − √ᾱ_t·x̂₀)/√(1 − ᾱ_t),
    divided by √ᾱ_{t'} reads x_σ' = x̂₀ + σ'·(x_σ − x̂₀)/σ = x_σ + (σ' − σ)·(x_σ − D)/σ:
    an Euler step of dx/dσ = (x − D)/σ. The sampler's timesteps: the default "leading"
    spacing, whose previous timestep t − T/K is the next t_k."""
    scheduler = diffusers.DDIMScheduler(
        prediction_type=prediction, clip_sample=False, set_alpha_to_one=True
    )
    unet = tiny_unet(seed=2)
    _, D = teacher(imported(tmp_path, unet, scheduler))
    scheduler.set_timesteps(STEPS)
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    x = z
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    alpha_bar = scheduler.alphas_cumprod[scheduler.timesteps]
    sigmas = torch.cat([sigma_of(alpha_bar), torch.zeros(1, dtype=torch.float64)])
    ours = solve(D, z / alpha_bar[0].sqrt(), sigmas, "euler")
    assert x.abs().max() > 0.1
    assert scaled_error(ours, x) < 1e-4


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_euler_scheduler_is_euler_in_sigma(tmp_path, prediction):
    """EulerDiscreteScheduler works in x_σ already: its sampler is cmkit's Euler solve over
    its own σ list (integer timesteps with "leading" spacing, its final σ 0)."""
    scheduler = diffusers.EulerDiscreteScheduler(
        prediction_type=prediction, timestep_spacing="leading"
    )
    unet = tiny_unet(seed=4)
    _, D = teacher(imported(tmp_path, unet, scheduler))
    scheduler.set_timesteps(STEPS)
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    x = z * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(scheduler.scale_model_input(x, t), t).sample
            x = scheduler.step(out, t, x).prev_sample
    ours = solve(D, z * scheduler.init_noise_sigma, scheduler.sigmas.double(), "euler")
    assert scaled_error(ours, x) < 1e-4


def test_class_labels_and_the_null_label(tmp_path):
    """`labels` go in as class_labels; none and no null label is an error; the null label
    (the last id) stands in for them when the import names one, and guided distillation of
    such a teacher runs on the data's labels."""
    unet = tiny_unet(seed=6, num_class_embeds=10)
    scheduler = diffusers.DDIMScheduler(clip_sample=False)
    conditional = imported(tmp_path / "a", unet, scheduler)
    config, D = teacher(conditional)
    assert config.data.classes == tuple("0123456789")  # digits' own names, the UNet's ids
    t = 500
    alpha_bar = scheduler.alphas_cumprod[t]
    x_t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    x_sigma, sigma = x_t / alpha_bar.sqrt(), float(sigma_of(alpha_bar))
    with torch.no_grad():
        for labels in (torch.tensor([0, 1]), torch.tensor([9, 9])):
            eps = unet(x_t, t, class_labels=labels).sample
            expected = (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
            assert scaled_error(D(x_sigma, sigma, labels=labels), expected) < 1e-5
        swapped = D(x_sigma, sigma, labels=torch.tensor([1, 0]))
        assert (swapped - D(x_sigma, sigma, labels=torch.tensor([0, 1]))).abs().max() > 1e-2
        with pytest.raises(UserError, match="--null-label"):
            D(x_sigma, sigma)
    unet = tiny_unet(seed=6, num_class_embeds=11)
    with_null = imported(tmp_path / "b", unet, scheduler, "--null-label", 10)
    config, D = teacher(with_null)
    assert len(config.data.classes) == 10 and config.network.kwargs["null_label"] == 10
    with torch.no_grad():
        assert torch.equal(D(x_sigma, sigma), D(x_sigma, sigma, labels=torch.tensor([10, 10])))
    distill = ["distill", "--teacher", with_null, "--steps", 2, "--num-scales", 4, *TINY]
    assert run_cli(*distill, "--guidance", "1.5", "--out", tmp_path / "guided") == 0
    no_null = ["distill", "--teacher", conditional, "--guidance", "1", "--out", tmp_path / "x"]
    assert run_cli(*no_null, *TINY) == 2


def test_distill_and_sample_an_imported_teacher(tmp_path):
    run = imported(tmp_path, tiny_unet(seed=8), diffusers.DDIMScheduler())
    config = json.loads((run / "config.json").read_text())
    assert config["kind"] == "teacher" and config["network"]["type"] == "diffusers-vp"
    assert config["training"]["options"]["scheduler"] == "DDIMScheduler"
    assert config["sampling"] == {"solver": "heun", "steps": 18}
    student = tmp_path / "student"
    distill = ["distill", "--teacher", run, "--out", student, "--steps", 3, "--num-scales", 4]
    assert run_cli(*distill, *TINY) == 0
    for model in (run, student):
        out = tmp_path / f"{model.name}.npy"
        assert run_cli("sample", "--model", model, "--n", 4, "--out", out, "--no-progress") == 0
        x = np.load(out)
        assert x.shape == (4, 1, 8, 8) and np.isfinite(x).all()


@pytest.fixture(scope="module")
def good_pipeline(tmp_path_factory) -> Path:
    return save_pipeline(
        tmp_path_factory.mktemp("good") / "pipe", tiny_unet(), diffusers.DDIMScheduler()
    )


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _bin_only(pipe: Path) -> None:
    unet = pipe / "unet"
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    (unet / "diffusion_pytorch_model.bin").write_bytes(b"not read")


def _other_unet(pipe: Path) -> None:
    _edit_json(pipe / "model_index.json", unet=["diffusers", "UNet2DConditionModel"])


def _two_outputs(pipe: Path) -> None:
    shutil.rmtree(pipe)
    save_pipeline(pipe, tiny_unet(out_channels=2), diffusers.DDIMScheduler())


REFUSALS = {  # what is done to a good folder -> what the one-line error says
    "missing folder": (lambda p: shutil.rmtree(p), "is not a folder"),
    "no model_index": (lambda p: (p / "model_index.json").unlink(), "model_index.json"),
    "other unet": (_other_unet, "takes a diffusers UNet2DModel"),
    "other scheduler": (
        lambda p: _edit_json(
            p / "scheduler" / "scheduler_config.json", _class_name="PNDMScheduler"
        ),
        "'PNDMScheduler'; import-teacher takes DDPMScheduler",
    ),
    "prediction type": (
        lambda p: _edit_json(p / "scheduler" / "scheduler_config.json", prediction_type="flow"),
        "prediction_type 'flow'",
    ),
    "zero terminal SNR": (
        lambda p: _edit_json(
            p / "scheduler" / "scheduler_config.json", rescale_betas_zero_snr=True
        ),
        "σ infinite",
    ),
    "in != out channels": (_two_outputs, "needs in = out"),
    ".bin only": (_bin_only, "from safetensors"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_are_one_line(good_pipeline, tmp_path, capsys, case):
    change, needle = REFUSALS[case]
    pipe = tmp_path / "pipe"
    shutil.copytree(good_pipeline, pipe)
    change(pipe)
    args = ["import-teacher", "--pipeline", pipe, "--data", "digits", "--out", tmp_path / "run"]
    assert run_cli(*args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert needle in line, line
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--data", "moons"], "--data moons holds samples of shape (2,); the UNet makes (1, 8, 8)"),
        (["--data", "digits", "--null-label", "0"], "--null-label applies to class-conditional"),
        (["--data", "digits", "--out-exists"], "already holds a run"),
    ],
)
def test_bad_options_are_one_line(good_pipeline, tmp_path, capsys, extra, needle):
    out = tmp_path / "run"
    if "--out-exists" in extra:
        extra = extra[:-1]
        assert run_cli("import-teacher", "--pipeline", good_pipeline, *extra, "--out", out) == 0
        capsys.readouterr()
    assert run_cli("import-teacher", "--pipeline", good_pipeline, *extra, "--out", out) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert needle in line, line


def test_null_label_must_be_the_last_class_id(tmp_path, capsys):
    pipe = save_pipeline(
        tmp_path / "pipe", tiny_unet(num_class_embeds=3), diffusers.DDIMScheduler()
    )
    args = ["import-teacher", "--pipeline", pipe, "--data", "digits", "--out", tmp_path / "r"]
    assert run_cli(*args, "--null-label", 0) == 2
    assert "--null-label must be the UNet's last class id, 2, got 0" in capsys.readouterr().err
    assert run_cli(*args, "--null-label", 2) == 2  # 2 classes left; digits have 10
    assert "digits has labels of 10 classes; the UNet knows 2" in capsys.readouterr().err
