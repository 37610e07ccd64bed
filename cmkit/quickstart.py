"""`cmkit quickstart`: a teacher and its few-step students on the built-in digits, in minutes.

Writes <out>/teacher and one run per consistency recipe (<out>/ect by default; cd and ict on
request: ordinary run directories), <out>/samples.png comparing the samplers, and
<out>/report.md. ECT is the default because it was the best one-step recipe on digits in
BENCHMARKS.md, at less training time than CD. A stage whose run exists is resumed (or reused
when complete), so an interrupted quickstart picks up where it stopped.
"""

import time
from pathlib import Path

from cmkit import recipes
from cmkit.data import load_data, run_splits
from cmkit.errors import OptionError
from cmkit.generate import generate, load_model
from cmkit.metrics import energy_distance
from cmkit.plots import image_grid, save_panels
from cmkit.runs import load_config
from cmkit.units import to_unit

DATA = "digits"
TEACHER = ("teacher Heun", "teacher", {"steps": 18, "solver": "heun"}, 35)
CM_TITLES = {"ect": "ECT", "cd": "CD", "ict": "iCT"}  # the recipes it offers, in this order
DEFAULT_RECIPES = ("ect",)


def samplers(cm_recipes: tuple[str, ...]) -> list[tuple[str, str, dict, int]]:
    """(title, run, sampling options, network evaluations): the teacher, then each recipe at
    1 and 2 steps."""
    rows = [TEACHER]
    for name in cm_recipes:
        title = CM_TITLES[name]
        rows += [(f"{title} 1 step", name, {"steps": 1}, 1)]
        rows += [(f"{title} 2 steps", name, {"steps": 2}, 2)]
    return rows


def check_recipes(cm_recipes: tuple[str, ...]) -> tuple[str, ...]:
    """The requested recipes in the offered order, each once; one line for any other."""
    unknown = [name for name in cm_recipes if name not in CM_TITLES]
    if unknown or not cm_recipes:
        raise OptionError(
            "recipes", f"must be some of {', '.join(CM_TITLES)}, got {','.join(cm_recipes)!r}"
        )
    return tuple(name for name in CM_TITLES if name in cm_recipes)


def _run_options(out: Path, steps: int, device: str, progress: bool) -> recipes.RunOptions:
    print(f"== {out.name}: {steps} steps", flush=True)
    return recipes.RunOptions(
        out=str(out),
        steps=steps,
        device=device,
        progress=progress,
        resume=(out / "config.json").exists(),
    )


def train_all(
    out: Path,
    scale: float,
    device: str,
    progress: bool,
    data: str = DATA,
    cm_recipes: tuple[str, ...] = DEFAULT_RECIPES,
) -> dict[str, float]:
    """Train a teacher and the `cm_recipes` students on `data` with their default options
    (step counts times `scale`); returns seconds per stage."""
    base = recipes.defaults_for(load_data(data).shape[1:])
    seconds = {}
    for name, (key, train) in recipes.default_stages(out, data, cm_recipes).items():
        start = time.perf_counter()
        train(_run_options(out / name, recipes.scaled_steps(base, key, scale), device, progress))
        seconds[name] = time.perf_counter() - start
    return seconds


def quickstart(
    out: Path,
    scale: float = 1.0,
    device: str = "cpu",
    progress: bool = True,
    cm_recipes: tuple[str, ...] = DEFAULT_RECIPES,
) -> Path:
    """Run the whole pipeline and write the comparison PNG and report; returns the report."""
    cm_recipes = check_recipes(cm_recipes)
    out.mkdir(parents=True, exist_ok=True)
    seconds = train_all(out, scale, device, progress, cm_recipes=cm_recipes)
    held_out = run_splits(load_config(out / "teacher").data)[1]
    panels, rows = [], []
    for title, run, options, nfe in samplers(cm_recipes):
        model = load_model(str(out / run), device)
        x = generate(model, 500, seed=0, **options)
        panels.append((f"{title} ({nfe} NFE)", image_grid(to_unit(model.scaler.to_model(x[:64])))))
        rows.append((title, nfe, energy_distance(x, held_out)))
    save_panels(panels, out / "samples.png")
    report = out / "report.md"
    report.write_text(_report(rows, seconds, len(held_out)))
    print(report.read_text())
    return report


def _report(rows, seconds: dict[str, float], n_held_out: int) -> str:
    lines = [
        "# cmkit quickstart on digits",
        "",
        "Samples: samples.png. Energy distance in pixel space (0..16 units) between 500 samples",
        f"and the {n_held_out} held-out digits; lower is better, about 0 means indistinguishable.",
        "",
        "| sampler | NFE | energy distance |",
        "|---|---|---|",
        *[f"| {title} | {nfe} | {ed:.3f} |" for title, nfe, ed in rows],
        "",
        "Training time: "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())
        + f" (total {sum(seconds.values()) / 60:.1f} min).",
        "",
    ]
    return "\n".join(lines)
