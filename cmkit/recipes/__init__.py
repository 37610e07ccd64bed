"""Recipes: one module per way of making a model, each with its own options and defaults.

  teacher   an EDM denoiser or flow-matching velocity field (the baseline, CD's teacher)
  cd        consistency distillation from a teacher run
  lcm       CD of a guided teacher with LCM's settings (latent consistency models)
  ct, ict   consistency training from data alone (original and improved)
  ect       easy consistency tuning: continuous-time pairs, from a teacher or from scratch
  scm       continuous-time sCT (from data) and sCD (from a teacher) on TrigFlow, by JVP
  flowmap   flow maps from data: MeanFlow and shortcut models (any number of steps)

Each `*_run(run: RunOptions, ...)` trains (or resumes) one run directory and returns it;
`common` holds the set-up they share; `stages` the teacher-then-students table the quickstart
and the benches train from. `TRAINING_RECIPES` are those `cmkit train --recipe`
offers: adding one is a module with an options dataclass and a run function, plus its entry.
"""

from collections.abc import Callable
from dataclasses import dataclass

from cmkit.recipes.cd import CDOptions, distill_run
from cmkit.recipes.common import RunOptions, defaults_for
from cmkit.recipes.ct import CTOptions, ct_run
from cmkit.recipes.ect import ECTOptions, ect_run
from cmkit.recipes.flowmap import MeanFlowOptions, ShortcutOptions, meanflow_run, shortcut_run
from cmkit.recipes.ict import ICTOptions, ict_run
from cmkit.recipes.lcm import LCMOptions, lcm_run
from cmkit.recipes.scm import SCDOptions, SCTOptions, scd_run, sct_run
from cmkit.recipes.stages import STUDENTS, default_stages, scaled_steps
from cmkit.recipes.teacher import TeacherOptions, teacher_run


@dataclass(frozen=True)
class Recipe:
    options: type
    run: (
        Callable  # train: (RunOptions, data_spec, process, options); distill: (RunOptions, options)
    )
    process: str = "edm"  # the process it trains on unless told otherwise


TRAINING_RECIPES = {
    "ct": Recipe(CTOptions, ct_run),
    "ict": Recipe(ICTOptions, ict_run),
    "ect": Recipe(ECTOptions, ect_run),
    "sct": Recipe(SCTOptions, sct_run, "trigflow"),
    "meanflow": Recipe(MeanFlowOptions, meanflow_run, "flow"),
    "shortcut": Recipe(ShortcutOptions, shortcut_run, "flow"),
}
DISTILL_RECIPES = {
    "cd": Recipe(CDOptions, distill_run),
    "scd": Recipe(SCDOptions, scd_run, "trigflow"),
    "lcm": Recipe(LCMOptions, lcm_run),
}

__all__ = [
    "CDOptions",
    "CTOptions",
    "DISTILL_RECIPES",
    "ECTOptions",
    "ICTOptions",
    "LCMOptions",
    "MeanFlowOptions",
    "TRAINING_RECIPES",
    "Recipe",
    "RunOptions",
    "SCDOptions",
    "SCTOptions",
    "ShortcutOptions",
    "STUDENTS",
    "TeacherOptions",
    "ct_run",
    "default_stages",
    "defaults_for",
    "distill_run",
    "ect_run",
    "ict_run",
    "lcm_run",
    "meanflow_run",
    "scaled_steps",
    "scd_run",
    "sct_run",
    "shortcut_run",
    "teacher_run",
]
