"""Consistency distillation (Song et al. 2023, Algorithm 2): pairs of adjacent points on an
N-point grid joined by one Euler or Heun step of a trained teacher's PF-ODE; with guidance,
the step of the classifier-free-guided teacher (LCM, Luo et al. 2023); with a LoRA rank,
only adapters on the teacher's own network train (LCM-LoRA, cmkit.lora)."""

import copy
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from cmkit import lora
from cmkit.config import NetworkSpec, RunConfig, SamplingSection
from cmkit.errors import OptionError
from cmkit.losses import ConsistencyLoss, TeacherStep
from cmkit.networks.diffusers_vp import vp_log_sigmas
from cmkit.networks.zoo import backbone_of, build_for_data, default_network
from cmkit.noise import FixedScales, TimestepGrid
from cmkit.recipes.common import (
    RunOptions,
    distance_for,
    fit,
    guided_teacher,
    load_teacher_weights,
    start,
    training_section,
)
from cmkit.runs import load_network
from cmkit.solvers import SOLVERS
from cmkit.train import check_grad_clip
from cmkit.training_data import run_data
from cmkit.training_times import GridPairs

SPACINGS = ("process", "timesteps")


@dataclass
class CDOptions:
    recipe: ClassVar[str] = "cd"  # the name the run records
    teacher: str  # the teacher's run directory
    solver: str = "heun"
    num_scales: int = 18  # N
    distance: str = "l2"
    mu: float = 0.0  # target EMA rate μ
    init_from_teacher: bool = True
    grad_clip: float | None = 1.0
    guidance: tuple[float, float] | None = None  # distil the guided teacher: w_min, w_max
    # the N-point σ grid: the process's (Karras for EDM), or every k-th timestep of an
    # imported DDPM teacher's own table (LCM's skipping step, k = T/(N − 1))
    spacing: str = "process"
    lora_rank: int | None = None  # LCM-LoRA: train rank-r adapters only (None: every weight)
    lora_alpha: float | None = None  # the adapters' α, scaling α/r (None: α = r)


@dataclass
class Student:
    """What CD trains and learns from: the network and its spec, the (guided) teacher, the
    loss wrapper that gives batches their w, and what the run records beside the options."""

    spec: NetworkSpec
    net: nn.Module
    teacher: object
    with_guidance: Callable
    notes: dict = field(default_factory=dict)


def check(opts: CDOptions) -> None:
    if opts.solver not in SOLVERS:
        raise OptionError(
            "solver", f"must be {' or '.join(map(repr, SOLVERS))}, got {opts.solver!r}"
        )
    if not 0 <= opts.mu < 1:
        raise OptionError("mu", f"must be in [0, 1), got {opts.mu}")
    if opts.spacing not in SPACINGS:
        raise OptionError(
            "spacing", f"must be {' or '.join(map(repr, SPACINGS))}, got {opts.spacing!r}"
        )
    check_grad_clip(opts.grad_clip)
    if opts.lora_alpha is not None and opts.lora_rank is None:
        raise OptionError("lora_alpha", "scales LoRA adapters; add --lora-rank")


def distill_run(run: RunOptions, opts: CDOptions) -> Path:
    """Distil the teacher run `opts.teacher` into a consistency model; returns the run."""
    torch.manual_seed(run.seed)
    teacher_config, teacher_net = load_network(opts.teacher, "ema")
    if teacher_config.kind != "teacher":
        raise OptionError("teacher", f"{opts.teacher} is a consistency run; expected a teacher run")
    check(opts)
    process = teacher_config.process
    grid = grid_source(process, teacher_config.network, opts.spacing)
    grid.grid(opts.num_scales)  # validates N
    section = teacher_config.data
    data = run_data(section)
    make = _student if opts.lora_rank is None else _lora_student
    student = make(run, opts, teacher_config, teacher_net)
    net = student.net
    options = {**asdict(opts), "teacher": str(Path(opts.teacher).resolve()), **student.notes}
    training = training_section(run, section.shape, "cm_steps", opts.recipe, options)
    sampling = SamplingSection(num_scales=opts.num_scales)
    config = RunConfig("consistency", process, student.spec, section, training, sampling)
    online, target = process.consistency(net), process.consistency(copy.deepcopy(net))
    state = start(run, config, online, target, net)
    schedule = FixedScales(opts.num_scales, opts.mu)
    loss = ConsistencyLoss(
        process,
        GridPairs(grid, schedule),
        TeacherStep(student.teacher, opts.solver),
        distance_for(opts.distance, section.shape),
    )
    loss = student.with_guidance(loss)
    out = fit(run, config, state, data, loss, opts.grad_clip, schedule.target_mu)
    if opts.lora_rank is not None and run.world.main:
        lora.save_adapter(out, student.spec, state.ema)
    return out


def _student(run: RunOptions, opts: CDOptions, teacher_config: RunConfig, teacher_net) -> Student:
    """A student network of its own (the teacher's weights, or random ones), taught by the
    teacher run's network."""
    net_spec = _student_network(teacher_config, run.backbone, opts.init_from_teacher)
    teacher = teacher_config.process.denoiser(teacher_net.to(run.device).requires_grad_(False))
    teacher, with_guidance = guided_teacher(
        opts.guidance, teacher_config.data, teacher, teacher_config.network, net_spec
    )
    net = build_for_data(net_spec, teacher_config.data.shape)
    if opts.init_from_teacher:
        load_teacher_weights(net, teacher_net)
    return Student(net_spec, net, teacher, with_guidance)


def _lora_student(
    run: RunOptions, opts: CDOptions, teacher_config: RunConfig, teacher_net
) -> Student:
    """LCM-LoRA: adapters on the teacher's own network, whose base (the network with the
    adapters off) is the teacher; the target is the online network (μ = 0)."""
    _check_lora(opts, run.backbone, teacher_config.network)
    alpha = float(opts.lora_rank if opts.lora_alpha is None else opts.lora_alpha)
    base_spec = teacher_config.network
    adapter, net = lora.lora_student(teacher_net, base_spec, opts.teacher, opts.lora_rank, alpha)
    spec = adapter.to_spec()
    teacher = teacher_config.process.denoiser(lora.AdaptersOff(net))
    teacher, with_guidance = guided_teacher(
        opts.guidance, teacher_config.data, teacher, base_spec, spec
    )
    counts = lora.parameter_counts(net)
    if run.world.main:
        print(lora.trainable_line(counts), file=sys.stderr)
    return Student(spec, net, teacher, with_guidance, counts)


def _check_lora(opts: CDOptions, backbone: str | None, teacher_spec: NetworkSpec) -> None:
    """What LCM-LoRA fixes: the teacher's own network and weights, μ = 0, no w input."""
    lora.require_peft("--lora-rank")
    if not opts.lora_rank >= 1:
        raise OptionError("lora_rank", f"must be >= 1, got {opts.lora_rank}")
    if opts.lora_alpha is not None and not opts.lora_alpha > 0:
        raise OptionError("lora_alpha", f"must be > 0, got {opts.lora_alpha}")
    if opts.mu != 0:
        raise OptionError(
            "mu", f"must be 0 with --lora-rank: the target is the online network, got {opts.mu}"
        )
    if not opts.init_from_teacher:
        raise OptionError(
            "lora_rank",
            "adapts the teacher's own weights; it cannot start from random ones "
            "(--no-init-from-teacher)",
        )
    if backbone not in (None, backbone_of(teacher_spec)):
        raise OptionError(
            "lora_rank",
            f"adapts the teacher's own {backbone_of(teacher_spec)} network, not a {backbone}",
        )
    if opts.guidance is not None and float(opts.guidance[0]) < float(opts.guidance[1]):
        raise OptionError(
            "guidance",
            "W_MIN:W_MAX needs a w input, which a LoRA adapter does not add (LCM-LoRA has "
            "none); distil one W",
        )


def grid_source(process, teacher_spec: NetworkSpec, spacing: str):
    """What `.grid(N)` gives CD's pairs: the process's grid, or a DDPM teacher's timesteps."""
    if spacing == "process":
        return process
    if teacher_spec.type != "diffusers-vp":
        raise OptionError(
            "spacing",
            "timesteps follows an imported DDPM teacher's own timestep table; this teacher "
            f"is a {teacher_spec.type} network on the {process.name} process (use process)",
        )
    return TimestepGrid(vp_log_sigmas(teacher_spec.kwargs["schedule"]), process)


def _student_network(
    teacher_config: RunConfig, backbone: str | None, init_from_teacher: bool
) -> NetworkSpec:
    """The teacher's network spec, or the default one of another backbone (random start)."""
    teacher_spec = teacher_config.network
    if backbone is None or backbone == backbone_of(teacher_spec):
        return copy.deepcopy(teacher_spec)
    if init_from_teacher:
        raise OptionError(
            "backbone",
            f"{backbone} cannot start from the teacher's {backbone_of(teacher_spec)} weights; "
            "train it from random weights (no init from the teacher)",
        )
    return default_network(teacher_config.data.shape, {}, backbone)
