"""Consistency distillation (Song et al. 2023, Algorithm 2): pairs of adjacent points on an
N-point grid joined by one Euler or Heun step of a trained teacher's PF-ODE; with guidance,
the step of the classifier-free-guided teacher (LCM, Luo et al. 2023)."""

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch

from cmkit.config import NetworkSpec, RunConfig, SamplingSection
from cmkit.errors import OptionError
from cmkit.losses import ConsistencyLoss, GridPairs, TeacherStep
from cmkit.networks.diffusers_vp import vp_log_sigmas
from cmkit.networks.zoo import backbone_of, build_for_data, default_network
from cmkit.noise import FixedScales, TimestepGrid
from cmkit.recipes.common import (
    RunOptions,
    distance_for,
    fit,
    guided_teacher,
    load_teacher_weights,
    run_data,
    start,
    training_section,
)
from cmkit.runs import load_network
from cmkit.solvers import SOLVERS
from cmkit.train import check_grad_clip

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
    net_spec = _student_network(teacher_config, run.backbone, opts.init_from_teacher)
    teacher = process.denoiser(teacher_net.to(run.device).requires_grad_(False))
    teacher, with_guidance = guided_teacher(
        opts.guidance, section, teacher, teacher_config.network, net_spec
    )
    net = build_for_data(net_spec, section.shape)
    if opts.init_from_teacher:
        load_teacher_weights(net, teacher_net)
    options = {**asdict(opts), "teacher": str(Path(opts.teacher).resolve())}
    training = training_section(run, section.shape, "cm_steps", opts.recipe, options)
    sampling = SamplingSection(num_scales=opts.num_scales)
    config = RunConfig("consistency", process, net_spec, section, training, sampling)
    online, target = process.consistency(net), process.consistency(copy.deepcopy(net))
    state = start(run, config, online, target, net)
    schedule = FixedScales(opts.num_scales, opts.mu)
    loss = ConsistencyLoss(
        process,
        GridPairs(grid, schedule),
        TeacherStep(teacher, opts.solver),
        distance_for(opts.distance, section.shape),
    )
    return fit(run, config, state, data, with_guidance(loss), opts.grad_clip, schedule.target_mu)


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
