"""The teacher recipe: an EDM denoiser or a flow-matching velocity field, trained on data.

It is the baseline that consistency models are measured against, and the teacher that CD
distils. The process decides the loss (process.teacher_loss()).
"""

from dataclasses import asdict, dataclass
from pathlib import Path

from cmkit.config import RunConfig, SamplingSection
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


@dataclass
class TeacherOptions:
    grad_clip: float | None = 1.0


def teacher_run(
    run: RunOptions, data_spec: str, process: Process, opts: TeacherOptions | None = None
) -> Path:
    """Train a teacher on `data_spec` under `process`; returns the run directory."""
    opts = opts or TeacherOptions()
    check_grad_clip(opts.grad_clip)
    data, section, net_spec, net = from_data(run, data_spec, process)
    training = training_section(run, section.shape, "teacher_steps", "teacher", asdict(opts))
    sampling = SamplingSection(solver=DEFAULT_SOLVER, steps=DEFAULT_GRID_POINTS)
    config = RunConfig("teacher", process, net_spec, section, training, sampling)
    online = process.denoiser(net)
    state = start(run, config, online, None, net)
    return fit(run, config, state, data, process.teacher_loss(), opts.grad_clip)
