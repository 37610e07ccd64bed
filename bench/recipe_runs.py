"""The runs the quality bench compares: one teacher and every consistency recipe on one data
set, each with its default options, each keeping its EMA weights at every checkpoint
(history/) so quality can be plotted against training time.

A run that exists is resumed (or reused when complete), so an interrupted bench continues.
"""

import json
from pathlib import Path

from cmkit import recipes
from cmkit.data import load_data
from cmkit.generate import Model
from cmkit.networks.zoo import build_network
from cmkit.process import EDMProcess, TrigFlowProcess
from cmkit.runs import load_config, load_weights

CM_RUNS = ("cd", "ict", "ect", "sct", "scd")
LABELS = {"cd": "CD", "ict": "iCT", "ect": "ECT", "sct": "sCT", "scd": "sCD"}
SNAPSHOTS = 12  # history points per run


def stages(out: Path, data: str) -> dict:
    """name -> (steps key of the data kind's defaults, train(run options)); in order, since
    distillation and tuning read the teacher run."""
    teacher = str(out / "teacher")
    return {
        "teacher": (
            "teacher_steps",
            lambda run: recipes.teacher_run(run, data, EDMProcess()),
        ),
        "cd": ("cm_steps", lambda run: recipes.distill_run(run, recipes.CDOptions(teacher))),
        "ict": (
            "cm_steps",
            lambda run: recipes.ict_run(run, data, EDMProcess(), recipes.ICTOptions()),
        ),
        "ect": (
            "cm_steps",
            lambda run: recipes.ect_run(
                run, data, EDMProcess(), recipes.ECTOptions(init_from=teacher)
            ),
        ),
        "sct": (
            "cm_steps",
            lambda run: recipes.sct_run(run, data, TrigFlowProcess(), recipes.SCTOptions()),
        ),
        "scd": ("cm_steps", lambda run: recipes.scd_run(run, recipes.SCDOptions(teacher=teacher))),
    }


def train_runs(out: Path, data: str, scale: float = 1.0, only: tuple[str, ...] = ()) -> None:
    """Train (or resume) the teacher and the CM runs in `only` (all when empty)."""
    base = recipes.defaults_for(load_data(data).shape[1:])
    for name, (key, train) in stages(out, data).items():
        if only and name != "teacher" and name not in only:
            continue
        steps = max(10, round(base[key] * scale))
        run_dir = out / name
        print(f"== {data} {name}: {steps} steps", flush=True)
        train(
            recipes.RunOptions(
                out=str(run_dir),
                steps=steps,
                progress=False,
                resume=(run_dir / "config.json").exists(),
                checkpoint_every=max(1, steps // SNAPSHOTS),
                keep_history=name != "teacher",
            )
        )


def history(run_dir: Path) -> list[tuple[int, float, Model]]:
    """(step, training seconds, model with that checkpoint's EMA weights), by step."""
    config = load_config(run_dir)
    index = json.loads((run_dir / "history" / "index.json").read_text())
    out = []
    for step, seconds in sorted(index.items(), key=lambda kv: int(kv[0])):
        net = build_network(config.network)
        load_weights(net, run_dir / "history" / f"ema-{int(step):08d}.safetensors")
        out.append((int(step), seconds, Model(config, config.process.consistency(net.eval()))))
    return out


def first_below(
    curve: list[tuple[int, float, float]], threshold: float
) -> tuple[int, float] | None:
    """(step, seconds) of the first point of a (step, seconds, ratio) curve at or below
    `threshold`, or None when it never gets there."""
    return next(((step, sec) for step, sec, q in curve if q <= threshold), None)
