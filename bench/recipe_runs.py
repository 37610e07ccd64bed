"""The runs the quality bench compares: one teacher and every consistency recipe on one data
set, each with its default options, each keeping its EMA weights at every checkpoint
(history/) so quality can be plotted against training time.

A run that exists is resumed (or reused when complete), so an interrupted bench continues.
"""

import json
from pathlib import Path

from cmkit import recipes
from cmkit.data import load_data
from cmkit.generate import Model, wrap_network
from cmkit.networks.zoo import build_network
from cmkit.runs import load_config, load_weights

CM_RUNS = recipes.STUDENTS
LABELS = {
    "cd": "CD",
    "ict": "iCT",
    "ect": "ECT",
    "sct": "sCT",
    "scd": "sCD",
    "meanflow": "MeanFlow",
    "shortcut": "shortcut",
}
FLOW_MAPS = ("meanflow", "shortcut")  # sampled by jumps at any step count, not tuned
SNAPSHOTS = 12  # history points per run


def train_runs(out: Path, data: str, scale: float = 1.0, only: tuple[str, ...] = CM_RUNS) -> None:
    """Train (or resume) the teacher and the CM runs in `only`, keeping the students' EMA
    weights at SNAPSHOTS checkpoints."""
    run_stages(out, data, recipes.default_stages(out, data, only), scale, history=True)


def run_stages(
    out: Path, data: str, stages: dict, scale: float, history: bool = False, **options
) -> dict[str, float]:
    """Train (or resume, or reuse when complete) each stage name -> (steps key, train) in
    order at <out>/<name>, for its data kind's default steps times `scale`; `options` go to
    every stage's RunOptions. Returns each run's training minutes."""
    base = recipes.defaults_for(load_data(data).shape[1:])
    minutes = {}
    for name, (key, train) in stages.items():
        steps = recipes.scaled_steps(base, key, scale)
        run_dir = out / name
        print(f"== {data} {name}: {steps} steps", flush=True)
        keep = history and name != "teacher"
        train(
            recipes.RunOptions(
                out=str(run_dir),
                steps=steps,
                progress=False,
                resume=(run_dir / "config.json").exists(),
                checkpoint_every=max(1, steps // SNAPSHOTS) if history else 1000,
                keep_history=keep,
                **options,
            )
        )
        minutes[name] = json.loads((run_dir / "state.json").read_text())["seconds"] / 60
    return minutes


def history(run_dir: Path) -> list[tuple[int, float, Model]]:
    """(step, training seconds, model with that checkpoint's EMA weights), by step."""
    config = load_config(run_dir)
    index = json.loads((run_dir / "history" / "index.json").read_text())
    out = []
    for step, seconds in sorted(index.items(), key=lambda kv: int(kv[0])):
        net = build_network(config.network)
        load_weights(net, run_dir / "history" / f"ema-{int(step):08d}.safetensors")
        out.append((int(step), seconds, Model(config, wrap_network(config, net.eval()))))
    return out


def first_below(
    curve: list[tuple[int, float, float]], threshold: float
) -> tuple[int, float] | None:
    """(step, seconds) of the first point of a (step, seconds, ratio) curve at or below
    `threshold`, or None when it never gets there."""
    return next(((step, sec) for step, sec, q in curve if q <= threshold), None)
