"""`cmkit sample`, `eval` and `tune-times`: draw from a run, score it, tune its times."""

import argparse
from pathlib import Path

import numpy as np

from cmkit.cli.options import add_device, check_device, floats, ints, require
from cmkit.data import run_splits
from cmkit.errors import UserError
from cmkit.runs import save_json
from cmkit.solvers import SOLVERS
from cmkit.units import to_unit


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="draw samples from a run (.npy, or .png grid/scatter)")
    p.add_argument("--config", help="TOML or JSON file of options")
    p.add_argument("--model", help="run directory")
    p.add_argument(
        "--base",
        help="LoRA runs: apply the adapter to this teacher run of the same network (default: "
        "the run it was trained on)",
    )
    p.add_argument(
        "--force", action="store_true", help="LoRA runs: take a base run it was not trained on"
    )
    p.add_argument("--n", type=int, help="number of samples (default 64; with --noise: its n)")
    p.add_argument("--out", help="FILE.npy (user's units) or FILE.png")
    p.add_argument(
        "--steps",
        type=int,
        help="CM: sampling steps (default 1); teacher: grid "
        "points K (default 18, Heun: 2K−1 evaluations)",
    )
    p.add_argument("--times", type=floats, help="CM: intermediate times τ₁ > τ₂ > …")
    _add_gamma(p)
    p.add_argument("--solver", choices=SOLVERS, help="teacher (or --ode) solver")
    p.add_argument(
        "--ode",
        action="store_true",
        help="CM: deterministic ODE v = (x − f)/t (trigflow: (cos t·x − f)/sin t)",
    )
    p.add_argument("--seed", type=int, default=0)
    _add_conditioning(p)
    p.add_argument(
        "--noise",
        help="FILE.npy: float32 standard-normal noise (K, n, *shape) used instead of drawing "
        "it, laid out as an exported sampler takes it: the initial noise, then one per "
        "intermediate time (K = a CM's steps; 1 for a teacher or --ode)",
    )
    add_device(p)


def _add_gamma(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gamma",
        type=float,
        help="CM: TCD's strategic stochastic sampling with γ in [0, 1] (Zheng et al. 2024; "
        "TCD's default 0.3): γ = 1 is the multistep sampler, as without --gamma; γ = 0 is "
        "deterministic",
    )


def _add_conditioning(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--label",
        help="labelled runs: the class id of every sample, or all (default: ids 0..K−1 in turn)",
    )
    p.add_argument(
        "--guidance",
        type=float,
        help="labelled runs: classifier-free guidance scale w (teacher: any, default 0; a "
        "guided student: the w it was distilled for, or any in its range)",
    )


def read_noise(path: str) -> np.ndarray:
    """A .npy array, read without unpickling; its dtype and shape are checked by generate."""
    if Path(path).suffix != ".npy":
        raise UserError(f"--noise {path}: expected a .npy file")
    try:
        noise = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UserError(f"--noise {path}: cannot read it ({err})") from None
    if not isinstance(noise, np.ndarray):  # an .npz archive under a .npy name
        raise UserError(f"--noise {path}: expected one array, found an archive")
    return noise


def _reference_or_none(config) -> np.ndarray | None:
    """Held-out data to draw behind a scatter plot, if the training data is still readable."""
    try:
        reference = run_splits(config.data)[1]
    except UserError:
        return None
    return reference if len(reference) else None


def sample(args: argparse.Namespace) -> None:
    from cmkit.generate import conditioning, generate, load_model
    from cmkit.plots import save_image_grid, save_scatter

    require(args, "model", "out")
    out = Path(args.out)
    if out.suffix not in (".npy", ".png"):
        raise UserError(f"--out {args.out}: expected a .npy or .png file name")
    if not out.parent.is_dir():
        raise UserError(f"--out {args.out}: folder {out.parent} does not exist")
    noise = read_noise(args.noise) if args.noise else None
    n = args.n
    if n is None:
        n = noise.shape[1] if noise is not None and noise.ndim > 1 else 64
    model = load_model(args.model, check_device(args.device), base=args.base, force=args.force)
    x = generate(
        model,
        n,
        args.seed,
        args.steps,
        args.times,
        args.solver,
        args.ode,
        args.gamma,
        progress=not args.no_progress,
        cond=conditioning(model, n, args.label, args.guidance),
        noise=noise,
    )
    if out.suffix == ".npy":
        np.save(out, x)
    elif x.ndim == 4:
        save_image_grid(to_unit(model.scaler.to_model(x)), out)
    elif x.shape[1] == 2:
        save_scatter(x, out, _reference_or_none(model.config), title=str(args.model))
    else:
        raise UserError(f"--out {args.out}: PNG needs images or 2-D points; got {x.shape[1]}-D")
    print(f"wrote {n} samples to {out}")


def _add_scoring(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML or JSON file of options")
    p.add_argument("--model", help="run directory")
    p.add_argument(
        "--data",
        help="reference data (default: the run's held-out split; tune-times: its training split)",
    )
    p.add_argument(
        "--features",
        help="image features: digitsnet (default for 1x8x8), mnistnet (default for 1x28x28), "
        "pixels (default otherwise), inception (needs its weights locally), or a TorchScript "
        "file",
    )
    p.add_argument("--n", type=int, help="samples per evaluation (default 5000; images 2000)")
    p.add_argument("--seed", type=int, default=0)
    add_device(p)


def _scoring(args: argparse.Namespace, reference, fd_inf: bool = False):
    """The model, its scorer against `reference(model)` data, and the sample count."""
    from cmkit.evaluate import make_scorer
    from cmkit.generate import load_model

    require(args, "model")
    model = load_model(args.model, check_device(args.device))
    n = args.n or (2000 if len(model.sample_shape) == 3 else 5000)
    if n < 10:
        raise UserError(f"--n must be >= 10, got {n}")
    return model, make_scorer(model, reference(model), args.features, fd_inf), n


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="score a run's samples against held-out data at each NFE")
    _add_scoring(p)
    p.add_argument(
        "--nfe",
        type=ints,
        help="network evaluations, e.g. 1,2,4 (default: 1,2,4 for a CM; 1,2,4,8,16 for a flow "
        "map; 1,2,4,8,18,35 with Euler and Heun for a teacher)",
    )
    p.add_argument(
        "--reference",
        choices=("heldout", "train", "all"),
        help="which of the run's data to score against: its held-out split (default), its "
        "training split, or both",
    )
    p.add_argument(
        "--fd-inf", action="store_true", help="images: add FD∞ (Chong & Forsyth 2020), slower"
    )
    p.add_argument("--json", help="also write the results to this JSON file")
    _add_gamma(p)
    _add_conditioning(p)


def evaluate(args: argparse.Namespace) -> None:
    from cmkit.evaluate import evaluate, held_out, markdown_table, reference_splits
    from cmkit.generate import check_tcd, conditioning

    if args.data and args.reference:
        raise UserError("--data and --reference both choose the reference; pass one")
    labels = {}

    def reference(model):
        conditioning(model, 1, args.label, args.guidance)  # checks them before any work
        check_tcd(model, args.gamma)
        if args.data:
            return held_out(model, args.data)
        one_class = None if args.label in (None, "all") else int(args.label)
        chosen = reference_splits(model, args.reference or "heldout", one_class)
        labels["reference"] = chosen.label
        return chosen.data

    model, scorer, n = _scoring(args, reference, args.fd_inf)
    default = {"teacher": [1, 2, 4, 8, 18, 35], "flowmap": [1, 2, 4, 8, 16]}.get(
        model.kind, [1, 2, 4]
    )
    cond = conditioning(model, n, args.label, args.guidance)
    rows = evaluate(model, scorer, args.nfe or default, n, args.seed, cond, args.gamma)
    print(f"{args.model}: {n} samples against {len(scorer.reference)} reference samples")
    print(markdown_table(rows))
    if args.json:
        report = {
            "model": str(args.model),
            "kind": model.kind,
            "reference": args.data or labels["reference"],
            "reference_size": len(scorer.reference),
            "n": n,
            "seed": args.seed,
            "gamma": args.gamma,
            "rows": rows,
        }
        save_json(Path(args.json), report)
        print(f"wrote {args.json}")


def add_tune_times(sub) -> None:
    p = sub.add_parser(
        "tune-times", help="search the intermediate times of multistep sampling; store them"
    )
    _add_scoring(p)
    p.add_argument("--steps", type=int, default=2, help="sampling steps to tune (>= 2)")
    p.add_argument("--iters", type=int, default=12, help="golden-section iterations per time")


def tune_times(args: argparse.Namespace) -> None:
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


COMMANDS = {
    "sample": (add_sample, sample),
    "eval": (add_eval, evaluate),
    "tune-times": (add_tune_times, tune_times),
}
