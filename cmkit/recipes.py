"""Assemble runs from options: data, process, network, loss and state for each recipe.

This is where components meet; the CLI and `quickstart` call these functions, and nothing
below this module knows about options. Each `*_run` function trains (or resumes) one run
directory and returns it.
"""

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cmkit import data as datalib
from cmkit.errors import UserError
from cmkit.losses import (
    ConsistencyLoss,
    TeacherStep,
    UnbiasedEstimate,
    edm_loss,
    flow_matching_loss,
    make_distance,
)
from cmkit.noise import (
    MAX_SCALES,
    CTCurriculum,
    FixedScales,
    ICTCurriculum,
    lognormal_index_probs,
)
from cmkit.process import EDMProcess, FlowProcess, Process, process_from_dict
from cmkit.runs import (
    FORMAT,
    build_network,
    finish_checkpoint,
    load_config,
    load_network,
    restore_state,
    save_checkpoint,
)
from cmkit.train import TrainState, train


@dataclass
class Common:
    """Options every training command takes."""

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
    progress: bool = True
    on_nonfinite: str = "stop"  # or "skip": drop batches with a NaN/inf loss or gradient
    grad_clip: float | None = 1.0  # largest gradient norm of a step; None: no clipping
    network: dict = field(default_factory=dict)  # overrides of the default network kwargs
    backbone: str | None = None  # "builtin" or "diffusers-unet"; None: builtin (distill: teacher's)


# Defaults sized for 2 CPU cores; their measured results are in BENCHMARKS.md.
VECTOR_DEFAULTS = {"teacher_steps": 6000, "cm_steps": 6000, "batch_size": 512, "lr": 1e-3}
IMAGE_DEFAULTS = {"teacher_steps": 4000, "cm_steps": 3000, "batch_size": 64, "lr": 4e-4}
LR_MAX = torch.finfo(torch.float32).max / 10


def defaults_for(shape: tuple[int, ...]) -> dict:
    return VECTOR_DEFAULTS if len(shape) == 1 else IMAGE_DEFAULTS


def _build(net_spec: dict, shape: tuple[int, ...]) -> nn.Module:
    """The network, tried on one zero input of the data's shape (in eval mode, so no random
    numbers are drawn) so that a bad --network setting or an image size the network cannot
    take is reported now as a user error, not as a traceback from the first training step."""
    try:
        net = build_network(net_spec)
        with torch.no_grad():
            net.eval()(torch.zeros(1, *shape), torch.zeros(1))
    except UserError:
        raise
    except (TypeError, ValueError, RuntimeError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise UserError(
            f"--network {net_spec['kwargs']} does not fit data of shape {shape}: {reason}"
        ) from None
    return net.train()


BACKBONES = ("builtin", "diffusers-unet")


def default_network(
    shape: tuple[int, ...], overrides: dict | None = None, backbone: str = "builtin"
) -> dict:
    """An MLP for vectors, a small UNet for images (two levels, or three from 32 px up).

    backbone "diffusers-unet" puts a diffusers UNet2DModel of the same widths in the UNet's
    place (one ResNet per level, attention in the middle block), which export-diffusers needs.
    """
    if backbone not in BACKBONES:
        raise UserError(f"unknown --backbone {backbone!r}; expected {' or '.join(BACKBONES)}")
    if len(shape) == 1:
        if backbone != "builtin":
            raise UserError(f"--backbone {backbone} needs images (C, H, W); got vectors {shape}")
        spec = {"type": "mlp", "kwargs": {"dim": shape[0], "hidden": 256, "depth": 4}}
    else:
        channels, height, width = shape
        deep = min(height, width) >= 32 and height % 4 == 0 and width % 4 == 0
        if backbone == "diffusers-unet":
            spec = {"type": backbone, "kwargs": _diffusers_unet_kwargs(shape, deep)}
        else:
            kwargs = {
                "in_channels": channels,
                "channels": 32,
                "channel_mult": [1, 2, 2] if deep else [1, 2],
            }
            spec = {"type": "unet", "kwargs": kwargs}
    spec["kwargs"].update(overrides or {})
    return spec


def _diffusers_unet_kwargs(shape: tuple[int, ...], deep: bool) -> dict:
    channels, height, _ = shape
    widths = [32, 64, 64] if deep else [32, 64]
    return {
        "sample_size": height,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": widths,
        "down_block_types": ["DownBlock2D"] * len(widths),
        "up_block_types": ["UpBlock2D"] * len(widths),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "attention_head_dim": 8,
    }


def backbone_of(net_spec: dict) -> str:
    """The --backbone name that builds a network spec's type."""
    return "diffusers-unet" if net_spec["type"] == "diffusers-unet" else "builtin"


def load_training_data(spec: str, holdout: float) -> tuple[torch.Tensor, dict]:
    """Training split in model units, and the data section of config.json."""
    path = Path(spec)
    spec = str(path.resolve()) if path.exists() else spec
    train_x, _ = datalib.split_holdout(datalib.load_data(spec), holdout)
    scaler = datalib.Scaler.fit(train_x)
    section = {
        "spec": spec,
        "holdout": holdout,
        "shape": list(train_x.shape[1:]),
        "scaler": scaler.to_dict(),
    }
    return torch.from_numpy(scaler.to_model(train_x)), section


def held_out_data(config: dict) -> np.ndarray:
    """The held-out split of a run's data, in the user's units."""
    return datalib.run_splits(config["data"])[1]


def make_process(name: str, **edm_kwargs) -> Process:
    """The named process; EDM takes sigma_min, sigma_max, rho, sigma_data (flow has none)."""
    if name == "edm":
        return EDMProcess(**edm_kwargs)
    if name == "flow":
        return FlowProcess()
    raise UserError(f"unknown process {name!r}; expected 'edm' or 'flow'")


def _check_positive(**values) -> None:
    for name, value in values.items():
        if value is not None and not value > 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0, got {value}")


def _start(common: Common, config: dict, online, target, net) -> TrainState:
    """Fresh state (or the saved one with --resume) on the requested device."""
    device = torch.device(common.device)
    online.to(device)
    if target is not None:
        target.to(device).requires_grad_(False)
    ema = copy.deepcopy(net).requires_grad_(False)
    optimizer = torch.optim.Adam(online.parameters(), lr=config["training"]["lr"])
    state = TrainState(online, optimizer, torch.Generator().manual_seed(common.seed), ema, target)
    out = _prepare_out(Path(common.out))
    if common.resume:
        _check_same_run(out, load_config(out, config["kind"]), config)
        restore_state(out, state)
    elif (out / "config.json").exists():
        raise UserError(f"{out} already holds a run; pass --resume to continue it or pick --out")
    return state


def _prepare_out(out: Path) -> Path:
    """Create the run directory now (not at the first checkpoint) and finish any checkpoint
    a crash left committed but not yet renamed."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot use --out {out} as a run directory: {err.strerror}") from None
    finish_checkpoint(out)
    return out


def _check_same_run(out: Path, saved: dict, config: dict) -> None:
    """--resume continues the run it finds: everything but the step count must match.

    The sampling section is not compared: tuned times belong to the weights they were tuned
    on, so the checkpoints to come drop them (see runs.store_times)."""
    new = json.loads(json.dumps({"format": FORMAT, **config}))
    new["training"]["steps"] = saved.get("training", {}).get("steps")
    new["sampling"] = saved.get("sampling")
    saved.get("training", {}).setdefault("grad_clip", 1.0)  # what runs before the option used
    changed = list(_differences(saved, new))
    if changed:
        raise UserError(
            f"--resume: {out} was trained with other settings ({'; '.join(changed[:3])}); "
            "only --steps may change when resuming"
        )


def _differences(old, new, path: str = ""):
    """'key: old -> new' for every leaf where two JSON values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(old.keys() | new.keys()):
            yield from _differences(old.get(key), new.get(key), f"{path}.{key}" if path else key)
    elif old != new:
        yield f"{path}: {old!r} -> {new!r}"


def _fit(common: Common, config: dict, state: TrainState, data, loss_fn, target_mu) -> Path:
    out = Path(common.out)
    train(
        state,
        loss_fn,
        data.to(common.device),
        config["training"]["steps"],
        config["training"]["batch_size"],
        common.ema_rate,
        target_mu=target_mu,
        grad_clip=common.grad_clip,
        checkpoint=lambda s: save_checkpoint(out, config, s),
        checkpoint_every=common.checkpoint_every,
        progress=common.progress,
        on_nonfinite=common.on_nonfinite,
    )
    return out


def _training_section(common: Common, shape, steps_key: str, **extra) -> dict:
    defaults = defaults_for(tuple(shape))
    section = {
        "steps": defaults[steps_key] if common.steps is None else common.steps,
        "batch_size": defaults["batch_size"] if common.batch_size is None else common.batch_size,
        "lr": defaults["lr"] if common.lr is None else common.lr,
        "ema_rate": common.ema_rate,
        "seed": common.seed,
        "grad_clip": common.grad_clip,
        **extra,
    }
    _check_positive(
        steps=section["steps"],
        batch_size=section["batch_size"],
        lr=section["lr"],
        checkpoint_every=common.checkpoint_every,
        grad_clip=common.grad_clip,
    )
    if not section["lr"] < LR_MAX:
        raise UserError(
            f"--lr must be below {LR_MAX:.3g}, got {section['lr']}: Adam's first step "
            "moves weights by up to 10·lr, which must fit in float32"
        )
    if not 0 <= common.ema_rate < 1:
        raise UserError(f"--ema-rate must be in [0, 1), got {common.ema_rate}")
    return section


def _from_data(common: Common, data_spec: str) -> tuple[torch.Tensor, dict, dict, nn.Module]:
    """Seeded start of a run trained on data: training split, data section, network spec, net."""
    torch.manual_seed(common.seed)
    data, section = load_training_data(data_spec, common.holdout)
    shape = tuple(section["shape"])
    net_spec = default_network(shape, common.network, common.backbone or "builtin")
    return data, section, net_spec, _build(net_spec, shape)


def _run_config(kind, common, proc, net_spec, section, steps_key, sampling, **training) -> dict:
    """The config.json of a run: everything needed to rebuild its model and sampler."""
    return {
        "kind": kind,
        "process": proc.to_dict(),
        "network": net_spec,
        "data": section,
        "training": _training_section(common, section["shape"], steps_key, **training),
        "sampling": sampling,
    }


def teacher_run(
    common: Common, data_spec: str, process: str = "edm", process_kwargs: dict | None = None
) -> Path:
    """Train an EDM denoiser or a flow-matching velocity field: the baseline and CD teacher."""
    proc = make_process(process, **(process_kwargs or {}))
    data, section, net_spec, net = _from_data(common, data_spec)
    sampling = {"solver": "heun", "steps": 18}
    config = _run_config("teacher", common, proc, net_spec, section, "teacher_steps", sampling)
    online = proc.denoiser(net)
    state = _start(common, config, online, None, net)
    loss = edm_loss if process == "edm" else flow_matching_loss
    return _fit(common, config, state, data, lambda f, _t, x0, _k, g: loss(f, x0, g), None)


def distill_run(
    common: Common,
    teacher_dir: str,
    solver: str = "heun",
    num_scales: int = 18,
    distance: str = "l2",
    mu: float = 0.0,
    init_from_teacher: bool = True,
) -> Path:
    """Consistency distillation: pairs on an N-point grid joined by one teacher ODE step."""
    torch.manual_seed(common.seed)
    teacher_config, teacher_net = load_network(teacher_dir, "ema")
    if teacher_config["kind"] != "teacher":
        raise UserError(f"--teacher {teacher_dir} is a consistency run; expected a teacher run")
    if solver not in ("euler", "heun"):
        raise UserError(f"--solver must be 'euler' or 'heun', got {solver!r}")
    if not 0 <= mu < 1:
        raise UserError(f"--mu must be in [0, 1), got {mu}")
    proc = process_from_dict(teacher_config["process"])
    proc.grid(num_scales)  # validates N
    section = teacher_config["data"]
    scaler = datalib.Scaler.from_dict(section["scaler"])
    train_x, _ = datalib.run_splits(section)
    data = torch.from_numpy(scaler.to_model(train_x))
    net_spec = _student_network(teacher_config, common.backbone, init_from_teacher)
    net = _build(net_spec, tuple(section["shape"]))
    if init_from_teacher:
        net.load_state_dict(teacher_net.state_dict())
    config = _run_config(
        "consistency",
        common,
        proc,
        net_spec,
        section,
        "cm_steps",
        {"times": {}},
        recipe="cd",
        teacher=str(Path(teacher_dir).resolve()),
        solver=solver,
        num_scales=num_scales,
        distance=distance,
        mu=mu,
        init_from_teacher=init_from_teacher,
    )
    online, target = proc.consistency(net), proc.consistency(copy.deepcopy(net))
    state = _start(common, config, online, target, net)
    teacher = proc.denoiser(teacher_net.to(common.device).requires_grad_(False))
    schedule = FixedScales(num_scales, mu)
    loss = ConsistencyLoss(
        proc, schedule, TeacherStep(teacher, solver), _distance(distance, section["shape"])
    )
    return _fit(common, config, state, data, loss, schedule.target_mu)


def _student_network(teacher_config: dict, backbone: str | None, init_from_teacher: bool) -> dict:
    """The teacher's network spec, or the default one of another --backbone (random start)."""
    teacher_spec = teacher_config["network"]
    if backbone is None or backbone == backbone_of(teacher_spec):
        return copy.deepcopy(teacher_spec)
    if init_from_teacher:
        raise UserError(
            f"a {backbone} student cannot start from the teacher's {backbone_of(teacher_spec)} "
            "weights; pass --no-init-from-teacher"
        )
    return default_network(tuple(teacher_config["data"]["shape"]), {}, backbone)


def _distance(name: str, shape: list[int]):
    try:
        return make_distance(name, int(np.prod(shape)))
    except ValueError as err:
        raise UserError(str(err)) from None


@dataclass
class CTOptions:
    """Consistency training recipes: "ct" (Song et al. 2023) or "ict" (Song & Dhariwal 2023)."""

    recipe: str = "ict"
    process: str = "edm"
    distance: str | None = None  # ct: l2, ict: pseudo-huber
    s0: int | None = None  # ct: 2, ict: 10
    s1: int | None = None  # ct: 150, ict: 1280
    mu0: float = 0.9  # ct only
    mu_variant: str = "paper"  # ct only: "paper" or "openai"
    edm: dict = field(default_factory=dict)  # sigma_min, sigma_max, rho, sigma_data overrides
    pairs: str = "uniform"  # or "lognormal": iCT's paper choice, for long runs (see README)
    weighting: str | None = None  # ict: "ict" (1/(t_{n+1} − t_n)); ct: "uniform"
    p_mean: float = -1.1  # lognormal pairs
    p_std: float = 2.0


def _check_pairs(opts: CTOptions, proc: Process) -> None:
    """Uniform pairs, or lognormal ones on EDM with some probability mass inside [σ_min, σ_max]."""
    if opts.pairs not in ("uniform", "lognormal"):
        raise UserError(f"--pairs must be 'uniform' or 'lognormal', got {opts.pairs!r}")
    if opts.pairs == "uniform":
        return
    if proc.name != "edm":
        raise UserError("--pairs lognormal needs --process edm (flow times are uniform in [0, 1])")
    # every grid shares the endpoints, so the mass on a 2-point grid is the mass on any grid
    if (
        not opts.p_std > 0
        or not torch.isfinite(lognormal_index_probs(proc.grid(2), opts.p_mean, opts.p_std)).all()
    ):
        raise UserError(
            f"--p-mean {opts.p_mean} and --p-std {opts.p_std} put no probability on "
            f"[σ_min, σ_max]; expected p_std > 0 and p_mean near ln σ of the grid"
        )


def _curriculum(opts: CTOptions, steps: int) -> ICTCurriculum | CTCurriculum:
    """N(k), and μ(k) for ct, with the recipe's defaults (ict: s0 10, s1 1280; ct: 2, 150)."""
    if opts.recipe not in ("ct", "ict"):
        raise UserError(f"unknown recipe {opts.recipe!r}; expected 'ct' or 'ict'")
    ict = opts.recipe == "ict"
    s0 = opts.s0 if opts.s0 is not None else 10 if ict else 2
    s1 = opts.s1 if opts.s1 is not None else 1280 if ict else 150
    s0_min = 1 if ict else 2  # N(0) = s0 + 1 for ict, s0 for ct; N >= 2
    if not s0_min <= s0 <= s1 < MAX_SCALES:
        raise UserError(
            f"need {s0_min} <= s0 <= s1 < {MAX_SCALES} so that 2 <= N <= {MAX_SCALES}, "
            f"got s0={s0}, s1={s1}"
        )
    if ict:
        return ICTCurriculum(steps, s0, s1)
    if opts.mu_variant not in ("paper", "openai"):
        raise UserError(f"--mu-variant must be 'paper' or 'openai', got {opts.mu_variant!r}")
    if not 0 < opts.mu0 < 1:
        raise UserError(f"--mu0 must be in (0, 1), got {opts.mu0}")
    return CTCurriculum(steps, s0, s1, opts.mu0, opts.mu_variant)


def _ct_loss(opts: CTOptions, proc: Process, steps: int, shape: list[int]):
    """The CT loss and its curriculum for the chosen recipe."""
    if opts.weighting not in (None, "uniform", "ict"):
        raise UserError(f"--weighting must be 'uniform' or 'ict', got {opts.weighting!r}")
    _check_pairs(opts, proc)
    curriculum = _curriculum(opts, steps)
    for step in (0, steps):  # the curriculum's first and last grids, checked before training
        proc.grid(curriculum.scales(step))
    ict = opts.recipe == "ict"
    loss = ConsistencyLoss(
        proc,
        curriculum,
        UnbiasedEstimate(proc.perturb),
        _distance(opts.distance or ("pseudo-huber" if ict else "l2"), shape),
        opts.pairs,
        opts.weighting or ("ict" if ict else "uniform"),
        opts.p_mean,
        opts.p_std,
    )
    return loss, curriculum


def ct_run(common: Common, data_spec: str, opts: CTOptions) -> Path:
    """Consistency training from data alone, with the EMA target θ⁻ and the N(k)/μ(k) curriculum."""
    proc = make_process(opts.process, **opts.edm)
    data, section, net_spec, net = _from_data(common, data_spec)
    config = _run_config(
        "consistency", common, proc, net_spec, section, "cm_steps", {"times": {}}, **asdict(opts)
    )
    loss, curriculum = _ct_loss(opts, proc, config["training"]["steps"], section["shape"])
    online, target = proc.consistency(net), proc.consistency(copy.deepcopy(net))
    state = _start(common, config, online, target, net)
    return _fit(common, config, state, data, loss, curriculum.target_mu)


def final_scales(config: dict) -> int:
    """N of a consistency run's σ grid at the end of training: CD's fixed N, or the last N(k)
    of the CT/iCT curriculum (rebuilt from the options stored in config.json)."""
    training = config["training"]
    if "num_scales" in training:
        return training["num_scales"]
    opts = CTOptions(**{f.name: training[f.name] for f in fields(CTOptions)})
    proc = process_from_dict(config["process"])
    _, curriculum = _ct_loss(opts, proc, training["steps"], config["data"]["shape"])
    return curriculum.scales(training["steps"])
