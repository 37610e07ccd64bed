"""`cmkit train-teacher`, `distill` and `train`: flags to a recipe's options, then its run.

Recipe flags default to None, so a recipe's own dataclass supplies its defaults; a flag the
chosen recipe has no field for is refused rather than silently ignored.
"""

import argparse
from dataclasses import fields
from pathlib import Path

from cmkit import recipes
from cmkit.cli.options import add_device, check_device, clip_norm, flag, json_object, require
from cmkit.errors import OptionError
from cmkit.losses import DISTANCES
from cmkit.networks.zoo import BACKBONES
from cmkit.process import PROCESSES, EDMProcess, make_process
from cmkit.recipes.ct import MU_VARIANTS
from cmkit.recipes.ict import PAIRS, WEIGHTINGS
from cmkit.solvers import SOLVERS
from cmkit.train import ON_NONFINITE

DATA_HELP = (
    "digits | tinted-digits | moons | 8gaussians | checkerboard | swissroll | rings | "
    "FILE.npy | FILE.npz | image folder"
)
PROCESS_FLAGS = {  # option -> help; each process takes those among its own fields
    "sigma_min": "edm: ε = σ_min",
    "sigma_max": "edm: T = σ_max",
    "rho": "edm: Karras grid exponent ρ",
    "sigma_data": "σ_data: the data's scale in model units (vectors get std σ_data)",
}


def _add_run_options(p: argparse.ArgumentParser, data: bool = True) -> None:
    """The flags of recipes.RunOptions, plus --data and --grad-clip."""
    p.add_argument("--config", help="TOML or JSON file of options (same keys as the flags)")
    if data:
        p.add_argument("--data", help=DATA_HELP)
    p.add_argument("--out", help="run directory to create (or continue with --resume)")
    p.add_argument("--steps", type=int, help="optimiser steps (default depends on the data)")
    p.add_argument("--batch-size", type=int, help="batch size (default depends on the data)")
    p.add_argument("--lr", type=float, help="Adam learning rate")
    p.add_argument("--ema-rate", type=float, default=0.999, help="EMA of weights for sampling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", type=float, default=0.1, help="fraction of data held out")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument(
        "--checkpoint-minutes",
        type=float,
        default=10.0,
        help="also checkpoint after this many minutes of wall time",
    )
    p.add_argument(
        "--on-nonfinite",
        default="stop",
        choices=ON_NONFINITE,
        help="a NaN/inf loss or gradient stops training (exit 3) or skips the batch",
    )
    p.add_argument(
        "--grad-clip",
        type=clip_norm,
        help="clip the gradient norm at this value, or none (default: the recipe's, 1.0)",
    )
    if data:
        p.add_argument(
            "--network",
            type=json_object,
            default={},
            help="network settings, e.g. '{\"hidden\": 512}' or '{\"channels\": 64}'",
        )
    p.add_argument(
        "--backbone",
        choices=BACKBONES,
        help="image network: builtin UNet (default; distill: the teacher's) or diffusers-unet "
        "(a diffusers UNet2DModel, needed by export-diffusers; pip install 'cmkit[diffusers]')",
    )
    add_device(p)


def _add_process(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--process",
        default="edm",
        choices=list(PROCESSES),
        help="noise process: edm (x₀ + σ·z, the default), flow (rectified flow) or trigflow "
        "(cos t·x₀ + sin t·σ_d·z, sCM's TrigFlow; takes --sigma-data only)",
    )
    edm = EDMProcess()
    for name, text in PROCESS_FLAGS.items():
        p.add_argument(flag(name), type=float, help=f"{text} (default {getattr(edm, name):g})")


def _run_options(args: argparse.Namespace) -> recipes.RunOptions:
    require(args, "out")
    return recipes.RunOptions(
        out=args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        ema_rate=args.ema_rate,
        seed=args.seed,
        device=check_device(args.device),
        holdout=args.holdout,
        resume=args.resume,
        checkpoint_every=args.checkpoint_every,
        checkpoint_minutes=args.checkpoint_minutes,
        progress=not args.no_progress,
        on_nonfinite=args.on_nonfinite,
        network=getattr(args, "network", {}),
        backbone=args.backbone,
    )


def _process(args: argparse.Namespace):
    """The --process with the process flags given, each refused where it has no such field."""
    accepted = {f.name for f in fields(PROCESSES[args.process])}
    given = {name: getattr(args, name) for name in PROCESS_FLAGS if getattr(args, name) is not None}
    for name in sorted(given.keys() - accepted):
        raise OptionError(name, f"does not apply to --process {args.process}")
    return make_process(args.process, **given)


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
    _add_run_options(p)
    _add_process(p)


def train_teacher(args: argparse.Namespace) -> Path:
    require(args, "data")
    opts = _options(recipes.TeacherOptions, args)
    return recipes.teacher_run(_run_options(args), args.data, _process(args), opts)


def add_distill(sub) -> None:
    d = recipes.CDOptions(teacher="")
    p = sub.add_parser("distill", help="consistency distillation from a teacher run")
    _add_run_options(p, data=False)
    p.add_argument("--teacher", help="teacher run directory")
    p.add_argument("--solver", choices=SOLVERS, help=f"teacher ODE step (default {d.solver})")
    p.add_argument("--num-scales", type=int, help=f"N, points of the σ grid ({d.num_scales})")
    p.add_argument("--distance", choices=DISTANCES, help=f"default {d.distance}")
    p.add_argument("--mu", type=float, help=f"target EMA rate μ (default {d.mu})")
    p.add_argument(
        "--no-init-from-teacher", action="store_true", help="start the student from random weights"
    )


def distill(args: argparse.Namespace) -> Path:
    require(args, "teacher")
    init = not args.no_init_from_teacher
    opts = _options(recipes.CDOptions, args, init_from_teacher=init)
    return recipes.distill_run(_run_options(args), opts)


def _defaults(option: str) -> str:
    """'ct: l2, ict: pseudo-huber': each training recipe's default for an option."""
    shown = [
        f"{name}: {getattr(recipe.options(), option)}"
        for name, recipe in recipes.TRAINING_RECIPES.items()
        if option in {f.name for f in fields(recipe.options)}
    ]
    return "default " + ", ".join(shown)


def add_train(sub) -> None:
    p = sub.add_parser("train", help="consistency training (iCT or CT) from data alone")
    _add_run_options(p)
    p.add_argument("--recipe", default="ict", choices=list(recipes.TRAINING_RECIPES))
    _add_process(p)
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
        choices=list(WEIGHTINGS),
        help="ict: λ = 1/(t_{n+1} − t_n) (ict, the default) or 1 (uniform)",
    )
    p.add_argument("--p-mean", type=float, help=f"lognormal pairs: P_mean ({_defaults('p_mean')})")
    p.add_argument("--p-std", type=float, help=f"lognormal pairs: P_std ({_defaults('p_std')})")


def train(args: argparse.Namespace) -> Path:
    require(args, "data")
    recipe = recipes.TRAINING_RECIPES[args.recipe]
    own = {f.name for f in fields(recipe.options)}
    for other in recipes.TRAINING_RECIPES.values():
        for f in fields(other.options):
            if f.name not in own and getattr(args, f.name, None) is not None:
                raise OptionError(f.name, f"does not apply to --recipe {args.recipe}")
    opts = _options(recipe.options, args)
    return recipe.run(_run_options(args), args.data, _process(args), opts)


COMMANDS = {
    "train-teacher": (add_train_teacher, train_teacher),
    "distill": (add_distill, distill),
    "train": (add_train, train),
}
