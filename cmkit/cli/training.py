"""`cmkit train-teacher`, `distill` and `train`: flags to a recipe's options, then its run.

Recipe flags default to None, so a recipe's own dataclass supplies its defaults; a flag the
chosen recipe has no field for is refused rather than silently ignored.
"""

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path

from cmkit import recipes
from cmkit.cli.options import (
    add_device,
    check_device,
    clip_norm,
    flag,
    guidance_scales,
    json_object,
    require,
)
from cmkit.data import LAYOUTS
from cmkit.distributed import joined
from cmkit.engine import PRECISIONS
from cmkit.errors import OptionError
from cmkit.jvp import JVP_METHODS
from cmkit.lora import DEFAULT_RANK
from cmkit.losses import DISTANCES
from cmkit.networks.zoo import BACKBONES
from cmkit.process import PROCESSES, EDMProcess, make_process
from cmkit.recipes.cd import SPACINGS
from cmkit.recipes.ct import MU_VARIANTS
from cmkit.recipes.ect import ECT_TIMES, ECT_WEIGHTINGS
from cmkit.recipes.ict import PAIRS, WEIGHTINGS
from cmkit.recipes.lcm import LCM_MU
from cmkit.recipes.teacher import P_UNCOND
from cmkit.solvers import SOLVERS
from cmkit.train import ON_NONFINITE
from cmkit.training_times import SCM_TIMES

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


def add_data_flags(p: argparse.ArgumentParser, labels_help: str | None = None) -> None:
    """--data and how to read it: its .npz keys, its layout, its labels (`labels_help`: what
    --labels says; None: the flag is left out, for commands that decide it themselves)."""
    p.add_argument("--data", help=DATA_HELP)
    p.add_argument(
        "--data-key",
        help="the .npz array to train on (default: x_train, x, images, data or its only one)",
    )
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        help="how a 4-D array's axes are laid out (default: channels-last (N, H, W, 1|3|4) "
        "is detected, with a notice)",
    )
    if labels_help is not None:
        p.add_argument("--labels", action="store_true", help=labels_help)
    p.add_argument(
        "--label-key", help="the .npz array of the labels (default: y_train, y, labels, targets)"
    )


LABELS_HELP = (
    "class-conditional: read the data's labels (.npz y_train/y/labels/targets, class "
    "subfolders of an image folder, the IDX labels file beside the images, digits' digit)"
)


def _add_run_options(p: argparse.ArgumentParser, data: bool = True) -> None:
    """The flags of recipes.RunOptions, plus --data and --grad-clip."""
    p.add_argument("--config", help="TOML or JSON file of options (same keys as the flags)")
    if data:
        add_data_flags(p, LABELS_HELP)
        _add_latent_flags(p)
        p.add_argument(
            "--workers",
            type=int,
            default=0,
            help="decode an image folder lazily, a batch at a time, in this many processes "
            "(default 0: read it whole into memory); its rows come from a stream of their own",
        )
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
        "--keep-history",
        action="store_true",
        help="also keep each checkpoint's EMA weights in <out>/history (quality over time)",
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
    p.add_argument(
        "--nproc",
        type=int,
        help="train in this many processes on this machine, each on its share of the batch "
        "(gloo on cpu, nccl with one GPU each on cuda); torchrun works too",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="bf16: the network forwards under autocast (weights, optimiser, EMA and loss stay "
        "fp32); a speed-up on recent GPUs, slower on most CPUs",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the online network's training forward (pays off on long runs)",
    )


def _add_latent_flags(p: argparse.ArgumentParser) -> None:
    """--latent and --vae: train in an autoencoder's latent space (see cmkit.latent)."""
    p.add_argument(
        "--latent",
        metavar="DIR",
        help="train in the latent space of this autoencoder (from cmkit train-autoencoder); "
        "sample, eval and tune-times decode back to images",
    )
    p.add_argument(
        "--vae",
        metavar="DIR",
        help="the same with a diffusers AutoencoderKL folder (config.json and "
        "diffusion_pytorch_model.safetensors; pickled weights are refused)",
    )


def _add_process(p: argparse.ArgumentParser, default: str = "edm") -> None:
    p.add_argument(
        "--process",
        choices=list(PROCESSES),
        help="noise process: edm (x₀ + σ·z), flow (rectified flow) or trigflow "
        f"(cos t·x₀ + sin t·σ_d·z, sCM's TrigFlow; takes --sigma-data only); default {default}",
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
        keep_history=args.keep_history,
        progress=not args.no_progress,
        on_nonfinite=args.on_nonfinite,
        network=getattr(args, "network", {}),
        backbone=args.backbone,
        data_key=getattr(args, "data_key", None),
        layout=getattr(args, "layout", None),
        labels=getattr(args, "labels", False),
        label_key=getattr(args, "label_key", None),
        latent=getattr(args, "latent", None),
        vae=getattr(args, "vae", None),
        workers=getattr(args, "workers", 0),
        precision=args.precision,
        compile=args.compile,
    )


@contextmanager
def _run(args: argparse.Namespace) -> Iterator[recipes.RunOptions]:
    """The run's options in this process's world of processes (cmkit.distributed), whose
    device is its own GPU under several processes on cuda."""
    run = _run_options(args)
    with joined(run.device) as world:
        yield replace(run, world=world, device=str(world.device))


def _process(args: argparse.Namespace, default: str = "edm"):
    """The --process (else `default`) with the process flags given, each refused where it has
    no such field."""
    name = args.process or default
    accepted = {f.name for f in fields(PROCESSES[name])}
    given = {key: getattr(args, key) for key in PROCESS_FLAGS if getattr(args, key) is not None}
    for key in sorted(given.keys() - accepted):
        raise OptionError(key, f"does not apply to --process {name}")
    return make_process(name, **given)


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
    _add_run_options(p)
    _add_process(p)
    p.add_argument(
        "--p-uncond",
        type=float,
        help=f"with --labels: probability of training on the null label, which classifier-free "
        f"guidance needs (default {P_UNCOND})",
    )


def train_teacher(args: argparse.Namespace) -> Path:
    require(args, "data")
    opts = _options(recipes.TeacherOptions, args)
    with _run(args) as run:
        return recipes.teacher_run(run, args.data, _process(args), opts)


def add_distill(sub) -> None:
    d, lcm = recipes.CDOptions(teacher=""), recipes.LCMOptions(teacher="")
    p = sub.add_parser(
        "distill",
        help="consistency distillation from a teacher run (CD, LCM, or sCD in continuous time)",
    )
    _add_run_options(p, data=False)
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
    with _run(args) as run:
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
    _add_run_options(p)
    p.add_argument(
        "--recipe",
        default="ict",
        choices=list(recipes.TRAINING_RECIPES),
        help="consistency models: ct, ict (default), ect, sct; flow maps, which sample better "
        "with more steps: meanflow, shortcut",
    )
    _add_process(p, "edm; sct: trigflow; meanflow, shortcut: flow")
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
    process = _process(args, recipe.process)
    with _run(args) as run:
        return recipe.run(run, args.data, process, opts)


COMMANDS = {
    "train-teacher": (add_train_teacher, train_teacher),
    "distill": (add_distill, distill),
    "train": (add_train, train),
}
