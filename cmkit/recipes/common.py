"""What every recipe shares: the run's options, its seeded start from data (read by
cmkit.training_data), a fresh or resumed state, the fit.

A recipe module (teacher, cd, ct, ict) assembles its loss and config from its own options
dataclass and calls these; nothing here knows which recipe it serves.
"""

import copy
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cmkit import latent as latentlib
from cmkit.batch import Samples
from cmkit.config import DataSection, NetworkSpec, RunConfig, SamplingSection, TrainingSection
from cmkit.distributed import World
from cmkit.engine import check_precision, make_engine
from cmkit.errors import OptionError, UserError
from cmkit.guidance import GUIDANCE_DIM, GuidedDenoiser, WithGuidance, check_guidance
from cmkit.losses import make_distance
from cmkit.networks.zoo import NO_NULL_LABEL, build_for_data, default_network, has_null_label
from cmkit.noise import MAX_SCALES
from cmkit.process import Process
from cmkit.runs import (
    finish_checkpoint,
    load_config,
    restore_state,
    resumable,
    save_checkpoint,
    save_history,
)
from cmkit.train import TrainState, check_on_nonfinite, train, trainable_parameters
from cmkit.training_data import load_training_data

# Defaults sized for 2 CPU cores; their measured results are in BENCHMARKS.md.
VECTOR_DEFAULTS = {"teacher_steps": 6000, "cm_steps": 6000, "batch_size": 512, "lr": 1e-3}
IMAGE_DEFAULTS = {"teacher_steps": 4000, "cm_steps": 3000, "batch_size": 64, "lr": 4e-4}
LR_MAX = torch.finfo(torch.float32).max / 10
# A student that starts from its teacher's weights (ECT, sCD) fine-tunes at a quarter of the
# data kind's rate: 1e-4 on images, ECT's published rate. On digits, 3000 ECT steps at 4e-4
# took one-step FD-digitsnet to 2.26 by step 2250 and back up to 5.45; at 1e-4 it kept
# falling (1.66); sCD's 2-step FD after 2000 steps was 3.2 at 1e-4 against 11.0 at 4e-4.
FINE_TUNE_LR_SCALE = 0.25


@dataclass
class RunOptions:
    """Options of every training run, whatever the recipe."""

    out: str
    steps: int | None = None  # None: the default for the data kind
    batch_size: int | None = None
    lr: float | None = None
    ema_rate: float = 0.999
    seed: int = 0
    device: str = "cpu"
    holdout: float = 0.1
    resume: bool = False
    checkpoint_every: int = 1000
    checkpoint_minutes: float = 10.0  # also checkpoint after this much wall time
    keep_history: bool = False  # also keep each checkpoint's EMA weights in <out>/history
    progress: bool = True
    on_nonfinite: str = "stop"  # or "skip": drop batches with a NaN/inf loss or gradient
    network: dict = field(default_factory=dict)  # overrides of the default network kwargs
    backbone: str | None = None  # "builtin" or "diffusers-unet"; None: builtin (cd: teacher's)
    data_key: str | None = None  # the data's array in an .npz (None: found by name)
    layout: str | None = None  # "nchw" or "nhwc" of 4-D arrays (None: detected)
    labels: bool = False  # condition on the data's class labels (see cmkit.labels)
    label_key: str | None = None  # the labels' array in an .npz (None: found by name)
    latent: str | None = None  # train in the latent space of this train-autoencoder folder
    vae: str | None = None  # ... or of this diffusers AutoencoderKL folder (cmkit.latent)
    workers: int = 0  # decode an image folder lazily in this many processes (0: in memory)
    precision: str = "fp32"  # or "bf16": the network forwards under autocast
    compile: bool = False  # torch.compile the online network's training forward
    world: World = field(default_factory=World)  # the processes training together


def num_classes(section: DataSection) -> int | None:
    """K of a labelled run's data, None for an unlabelled one."""
    return None if section.classes is None else len(section.classes)


def defaults_for(shape: tuple[int, ...]) -> dict:
    return VECTOR_DEFAULTS if len(shape) == 1 else IMAGE_DEFAULTS


def check_positive(**values) -> None:
    for name, value in values.items():
        if value is not None and not value > 0:
            raise OptionError(name, f"must be > 0, got {value}")


def check_scales(s0: int, s1: int, s0_min: int) -> None:
    """A curriculum's N(0) and N(K) from s₀ and s₁ must make grids of 2..MAX_SCALES points."""
    if not s0_min <= s0 <= s1 < MAX_SCALES:
        raise UserError(
            f"need {s0_min} <= s0 <= s1 < {MAX_SCALES} so that 2 <= N <= {MAX_SCALES}, "
            f"got s0={s0}, s1={s1}"
        )


def distance_for(name: str, shape: tuple[int, ...], c: float | None = None):
    try:
        return make_distance(name, int(np.prod(shape)), c)
    except ValueError as err:
        raise OptionError("distance", str(err).removeprefix("unknown distance ")) from None


def from_data(
    run: RunOptions, spec: str, process: Process
) -> tuple[Samples, DataSection, NetworkSpec, nn.Module]:
    """Seeded start of a run trained on data: training split, data section, network spec, net."""
    autoencoder = latentlib.source(run.latent, run.vae)
    torch.manual_seed(run.seed)
    data, section = load_training_data(
        spec,
        run.holdout,
        process.sigma_data,
        run.data_key,
        run.layout,
        run.labels,
        run.label_key,
        autoencoder,
        run.workers,
    )
    net_spec = default_network(
        section.shape, run.network, run.backbone or "builtin", num_classes(section)
    )
    return data, section, net_spec, build_for_data(net_spec, section.shape)


def training_section(
    run: RunOptions, shape, steps_key: str, recipe: str, options: dict, lr_scale: float = 1.0
):
    """The loop's settings (the data kind's defaults where not given, the learning rate times
    the recipe's `lr_scale`) and the recipe's options."""
    defaults = defaults_for(tuple(shape))
    section = TrainingSection(
        recipe=recipe,
        steps=defaults[steps_key] if run.steps is None else run.steps,
        batch_size=defaults["batch_size"] if run.batch_size is None else run.batch_size,
        lr=defaults["lr"] * lr_scale if run.lr is None else run.lr,
        ema_rate=run.ema_rate,
        seed=run.seed,
        precision=run.precision,
        options=options,
    )
    check_positive(
        steps=section.steps,
        batch_size=section.batch_size,
        lr=section.lr,
        checkpoint_every=run.checkpoint_every,
        checkpoint_minutes=run.checkpoint_minutes,
    )
    if not section.lr < LR_MAX:
        raise OptionError(
            "lr",
            f"must be below {LR_MAX:.3g}, got {section.lr}: Adam's first step moves weights "
            "by up to 10·lr, which must fit in float32",
        )
    if not 0 <= run.ema_rate < 1:
        raise OptionError("ema_rate", f"must be in [0, 1), got {run.ema_rate}")
    check_on_nonfinite(run.on_nonfinite)
    check_precision(run.precision, run.device)
    run.world.check_batch_size(section.batch_size)
    return section


def train_from_data(
    run: RunOptions, data_spec: str, process: Process, recipe: str, opts, make_loss
):
    """A consistency model trained on data alone (CT, iCT): `make_loss(opts, process, steps,
    shape)` gives the recipe's loss and curriculum; the EMA target θ⁻ follows μ(k)."""
    data, section, net_spec, net = from_data(run, data_spec, process)
    training = training_section(run, section.shape, "cm_steps", recipe, asdict(opts))
    loss, schedule = make_loss(opts, process, training.steps, section.shape)
    sampling = SamplingSection(num_scales=schedule.scales(training.steps))
    config = RunConfig("consistency", process, net_spec, section, training, sampling)
    online, target = process.consistency(net), process.consistency(copy.deepcopy(net))
    state = start(run, config, online, target, net)
    return fit(run, config, state, data, loss, opts.grad_clip, schedule.target_mu)


def start(
    run: RunOptions, config: RunConfig, online, target, net, aux: nn.Module | None = None
) -> TrainState:
    """Fresh state (or the saved one with resume) on the requested device; `aux` holds the
    loss's own trainable weights, optimised and checkpointed with the network."""
    device = torch.device(run.device)
    online.to(device)
    if target is not None:
        target.to(device).requires_grad_(False)
    if aux is not None:
        aux.to(device)
    ema = copy.deepcopy(net).requires_grad_(False)
    optimizer = torch.optim.Adam(trainable_parameters(online, aux), lr=config.training.lr)
    state = TrainState(online, optimizer, torch.Generator().manual_seed(run.seed), ema, target, aux)
    state.world_sizes = [[0, run.world.size]]
    out = _prepare_out(Path(run.out), run.world)
    if run.resume and resumable(out, notify=run.world.main):
        _check_same_run(out, load_config(out, config.kind), config)
        restore_state(out, state)
        _note_world_size(out, state, run.world)
    elif (out / "config.json").exists():
        raise UserError(f"{out} already holds a run; resume it or choose another run directory")
    return state


def _prepare_out(out: Path, world: World) -> Path:
    """Create the run directory now (not at the first checkpoint) and finish any checkpoint
    a crash left committed but not yet renamed (rank 0, while the others wait to read)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OptionError("out", f"{out} cannot be a run directory: {err.strerror}") from None
    if world.main:
        finish_checkpoint(out)
    world.barrier()
    return out


def _note_world_size(out: Path, state: TrainState, world: World) -> None:
    """A resume with another number of processes continues the run, not bit for bit: the
    gradients are averaged over other groups of rows (all-reduce rounding); it is recorded."""
    before = state.world_sizes[-1][1]
    if before == world.size:
        return
    state.world_sizes.append([state.step, world.size])
    if world.main:
        print(
            f"cmkit: {out} was trained in {_processes(before)} up to step {state.step}; "
            f"continuing in {_processes(world.size)}, the same run up to all-reduce rounding "
            "(not bit-identical)",
            file=sys.stderr,
        )


def _check_same_run(out: Path, saved: RunConfig, config: RunConfig) -> None:
    """Resume continues the run it finds: everything but the step count must match (an
    option added to the recipe after the run was saved counts as its default).

    The sampling section is not compared: tuned times belong to the weights they were tuned
    on, so the checkpoints to come drop them (see runs.store_times); the final N follows the
    new step count."""
    old, new = saved.to_dict(), json.loads(json.dumps(config.to_dict()))
    new["training"]["steps"] = old["training"]["steps"]
    new["sampling"] = old["sampling"]
    # an option the saved run lacks was added since: the run was trained as its default
    saved_options = old["training"].get("options") or {}
    for key in set(new["training"].get("options") or {}) - set(saved_options):
        del new["training"]["options"][key]
    changed = list(_differences(old, new))
    if changed:
        raise UserError(
            f"resume: {out} was trained with other settings ({'; '.join(changed[:3])}); "
            "only the step count may change when resuming"
        )


def _differences(old, new, path: str = ""):
    """'key: old -> new' for every leaf where two JSON values differ (a recipe's options
    last: a change of recipe says more than the options that come with it)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(old.keys() | new.keys(), key=lambda k: (k == "options", k)):
            yield from _differences(old.get(key), new.get(key), f"{path}.{key}" if path else key)
    elif old != new:
        yield f"{path}: {old!r} -> {new!r}"


def _processes(n: int) -> str:
    return "1 process" if n == 1 else f"{n} processes"


def fit(
    run: RunOptions,
    config: RunConfig,
    state: TrainState,
    data: Samples,
    loss_fn,
    grad_clip: float | None,
    target_mu=lambda step: 0.0,
) -> Path:
    """Train to the configured step count, checkpointing into the run directory; grad_clip
    None trains unclipped."""
    out = Path(run.out)
    engine = make_engine(run.world, state.online.net, run.precision, run.compile)
    try:
        train(
            state,
            loss_fn,
            data.to(run.device),
            config.training.steps,
            config.training.batch_size,
            run.ema_rate,
            target_mu=target_mu,
            grad_clip=grad_clip,
            checkpoint=lambda s: _checkpoint(out, config, s, run.keep_history),
            checkpoint_every=run.checkpoint_every,
            checkpoint_seconds=60 * run.checkpoint_minutes,
            progress=run.progress,
            on_nonfinite=run.on_nonfinite,
            engine=engine,
        )
    finally:
        close = getattr(data, "close", None)  # a lazy folder's decoding workers
        if close is not None:
            close()
    return out


def _checkpoint(out: Path, config: RunConfig, state: TrainState, keep_history: bool) -> None:
    save_checkpoint(out, config, state)
    if keep_history:
        save_history(out, state)


def guided_teacher(
    guidance, section: DataSection, teacher, teacher_spec: NetworkSpec, net_spec: NetworkSpec
) -> tuple[object, Callable]:
    """Guided distillation's teacher and loss wrapper (LCM, pixel space): with `guidance`
    (w_min, w_max) the teacher becomes the guided denoiser D_w and each batch carries w;
    when w_min < w_max the student's spec gains the w input (edited in place). Without
    guidance: the teacher as it is and the loss unwrapped."""
    if guidance is None:
        return teacher, lambda loss: loss
    try:
        w_min, w_max = check_guidance(guidance)
    except ValueError as err:
        raise OptionError("guidance", str(err)) from None
    if section.classes is None:
        raise OptionError("guidance", "needs a teacher trained with --labels")
    if not has_null_label(teacher_spec):
        raise OptionError("guidance", NO_NULL_LABEL)
    if w_min < w_max:
        if net_spec.type not in ("mlp", "unet"):
            raise OptionError(
                "guidance",
                f"a range of w needs the built-in networks' w input; a {net_spec.type} "
                "student distils one w at a time",
            )
        net_spec.kwargs["guidance_dim"] = GUIDANCE_DIM
    guided = GuidedDenoiser(teacher, len(section.classes))
    return guided, lambda loss: WithGuidance(loss, w_min, w_max)


def load_teacher_weights(net: nn.Module, teacher_net: nn.Module) -> None:
    """The teacher's weights into a student of the same network, whose only extra weights
    may be its w input (zero at the start, so the student starts as the teacher)."""
    missing, unexpected = net.load_state_dict(teacher_net.state_dict(), strict=False)
    extra = [k for k in missing if not k.startswith("cond.guidance.")]
    if extra or unexpected:
        raise UserError(f"the student's network does not match its teacher's: {extra + unexpected}")
