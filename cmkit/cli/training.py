"""`cmkit train-teacher`, `distill` and `train`: flags to a recipe's options, then its run.

Recipe flags default to None, so a recipe's own dataclass supplies its defaults; a flag the
chosen recipe has no field for is refused rather than silently ignored.
"""

import argparse
from dataclasses import fields
from pathlib import Path

from cmkit import recipes
from cmkit.cli.options import guidance_scales, require
from cmkit.cli.run_flags import add_process_flags, add_run_flags, joined_run, process_of
from cmkit.errors import OptionError
from cmkit.jvp import JVP_METHODS
from cmkit.lora import DEFAULT_RANK
from cmkit.losses import DISTANCES
from cmkit.recipes.cd import SPACINGS
from cmkit.recipes.ct import MU_VARIANTS
from cmkit.recipes.ect import ECT_TIMES, ECT_WEIGHTINGS
from cmkit.recipes.ict import PAIRS, WEIGHTINGS
from cmkit.recipes.lcm import LCM_MU
from cmkit.recipes.teacher import P_UNCOND
from cmkit.solvers import SOLVERS
from cmkit.training_times import SCM_TIMES


def _recipe(args: argparse.Namespace, table: dict) -> "recipes.Recipe":
    """The chosen recipe, refusing the flags of the table's other recipes that it lacks."""
    recipe = table[args.recipe]
    own = {f.name for f in fields(recipe.options)}
    for other in table.values():
        for f in fields(other.options):
            if f.name not in own and getattr(args, f.name, None) is not None:
                raise OptionError(f.name, f"does not apply to --recipe {args.recipe}")
    return recipe


def _options(cls: type, args: argparse.Namespace, **values):
    """An options dataclass from the flags given (None: the dataclass's default)."""
    for f in fields(cls):
        value = getattr(args, f.name, None)
        if f.name not in values and value is not None:
            values[f.name] = None if value == "none" else value
    return cls(**values)


def add_train_teacher(sub) -> None:
    p = sub.add_parser(
        "train-teacher", help="train an EDM (flow-matching, TrigFlow) diffusion model"
    )
    add_run_flags(p)
    add_process_flags(p)
    p.add_argument(
        "--p-uncond",
        type=float,
        help=f"with --labels: probability of training on the null label, which classifier-free "
        f"guidance needs (default {P_UNCOND})",
    )


def train_teacher(args: argparse.Namespace) -> Path:
    require(args, "data")
    opts = _options(recipes.TeacherOptions, args)
    with joined_run(args) as run:
        return recipes.teacher_run(run, args.data, process_of(args), opts)


def add_distill(sub) -> None:
    d, lcm = recipes.CDOptions(teacher=""), recipes.LCMOptions(teacher="")
    p = sub.add_parser(
        "distill",
        help="consistency distillation from a teacher run (CD, LCM, or sCD in continuous time)",
    )
    add_run_flags(p, data=False)
    p.add_argument(
        "--recipe",
        default="cd",
        choices=list(recipes.DISTILL_RECIPES),
        help="cd: grid pairs joined by a teacher ODE step (default); lcm: cd with LCM's "
        "settings (Euler/DDIM steps, N = 51, μ = 0.95, a DDPM teacher's own timesteps); "
        "scd: continuous time",
    )
    p.add_argument("--teacher", help="teacher run directory")
    p.add_argument(
        "--solver", choices=SOLVERS, help=f"teacher ODE step (cd {d.solver}, lcm {lcm.solver})"
    )
    p.add_argument(
        "--num-scales",
        type=int,
        help=f"N, points of the σ grid (cd {d.num_scales}, lcm {lcm.num_scales})",
    )
    p.add_argument("--distance", choices=DISTANCES, help=f"default {d.distance}")
    p.add_argument(
        "--mu", type=float, help=f"target EMA rate μ (cd {d.mu}, lcm {LCM_MU}; 0 with --lora-rank)"
    )
    p.add_argument(
        "--spacing",
        choices=SPACINGS,
        help="the σ grid: the process's (Karras for EDM; cd's default), or timesteps: every "
        "k-th of an imported DDPM teacher's timesteps, k = T/(N − 1) (lcm's default for one)",
    )
    p.add_argument(
        "--no-init-from-teacher", action="store_true", help="start the student from random weights"
    )
    p.add_argument(
        "--guidance",
        type=guidance_scales,
        help="labelled teacher: distil its classifier-free-guided ODE at scale W, or over "
        "W_MIN:W_MAX with w as the student's input (one student for every w)",
    )
    p.add_argument(
        "--lora-rank",
        type=int,
        nargs="?",
        const=DEFAULT_RANK,
        help=f"cd: LCM-LoRA, train only rank-R LoRA adapters on the teacher's own network "
        f"(R default {DEFAULT_RANK}; μ = 0; pip install 'cmkit[lora]')",
    )
    p.add_argument("--lora-alpha", type=float, help="cd: LoRA α, the update is (α/R)·B·A (α = R)")
    _add_scm_flags(p, times=True)


def _add_scm_flags(p: argparse.ArgumentParser, times: bool) -> None:
    """sCT/sCD's own flags; `times`: also P_mean/P_std of the training times (train has them
    already, shared with iCT and ECT)."""
    s = recipes.SCTOptions()
    if times:
        p.add_argument(
            "--time-dist",
            choices=SCM_TIMES,
            help=f"scd: σ of the training times lognormal or along the Karras ramp ({s.time_dist})",
        )
        p.add_argument("--p-mean", type=float, help=f"scd: τ ~ N(P_mean, P_std²) ({s.p_mean})")
        p.add_argument("--p-std", type=float, help=f"scd: P_std ({s.p_std})")
    p.add_argument("--warmup", type=int, help=f"sct/scd: tangent warm-up steps ({s.warmup})")
    p.add_argument("--tangent-c", type=float, help=f"sct/scd: g/(‖g‖ + c) ({s.tangent_c})")
    p.add_argument(
        "--jvp",
        help=f"sct/scd/meanflow: the JVP by {' or '.join(JVP_METHODS)} (default {s.jvp})",
    )


def distill(args: argparse.Namespace) -> Path:
    require(args, "teacher")
    recipe = _recipe(args, recipes.DISTILL_RECIPES)
    init = not args.no_init_from_teacher
    opts = _options(recipe.options, args, init_from_teacher=init)
    with joined_run(args) as run:
        return recipe.run(run, opts)


def _defaults(option: str) -> str:
    """'ct: l2, ict: pseudo-huber': each training recipe's default for an option."""
    shown = [
        f"{name}: {getattr(recipe.options(), option)}"
        for name, recipe in recipes.TRAINING_RECIPES.items()
        if option in {f.name for f in fields(recipe.options)}
    ]
    return "default " + ", ".join(shown)


def add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="consistency training from data (iCT, CT), tuning a teacher (ECT), or a flow map "
        "(MeanFlow, shortcut)",
    )
    add_run_flags(p)
    p.add_argument(
        "--recipe",
        default="ict",
        choices=list(recipes.TRAINING_RECIPES),
        help="consistency models: ct, ict (default), ect, sct; flow maps, which sample better "
        "with more steps: meanflow, shortcut",
    )
    add_process_flags(p, "edm; sct: trigflow; meanflow, shortcut: flow")
    p.add_argument("--distance", choices=DISTANCES, help=_defaults("distance"))
    p.add_argument("--s0", type=int, help=f"initial N ({_defaults('s0')})")
    p.add_argument("--s1", type=int, help=f"final N ({_defaults('s1')})")
    p.add_argument("--mu0", type=float, help=f"initial target EMA rate μ₀ ({_defaults('mu0')})")
    p.add_argument(
        "--mu-variant",
        choices=MU_VARIANTS,
        help="ct: μ(k) = exp(s₀ ln μ₀ / N(k)) (paper, the default) or / (N(k) − 1) (openai)",
    )
    p.add_argument(
        "--pairs",
        choices=PAIRS,
        help="ict: how grid pairs are drawn (default uniform); lognormal is the iCT paper's "
        "choice for 400k-step runs, uniform trains the one-step map faster on short runs",
    )
    p.add_argument(
        "--weighting",
        choices=sorted({*WEIGHTINGS, *ECT_WEIGHTINGS}),
        help="ict: λ = 1/(t_{n+1} − t_n) (ict, the default) or 1 (uniform); "
        "ect: 1/(t − r) (inverse-gap, the default) or (t² + σ_d²)/(t·σ_d)² (snr)",
    )
    p.add_argument(
        "--p-mean",
        type=float,
        help=f"lognormal times (meanflow: logit-normal): P_mean ({_defaults('p_mean')})",
    )
    p.add_argument("--p-std", type=float, help=f"lognormal times: P_std ({_defaults('p_std')})")
    e = recipes.ECTOptions()
    p.add_argument(
        "--init-from", help="ect: start from this EDM teacher run (same network); else scratch"
    )
    p.add_argument(
        "--time-dist",
        choices=sorted({*ECT_TIMES, *SCM_TIMES}),
        help="ect/sct: training times uniform along the Karras ramp (karras) or lognormal "
        f"(the papers', with --p-mean/--p-std); {_defaults('time_dist')}",
    )
    p.add_argument("--q", type=float, help=f"ect: the gap t − r shrinks by q per stage ({e.q:g})")
    p.add_argument(
        "--double", type=int, help="ect: steps per stage (default: the run's steps / stages)"
    )
    p.add_argument("--k", type=float, help=f"ect: n(t) = 1 + k·sigmoid(−b·t) (k = {e.k:g})")
    p.add_argument("--b", type=float, help=f"ect: b of n(t) ({e.b:g})")
    p.add_argument(
        "--huber-c", type=float, help="ect: pseudo-Huber c (default iCT's 0.00054·√d; 0: L2 norm)"
    )
    p.add_argument(
        "--dropout", type=float, help="ect: dropout of the network (default: the network's)"
    )
    _add_scm_flags(p, times=False)
    m, sc = recipes.MeanFlowOptions(), recipes.ShortcutOptions()
    p.add_argument(
        "--fraction",
        type=float,
        help=f"meanflow: share of each batch with r ≠ t ({m.fraction:g}); shortcut: share on "
        f"self-consistency ({sc.fraction:g}); the rest trains flow matching",
    )
    p.add_argument(
        "--power",
        type=float,
        help=f"meanflow: p of the adaptive weight 1/(‖Δ‖² + c)^p ({m.power:g})",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        help=f"shortcut: M, a power of two; jumps of 1, 1/2, …, 1/M ({sc.max_steps})",
    )


def train(args: argparse.Namespace) -> Path:
    require(args, "data")
    recipe = _recipe(args, recipes.TRAINING_RECIPES)
    opts = _options(recipe.options, args)
    process = process_of(args, recipe.process)
    with joined_run(args) as run:
        return recipe.run(run, args.data, process, opts)


COMMANDS = {
    "train-teacher": (add_train_teacher, train_teacher),
    "distill": (add_distill, distill),
    "train": (add_train, train),
}
