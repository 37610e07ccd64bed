"""Conditional generation: a labelled teacher under classifier-free guidance against guided
consistency distillation, at several guidance scales w.

Trains (or reuses, in --runs) a class-conditional teacher (label dropout p_uncond = 0.1),
one CD student per w distilled from the guided teacher at that w (w = 0 is plain CD of the
conditional teacher, the baseline), and one student distilled over [min w, max w] with w
as its input (LCM's w-embedding), each with the recipes' defaults. Every sampler draws n
samples with the labels 0..9 in turn: the teacher with Heun (18 points, 35 evaluations) on
the guided denoiser at each w, each fixed-w student at its w and the w-input student at
every w, at 1, 2 and 4 steps (default times). Scores: label accuracy of the samples under
the feature network's classifier head (digitsnet for digits, mnistnet for MNIST), FD on its
features against the held-out split, and the mean over classes of the per-class FD against
all of that class's data (about 180 digits each). Writes the table into BENCHMARKS.md and a
grid (one column per class; the teacher and the w-input student at each w) to
bench/conditional-<data>.png.

    python bench/conditional.py [--data digits] [--ws 0,1,2,4] [--runs bench_runs/conditional]
    python bench/conditional.py --data mnist     # ../shared/data/mnist.npz (slow)
"""

import argparse
import datetime
import json
import time
from pathlib import Path

import numpy as np
import torch
from benchmarks_md import write_section
from recipe_runs import run_stages

from cmkit import recipes
from cmkit.data import run_splits
from cmkit.evaluate import make_scorer
from cmkit.features import accuracy, load_digitsnet, load_mnistnet
from cmkit.generate import conditioning, generate, load_model
from cmkit.labels import run_labels
from cmkit.plots import save_image_grid
from cmkit.process import EDMProcess
from cmkit.units import to_unit

ROOT = Path(__file__).resolve().parent.parent
MNIST = ROOT.parent / "shared" / "data" / "mnist.npz"
STEPS = (1, 2, 4)
TEACHER_POINTS = 18  # Heun: 35 evaluations


def train(out: Path, data: str, ws: list[float], scale: float) -> dict[str, float]:
    """Train (or resume) the teacher and the students; their training minutes by name."""
    teacher = str(out / "teacher")
    stages = {
        "teacher": ("teacher_steps", lambda run: recipes.teacher_run(run, data, EDMProcess()))
    }
    for w in ws:
        options = recipes.CDOptions(teacher, guidance=(w, w))
        stages[f"w={w:g}"] = ("cm_steps", lambda run, o=options: recipes.distill_run(run, o))
    options = recipes.CDOptions(teacher, guidance=(min(ws), max(ws)))
    stages["w-input"] = ("cm_steps", lambda run: recipes.distill_run(run, options))
    return run_stages(out, data, stages, scale, labels=True)


def steps_of(run_dir: Path) -> int:
    return json.loads((run_dir / "state.json").read_text())["step"]


class Judge:
    """Accuracy and FD of labelled samples against one run's data."""

    def __init__(self, model) -> None:
        train, held = run_splits(model.config.data)
        y_train, y_held = run_labels(model.config.data, len(train) + len(held))
        self.scaler = model.scaler
        self.classifier = load_digitsnet() if model.sample_shape[-1] == 8 else load_mnistnet()
        self.overall = make_scorer(model, held)
        everything, y = np.concatenate([train, held]), np.concatenate([y_train, y_held])
        self.per_class = [make_scorer(model, everything[y == k]) for k in range(y.max() + 1)]

    def __call__(self, samples: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        unit = to_unit(self.scaler.to_model(samples))
        per_class = [
            scorer.primary_value(samples[labels == k]) for k, scorer in enumerate(self.per_class)
        ]
        return {
            "accuracy": accuracy(self.classifier, unit, labels),
            "FD": self.overall.primary_value(samples),
            "FD per class": float(np.mean(per_class)),
        }


def evaluate_runs(out: Path, ws: list[float], n: int) -> tuple[list[dict], dict]:
    """The table's rows and, for the grid, each (run, w)'s first samples."""
    teacher = load_model(str(out / "teacher"))
    judge = Judge(teacher)
    rows, grids = [], {}

    def score(run: str, model, w: float, steps: int | None, nfe: int) -> None:
        cond = conditioning(model, n, None, w)
        started = time.perf_counter()
        samples = generate(model, n, seed=0, steps=steps, cond=cond)
        seconds = time.perf_counter() - started
        metrics = judge(samples, cond["labels"].numpy())
        rows.append({"run": run, "w": w, "NFE": nfe, **metrics, "sample s": seconds})
        grids.setdefault((run, w), samples[:20])
        print(f"{run} w={w:g} NFE {nfe}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))

    for w in ws:
        score("teacher (Heun)", teacher, w, TEACHER_POINTS, 2 * TEACHER_POINTS - 1)
    for w in ws:
        student = load_model(str(out / f"w={w:g}"))
        for steps in STEPS:
            score(f"CD at w={w:g}", student, w, steps, steps)
    student = load_model(str(out / "w-input"))
    for w in ws:
        for steps in STEPS:
            score("CD, w input", student, w, steps, steps)
    return rows, grids


def checks(rows: list[dict], ws: list[float]) -> list[str]:
    """The issue's targets, each with its measured numbers."""

    def row(run: str, w: float, nfe: int) -> dict:
        return next(r for r in rows if r["run"] == run and r["w"] == w and r["NFE"] == nfe)

    teacher = {w: row("teacher (Heun)", w, 2 * TEACHER_POINTS - 1) for w in ws}
    acc = [teacher[w]["accuracy"] for w in ws]
    drop = max((a - b for a, b in zip(acc, acc[1:], strict=False)), default=0.0)
    trend = f"falls by up to {100 * drop:.2f} points" if drop > 0 else "never falls"
    lines = [
        f"- Teacher at w = {ws[0]:g}: accuracy {100 * acc[0]:.1f}% (target ≥ 95%); over w = "
        f"{', '.join(f'{w:g}' for w in ws)}: {', '.join(f'{100 * a:.2f}%' for a in acc)} "
        f"({trend} from one w to the next; target: does not fall)."
    ]
    for w in ws:
        fixed, t = row(f"CD at w={w:g}", w, 1), teacher[w]
        gap = 100 * (fixed["accuracy"] - t["accuracy"])
        lines.append(
            f"- Fixed-w student at w = {w:g}, 1 step: accuracy {100 * fixed['accuracy']:.1f}% "
            f"vs the teacher's {100 * t['accuracy']:.1f}% ({gap:+.1f} points; target within "
            f"3), FD {fixed['FD']:.3g} = {fixed['FD'] / t['FD']:.2f}× the teacher's Heun-35 "
            "(target ≤ 1.25×)."
        )
    for w in ws:
        shared, fixed = row("CD, w input", w, 1), row(f"CD at w={w:g}", w, 1)
        gap = 100 * (shared["accuracy"] - fixed["accuracy"])
        lines.append(
            f"- w-input student at w = {w:g}, 1 step: accuracy {100 * shared['accuracy']:.1f}% "
            f"vs the fixed-w student's {100 * fixed['accuracy']:.1f}% ({gap:+.1f} points; target "
            f"within 5), FD {shared['FD']:.3g} vs {fixed['FD']:.3g}."
        )
    return lines


def markdown(rows: list[dict]) -> list[str]:
    lines = [
        "| sampler | w | NFE | accuracy | FD (held-out) | FD per class | sampling s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['w']:g} | {r['NFE']} | {100 * r['accuracy']:.1f}% | "
            f"{r['FD']:.3g} | {r['FD per class']:.3g} | {r['sample s']:.1f} |"
        )
    return lines


def save_class_rows(rows: list[np.ndarray], model, path: Path) -> None:
    """A grid of each row's first 10 samples (labels 0..9 in turn: a column per class)."""
    unit = to_unit(model.scaler.to_model(np.concatenate([r[:10] for r in rows])))
    save_image_grid(unit, path, scale=4, nrow=10)


def save_grid(grids: dict, ws: list[float], model, path: Path) -> None:
    """Rows: the teacher, then the w-input student's one step, at each w."""
    rows = [grids[("teacher (Heun)", w)] for w in ws] + [grids[("CD, w input", w)] for w in ws]
    save_class_rows(rows, model, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits", help="digits or mnist")
    parser.add_argument("--ws", default="0,1,2,4", help="guidance scales w, comma-separated")
    parser.add_argument("--runs", default="bench_runs/conditional")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply training steps")
    parser.add_argument("--n", type=int, default=2000, help="samples per evaluation")
    args = parser.parse_args()
    ws = sorted(float(w) for w in args.ws.split(","))
    data = str(MNIST) if args.data == "mnist" else args.data
    out = Path(args.runs) / args.data
    started = time.perf_counter()
    minutes = train(out, data, ws, args.scale)
    rows, grids = evaluate_runs(out, ws, args.n)
    teacher = load_model(str(out / "teacher"))
    grid_path = ROOT / "bench" / f"conditional-{args.data}.png"
    save_grid(grids, ws, teacher, grid_path)
    command = "python bench/conditional.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if parser.get_default(k) != v
    )
    trained = ", ".join(
        f"{name} {steps_of(out / name)} steps in {m:.1f}" for name, m in minutes.items()
    )
    body = "\n".join(
        [
            f"`{command.strip()}` on {datetime.date.today()} with {torch.get_num_threads()} "
            f"torch thread(s), {args.n} samples per row, labels 0..9 in turn; "
            f"{(time.perf_counter() - started) / 60:.0f} min in all. Training "
            f"(minutes): {trained}.",
            "",
            *markdown(rows),
            "",
            *checks(rows, ws),
            "",
            f"![conditional samples]({grid_path.relative_to(ROOT)}): rows are the teacher "
            f"(Heun 35) at w = {', '.join(f'{w:g}' for w in ws)}, then the w-input student's "
            "one step at the same w; columns are the classes 0..9.",
        ]
    )
    write_section(f"conditional-{args.data}", f"Conditional generation ({args.data})", body)
    print(body)


if __name__ == "__main__":
    main()
