"""Zero-shot editing on held-out digits: inpainting and super-resolution error against the truth.

Runs `cmkit.edit_tasks.run_task` (what `cmkit edit` calls) with a distilled digits model on
the run's held-out split, at 1, 2 and 4 steps (τ₁ = T, then the run's sampling times), and
compares with plain baselines: filling the hole with the mean of the image's known pixels or
with the training set's per-pixel mean; nearest upsampling. Errors are RMSE in the data's
units (digits: 0..16) over the filled pixels (inpainting) or all pixels (super-resolution).
Writes the table into BENCHMARKS.md between markers.

    python bench/editing.py [--model /work/shared_runs/qs/cd] [--seeds 3]
"""

import argparse
import datetime
from pathlib import Path

import numpy as np

from cmkit.data import load_data, split_holdout
from cmkit.edit_tasks import EditOptions, run_task
from cmkit.editing import builtin_mask
from cmkit.generate import load_model
from cmkit.recipes import held_out_data

ROOT = Path(__file__).resolve().parent.parent
MARK_BEGIN, MARK_END = "<!-- editing:begin -->", "<!-- editing:end -->"
STEPS = (1, 2, 4)


def rmse(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    """Root mean squared error over the pixels where `where` (broadcast to a) is True."""
    where = np.broadcast_to(where, a.shape)
    return float(np.sqrt(((a - b)[where] ** 2).mean()))


def pool(x: np.ndarray, p: int) -> np.ndarray:
    n, c, h, w = x.shape
    return x.reshape(n, c, h // p, p, w // p, p).mean(axis=(3, 5))


def edit_errors(model, task, truth, inputs, where, seeds: int, **options) -> list[float]:
    """Per-step [mean RMSE, sd over seeds, RMSE of the seeds' average] in data units."""
    rows = []
    for k in STEPS:
        outs = [
            model.scaler.to_raw(
                run_task(model, task, inputs, EditOptions(steps=k, seed=s, **options)).after
            )
            for s in range(seeds)
        ]
        errs = [rmse(o, truth, where) for o in outs]
        rows.append(
            (float(np.mean(errs)), float(np.std(errs)), rmse(np.mean(outs, 0), truth, where))
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/work/shared_runs/qs/cd")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    model = load_model(args.model)
    truth = held_out_data(model.config)
    section = model.config["data"]
    train = split_holdout(load_data(section["spec"]), section["holdout"])[0]
    y = model.scaler.to_model(truth)
    _, h, w = model.shape
    results = []
    for name in ("center", "left-half"):
        hole = builtin_mask(name, h, w, None).numpy()
        known_mean = np.where(hole, np.nan, truth).reshape(len(truth), -1)
        image_fill = np.where(hole, np.nanmean(known_mean, 1)[:, None, None, None], truth)
        data_fill = np.where(hole, train.mean(0), truth)
        baselines = [
            ("image mean fill", rmse(image_fill, truth, hole)),
            ("training mean fill", rmse(data_fill, truth, hole)),
        ]
        steps = edit_errors(model, "inpaint", truth, [y], hole, args.seeds, mask=name)
        results.append((f"inpaint {name} ({int(hole.sum())} of {h * w} px)", baselines, steps))
    for p in (2, 4):
        nearest = pool(truth, p).repeat(p, 2).repeat(p, 3)
        every = np.ones(truth.shape, bool)
        steps = edit_errors(model, "superres", truth, [pool(y, p)], every, args.seeds, factor=p)
        results.append(
            (
                f"superres ×{p} ({h // p}x{w // p} → {h}x{w})",
                [("nearest upsampling", rmse(nearest, truth, every))],
                steps,
            )
        )
    write_table(results, len(truth), args)


def write_table(results, n: int, args) -> None:
    lines = [
        MARK_BEGIN,
        f"Measured {datetime.date.today()} with `python bench/editing.py --model {args.model} "
        f"--seeds {args.seeds}` (2 CPU cores).",
        f"RMSE in pixel units (0..16) against the {n} held-out digits, over the filled pixels "
        f"(inpainting) or all pixels (super-resolution); edits: mean ± sd over {args.seeds} "
        "seeds, and in brackets the RMSE of the average of those edits.",
        "",
        "| task | baseline | " + " | ".join(f"edit, {k} step{'s' * (k > 1)}" for k in STEPS) + " |",
        "|---|---|" + "---|" * len(STEPS),
    ]
    for title, baselines, steps in results:
        base = "<br>".join(f"{b}: {e:.2f}" for b, e in baselines)
        cells = [f"{m:.2f} ± {s:.2f} ({avg:.2f})" for m, s, avg in steps]
        lines.append(f"| {title} | {base} | " + " | ".join(cells) + " |")
    lines.append(MARK_END)
    table = "\n".join(lines)
    print(table)
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if MARK_BEGIN in text:
        head, rest = text.split(MARK_BEGIN, 1)
        text = head + table + rest.split(MARK_END, 1)[1]
    else:
        text += "\n## Zero-shot editing on held-out digits\n\n" + table + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
