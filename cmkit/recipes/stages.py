"""A teacher and its students on one data set, each with its recipe's defaults, as stages to
run in order: the teacher first, since distillation and ECT read it (the flow maps train
from data beside it). The quickstart and the quality bench train from this one table.
"""

from collections.abc import Callable
from pathlib import Path

from cmkit.process import EDMProcess, FlowProcess, TrigFlowProcess
from cmkit.recipes.cd import CDOptions, distill_run
from cmkit.recipes.common import RunOptions
from cmkit.recipes.ect import ECTOptions, ect_run
from cmkit.recipes.flowmap import MeanFlowOptions, ShortcutOptions, meanflow_run, shortcut_run
from cmkit.recipes.ict import ICTOptions, ict_run
from cmkit.recipes.scm import SCDOptions, SCTOptions, scd_run, sct_run
from cmkit.recipes.teacher import teacher_run

Stage = tuple[str, Callable[[RunOptions], Path]]  # (steps key of the data kind's defaults, train)
STUDENTS = ("cd", "ict", "ect", "sct", "scd", "meanflow", "shortcut")


def default_stages(out: Path, data: str, students: tuple[str, ...] = STUDENTS) -> dict[str, Stage]:
    """name -> stage for the teacher at <out>/teacher, then each of `students`, in that order."""
    teacher = str(out / "teacher")
    trains = {
        "cd": lambda run: distill_run(run, CDOptions(teacher)),
        "ict": lambda run: ict_run(run, data, EDMProcess(), ICTOptions()),
        "ect": lambda run: ect_run(run, data, EDMProcess(), ECTOptions(init_from=teacher)),
        "sct": lambda run: sct_run(run, data, TrigFlowProcess(), SCTOptions()),
        "scd": lambda run: scd_run(run, SCDOptions(teacher=teacher)),
        "meanflow": lambda run: meanflow_run(run, data, FlowProcess(), MeanFlowOptions()),
        "shortcut": lambda run: shortcut_run(run, data, FlowProcess(), ShortcutOptions()),
    }
    stages = {"teacher": ("teacher_steps", lambda run: teacher_run(run, data, EDMProcess()))}
    return stages | {name: ("cm_steps", trains[name]) for name in students}


def scaled_steps(defaults: dict, key: str, scale: float) -> int:
    """A stage's step count: the data kind's default times `scale`, at least 10."""
    return max(10, round(defaults[key] * scale))
