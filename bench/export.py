"""1-step sampling speed of the exported graph in onnxruntime (CPU) against torch eager.

One process, the same noise, interleaved round by round: cmkit's sampler module in torch
eager (what `cmkit export` traces), the `.pt2` program from torch.export.load, and the `.onnx`
graph in an onnxruntime CPU session given as many threads as torch has (OMP_NUM_THREADS).
Reports images per second and ratios to eager (medians over rounds), and writes them to
BENCHMARKS.md. Without --model it trains (or reuses) a digits iCT run with the default network
in bench_runs/export-digits-ict.

    python bench/export.py [--model RUN] [--rounds 30] [--batches 1,64]
"""

import argparse
import datetime
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from benchmarks_md import write_section
from speed import measure

from cmkit.cli import main as cmkit
from cmkit.export import build_sampler, export_run
from cmkit.generate import load_model

RUN = Path(__file__).resolve().parent.parent / "bench_runs" / "export-digits-ict"
TRAIN_STEPS = 300


def default_run() -> Path:
    if not (RUN / "ema.safetensors").exists():
        train = ["train", "--data", "digits", "--out", RUN, "--steps", TRAIN_STEPS]
        assert cmkit([str(a) for a in [*train, "--no-progress"]]) == 0
    return RUN


def exported(run: Path, folder: Path) -> tuple:
    """The run's 1-step sampler module, its .pt2 program and an onnxruntime session of its
    .onnx graph, both written to `folder` by cmkit export."""
    sampler = build_sampler(load_model(str(run)), 1, None)
    for fmt in ("onnx", "pt2"):
        export_run(run, fmt, folder / f"sampler.{fmt}", 1)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    session = onnxruntime.InferenceSession(
        str(folder / "sampler.onnx"), options, providers=["CPUExecutionProvider"]
    )
    return sampler, torch.export.load(folder / "sampler.pt2").module(), session


def variants(sampler, program, session, batch: int) -> tuple[dict, dict]:
    """The callables to time on one noise array, and each one's largest difference to eager."""
    shape = sampler.inputs[0].shape[2:]
    noise = np.random.default_rng(0).standard_normal((1, batch, *shape), dtype=np.float32)
    z = torch.from_numpy(noise)
    fns = {
        "torch eager": lambda: sampler(z),
        "torch.export .pt2": lambda: program(z),
        "onnxruntime": lambda: session.run(None, {"noise": noise})[0],
    }
    with torch.no_grad():
        outs = {name: np.asarray(fn()) for name, fn in fns.items()}
    eager = outs["torch eager"]
    return fns, {name: float(np.abs(out - eager).max()) for name, out in outs.items()}


def report(results: dict, command: str, label: str) -> str:
    lines = [
        f"Measured {datetime.date.today()} on 2 CPU cores with `{command}` ({label}): "
        f"{torch.get_num_threads()} torch thread(s), onnxruntime given the same.",
        "Medians over interleaved rounds in one process; the ratios are what to trust.",
        "",
        "| batch | variant | images/s | time / torch eager | max abs diff to eager |",
        "|---:|---|---:|---:|---:|",
    ]
    for batch, (times, diffs) in results.items():
        eager = times["torch eager"]
        for name, sec in times.items():
            speed = f"{batch / sec:.0f} | {sec / eager:.3f}"
            lines.append(f"| {batch} | {name} | {speed} | {diffs[name]:.1e} |")
    lines.append("")
    for batch, (times, _) in results.items():
        eager = times["torch eager"]
        lines.append(
            f"- batch {batch}: onnxruntime **{eager / times['onnxruntime']:.2f}×** the speed of "
            f"torch eager; the .pt2 program {eager / times['torch.export .pt2']:.2f}×"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a consistency run (default: a digits iCT run)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batches", default="1,64")
    args = parser.parse_args()
    run = Path(args.model) if args.model else default_run()
    label = f"run {args.model}" if args.model else f"digits iCT, default UNet, {TRAIN_STEPS} steps"
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        loaded = exported(run, Path(folder))
        for batch in [int(b) for b in args.batches.split(",")]:
            fns, diffs = variants(*loaded, batch)
            results[batch] = (measure(fns, args.rounds), diffs)
    command = "python bench/export.py" + (f" --model {args.model}" if args.model else "")
    table = report(results, command, label)
    print(table)
    write_section("export", "Exported sampler: onnxruntime against torch eager", table)


if __name__ == "__main__":
    main()
