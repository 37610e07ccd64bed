"""Gradient clipping at norm 1.0 against none: quality, how often the clip binds, training time.

For each recipe on each data set — teacher (train-teacher), CD (distill), iCT (train --recipe
ict) and, on the 2-D toys, CT (train --recipe ct) — trains one run with --grad-clip 1.0 and
one with --grad-clip none from the same seed, at half the default step counts. Both CD runs
distil the clip-1.0 teacher, so only the student's clip differs. Each run is scored with
`cmkit eval` (consistency models at 1 and 2 steps, teachers with Heun at 35 NFE); the share
of steps where the clip bound and the training time come from its state.json. Writes the
table into BENCHMARKS.md between markers.

Only the command line is used (subprocesses), so the script stays valid while the library's
internals change. Finished runs and evaluations in --runs are reused; --seeds 0,1 adds a
second training seed, whose spread says which differences are noise.

    python bench/grad_clip.py [--data digits,moons] [--seeds 0] [--runs bench_runs/grad_clip]
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks_md import write_section

ROOT = Path(__file__).resolve().parent.parent
CLIPS = ("1.0", "none")
# half of the default step counts (recipes.VECTOR_DEFAULTS and IMAGE_DEFAULTS)
STEPS = {
    "digits": {"teacher": 2000, "cd": 1500, "ict": 1500},
    "moons": {"teacher": 3000, "cd": 3000, "ict": 3000, "ct": 3000},
}
HEADLINE = {"digits": "FD-digitsnet", "moons": "ED"}


def cmkit(*args: str) -> subprocess.CompletedProcess:
    """`python -m cmkit.cli ARGS` with this checkout's cmkit first on the path."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "-m", "cmkit.cli", *args], env=env, capture_output=True, text=True
    )


def command(recipe: str, data: str, teacher: Path) -> list[str]:
    return {
        "teacher": ["train-teacher", "--data", data],
        "cd": ["distill", "--teacher", str(teacher)],
        "ict": ["train", "--data", data, "--recipe", "ict"],
        "ct": ["train", "--data", data, "--recipe", "ct"],
    }[recipe]


def state_of(run: Path) -> dict | None:
    path = run / "state.json"
    return json.loads(path.read_text()) if path.is_file() else None


def train(run: Path, args: list[str], steps: int, seed: int, clip: str) -> str | None:
    """Train (or finish) a run; None when done, else the one-line reason it stopped."""
    state = state_of(run)
    if state is not None and state["step"] >= steps:
        return None
    options = ["--steps", str(steps), "--seed", str(seed), "--grad-clip", clip, "--no-progress"]
    resume = ["--resume"] if state is not None else []
    print(f"training {run} ({steps} steps)", flush=True)
    proc = cmkit(*args, *options, "--out", str(run), *resume)
    if proc.returncode == 0:
        return None
    if proc.returncode == 3:  # diverged: a result, not a failure of the bench
        return proc.stderr.strip().splitlines()[-1]
    raise RuntimeError(f"cmkit {' '.join(args)} failed:\n{proc.stderr}")


def scores(run: Path, recipe: str, metric: str) -> dict[str, float]:
    """{"1": …, "2": …} for a consistency model, {"heun35": …} for a teacher."""
    out = run / "eval.json"
    if not out.is_file():
        nfe = "35" if recipe == "teacher" else "1,2"
        proc = cmkit("eval", "--model", str(run), "--nfe", nfe, "--json", str(out), "--no-progress")
        if proc.returncode != 0:
            raise RuntimeError(f"cmkit eval --model {run} failed:\n{proc.stderr}")
    rows = json.loads(out.read_text())["rows"]
    if recipe == "teacher":
        return {"heun35": next(r[metric] for r in rows if r["sampler"] == "heun")}
    return {str(r["nfe"]): r[metric] for r in rows}


def measure(data: str, seeds: list[int], runs: Path) -> list[dict]:
    """One result per (recipe, clip, seed): scores, share of clipped steps, seconds."""
    results = []
    for seed in seeds:
        teacher = runs / data / f"teacher-clip1.0-s{seed}"
        for recipe, steps in STEPS[data].items():
            for clip in CLIPS:
                run = runs / data / f"{recipe}-clip{clip}-s{seed}"
                stopped = train(run, command(recipe, data, teacher), steps, seed, clip)
                state = state_of(run)
                result = {"recipe": recipe, "clip": clip, "seed": seed, "stopped": stopped}
                if stopped is None:
                    taken = state["step"] - state["skipped"]
                    result["bound"] = state.get("clipped", 0) / taken
                    result["seconds"] = state["seconds"]
                    result["scores"] = scores(run, recipe, HEADLINE[data])
                results.append(result)
                print(json.dumps(result), flush=True)
    return results


def _cell(values: list[float], digits: int = 4) -> str:
    """One value, or the mean of several with each seed's value in brackets."""
    if len(values) == 1:
        return f"{values[0]:.{digits}g}"
    each = ", ".join(f"{v:.{digits}g}" for v in values)
    return f"{statistics.mean(values):.{digits}g} ({each})"


def table(data: str, results: list[dict]) -> list[str]:
    lines = [
        f"| recipe | --grad-clip | {HEADLINE[data]}: 1 step (teacher: Heun 35 NFE) | 2 steps "
        "| steps clipped | training s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for recipe in STEPS[data]:
        for clip in CLIPS:
            group = [r for r in results if r["recipe"] == recipe and r["clip"] == clip]
            stopped = [r for r in group if r["stopped"]]
            if stopped:
                lines.append(f"| {recipe} | {clip} | {stopped[0]['stopped']} | | | |")
                continue
            first = "heun35" if recipe == "teacher" else "1"
            two = "–" if recipe == "teacher" else _cell([r["scores"]["2"] for r in group])
            bound = "–" if clip == "none" else _cell([100 * r["bound"] for r in group], 3) + "%"
            lines.append(
                f"| {recipe} | {clip} | {_cell([r['scores'][first] for r in group])} | {two} "
                f"| {bound} | {_cell([r['seconds'] for r in group], 3)} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits,moons")
    parser.add_argument("--seeds", default="0", help="training seeds, e.g. 0,1")
    parser.add_argument("--runs", default="bench_runs/grad_clip")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    start = time.perf_counter()
    threads = os.environ.get("OMP_NUM_THREADS")
    body = [
        f"Measured {datetime.date.today()} on 2 CPU cores with `"
        + (f"OMP_NUM_THREADS={threads} " if threads else "")
        + f"python bench/grad_clip.py --data {args.data} --seeds {args.seeds}`.",
        "Half the default steps; CD distils the --grad-clip 1.0 teacher in both rows. "
        "Headline metric of `cmkit eval` against the held-out split (lower is better), "
        "2 steps at the default τ; steps clipped: share of optimiser steps whose gradient norm "
        "exceeded 1.0. Several seeds: mean (each seed)."
        + (" One training seed: no spread is measured." if len(seeds) == 1 else ""),
    ]
    for data in [d for d in args.data.split(",") if d]:
        results = measure(data, seeds, Path(args.runs))
        body += ["", f"**{data}** ({', '.join(f'{k} {v}' for k, v in STEPS[data].items())} steps)"]
        body += ["", *table(data, results)]
    text = "\n".join(body)
    print(text)
    write_section("grad-clip", "Gradient clipping: norm 1.0 against none", text)
    print(f"total {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
