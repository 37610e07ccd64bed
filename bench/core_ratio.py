"""Core acceptance check: CD and iCT one-step quality against the teacher on unseen 2-D data.

Generates a 2-D data set the library has never seen (a five-arm pinwheel, 50 000 points),
runs `cmkit train-teacher`, `cmkit distill` and `cmkit train --recipe ict` with default
settings, samples each with `cmkit sample`, and reports the energy distance to the held-out
10% with the ratios to the teacher's Heun sampler (35 evaluations). Writes the table into
BENCHMARKS.md between markers.

    python bench/core_ratio.py [--workdir DIR] [--seeds 3] [--n 10000]
"""

import argparse
import datetime
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from benchmarks_md import write_section

from cmkit.data import run_splits
from cmkit.generate import generate, load_model
from cmkit.metrics import energy_distance


def pinwheel(n: int = 50_000, arms: int = 5, seed: int = 123) -> np.ndarray:
    """Points on curved arms, shifted off the origin so the scaling matters."""
    rng = np.random.default_rng(seed)
    radius = rng.normal(1.0, 0.25, n)
    angle = rng.integers(0, arms, n) * 2 * np.pi / arms + 1.2 * radius + rng.normal(0, 0.1, n)
    xy = np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1) * 2.0
    return (xy + np.array([3.0, -1.0])).astype(np.float32)


def cli(*args: str) -> float:
    """Run one cmkit command; returns its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cmkit.cli", *args, "--no-progress"], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="bench_runs/core_ratio")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n", type=int, default=10_000)
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "pinwheel.npy"
    np.save(data, pinwheel())
    seconds = {
        "teacher": cli("train-teacher", "--data", str(data), "--out", str(work / "teacher")),
        "cd": cli("distill", "--teacher", str(work / "teacher"), "--out", str(work / "cd")),
        "ict": cli("train", "--data", str(data), "--recipe", "ict", "--out", str(work / "ict")),
    }
    rows = []
    for title, run, options in [
        ("teacher Heun, 35 NFE", "teacher", {"steps": 18, "solver": "heun"}),
        ("teacher Euler, 18 NFE", "teacher", {"steps": 18, "solver": "euler"}),
        ("CD, 1 step", "cd", {"steps": 1}),
        ("CD, 2 steps", "cd", {"steps": 2}),
        ("iCT, 1 step", "ict", {"steps": 1}),
        ("iCT, 2 steps", "ict", {"steps": 2}),
    ]:
        model = load_model(str(work / run))
        ref = run_splits(model.config.data)[1]
        eds = [
            energy_distance(generate(model, args.n, s, **options), ref) for s in range(args.seeds)
        ]
        rows.append((title, float(np.mean(eds)), float(np.std(eds))))
    write_table(rows, seconds, len(ref), args)


def write_table(rows, seconds, n_ref: int, args) -> None:
    teacher = rows[0][1]
    lines = [
        f"Measured {datetime.date.today()} with `python bench/core_ratio.py --seeds {args.seeds}"
        f" --n {args.n}` (default settings of every command, 2 CPU cores).",
        f"Energy distance of {args.n} samples to the {n_ref} held-out points (mean ± sd over "
        f"{args.seeds} sampling seeds; ~0 means indistinguishable).",
        "",
        "| sampler | energy distance | ratio to teacher Heun |",
        "|---|---|---|",
        *[f"| {t} | {m:.5f} ± {s:.5f} | {m / teacher:.2f} |" for t, m, s in rows],
        "",
        "Training time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items()) + ".",
    ]
    table = "\n".join(lines)
    print(table)
    write_section(
        "core_ratio", "Core: one-step quality against the teacher (2-D, unseen data)", table
    )


if __name__ == "__main__":
    main()
