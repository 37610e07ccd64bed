"""Zero-shot editing on held-out digits: inpainting and super-resolution error against the truth.

Runs `cmkit.edit_tasks.run_task` (what `cmkit edit` calls) with a distilled digits model on
the run's held-out split, at 1, 2 and 4 steps (the defaults: τ₁ = T, then the run's sampling
times) and at hand-picked `--times`, and compares with plain baselines: filling the hole with
the mean of the image's known pixels or with the training set's per-pixel mean; nearest
upsampling. Errors are RMSE in the data's units (digits: 0..16) over the filled pixels
(inpainting) or all pixels (super-resolution). Writes the table into BENCHMARKS.md between
markers.

    python bench/editing.py [--model /work/shared_runs/qs/cd] [--seeds 8] [--times 80,2,1,0.5]
"""

import argparse
import datetime

import numpy as np
from benchmarks_md import write_section

from cmkit.data import run_splits
from cmkit.edit_tasks import EditOptions, run_task
from cmkit.editing import builtin_mask
from cmkit.generate import load_model

STEPS = (1, 2, 4)


def rmse(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    """Root mean squared error over the pixels where `where` (broadcast to a) is True."""
    where = np.broadcast_to(where, a.shape)
    return float(np.sqrt(((a - b)[where] ** 2).mean()))


def pool(x: np.ndarray, p: int) -> np.ndarray:
    """p×p average pooling of (N, C, H, W) images."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // p, p, w // p, p).mean(axis=(3, 5))


def edit_errors(model, task, truth, inputs, where, args, **options) -> list[tuple]:
    """Per setting (each of STEPS, then --times): mean RMSE and sd over the seeds, and the
    RMSE of the seeds' average edit, in data units."""
    rows = []
    for setting in [{"steps": k} for k in STEPS] + [{"times": args.times}]:
        outs = [
            model.scaler.to_raw(
                run_task(model, task, inputs, EditOptions(seed=s, **setting, **options)).after
            )
            for s in range(args.seeds)
        ]
        errs = [rmse(o, truth, where) for o in outs]
        rows.append((np.mean(errs), np.std(errs), rmse(np.mean(outs, 0), truth, where)))
    return rows


def inpainting_rows(model, truth, train, args) -> list[tuple]:
    _, h, w = model.shape
    rows = []
    for name in ("center", "left-half"):
        hole = builtin_mask(name, h, w, None).numpy()
        known = np.where(hole, np.nan, truth).reshape(len(truth), -1)
        image_fill = np.where(hole, np.nanmean(known, 1)[:, None, None, None], truth)
        data_fill = np.where(hole, train.mean(0), truth)
        baselines = [
            ("image mean fill", rmse(image_fill, truth, hole)),
            ("training mean fill", rmse(data_fill, truth, hole)),
        ]
        y = model.scaler.to_model(truth)
        edits = edit_errors(model, "inpaint", truth, [y], hole, args, mask=name)
        rows.append((f"inpaint {name} ({int(hole.sum())} of {h * w} px)", baselines, edits))
    return rows


def superres_rows(model, truth, args) -> list[tuple]:
    _, h, w = model.shape
    every = np.ones(truth.shape, bool)
    rows = []
    for p in (2, 4):
        nearest = pool(truth, p).repeat(p, 2).repeat(p, 3)
        low = pool(model.scaler.to_model(truth), p)
        edits = edit_errors(model, "superres", truth, [low], every, args, factor=p)
        baselines = [("nearest upsampling", rmse(nearest, truth, every))]
        rows.append((f"superres ×{p} ({h // p}x{w // p} → {h}x{w})", baselines, edits))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/work/shared_runs/qs/cd")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument(
        "--times",
        type=lambda text: [float(t) for t in text.split(",")],
        default=[80.0, 2.0, 1.0, 0.5],
        help="hand-picked editing times for the last column",
    )
    args = parser.parse_args()
    model = load_model(args.model)
    train, truth = run_splits(model.config.data)
    rows = inpainting_rows(model, truth, train, args) + superres_rows(model, truth, args)
    write_table(rows, len(truth), args)


def write_table(rows, n: int, args) -> None:
    times = ",".join(f"{t:g}" for t in args.times)
    lines = [
        f"Measured {datetime.date.today()} with `python bench/editing.py --model {args.model} "
        f"--seeds {args.seeds} --times {times}` (2 CPU cores).",
        f"RMSE in pixel units (0..16) against the {n} held-out digits, over the filled pixels "
        f"(inpainting) or all pixels (super-resolution); edits: mean ± sd over {args.seeds} "
        "seeds, and in brackets the RMSE of the average of those edits.",
        "",
        "| task | baseline | "
        + " | ".join(f"edit, {k} step{'s' * (k > 1)}" for k in STEPS)
        + f" | edit, `--times {times}` |",
        "|---|---|" + "---|" * (len(STEPS) + 1),
    ]
    for title, baselines, edits in rows:
        base = "<br>".join(f"{b}: {e:.2f}" for b, e in baselines)
        cells = [f"{m:.2f} ± {s:.2f} ({avg:.2f})" for m, s, avg in edits]
        lines.append(f"| {title} | {base} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    write_section("editing", "Zero-shot editing on held-out digits", table)


if __name__ == "__main__":
    main()
