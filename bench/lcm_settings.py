"""LCM's distillation settings against CD's, on bench/lcm.py's latent teacher: which of the
teacher step (Euler or Heun), the grid size N and the target EMA μ limits LCM's FD.

LCM's published settings (Euler/DDIM steps, N = 51 points, μ = 0.95; `distill --recipe lcm`)
are the `lcm` run of bench/lcm.py, reused; the other students change one or more of them,
each one `LCMOptions` over the same w range, trained from the same teacher for the same
steps. Scores each at 1 and 4 steps at every w as bench/lcm.py does (label accuracy, FD
against the held-out images), as a ratio to the teacher's Heun-35 FD at that w. Writes a
table into BENCHMARKS.md.

    python bench/lcm_settings.py [--data digits] [--runs bench_runs/lcm]
    python bench/lcm_settings.py --data mnist
"""

import argparse
import datetime
import time
from pathlib import Path

import torch
from benchmarks_md import write_section
from conditional import MNIST, Judge
from lcm import TEACHER_POINTS, train
from recipe_runs import run_stages

from cmkit import recipes
from cmkit.generate import conditioning, generate, load_model
from cmkit.recipes.lcm import LCM_MU, LCM_SCALES

WS = (0.0, 1.0, 2.0, 4.0)
STEPS = (1, 4)
SETTINGS = {  # run name -> (teacher step, N, μ); "lcm" is bench/lcm.py's run, LCM's own
    "lcm": ("euler", LCM_SCALES, LCM_MU),
    "lcm-heun51": ("heun", LCM_SCALES, LCM_MU),
    "lcm-euler51-mu0": ("euler", LCM_SCALES, 0.0),
    "lcm-euler18-mu0": ("euler", 18, 0.0),
    "lcm-heun18-mu0": ("heun", 18, 0.0),
}


def train_settings(out: Path, data: str, names: list[str]) -> dict[str, float]:
    """Train (or reuse) each setting's student from bench/lcm.py's teacher, in its latent."""
    teacher = str(out / "teacher")
    stages = {}
    for name in names:
        solver, scales, mu = SETTINGS[name]
        opts = recipes.LCMOptions(
            teacher, guidance=(min(WS), max(WS)), solver=solver, num_scales=scales, mu=mu
        )
        stages[name] = ("cm_steps", lambda run, opts=opts: recipes.lcm_run(run, opts))
    return run_stages(out, data, stages, 1.0, labels=True, latent=str(out / "autoencoder"))


def score(out: Path, names: list[str], n: int) -> tuple[dict, list[dict]]:
    """The teacher's Heun-35 metrics at each w, and each student's at each w and step count."""
    teacher = load_model(str(out / "teacher"))
    judge = Judge(teacher)

    def metrics(model, w: float, steps: int) -> dict[str, float]:
        cond = conditioning(model, n, None, w)
        return judge(generate(model, n, seed=0, steps=steps, cond=cond), cond["labels"].numpy())

    base = {w: metrics(teacher, w, TEACHER_POINTS) for w in WS}
    rows = []
    for name in names:
        model = load_model(str(out / name))
        for w in WS:
            for steps in STEPS:
                row = {"run": name, "w": w, "steps": steps, **metrics(model, w, steps)}
                print(f"{name} w={w:g} steps {steps}: FD {row['FD']:.3g}", flush=True)
                rows.append(row)
    return base, rows


def markdown(base: dict, rows: list[dict], minutes: dict[str, float]) -> list[str]:
    """One row per setting: FD / teacher FD (and the accuracy gap in points) at each w."""
    head = " | ".join(f"w = {w:g}, {k} step{'s' if k > 1 else ''}" for w in WS for k in STEPS)
    lines = [
        f"| student | teacher step | N | μ | train min | {head} |",
        "|---|---|---:|---:|---:|" + "---:|" * (len(WS) * len(STEPS)),
    ]
    for name in minutes:
        solver, scales, mu = SETTINGS[name]
        cells = []
        for w in WS:
            for steps in STEPS:
                r = next(r for r in rows if (r["run"], r["w"], r["steps"]) == (name, w, steps))
                gap = 100 * (r["accuracy"] - base[w]["accuracy"])
                cells.append(f"{r['FD'] / base[w]['FD']:.2f}× ({gap:+.1f})")
        lines.append(
            f"| {name} | {solver} | {scales} | {mu:g} | {minutes[name]:.1f} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits", help="digits or mnist")
    parser.add_argument("--runs", default="bench_runs/lcm")
    parser.add_argument("--n", type=int, default=2000, help="samples per evaluation")
    args = parser.parse_args()
    data = str(MNIST) if args.data == "mnist" else args.data
    out = Path(args.runs) / args.data
    started = time.perf_counter()
    train(out, data, list(WS), 2.0, 4, 1.0, only=("teacher",))  # bench/lcm.py's teacher
    minutes = train_settings(out, data, list(SETTINGS))
    base, rows = score(out, list(SETTINGS), args.n)
    teacher = ", ".join(
        f"w = {w:g}: FD {m['FD']:.3g}, {100 * m['accuracy']:.1f}%" for w, m in base.items()
    )
    body = "\n".join(
        [
            f"`python bench/lcm_settings.py --data {args.data}` on {datetime.date.today()} with "
            f"{torch.get_num_threads()} torch thread(s); {args.n} samples per cell, labels "
            f"0..9 in turn; {(time.perf_counter() - started) / 60:.0f} min in all. Each cell: "
            "the student's FD / the teacher's Heun-35 FD at that w (target ≤ 1.25× at 4 "
            "steps), and its accuracy minus the teacher's in points. Teacher: "
            f"{teacher}.",
            "",
            *markdown(base, rows, minutes),
        ]
    )
    write_section(f"lcm-settings-{args.data}", f"LCM's settings against CD's ({args.data})", body)
    print(body)


if __name__ == "__main__":
    main()
