"""`cmkit train-autoencoder`: the built-in KL autoencoder that `--latent DIR` trains in."""

import argparse
from pathlib import Path

from cmkit.cli.options import add_device, check_device, require
from cmkit.cli.run_flags import DATA_HELP
from cmkit.data import LAYOUTS


def add_train_autoencoder(sub) -> None:
    from cmkit.train_autoencoder import KL_WEIGHT, AutoencoderOptions

    d = AutoencoderOptions(out="")
    p = sub.add_parser(
        "train-autoencoder",
        help="train a small KL autoencoder on images, for latent runs (--latent DIR)",
    )
    p.add_argument("--config", help="TOML or JSON file of options (same keys as the flags)")
    p.add_argument("--data", help=DATA_HELP + " (images)")
    p.add_argument("--data-key", help="the .npz array of the images (default: found by name)")
    p.add_argument("--layout", choices=LAYOUTS, help="how a 4-D array's axes are laid out")
    p.add_argument("--out", help="folder to create: autoencoder.json, .safetensors, metrics, PNG")
    p.add_argument(
        "--latent-channels",
        type=int,
        help="C, channels of the latent (default 2 up to 16 px, else 4)",
    )
    p.add_argument(
        "--downsample",
        type=int,
        help="image side / latent side, a power of 2 (default 2 up to 16 px, 4 up to 64, 8)",
    )
    p.add_argument(
        "--channels",
        type=int,
        help="width at full size; every halved level has twice as many (default 16)",
    )
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimiser steps ({d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate ({d.lr:g})")
    p.add_argument(
        "--kl-weight",
        type=float,
        default=KL_WEIGHT,
        help=f"β of the KL term, per pixel like the squared error ({KL_WEIGHT:g}, as LDM)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", type=float, default=0.1, help="fraction held out for metrics")
    p.add_argument("--resume", action="store_true", help="continue the training in --out")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    add_device(p)


def train_autoencoder(args: argparse.Namespace) -> Path:
    from cmkit.train_autoencoder import AutoencoderOptions, train_autoencoder

    require(args, "data", "out")
    opts = AutoencoderOptions(
        out=args.out,
        latent_channels=args.latent_channels,
        downsample=args.downsample,
        channels=args.channels,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        kl_weight=args.kl_weight,
        seed=args.seed,
        holdout=args.holdout,
        data_key=args.data_key,
        layout=args.layout,
        device=check_device(args.device),
        resume=args.resume,
        progress=not args.no_progress,
        checkpoint_every=args.checkpoint_every,
    )
    return train_autoencoder(args.data, opts)


COMMANDS = {"train-autoencoder": (add_train_autoencoder, train_autoencoder)}
