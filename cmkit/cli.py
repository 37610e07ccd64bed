"""The `cmkit` command line: the only place flags and config files become components.

Every command takes `--config FILE` (TOML or JSON whose keys are the long flag names, with
dashes or underscores); flags on the command line win over the file. User errors print one
line on stderr and exit with code 2; a diverged run exits with 3; Ctrl-C during training
saves a checkpoint and exits with 130.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from cmkit import recipes
from cmkit.editing import TASKS
from cmkit.errors import UserError
from cmkit.runs import save_json
from cmkit.train import ON_NONFINITE, TrainingDiverged, TrainingInterrupted

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage stays available through --help)."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = None
    if values is None or not all(map(_finite, values)):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r}")
    return values


def _finite(value) -> bool:
    """A number that is neither NaN nor ±inf, nor an integer too large for a float."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _grad_clip(text: str | float) -> float | str:
    """A finite number > 0, or "none" (kept a string: options.json drops None, "not given")."""
    if str(text).lower() in ("none", "off"):
        return "none"
    try:
        value = float(text)
    except (TypeError, ValueError, OverflowError):
        value = math.nan
    if isinstance(text, bool) or not (_finite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0 or 'none', got {text!r}")
    return value


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _add_common(p: argparse.ArgumentParser, data: bool = True) -> None:
    p.add_argument("--config", help="TOML or JSON file of options (same keys as the flags)")
    if data:
        p.add_argument(
            "--data",
            help="digits | tinted-digits | moons | 8gaussians | checkerboard | swissroll | "
            "rings | FILE.npy | FILE.npz | image folder",
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
        "--on-nonfinite",
        default="stop",
        choices=ON_NONFINITE,
        help="a NaN/inf loss or gradient stops training (exit 3) or skips the batch",
    )
    p.add_argument(
        "--grad-clip",
        type=_grad_clip,
        default=1.0,
        help="largest gradient norm of a step (default 1.0), or none/off: no clipping",
    )
    if data:
        p.add_argument(
            "--network",
            type=_json_object,
            default={},
            help="network settings, e.g. '{\"hidden\": 512}' or '{\"channels\": 64}'",
        )
    p.add_argument(
        "--backbone",
        choices=recipes.BACKBONES,
        help="image network: builtin UNet (default; distill: the teacher's) or diffusers-unet "
        "(a diffusers UNet2DModel, needed by export-diffusers; pip install 'cmkit[diffusers]')",
    )
    _add_device(p)


def _add_process(p: argparse.ArgumentParser) -> None:
    p.add_argument("--process", default="edm", choices=["edm", "flow"])
    p.add_argument("--sigma-min", type=float, default=0.002, help="edm: ε = σ_min")
    p.add_argument("--sigma-max", type=float, default=80.0, help="edm: T = σ_max")
    p.add_argument("--rho", type=float, default=7.0, help="edm: Karras grid exponent ρ")
    p.add_argument("--sigma-data", type=float, default=0.5, help="edm: σ_data")


def _add_scoring(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML or JSON file of options")
    p.add_argument("--model", help="run directory")
    p.add_argument(
        "--data",
        help="reference data (default: the run's held-out split; tune-times: its training split)",
    )
    p.add_argument(
        "--features",
        help="image features: digitsnet (default for 1x8x8), pixels (default otherwise), "
        "inception (needs its weights locally), or a TorchScript file",
    )
    p.add_argument("--n", type=int, help="samples per evaluation (default 5000; images 2000)")
    p.add_argument("--seed", type=int, default=0)
    _add_device(p)


def _edm_kwargs(args: argparse.Namespace) -> dict:
    if args.process != "edm":
        return {}
    return {
        "sigma_min": args.sigma_min,
        "sigma_max": args.sigma_max,
        "rho": args.rho,
        "sigma_data": args.sigma_data,
    }


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, …")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> Parser:
    parser = Parser(
        prog="cmkit",
        description="Consistency models: one-step generators from "
        "data or from a diffusion teacher.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("train-teacher", help="train an EDM (or flow-matching) diffusion model")
    _add_common(p)
    _add_process(p)

    p = sub.add_parser("distill", help="consistency distillation from a teacher run")
    _add_common(p, data=False)
    p.add_argument("--teacher", help="teacher run directory")
    p.add_argument("--solver", default="heun", choices=["euler", "heun"])
    p.add_argument("--num-scales", type=int, default=18, help="N, points of the σ grid")
    p.add_argument("--distance", default="l2", choices=["l2", "l1", "pseudo-huber"])
    p.add_argument("--mu", type=float, default=0.0, help="target EMA rate μ")
    p.add_argument(
        "--no-init-from-teacher", action="store_true", help="start the student from random weights"
    )

    p = sub.add_parser("train", help="consistency training (CT or iCT) from data alone")
    _add_common(p)
    p.add_argument("--recipe", default="ict", choices=["ct", "ict"])
    _add_process(p)
    p.add_argument(
        "--distance",
        choices=["l2", "l1", "pseudo-huber"],
        help="default: l2 for ct, pseudo-huber for ict",
    )
    p.add_argument("--s0", type=int, help="initial N (ct: 2, ict: 10)")
    p.add_argument("--s1", type=int, help="final N (ct: 150, ict: 1280)")
    p.add_argument("--mu0", type=float, default=0.9, help="ct: initial target EMA rate μ₀")
    p.add_argument(
        "--mu-variant",
        default="paper",
        choices=["paper", "openai"],
        help="ct: μ(k) = exp(s₀ ln μ₀ / N(k)) (paper) or / (N(k) − 1) (openai)",
    )
    p.add_argument(
        "--pairs",
        default="uniform",
        choices=["uniform", "lognormal"],
        help="how grid pairs are drawn; lognormal is the iCT paper's choice for 400k-step "
        "runs, uniform trains the one-step map faster on short runs",
    )
    p.add_argument(
        "--weighting",
        choices=["uniform", "ict"],
        help="λ: 1 (ct default) or 1/(t_{n+1} − t_n) (ict default)",
    )
    p.add_argument("--p-mean", type=float, default=-1.1, help="lognormal pairs: P_mean")
    p.add_argument("--p-std", type=float, default=2.0, help="lognormal pairs: P_std")

    p = sub.add_parser("sample", help="draw samples from a run (.npy, or .png grid/scatter)")
    p.add_argument("--config", help="TOML or JSON file of options")
    p.add_argument("--model", help="run directory")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--out", help="FILE.npy (user's units) or FILE.png")
    p.add_argument(
        "--steps",
        type=int,
        help="CM: sampling steps (default 1); teacher: grid "
        "points K (default 18, Heun: 2K−1 evaluations)",
    )
    p.add_argument("--times", type=_floats, help="CM: intermediate times τ₁ > τ₂ > …")
    p.add_argument("--solver", choices=["euler", "heun"], help="teacher (or --ode) solver")
    p.add_argument("--ode", action="store_true", help="CM: deterministic ODE v = (x − f)/t")
    p.add_argument("--seed", type=int, default=0)
    _add_device(p)

    p = sub.add_parser("eval", help="score a run's samples against held-out data at each NFE")
    _add_scoring(p)
    p.add_argument(
        "--nfe",
        type=_ints,
        help="network evaluations, e.g. 1,2,4 (default: 1,2,4 for a CM; "
        "1,2,4,8,18,35 with Euler and Heun for a teacher)",
    )
    p.add_argument("--json", help="also write the results to this JSON file")

    p = sub.add_parser(
        "tune-times", help="search the intermediate times of multistep sampling; store them"
    )
    _add_scoring(p)
    p.add_argument("--steps", type=int, default=2, help="sampling steps to tune (>= 2)")
    p.add_argument("--iters", type=int, default=12, help="golden-section iterations per time")

    p = sub.add_parser(
        "export-diffusers", help="write a consistency run as a diffusers ConsistencyModelPipeline"
    )
    p.add_argument("--config", help="TOML or JSON file of options")
    p.add_argument("--model", help="consistency run trained with --backbone diffusers-unet")
    p.add_argument("--out", help="new folder for the pipeline")
    p.add_argument(
        "--num-train-timesteps",
        type=int,
        help="N of the scheduler's Karras grid (default: the run's final training N)",
    )

    p = sub.add_parser("import-diffusers", help="turn a ConsistencyModelPipeline folder into a run")
    p.add_argument("--config", help="TOML or JSON file of options")
    p.add_argument("--pipeline", help="folder written by save_pretrained or export-diffusers")
    p.add_argument("--out", help="run directory to create")

    p = sub.add_parser(
        "edit",
        help="zero-shot editing with a consistency run: inpaint, colorize, superres, denoise, "
        "interpolate, sdedit",
    )
    p.add_argument("task", choices=TASKS)
    p.add_argument("--config", help="TOML or JSON file of options")
    p.add_argument("--model", help="run directory (a consistency run; a teacher only denoises)")
    p.add_argument(
        "--input",
        action="append",
        help=".npy/.npz array (N, ...) in the data's units, or an image file; superres: the "
        "low-resolution image; interpolate: two standard-normal noise arrays (default: from "
        "--seed)",
    )
    p.add_argument("--out", help="FILE.npy or FILE.png, the kind of the input; a _grid.png beside")
    p.add_argument("--mask", help="inpaint: center | left-half | strokes | FILE (1/white = fill)")
    p.add_argument("--steps", type=int, help="network evaluations (default 4; sdedit 2)")
    p.add_argument(
        "--times",
        type=_floats,
        help="editing times τ₁ > τ₂ > … (τ₁ ≤ T: where editing starts; default T and the "
        "sampling times for --steps)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds all noise (and the strokes mask)")
    p.add_argument("--factor", type=int, default=2, help="superres: upscaling factor p")
    p.add_argument("--sigma", type=float, help="denoise: noise level in the data's units")
    p.add_argument("--frames", type=int, default=8, help="interpolate: frames per pair")
    _add_device(p)

    p = sub.add_parser("quickstart", help="the whole pipeline on digits in minutes")
    p.add_argument("--config", help="TOML or JSON file of options")
    p.add_argument("--out", default="quickstart", help="directory for runs and results")
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every step count (e.g. 0.1 for a smoke test)",
    )
    _add_device(p)
    return parser


def _config_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    """Options from a TOML/JSON file, checked against the command's own flags."""
    file = Path(path)
    try:
        text = file.read_text()
        options = tomllib.loads(text) if file.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read --config {path}: {err}") from None
    if not isinstance(options, dict):
        raise UserError(f"--config {path} must hold a table of options, got {type(options)}")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("config", "help")}
    defaults = {}
    for key, value in options.items():
        action = actions.get(str(key).replace("-", "_"))
        if action is None:
            raise UserError(f"--config {path}: unknown option {key!r} for this command")
        if not _valid_option(action, value):
            expected = ", ".join(action.choices) if action.choices else _kind_of(action)
            raise UserError(f"--config {path}: {key} = {value!r}; expected {expected}")
        defaults[action.dest] = float(value) if action.type is float else value
    return defaults


def _kind_of(action: argparse.Action) -> str:
    if action.nargs == 0:
        return "true or false"
    names = {
        int: "an integer",
        float: "a finite number",
        _floats: "a list of numbers",
        _ints: "a list of integers",
        _json_object: "a table",
        _grad_clip: "a number > 0 or 'none'",
    }
    return names.get(action.type, "a string")


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _valid_option(action: argparse.Action, value) -> bool:
    """A config value must already have the type the flag would parse to."""
    if action.nargs == 0:  # store_true flags
        ok = isinstance(value, bool)
    elif action.type is int:
        ok = _is_number(value) and isinstance(value, int)
    elif action.type is float:
        ok = _is_number(value) and _finite(value)
    elif action.type is _floats:
        ok = isinstance(value, list) and all(_is_number(v) and _finite(v) for v in value)
    elif action.type is _ints:
        ok = isinstance(value, list) and all(isinstance(v, int) and _is_number(v) for v in value)
    elif action.type is _json_object:
        ok = isinstance(value, dict)
    elif action.type is _grad_clip:  # a number or a word, parsed alike
        try:
            _grad_clip(value)
        except argparse.ArgumentTypeError:
            ok = False
        else:
            ok = True
    else:
        ok = isinstance(value, str)
    return ok and (not action.choices or value in action.choices)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = parser._subparsers._group_actions[0].choices[args.command]
    if args.config:
        sub.set_defaults(**_config_defaults(sub, args.config))
        args = parser.parse_args(argv)
    _check_numbers(sub, args)
    return args


def _check_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Numbers argparse accepts but nothing downstream can use: NaN, ±inf, seeds beyond 63 bits."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.type is float and value is not None and not _finite(value):
            raise UserError(f"{action.option_strings[0]} must be a finite number, got {value}")
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed < 2**63:
        raise UserError(f"--seed must be in [0, 2**63), got {seed}")


def _require(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name, None) in (None, ""):
            flag = "--" + name.replace("_", "-")
            raise UserError(
                f"{flag} is required for `cmkit {args.command}` (or set it in --config)"
            )


def _check_device(device: str) -> str:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(
            f"--device {device!r} is not a device; expected cpu, cuda, cuda:N or mps"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: MPS is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {device!r}: expected cpu, cuda, cuda:N or mps")
    try:
        torch.empty(0, device=dev)
    except RuntimeError as err:  # e.g. cuda:3 on a machine with one GPU
        raise UserError(f"--device {device}: {str(err).splitlines()[0]}") from None
    return device


def _common(args: argparse.Namespace) -> recipes.Common:
    _require(args, "out")
    return recipes.Common(
        out=args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        ema_rate=args.ema_rate,
        seed=args.seed,
        device=_check_device(args.device),
        holdout=args.holdout,
        resume=args.resume,
        checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress,
        on_nonfinite=args.on_nonfinite,
        grad_clip=None if args.grad_clip == "none" else args.grad_clip,
        network=getattr(args, "network", {}),
        backbone=args.backbone,
    )


def _save_options(args: argparse.Namespace, out: Path) -> None:
    """options.json: the command's options, rerunnable with `--config` (change --out)."""
    skip = ("command", "config", "resume")
    options = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    save_json(out / "options.json", options)


def cmd_train_teacher(args: argparse.Namespace) -> Path:
    _require(args, "data")
    return recipes.teacher_run(_common(args), args.data, args.process, _edm_kwargs(args))


def cmd_distill(args: argparse.Namespace) -> Path:
    _require(args, "teacher")
    return recipes.distill_run(
        _common(args),
        args.teacher,
        args.solver,
        args.num_scales,
        args.distance,
        args.mu,
        not args.no_init_from_teacher,
    )


def cmd_train(args: argparse.Namespace) -> Path:
    _require(args, "data")
    opts = recipes.CTOptions(
        recipe=args.recipe,
        process=args.process,
        distance=args.distance,
        s0=args.s0,
        s1=args.s1,
        mu0=args.mu0,
        mu_variant=args.mu_variant,
        edm=_edm_kwargs(args),
        pairs=args.pairs,
        weighting=args.weighting,
        p_mean=args.p_mean,
        p_std=args.p_std,
    )
    return recipes.ct_run(_common(args), args.data, opts)


def _reference_or_none(config: dict) -> np.ndarray | None:
    """Held-out data to draw behind a scatter plot, if the training data is still readable."""
    try:
        reference = recipes.held_out_data(config)
    except UserError:
        return None
    return reference if len(reference) else None


def cmd_sample(args: argparse.Namespace) -> None:
    from cmkit.generate import generate, load_model
    from cmkit.plots import save_image_grid, save_scatter

    _require(args, "model", "out")
    out = Path(args.out)
    if out.suffix not in (".npy", ".png"):
        raise UserError(f"--out {args.out}: expected a .npy or .png file name")
    if not out.parent.is_dir():
        raise UserError(f"--out {args.out}: folder {out.parent} does not exist")
    model = load_model(args.model, _check_device(args.device))
    x = generate(
        model,
        args.n,
        args.seed,
        args.steps,
        args.times,
        args.solver,
        args.ode,
        progress=not args.no_progress,
    )
    if out.suffix == ".npy":
        np.save(out, x)
    elif x.ndim == 4:
        save_image_grid((model.scaler.to_model(x) + 1) / 2, out)
    elif x.shape[1] == 2:
        save_scatter(x, out, _reference_or_none(model.config), title=str(args.model))
    else:
        raise UserError(f"--out {args.out}: PNG needs images or 2-D points; got {x.shape[1]}-D")
    print(f"wrote {args.n} samples to {out}")


def _scoring(args: argparse.Namespace, reference):
    """The model, its scorer against `reference(model)` data, and the sample count."""
    from cmkit.evaluate import make_scorer
    from cmkit.generate import load_model

    _require(args, "model")
    model = load_model(args.model, _check_device(args.device))
    n = args.n or (2000 if len(model.shape) == 3 else 5000)
    if n < 10:
        raise UserError(f"--n must be >= 10, got {n}")
    return model, make_scorer(model, reference(model), args.features), n


def cmd_eval(args: argparse.Namespace) -> None:
    from cmkit.evaluate import evaluate, held_out, markdown_table

    model, scorer, n = _scoring(args, lambda m: held_out(m, args.data))
    default = [1, 2, 4] if model.kind != "teacher" else [1, 2, 4, 8, 18, 35]
    rows = evaluate(model, scorer, args.nfe or default, n, args.seed)
    print(f"{args.model}: {n} samples against {len(scorer.reference)} reference samples")
    print(markdown_table(rows))
    if args.json:
        report = {
            "model": str(args.model),
            "kind": model.kind,
            "reference": args.data or "held-out split",
            "reference_size": len(scorer.reference),
            "n": n,
            "seed": args.seed,
            "rows": rows,
        }
        save_json(Path(args.json), report)
        print(f"wrote {args.json}")


def cmd_tune_times(args: argparse.Namespace) -> None:
    from cmkit.data import load_data
    from cmkit.evaluate import training_split, tune_times
    from cmkit.runs import store_times

    def reference(model):
        return load_data(args.data) if args.data else training_split(model)

    model, scorer, n = _scoring(args, reference)
    if args.iters < 1:
        raise UserError(f"--iters must be >= 1, got {args.iters}")
    times, best = tune_times(model, scorer, args.steps, n, args.seed, args.iters)
    note = {"metric": scorer.primary, "value": best, "n": n, "seed": args.seed}
    store_times(args.model, args.steps, times, note)
    shown = ", ".join(f"{t:.4g}" for t in times)
    print(f"{args.steps}-step times {shown}: {scorer.primary} {best:.4g}; stored in {args.model}")


def cmd_export_diffusers(args: argparse.Namespace) -> None:
    from cmkit.diffusers_io import export_pipeline, pipeline_calls

    _require(args, "model", "out")
    model, n = export_pipeline(args.model, args.out, args.num_train_timesteps)
    side = model.shape[-1]
    print(f"wrote a {side}x{side} ConsistencyModelPipeline (N = {n}) to {args.out}; with")
    print("  pipe = ConsistencyModelPipeline.from_pretrained(OUT)")
    print("  g = torch.Generator().manual_seed(S)")
    for line in pipeline_calls(model, n):
        print(f"  {line}")


def cmd_import_diffusers(args: argparse.Namespace) -> Path:
    from cmkit.diffusers_io import import_pipeline

    _require(args, "pipeline", "out")
    return import_pipeline(args.pipeline, args.out)


def cmd_edit(args: argparse.Namespace) -> None:
    from cmkit.edit_tasks import EditOptions, edit_files
    from cmkit.generate import load_model

    _require(args, "model", "out")
    model = load_model(args.model, _check_device(args.device))
    opts = EditOptions(
        args.mask, args.steps, args.times, args.seed, args.factor, args.sigma, args.frames
    )
    written = edit_files(model, args.task, args.input or [], Path(args.out), opts)
    print(f"wrote {', '.join(map(str, written))}")


def cmd_quickstart(args: argparse.Namespace) -> None:
    from cmkit.quickstart import quickstart

    if args.scale <= 0:
        raise UserError(f"--scale must be > 0, got {args.scale}")
    quickstart(Path(args.out), args.scale, _check_device(args.device), not args.no_progress)


COMMANDS = {
    "train-teacher": cmd_train_teacher,
    "distill": cmd_distill,
    "train": cmd_train,
    "sample": cmd_sample,
    "eval": cmd_eval,
    "tune-times": cmd_tune_times,
    "edit": cmd_edit,
    "quickstart": cmd_quickstart,
    "export-diffusers": cmd_export_diffusers,
    "import-diffusers": cmd_import_diffusers,
}


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(argv)
        result = COMMANDS[args.command](args)
        if isinstance(result, Path):
            _save_options(args, result)
            print(f"run saved in {result}")
        return 0
    except UserError as err:
        print(f"cmkit: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"cmkit: training stopped: {_one_line(err)}", file=sys.stderr)
        return 3
    except TrainingInterrupted as err:
        again = "rerun it" if args.command == "quickstart" else "continue with --resume"
        print(f"cmkit: {err}; {again}", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise
        print(f"cmkit: error: out of memory ({_one_line(err)[:200]})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cmkit: interrupted", file=sys.stderr)
        return 130


def _out_of_memory(err: Exception) -> bool:
    """An allocation too large for the machine, e.g. from --n or --batch-size (torch reports
    CPU and CUDA allocation failures as RuntimeErrors that say 'allocate')."""
    return isinstance(err, MemoryError) or "allocate" in str(err)


def _one_line(err: Exception) -> str:
    """The message on one line, whatever user text (a file name, a value) it quotes."""
    return " ".join(str(err).split("\n"))


if __name__ == "__main__":
    sys.exit(main())
