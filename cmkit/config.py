"""The run config: everything needed to rebuild a run's model and sampler, typed.

This module owns config.json: it is written by `RunConfig.to_dict()` and read by
`RunConfig.from_dict()` (through runs.load_config) and nowhere else. Sections:
  kind       "teacher" (a denoiser), "consistency" (a consistency function) or "flowmap"
             (a flow map F(x_t, t → s), cmkit.flowmap)
  process    the noise process (cmkit.process), rebuilt by its one factory
  network    the plain network's type and keyword arguments (cmkit.networks.zoo)
  data       the data spec, held-out fraction, sample shape and scaling; for a latent run
             also the autoencoder (`latent`), and `shape` is then the latents' shape
  training   the recipe, the loop's settings and the recipe's own options
  sampling   the teacher's solver and grid, tuned times, the final training N, diffusers flags

Format 1 (cmkit 0.1) kept the recipe's options beside the loop's settings and did not store
the final N; it is upgraded on read, and what cannot be upgraded is refused in one line.
"""

from dataclasses import asdict, dataclass, field

from cmkit.errors import UserError
from cmkit.noise import CTCurriculum, ICTCurriculum
from cmkit.process import Process, process_from_dict
from cmkit.units import Scaler

FORMAT = 2
KINDS = ("teacher", "consistency", "flowmap")
LATENT_KINDS = ("builtin", "diffusers")  # cmkit train-autoencoder's, diffusers' AutoencoderKL
LOOP_KEYS = ("steps", "batch_size", "lr", "ema_rate", "seed")
FORMAT_1_GRAD_CLIP = 1.0  # format 1 runs were all clipped at 1.0


@dataclass
class NetworkSpec:
    """A plain network F(x, c_noise, **cond): its type name and constructor arguments."""

    type: str
    kwargs: dict = field(default_factory=dict)


@dataclass
class LatentSection:
    """The autoencoder a latent run trains in (cmkit.latent): images are encoded to the
    posterior mean z and the network sees z·scaling_factor; sampling decodes back.

    kind "builtin" (a folder of cmkit train-autoencoder) or "diffusers" (an AutoencoderKL
    folder); sha256 of its weights file, so a changed autoencoder is refused, not used."""

    kind: str
    path: str  # the folder, absolute
    sha256: str
    scaling_factor: float  # σ_data / std of the encoded training latents
    image_shape: tuple[int, ...]  # (C, H, W) of the images, what sampling returns


@dataclass
class DataSection:
    """Where the data came from, which part was held out, and its map to model units.

    `scaler` maps the user's data to model units (images to [−1, 1]); `shape` is what the
    network sees: the samples' shape, or for a latent run the latents' (`latent`)."""

    spec: str
    holdout: float
    shape: tuple[int, ...]
    scaler: Scaler
    key: str | None = None  # the .npz array the user named (None: found by name)
    layout: str | None = None  # "nchw" or "nhwc" as the user said (None: detected)
    classes: tuple[str, ...] | None = None  # class names of a labelled run (None: unlabelled)
    label_key: str | None = None  # the .npz label array the user named (None: found by name)
    latent: LatentSection | None = None  # the autoencoder of a latent run (None: pixels)
    lazy: bool = False  # an image folder decoded a batch at a time (cmkit.folder)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of a sample in the user's units: the images of a latent run."""
        return self.shape if self.latent is None else self.latent.image_shape


@dataclass
class TrainingSection:
    """The recipe and the loop's settings; `options` are the recipe's own (its dataclass).

    Loop settings are None for runs that were not trained here (imported from diffusers)."""

    recipe: str
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    ema_rate: float | None = None
    seed: int | None = None
    precision: str = "fp32"  # the network forwards' autocast: fp32 (none) or bf16
    options: dict = field(default_factory=dict)


@dataclass
class SamplingSection:
    """How the run samples by default.

    solver/steps: a teacher's ODE solver and grid points. times: tuned intermediate times per
    step count (with their tuning notes). num_scales: N of the final training grid (what a
    diffusers scheduler needs). clip_denoised/num_train_timesteps: runs from diffusers."""

    solver: str | None = None
    steps: int | None = None
    times: dict[str, list[float]] = field(default_factory=dict)
    tuning: dict = field(default_factory=dict)
    num_scales: int | None = None
    clip_denoised: bool = False
    num_train_timesteps: int | None = None


@dataclass
class RunConfig:
    kind: str
    process: Process
    network: NetworkSpec
    data: DataSection
    training: TrainingSection
    sampling: SamplingSection = field(default_factory=SamplingSection)

    def to_dict(self) -> dict:
        """The JSON form written as config.json (a pixel run's data has no `latent` key)."""
        training = asdict(self.training)
        sampling = {k: v for k, v in asdict(self.sampling).items() if v not in (None, {}, False)}
        data = {k: v for k, v in asdict(self.data).items() if k != "latent" or v is not None}
        if not self.data.lazy:  # written only when set: the runs before it read in memory
            del data["lazy"]
        if self.data.latent is not None:
            data["latent"]["image_shape"] = list(self.data.latent.image_shape)
        return {
            "format": FORMAT,
            "kind": self.kind,
            "process": self.process.to_dict(),
            "network": asdict(self.network),
            "data": {
                **data,
                "shape": list(self.data.shape),
                "scaler": self.data.scaler.to_dict(),
                "classes": None if self.data.classes is None else list(self.data.classes),
            },
            "training": training,
            "sampling": sampling,
        }

    @classmethod
    def from_dict(cls, d, source: str = "config") -> "RunConfig":
        """Read config.json's value (format 1 or 2); a UserError naming `source` otherwise."""
        if not isinstance(d, dict) or d.get("format") not in (1, FORMAT):
            found = d.get("format") if isinstance(d, dict) else None
            raise UserError(
                f"{source} has run format {found!r}; this cmkit reads formats 1 and {FORMAT}"
            )
        if d.get("kind") not in KINDS:
            raise UserError(f"{source} is a {d.get('kind')!r} run; expected one of {KINDS}")
        try:
            if d["format"] == 1:
                d = _upgrade_format_1(d, source)
            data, network = d["data"], d["network"]
            sampling = SamplingSection(**d.get("sampling", {}))
            return cls(
                kind=d["kind"],
                process=process_from_dict(d["process"]),
                network=NetworkSpec(network["type"], dict(network.get("kwargs", {}))),
                data=DataSection(
                    str(data["spec"]),
                    float(data["holdout"]),
                    tuple(int(n) for n in data["shape"]),
                    Scaler.from_dict(data["scaler"]),
                    data.get("key"),
                    data.get("layout"),
                    _classes(data.get("classes")),
                    data.get("label_key"),
                    _latent(data.get("latent")),
                    bool(data.get("lazy", False)),
                ),
                training=TrainingSection(**d["training"]),
                sampling=sampling,
            )
        except UserError:
            raise
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise UserError(f"{source} is not a complete cmkit run config ({err!r})") from None


def _classes(names) -> tuple[str, ...] | None:
    return None if names is None else tuple(str(n) for n in names)


def _latent(entry) -> LatentSection | None:
    if entry is None:
        return None
    if entry["kind"] not in LATENT_KINDS:
        raise ValueError(f"latent kind {entry['kind']!r} is not one of {LATENT_KINDS}")
    return LatentSection(
        str(entry["kind"]),
        str(entry["path"]),
        str(entry["sha256"]),
        float(entry["scaling_factor"]),
        tuple(int(n) for n in entry["image_shape"]),
    )


def _upgrade_format_1(d: dict, source: str) -> dict:
    """Format 1 -> 2: split the recipe's options from the loop's settings, store the final N."""
    old = dict(d.get("training", {}))
    loop = {k: old.pop(k) for k in LOOP_KEYS if k in old}
    recipe = old.pop("recipe", "teacher" if d.get("kind") == "teacher" else None)
    if recipe == "imported":
        training = {"recipe": recipe, "options": old}
    elif recipe in ("teacher", "cd"):
        options = {**old, "grad_clip": FORMAT_1_GRAD_CLIP}
        training = {"recipe": recipe, **loop, "options": options}
    elif recipe in ("ct", "ict"):
        options = {**_ct_options_1(recipe, old, source), "grad_clip": FORMAT_1_GRAD_CLIP}
        training = {"recipe": recipe, **loop, "options": options}
    else:
        raise UserError(f"{source}: format 1 run with unknown recipe {recipe!r}")
    sampling = dict(d.get("sampling", {}))
    if d.get("kind") == "consistency" and "num_scales" not in sampling:
        sampling["num_scales"] = _final_scales_1(training)
    return {**d, "format": FORMAT, "training": training, "sampling": sampling}


def _ct_options_1(recipe: str, old: dict, source: str) -> dict:
    """Format 1's shared CT/iCT option bag as the recipe's own options, defaults filled in."""
    ict = recipe == "ict"
    curriculum = ICTCurriculum if ict else CTCurriculum  # format 1's defaults were theirs
    options = {
        "distance": old.get("distance") or ("pseudo-huber" if ict else "l2"),
        "s0": old.get("s0") or curriculum.s0,
        "s1": old.get("s1") or curriculum.s1,
    }
    weighting = old.get("weighting") or ("ict" if ict else "uniform")
    if ict:
        keys = ("pairs", "p_mean", "p_std")
        return {**options, **{k: old[k] for k in keys if k in old}, "weighting": weighting}
    if old.get("pairs", "uniform") != "uniform" or weighting != "uniform":
        raise UserError(
            f"{source}: a format 1 ct run with pairs {old.get('pairs')!r} and weighting "
            f"{weighting!r} has no format {FORMAT} form (ct uses uniform pairs and λ = 1)"
        )
    return {
        **options,
        "mu0": old.get("mu0", CTCurriculum.mu0),
        "mu_variant": old.get("mu_variant", "paper"),
    }


def _final_scales_1(training: dict) -> int | None:
    """The final N of a format 1 run: CD's fixed N or the last N(k) of its curriculum."""
    options, steps = training.get("options", {}), training.get("steps")
    if training["recipe"] == "cd":
        return options.get("num_scales")
    if training["recipe"] == "ict":
        return ICTCurriculum(steps, options["s0"], options["s1"]).scales(steps)
    if training["recipe"] == "ct":
        return CTCurriculum(steps, options["s0"], options["s1"]).scales(steps)
    return None
