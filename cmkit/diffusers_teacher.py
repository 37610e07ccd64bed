"""Import a DDPM-family diffusers folder as a cmkit teacher run (`cmkit import-teacher`).

A folder written by save_pretrained with a UNet2DModel and a DDPMScheduler, DDIMScheduler or
EulerDiscreteScheduler holds a VP diffusion model; networks.diffusers_vp evaluates it as an
EDM denoiser D(x_σ, σ) on σ_t = √((1 − ᾱ_t)/ᾱ_t), so `distill` and `sample` take it like a
teacher trained here, on σ ∈ [σ_0, σ_{T−1}] of its own table. DDIM with η = 0 is Euler's
method in σ on this denoiser, step for step (tests/test_import_teacher.py). The data the
teacher was trained on is the user's (`data_spec`), scaled as cmkit scales images (its min
and max to −1 and 1: diffusers' x/127.5 − 1 for 8-bit images spanning 0..255). Weights come
from safetensors only, and nothing is downloaded.
"""

import math
from pathlib import Path

from cmkit.config import DataSection, NetworkSpec, RunConfig, SamplingSection, TrainingSection
from cmkit.diffusers_io import load_unet
from cmkit.errors import OptionError, UserError
from cmkit.networks.diffusers_unet import require_diffusers
from cmkit.networks.diffusers_vp import PREDICTION_TYPES, SCHEDULE_KEYS, vp_log_sigmas
from cmkit.networks.zoo import build_network
from cmkit.noise import SIGMA_DATA
from cmkit.process import EDMProcess
from cmkit.runs import read_json, save_config, save_tensors
from cmkit.solvers import DEFAULT_GRID_POINTS, DEFAULT_SOLVER
from cmkit.training_data import load_training_data

SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler")


def import_teacher(
    pipeline_dir: str | Path,
    out_dir: str | Path,
    data_spec: str,
    holdout: float = 0.1,
    null_label: int | None = None,
    data_key: str | None = None,
    layout: str | None = None,
    label_key: str | None = None,
) -> Path:
    """Write the teacher run `out_dir` (config.json, ema.safetensors) for the folder's UNet.

    A class-conditional UNet (num_class_embeds K) keeps its class ids as the run's classes,
    "0".."K−1" but `null_label`, the id that stands in where no labels are given and that
    classifier-free guidance needs: none by default (an imported UNet has no unconditional
    class unless one is named), else the last id, as cmkit's own ∅ is. The data's labels
    are read with it (`--labels`), since distillation draws a label with each sample.
    """
    src, out = Path(pipeline_dir), Path(out_dir)
    if (out / "config.json").exists():
        raise UserError(f"{out} already holds a run; pick another --out")
    scheduler = _scheduler_config(src)
    unet = _checked_unet(src)
    classes = _classes(unet.config.num_class_embeds, null_label)
    network = _network(unet, scheduler, src, null_label)
    data = _data_section(
        data_spec, holdout, (data_key, layout, label_key), _shape(unet.config), classes
    )
    training = TrainingSection(
        "imported",
        options={
            "source": str(src.resolve()),
            "scheduler": scheduler["_class_name"],
            "prediction_type": network.kwargs["prediction_type"],
        },
    )
    sampling = SamplingSection(solver=DEFAULT_SOLVER, steps=DEFAULT_GRID_POINTS)
    process = _process(network.kwargs["schedule"], src)
    config = RunConfig("teacher", process, network, data, training, sampling)
    net = build_network(network)
    net.unet.load_state_dict(unet.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / "ema.safetensors", net.state_dict())
    save_config(out, config)
    return out


def _scheduler_config(src: Path) -> dict:
    """The folder's scheduler config, if its model_index names a UNet2DModel and the scheduler
    is one whose ᾱ table and prediction type convert to σ."""
    if not src.is_dir():
        raise UserError(f"{src} is not a folder; expected one written by save_pretrained")
    index = read_json(src / "model_index.json")
    unet = index.get("unet") if isinstance(index, dict) else None
    if unet != ["diffusers", "UNet2DModel"]:
        raise UserError(
            f"{src / 'model_index.json'} names unet {unet!r}; import-teacher takes a "
            "diffusers UNet2DModel"
        )
    path = src / "scheduler" / "scheduler_config.json"
    config = read_json(path)
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name not in SCHEDULERS:
        raise UserError(f"{path} describes {name!r}; import-teacher takes {', '.join(SCHEDULERS)}")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise UserError(
            f"{path}: prediction_type {prediction!r}; import-teacher takes "
            f"{', '.join(PREDICTION_TYPES)}"
        )
    if config.get("rescale_betas_zero_snr"):
        raise UserError(
            f"{path}: rescale_betas_zero_snr makes σ infinite at the last timestep; an EDM "
            "teacher needs a finite σ_max"
        )
    if config.get("timestep_type") == "continuous" and prediction == "v_prediction":
        raise UserError(
            f"{path}: timestep_type 'continuous' feeds the UNet ln(σ)/4, not a DDPM timestep; "
            "import-teacher takes discrete timesteps"
        )
    return config


def _network(unet, scheduler: dict, src: Path, null_label: int | None) -> NetworkSpec:
    """The diffusers-vp spec: the UNet's config, the schedule of ᾱ_t, what the UNet predicts."""
    return NetworkSpec(
        "diffusers-vp",
        {
            "unet": {k: v for k, v in unet.config.items() if not k.startswith("_")},
            "schedule": _schedule(scheduler, src),
            "prediction_type": scheduler.get("prediction_type", "epsilon"),
            "sigma_data": SIGMA_DATA,
            "null_label": null_label,
        },
    )


def _schedule(scheduler: dict, src: Path) -> dict:
    """The beta-schedule fields, resolved by diffusers (its defaults where the file has none),
    so the run's network spec rebuilds ᾱ_t by itself."""
    given = {k: scheduler[k] for k in SCHEDULE_KEYS if k in scheduler}
    try:
        resolved = require_diffusers().DDPMScheduler(**given).config
    except (NotImplementedError, TypeError, ValueError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise UserError(f"{src}: cannot rebuild the scheduler's ᾱ table: {reason}") from None
    return {k: resolved[k] for k in SCHEDULE_KEYS}


def _checked_unet(src: Path):
    """The folder's UNet2DModel (safetensors only), if cmkit can use its output as a denoiser."""
    unet = load_unet(src / "unet")
    config = unet.config
    if config.in_channels != config.out_channels:
        raise UserError(
            f"{src}: the UNet has {config.in_channels} input and {config.out_channels} output "
            "channels; import-teacher needs in = out (a learned variance is not supported)"
        )
    if config.class_embed_type is not None:
        raise UserError(
            f"{src}: class_embed_type {config.class_embed_type!r} embeds no class ids; "
            "import-teacher takes unconditional UNets and ones with num_class_embeds"
        )
    return unet


def _classes(num_class_embeds: int | None, null_label: int | None) -> tuple[str, ...] | None:
    """The run's class names: the UNet's class ids but the null label (None: unconditional)."""
    if num_class_embeds is None:
        if null_label is not None:
            raise OptionError("null_label", "applies to class-conditional UNets; this one is not")
        return None
    if null_label is not None and null_label != num_class_embeds - 1:
        raise OptionError(
            "null_label",
            f"must be the UNet's last class id, {num_class_embeds - 1}, got {null_label}: class "
            "ids index the run's classes, and ∅ comes after them",
        )
    return tuple(str(i) for i in range(num_class_embeds) if i != null_label)


def _shape(unet_config) -> tuple[int, int, int]:
    side = unet_config.sample_size
    height, width = (side, side) if isinstance(side, int) else side
    return unet_config.in_channels, height, width


def _data_section(
    spec: str,
    holdout: float,
    reading: tuple[str | None, str | None, str | None],
    shape: tuple[int, ...],
    classes: tuple[str, ...] | None,
) -> DataSection:
    """The data section of the teacher's training data, which must be what the UNet makes,
    with its labels (see cmkit.labels) when the UNet is class-conditional: distillation
    draws a label with each sample. The classes are the UNet's; the data's names are kept
    when it names as many. `reading`: the data's .npz key, layout and label key."""
    key, layout, label_key = reading
    labelled = classes is not None
    _, section = load_training_data(
        spec, holdout, SIGMA_DATA, key, layout, labelled, label_key if labelled else None
    )
    if section.shape != shape:
        raise OptionError(
            "data", f"{spec} holds samples of shape {section.shape}; the UNet makes {shape}"
        )
    if labelled:
        if len(section.classes) > len(classes):
            raise OptionError(
                "data",
                f"{spec} has labels of {len(section.classes)} classes; the UNet knows "
                f"{len(classes)}",
            )
        if len(section.classes) < len(classes):
            section.classes = classes
    return section


def _process(schedule: dict, src: Path) -> EDMProcess:
    """EDM on the σ range of the training timesteps, σ_0 to σ_{T−1}."""
    log_sigmas = vp_log_sigmas(schedule)
    sigma_min, sigma_max = math.exp(float(log_sigmas[0])), math.exp(float(log_sigmas[-1]))
    if not (math.isfinite(sigma_max) and 0 < sigma_min < sigma_max):
        raise UserError(f"{src}: the scheduler's σ range [{sigma_min}, {sigma_max}] is unusable")
    return EDMProcess(sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=SIGMA_DATA)
