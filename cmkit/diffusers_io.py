"""Exchange consistency runs with diffusers: a ConsistencyModelPipeline folder, and back.

An EDM consistency run whose backbone is a diffusers UNet2DModel computes exactly what
ConsistencyModelPipeline computes: the pipeline feeds the UNet x/√(σ²+σ_d²) and 250·ln σ
(cmkit: c_in·x and 1000·c_noise, see networks.diffusers_unet) and combines with the σ_min-shifted
c_skip and c_out of param.ConsistencyFunction. It starts from σ_max·randn(B, C, H, W) drawn from
the caller's generator and, with more than one step, draws one randn of that shape per step:
the order in which `generate` draws its noise, so one seed gives the same images in both.
Exported folders carry cmkit.json (the run's config: data scaling, sampling settings), so an
import gives the run back unchanged; a folder from elsewhere gets pixel units 0..255.
"""

import json
import math
from pathlib import Path

import torch

from cmkit.config import DataSection, NetworkSpec, RunConfig, TrainingSection
from cmkit.errors import OptionError, UserError
from cmkit.generate import Model, cm_times
from cmkit.networks.diffusers_unet import require_diffusers
from cmkit.networks.zoo import build_network
from cmkit.process import EDMProcess
from cmkit.runs import load_config, load_network, read_json, save_config, save_json, save_tensors
from cmkit.sampling import check_times
from cmkit.units import Scaler

SIDECAR = "cmkit.json"
PIXEL_SCALER = Scaler(shift=(127.5,), scale=(127.5,))  # 0..255 <-> [−1, 1]


def check_exportable(run_dir: str | Path, config: RunConfig) -> None:
    """Refuse runs ConsistencyModelPipeline cannot run exactly, saying why."""
    if config.kind != "consistency":
        raise UserError(
            f"{run_dir} is a teacher run; export-diffusers takes consistency runs "
            "(the pipeline applies the consistency parameterisation)"
        )
    if config.data.latent is not None:
        raise UserError(
            f"{run_dir} samples in a latent space; ConsistencyModelPipeline makes pixels "
            "(it has no autoencoder to decode with)"
        )
    if config.process.diffusers_scheduler() is None:
        raise UserError(
            f"{run_dir} uses the {config.process.name} process; "
            "ConsistencyModelPipeline samples the EDM process only"
        )
    network = config.network
    if network.type != "diffusers-unet":
        raise UserError(
            f"{run_dir} has a {network.type} network; only runs trained with "
            "--backbone diffusers-unet export (train or distill one with that flag)"
        )
    channels, height, width = config.data.shape
    if height != width or network.kwargs.get("sample_size") != height:
        raise UserError(
            f"{run_dir} makes {height}x{width} images with UNet sample_size "
            f"{network.kwargs.get('sample_size')}; ConsistencyModelPipeline needs square "
            "images of side sample_size"
        )


def export_pipeline(run_dir: str | Path, out_dir: str | Path, num_scales: int | None = None):
    """Write a folder that ConsistencyModelPipeline.from_pretrained(out_dir) loads offline.

    The scheduler's N (num_train_timesteps) defaults to the run's final training N; it only
    decides which σ the pipeline can use (its N-point Karras grid). Returns (model, N).
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise OptionError("out", f"{out} exists and is not empty; pick a new folder")
    config = load_config(run_dir)
    check_exportable(run_dir, config)
    sampling = config.sampling
    n = num_scales or sampling.num_train_timesteps or sampling.num_scales
    if n is None or n < 2:
        raise OptionError("num_train_timesteps", f"must be >= 2, got {n}")
    config, net = load_network(run_dir, "ema")
    diffusers = require_diffusers()
    scheduler = diffusers.CMStochasticIterativeScheduler(
        num_train_timesteps=n,
        clip_denoised=sampling.clip_denoised,
        **config.process.diffusers_scheduler(),
    )
    pipe = diffusers.ConsistencyModelPipeline(unet=net.unet, scheduler=scheduler)
    pipe.save_pretrained(out, safe_serialization=True)
    config.sampling.num_train_timesteps = n
    save_json(out / SIDECAR, config.to_dict())
    return Model(config, config.process.consistency(net)), n


def pipeline_timesteps(process: EDMProcess, n: int, times: list[float]) -> list[int]:
    """The `timesteps=[...]` with which ConsistencyModelPipeline samples at σ_max and then at
    each τ of `times` (descending): indices into its descending N-point Karras grid, ending at 0.

    A τ off that grid cannot be passed to the pipeline; the error names the nearest point.
    """
    check_times(process, times)
    grid = process.grid(n).flip(0)  # the pipeline's timestep i is grid[i]
    indices = []
    for tau in times:
        i = int(torch.argmin((grid - tau).abs()))
        if not math.isclose(grid[i], tau, rel_tol=1e-6):
            raise UserError(
                f"τ = {tau:g} is not on the pipeline's {n}-point Karras grid (nearest: "
                f"timestep {i}, τ = {float(grid[i])!r})"
            )
        indices.append(i)
    return [*reversed(indices), 0]


def pipeline_calls(model: Model, n: int) -> list[str]:
    """How to reproduce `cmkit sample --steps K --seed S` with the exported pipeline, for one
    step, two steps and every step count with stored times."""
    lines = []
    for steps in sorted({1, 2, *map(int, model.config.sampling.times)}):
        try:
            timesteps = pipeline_timesteps(model.process, n, cm_times(model, steps, None))
            call = f"pipe(num_inference_steps=None, timesteps={timesteps}, generator=g)"
        except UserError as err:
            call = f"not expressible: {err}"
        lines.append(f"cmkit sample --steps {steps} --seed S  ==  {call}")
    return lines


def import_pipeline(pipeline_dir: str | Path, out_dir: str | Path) -> Path:
    """Turn a ConsistencyModelPipeline folder into a cmkit consistency run (ema weights only)."""
    src, out = Path(pipeline_dir), Path(out_dir)
    if (out / "config.json").exists():
        raise UserError(f"{out} already holds a run; pick another --out")
    _read_json(src / "model_index.json", "ConsistencyModelPipeline")
    scheduler = _read_json(src / "scheduler" / "scheduler_config.json", "CMStochastic")
    process = _process_of(scheduler, src)
    unet = load_unet(src / "unet")
    kwargs = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    if kwargs.get("num_class_embeds") or kwargs["in_channels"] != kwargs["out_channels"]:
        raise UserError(f"{src}: cmkit imports unconditional UNets with in = out channels")
    network = NetworkSpec("diffusers-unet", kwargs)
    net = build_network(network)
    net.unet.load_state_dict(unet.state_dict())
    config = _imported_config(src, process, network, scheduler)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / "ema.safetensors", net.state_dict())
    save_config(out, config)
    return out


def load_unet(folder: Path):
    """The folder's UNet2DModel from safetensors only: a pickled .bin is refused, never read."""
    diffusers = require_diffusers()
    try:
        return diffusers.UNet2DModel.from_pretrained(
            folder, local_files_only=True, low_cpu_mem_usage=False, use_safetensors=True
        )
    except (OSError, ValueError) as err:  # missing or unreadable files, bad configs
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot load the UNet in {folder} from safetensors: {reason}") from None


def _read_json(path: Path, class_prefix: str) -> dict:
    """A diffusers config file whose _class_name starts with class_prefix."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    if not str(config.get("_class_name", "")).startswith(class_prefix):
        raise UserError(f"{path} describes {config.get('_class_name')!r}; expected {class_prefix}")
    return config


def _process_of(scheduler: dict, src: Path) -> EDMProcess:
    if scheduler.get("s_noise", 1.0) != 1.0:
        raise UserError(f"{src}: s_noise = {scheduler['s_noise']}; cmkit re-noises with 1.0")
    keys = ("sigma_min", "sigma_max", "rho", "sigma_data")
    return EDMProcess(**{k: float(scheduler[k]) for k in keys if k in scheduler})


def _imported_config(
    src: Path, process: EDMProcess, network: NetworkSpec, scheduler: dict
) -> RunConfig:
    """config.json for an imported pipeline: cmkit.json's data, training and sampling sections
    when the folder came from export-diffusers, pixel units 0..255 otherwise."""
    side = network.kwargs["sample_size"]
    height, width = (side, side) if isinstance(side, int) else side
    shape = (network.kwargs["in_channels"], height, width)
    if (src / SIDECAR).is_file():
        config = RunConfig.from_dict(read_json(src / SIDECAR), str(src / SIDECAR))
        if config.data.shape != shape:
            raise UserError(
                f"{src / SIDECAR} says shape {config.data.shape}; the UNet makes {shape}"
            )
        config.process, config.network = process, network
    else:
        data = DataSection(f"diffusers:{src.resolve()}", 0.0, shape, PIXEL_SCALER)
        training = TrainingSection("imported", options={"source": str(src.resolve())})
        config = RunConfig("consistency", process, network, data, training)
    config.sampling.clip_denoised = bool(scheduler.get("clip_denoised", True))
    config.sampling.num_train_timesteps = int(scheduler.get("num_train_timesteps", 40))
    return config
