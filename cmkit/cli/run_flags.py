"""The flags every training command shares, and what they become: the data and how to read
it, recipes.RunOptions, the latent space, the noise process.

`train-teacher`, `distill` and `train` (cmkit.cli.training) add these and read them back
with joined_run and process_of; the commands that read data without training a run take the
data flags alone.
"""

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields, replace

from cmkit import recipes
from cmkit.cli.options import add_device, check_device, clip_norm, flag, json_object, require
from cmkit.data import LAYOUTS
from cmkit.distributed import joined
from cmkit.engine import PRECISIONS
from cmkit.errors import OptionError
from cmkit.networks.zoo import BACKBONES
from cmkit.process import PROCESSES, EDMProcess, make_process
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


def add_run_flags(p: argparse.ArgumentParser, data: bool = True) -> None:
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


def add_process_flags(p: argparse.ArgumentParser, default: str = "edm") -> None:
    """--process and every process's flags; process_of refuses those the chosen one lacks."""
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
def joined_run(args: argparse.Namespace) -> Iterator[recipes.RunOptions]:
    """The run's options in this process's world of processes (cmkit.distributed), whose
    device is its own GPU under several processes on cuda."""
    run = _run_options(args)
    with joined(run.device) as world:
        yield replace(run, world=world, device=str(world.device))


def process_of(args: argparse.Namespace, default: str = "edm"):
    """The --process (else `default`) with the process flags given, each refused where it has
    no such field."""
    name = args.process or default
    accepted = {f.name for f in fields(PROCESSES[name])}
    given = {key: getattr(args, key) for key in PROCESS_FLAGS if getattr(args, key) is not None}
    for key in sorted(given.keys() - accepted):
        raise OptionError(key, f"does not apply to --process {name}")
    return make_process(name, **given)
