"""Scaling out on one machine: processes against threads, communication, memory on data
larger than RAM, torch.compile's break-even point, and the built-in UNet against diffusers'.

1. Training throughput (steps/s from each run's own training time, state.json's `seconds`,
   so start-up is left out) of 1 process × 2 threads, 1 × 1 and 2 processes × 1 thread
   (`--nproc 2`), from a small MLP to a 32 px UNet: where 2 processes start to pay.
2. Overhead of a 2-process step: its time at batch B less that of 1 process at B/2, which
   computes what each rank computes without the all-reduces (and draws half the noise).
3. Peak resident memory (ru_maxrss of the training process: the default UNet, batch 16) on
   a 2 GB and a 200 MB .npy of 32 px images: rows stay on disk, so memory should not follow
   the file's size (nor should the time per step, also shown).
4. --compile: its one-time cost and per-step gain on the digits UNet, and the step count
   where it breaks even (a fresh inductor cache per run, so the cost is not hidden).
5. One training step (EDM loss, backward, Adam) of the built-in UNet against diffusers'
   UNet2DModel of the same widths (zoo.default_network's) at 8, 28 and 32 px, interleaved.

Prints the tables with their ratios and writes them to BENCHMARKS.md (not with `--no-write`,
nor with `--only`, which runs one section).
Run it alone on the machine: every number is a wall-clock time.

    python bench/scale.py [--workdir DIR] [--quick] [--no-write] [--only SECTION]
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from benchmarks_md import write_section

from cmkit.batch import Batch
from cmkit.losses import EDMLoss
from cmkit.networks.zoo import build_for_data, default_network
from cmkit.process import EDMProcess

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Case:
    """A training command to time (without --out, --steps, --batch-size) and its size."""

    label: str
    args: tuple[str, ...]
    batch: int
    steps: int


# Starts a command and writes its ru_maxrss to argv[1]: a process started with vfork + exec
# (subprocess, posix_spawn) begins with its parent's peak RSS as its own, so the trainer is
# started from this small process, not from the bench, whose peak (torch, the 2 GB .npy it
# wrote through a map) would otherwise be counted as the run's.
LAUNCHER = (
    "import os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); _, status, usage = "
    "os.wait4(p.pid, 0); open(sys.argv[1], 'w').write(str(usage.ru_maxrss)); "
    "sys.exit(os.waitstatus_to_exitcode(status))"
)


def cmkit(args: list, threads: int, maxrss: Path, **env) -> subprocess.Popen:
    """`cmkit ARGS` started through LAUNCHER, which writes its peak RSS (KiB) to `maxrss`."""
    environ = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT), **env}
    command = [sys.executable, "-m", "cmkit", *map(str, args), "--no-progress"]
    launcher = [sys.executable, "-c", LAUNCHER, maxrss, *command]
    return subprocess.Popen(launcher, env=environ, stdout=subprocess.DEVNULL)


def train(case: Case, out: Path, nproc: int, threads: int, batch: int, *extra, **env) -> dict:
    """Run the case to its step count; returns its state.json (and `maxrss`, in bytes)."""
    args = [*case.args, "--steps", case.steps, "--batch-size", batch, "--out", out, *extra]
    args += ["--checkpoint-every", 10**9] if "--checkpoint-every" not in extra else []
    maxrss = out.parent / f"{out.name}.maxrss"
    proc = cmkit([*args, "--nproc", nproc], threads, maxrss, **env)
    if proc.wait() != 0:
        raise SystemExit(f"bench: {' '.join(map(str, args))} exited with {proc.returncode}")
    state = json.loads((out / "state.json").read_text())
    return {**state, "maxrss": int(maxrss.read_text()) * 1024}  # Linux reports KiB


def images(path: Path, rows: int, size: int = 32) -> Path:
    """A .npy of `rows` random uint8 RGB images, written in chunks (never whole in memory)."""
    if path.exists() and np.load(path, mmap_mode="r").shape[0] == rows:
        return path
    x = np.lib.format.open_memmap(path, "w+", np.uint8, (rows, 3, size, size))
    rng = np.random.default_rng(0)
    for start in range(0, rows, 8192):
        stop = min(rows, start + 8192)
        x[start:stop] = rng.integers(0, 256, (stop - start, 3, size, size), dtype=np.uint8)
    x.flush()
    del x
    return path


def throughput(cases: list[Case], work: Path) -> list[str]:
    lines = [
        "| network | batch | 1 × 2 threads | 1 × 1 | 2 processes × 1 | 2 proc / 1×1 "
        "| 1×2 / 1×1 | 2-process overhead / step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, case in enumerate(cases):
        speed = {}
        for key, nproc, threads, batch in (
            ("1x2", 1, 2, case.batch),
            ("1x1", 1, 1, case.batch),
            ("2x1", 2, 1, case.batch),
            ("half", 1, 1, case.batch // 2),
        ):
            state = train(case, work / f"throughput-{i}-{key}", nproc, threads, batch)
            speed[key] = state["step"] / state["seconds"]
        comm = 1 / speed["2x1"] - 1 / speed["half"]  # seconds per step beyond a rank's share
        lines.append(
            f"| {case.label} | {case.batch} | {speed['1x2']:.1f} | {speed['1x1']:.1f} | "
            f"{speed['2x1']:.1f} | **{speed['2x1'] / speed['1x1']:.2f}×** | "
            f"{speed['1x2'] / speed['1x1']:.2f}× | {1000 * comm:.2f} ms "
            f"({100 * comm * speed['2x1']:.0f}%) |"
        )
    return lines


def memory(work: Path, small_rows: int, steps: int) -> list[str]:
    case = Case("UNet 32 px", ("train-teacher",), 16, steps)
    lines = [
        "| .npy data | file size | peak RSS | RSS / 200 MB-class file's | ms per step |",
        "|---|---:|---:|---:|---:|",
    ]
    peaks = []
    for name, rows in (("small", small_rows), ("large", 10 * small_rows)):
        path = images(work / f"{name}.npy", rows)
        run = Case(case.label, (*case.args, "--data", str(path)), case.batch, case.steps)
        state = train(run, work / f"memory-{name}", 1, 2, case.batch)
        peaks.append(state["maxrss"])
        size = path.stat().st_size
        lines.append(
            f"| {rows} images 3×32×32 uint8 | {size / 2**20:.0f} MiB | "
            f"{peaks[-1] / 2**20:.0f} MiB | {peaks[-1] / peaks[0]:.2f}× | "
            f"{1000 * state['seconds'] / state['step']:.0f} |"
        )
    return lines


def compile_cost(work: Path, steps: int) -> list[str]:
    """Seconds at each checkpoint (history/index.json) of the digits UNet, compiled or not."""
    case = Case("digits UNet", ("train-teacher", "--data", "digits"), 64, steps)
    every = max(1, steps // 10)
    fits = {}
    for name, extra in (("eager", ()), ("compiled", ("--compile",))):
        with tempfile.TemporaryDirectory() as cache:
            out = work / f"compile-{name}"
            args = ("--keep-history", "--checkpoint-every", every, *extra)
            train(case, out, 1, 2, case.batch, *args, TORCHINDUCTOR_CACHE_DIR=cache)
        index = json.loads((out / "history" / "index.json").read_text())
        (s0, t0), (s1, t1) = [(int(k), v) for k, v in index.items()][:: len(index) - 1]
        per_step = (t1 - t0) / (s1 - s0)
        fits[name] = (per_step, t0 - s0 * per_step)  # per step, one-time cost
    (eager, e0), (compiled, c0) = fits["eager"], fits["compiled"]
    gain = eager - compiled
    breaks = f"{(c0 - e0) / gain:.0f} steps" if gain > 0 else "never (no per-step gain)"
    return [
        "| digits UNet, batch 64, 2 threads | eager | --compile |",
        "|---|---:|---:|",
        f"| ms per step | {1000 * eager:.1f} | {1000 * compiled:.1f} |",
        f"| one-time cost (s) | {e0:.1f} | {c0:.1f} |",
        "",
        f"- per-step speed-up **{eager / compiled:.2f}×**; compile breaks even after **{breaks}**",
    ]


def unet_step_times(shape: tuple[int, ...], batch: int, rounds: int) -> dict[str, float]:
    """Median seconds of one optimiser step of each backbone, taking turns every round."""
    process, generator = EDMProcess(), torch.Generator().manual_seed(0)
    steps, loss = {}, EDMLoss(process)
    x0 = torch.rand(batch, *shape) * 2 - 1
    for backbone in ("builtin", "diffusers-unet"):
        torch.manual_seed(0)
        denoiser = process.denoiser(
            build_for_data(default_network(shape, backbone=backbone), shape)
        )
        optimizer = torch.optim.Adam(denoiser.parameters(), lr=1e-4)

        def step(denoiser=denoiser, optimizer=optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            loss(denoiser, None, Batch(x0), 0, generator).backward()
            optimizer.step()

        step()  # warm up
        steps[backbone] = step
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def unets(rounds: int, batch: int) -> list[str]:
    lines = [
        "| images | batch | built-in UNet steps/s | diffusers UNet2DModel steps/s "
        "| built-in / diffusers |",
        "|---|---:|---:|---:|---:|",
    ]
    for shape in ((1, 8, 8), (1, 28, 28), (3, 32, 32)):
        t = unet_step_times(shape, batch, rounds)
        lines.append(
            f"| {'×'.join(map(str, shape))} | {batch} | {1 / t['builtin']:.1f} | "
            f"{1 / t['diffusers-unet']:.1f} | **{t['diffusers-unet'] / t['builtin']:.2f}×** |"
        )
    return lines


SECTIONS = ("throughput", "memory", "compile", "unets")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="bench_runs/scale")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps, small files")
    parser.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md")
    parser.add_argument(
        "--only", choices=SECTIONS, help="run this section alone; print only, like --no-write"
    )
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    k = 0.05 if args.quick else 1.0  # share of the full step counts

    def steps(n: int) -> int:
        return max(4, int(n * k))

    def cases() -> list[Case]:
        image32 = str(images(work / "images32.npy", 2048))
        mlp = ("train-teacher", "--data", "moons", "--network")
        return [
            Case("MLP 256×4 (moons)", (*mlp, '{"hidden": 256}'), 512, steps(400)),
            Case("MLP 1024×4 (moons)", (*mlp, '{"hidden": 1024}'), 1024, steps(200)),
            Case("UNet 8 px (digits)", ("train-teacher", "--data", "digits"), 64, steps(200)),
            Case("UNet 32 px", ("train-teacher", "--data", image32), 64, steps(60)),
        ]

    torch.set_num_threads(2)
    small_rows = 2048 if args.quick else 68_267  # 200 MiB of 3×32×32 bytes (2 GiB ×10)
    sections = {  # name: (title, what measures it)
        "throughput": (
            "Training throughput: processes against threads (steps/s)",
            lambda: throughput(cases(), work),
        ),
        "memory": (
            "Peak memory training on a .npy (rows stay on disk)",
            lambda: memory(work, small_rows, steps(60)),
        ),
        "compile": ("torch.compile: cost and break-even", lambda: compile_cost(work, steps(300))),
        "unets": (
            "One training step: built-in UNet against diffusers' UNet2DModel",
            lambda: unets(3 if args.quick else 30, 32),
        ),
    }
    chosen = [args.only] if args.only else SECTIONS
    tables = [(sections[name][0], sections[name][1]()) for name in chosen]
    flags = f"{' --quick' if args.quick else ''}{f' --only {args.only}' if args.only else ''}"
    head = (
        f"Measured {datetime.date.today()} with `python bench/scale.py{flags}` on "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}; wall-clock times, so it was "
        "run alone."
    )
    body = "\n\n".join([head, *(f"**{title}**\n\n" + "\n".join(lines) for title, lines in tables)])
    print(body)
    if not (args.no_write or args.only):  # the section holds every table, not one
        write_section("scale", "Scaling out: processes, memory, compile, UNet backbones", body)


if __name__ == "__main__":
    main()
