"""The teacher recipe: an EDM denoiser or a flow-matching velocity field, trained on data.

It is the baseline that consistency models are measured against, and the teacher that CD
distils. The process decides the loss (process.teacher_loss()). Trained with --labels it is
class-conditional and, by dropping labels to ∅ with probability p_uncond, also
unconditional, so it can be sampled with classifier-free guidance (cmkit.guidance).
"""

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from cmkit.config import RunConfig, SamplingSection
from cmkit.errors import OptionError
from cmkit.guidance import LabelDropout
from cmkit.process import Process
from cmkit.recipes.common import (
    RunOptions,
    fit,
    from_data,
    start,
    training_section,
)
from cmkit.solvers import DEFAULT_GRID_POINTS, DEFAULT_SOLVER
from cmkit.train import check_grad_clip

P_UNCOND = 0.1  # Ho & Salimans 2022 use 0.1–0.2


@dataclass
class TeacherOptions:
    grad_clip: float | None = 1.0
    p_uncond: float | None = None  # labelled runs: P_UNCOND unless given


def check(opts: TeacherOptions, labelled: bool) -> TeacherOptions:
    """The options with p_uncond resolved: P_UNCOND for a labelled run, refused without labels."""
    check_grad_clip(opts.grad_clip)
    if not labelled:
        if opts.p_uncond is not None:
            raise OptionError("p_uncond", "applies to runs trained with --labels")
        return opts
    p = P_UNCOND if opts.p_uncond is None else opts.p_uncond
    if not 0 <= p < 1:
        raise OptionError("p_uncond", f"must be in [0, 1), got {p}")
    return replace(opts, p_uncond=p)


def teacher_run(
    run: RunOptions, data_spec: str, process: Process, opts: TeacherOptions | None = None
) -> Path:
    """Train a teacher on `data_spec` under `process`; returns the run directory."""
    opts = check(opts or TeacherOptions(), run.labels)
    data, section, net_spec, net = from_data(run, data_spec, process)
    training = training_section(run, section.shape, "teacher_steps", "teacher", asdict(opts))
    sampling = SamplingSection(solver=DEFAULT_SOLVER, steps=DEFAULT_GRID_POINTS)
    config = RunConfig("teacher", process, net_spec, section, training, sampling)
    online = process.denoiser(net)
    state = start(run, config, online, None, net)
    loss = process.teacher_loss()
    if section.classes is not None:
        loss = LabelDropout(loss, opts.p_uncond, len(section.classes))
    return fit(run, config, state, data, loss, opts.grad_clip)
