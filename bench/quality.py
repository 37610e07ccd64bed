"""Quality against network evaluations: teacher Euler/Heun against CD and iCT, side by side.

For each data set, trains (or reuses, in --runs) a teacher, its CD student and an iCT run with
the library's default recipe, tunes the CMs' multistep times on the training split, and scores
every sampler against the held-out split: teacher Euler and Heun at 1–35 evaluations, CD and
iCT at 1, 2 and 4 steps. Writes the tables and Q1/Q2 into BENCHMARKS.md between markers and
a plot of metric against NFE to bench/quality-<data>.png, one section per data set.

    python bench/quality.py [--data digits,moons,8gaussians] [--runs bench_runs/quality]
    python bench/quality.py --data mnist     # MNIST from ../shared/data/mnist.npz (slow)
"""

import argparse
import datetime
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from benchmarks_md import write_section  # noqa: E402

from cmkit.data import run_splits  # noqa: E402
from cmkit.evaluate import Scorer, evaluate, make_scorer, tune_times  # noqa: E402
from cmkit.features import named_extractor, train_classifier  # noqa: E402
from cmkit.generate import load_model  # noqa: E402
from cmkit.quickstart import train_all  # noqa: E402
from cmkit.runs import store_times  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MNIST = ROOT.parent / "shared" / "data" / "mnist.npz"
TEACHER_NFE = [1, 2, 4, 8, 18, 35]
CM_STEPS = [1, 2, 4]


def mnist_features():
    """MNIST is scored on a classifier trained here on its labelled training images."""
    with np.load(MNIST) as f:
        x, y = f["x_train"][:, None] / 255.0, f["y_train"]
    return named_extractor(train_classifier(x.astype(np.float32), y, epochs=2), "mnistnet")


def scorers(name: str, model, train: np.ndarray, held: np.ndarray) -> tuple[Scorer, Scorer]:
    """(held-out scorer for the tables, training-split scorer for tuning the CMs' times)."""
    if name != "mnist":
        return make_scorer(model, held), make_scorer(model, train)
    features = mnist_features()
    return Scorer(held, model.scaler, features), Scorer(train[:5000], model.scaler, features)


def tune(run_dir: Path, scorer: Scorer, n: int) -> dict[str, list[float]]:
    """Tune and store 2-step and (from those) 4-step times; returns them by step count."""
    times: list[float] = []
    for steps in CM_STEPS[1:]:
        model = load_model(str(run_dir))
        times, best = tune_times(model, scorer, steps, n, start=times[:1])
        store_times(run_dir, steps, times, {"metric": scorer.primary, "value": best, "n": n})
    return load_model(str(run_dir)).config.sampling.times


def run_data(name: str, runs: Path, scale: float, n: int | None) -> dict:
    spec = str(MNIST) if name == "mnist" else name
    out = runs / name
    train_all(out, scale, "cpu", progress=False, data=spec)
    seconds = {  # training time as recorded by each run, so reused runs report it too
        run: json.loads((out / run / "state.json").read_text())["seconds"]
        for run in ("teacher", "cd", "ict")
    }
    teacher = load_model(str(out / "teacher"))
    train, held = run_splits(teacher.config.data)
    scorer, tune_scorer = scorers(name, teacher, train, held)
    n = n or (2000 if len(teacher.shape) == 3 else 5000)
    result = {"name": name, "seconds": seconds, "n": n, "reference": len(scorer.reference)}
    # the floor: real training samples scored like generated ones
    real = train[np.random.default_rng(0).choice(len(train), min(n, len(train)), replace=False)]
    rows = [{"sampler": "real data (training split)", "nfe": 0, **scorer(real)}]
    rows += [
        {**row, "sampler": f"teacher {row['sampler']}"}
        for row in evaluate(teacher, scorer, TEACHER_NFE, n)
    ]
    result["tuned"] = {}
    for run in ("cd", "ict"):
        result["tuned"][run] = tune(out / run, tune_scorer, min(n, 2000))
        rows += [
            {**row, "sampler": f"{run.upper()} {row['sampler']}"}
            for row in evaluate(load_model(str(out / run)), scorer, CM_STEPS, n)
        ]
    return {**result, "rows": rows, "primary": scorer.primary}


def ratios(result: dict) -> dict[str, float]:
    """Q_k = metric(CM k steps) / metric(teacher Heun 35 NFE), per CM."""
    key = result["primary"]
    by = {(r["sampler"], r["nfe"]): r[key] for r in result["rows"]}
    base = by[("teacher heun", 35)]
    return {
        f"{run} Q{k}": by[(f"{run} {k} step" + ("s" if k > 1 else ""), k)] / base
        for run in ("CD", "ICT")
        for k in (1, 2)
    }


def plot(result: dict, path: Path) -> None:
    """Headline metric against NFE (log-log), with the real-data floor."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    key = result["primary"]
    for prefix, style in [("teacher euler", "o--"), ("teacher heun", "s--"),
                          ("CD", "o-"), ("ICT", "^-")]:  # fmt: skip
        rows = [r for r in result["rows"] if r["sampler"].startswith(prefix)]
        ax.plot([r["nfe"] for r in rows], [r[key] for r in rows], style, label=prefix)
    ax.axhline(result["rows"][0][key], color="grey", lw=0.8, ls=":", label="real data")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel(key + " (lower is better)")
    ax.set_title(result["name"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(result: dict) -> list[str]:
    metrics = [k for k in result["rows"][0] if k not in ("sampler", "nfe")]
    lines = [
        f"### {result['name']}",
        "",
        f"{result['n']} samples against {result['reference']} held-out samples; "
        f"headline metric {result['primary']}. Training: "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in result["seconds"].items())
        + ". Tuned times: "
        + "; ".join(
            f"{run.upper()} "
            + ", ".join(f"{k} steps τ={[round(t, 3) for t in v]}" for k, v in t.items())
            for run, t in result["tuned"].items()
        )
        + ".",
        "",
        "| sampler | NFE | " + " | ".join(metrics) + " |",
        "|---|---:|" + "---:|" * len(metrics),
    ]
    for row in result["rows"]:
        nfe = row["nfe"] or "–"
        lines.append(
            f"| {row['sampler']} | {nfe} | " + " | ".join(f"{row[m]:.4g}" for m in metrics) + " |"
        )
    q = ratios(result)
    lines += [
        "",
        "Ratios to teacher Heun at 35 NFE: " + ", ".join(f"{k} = {v:.2f}" for k, v in q.items()),
        "",
    ]
    return lines


def write(result: dict, command: str, plot_path: str) -> None:
    """One BENCHMARKS.md section per data set, each with the command that produced it."""
    body = [
        f"Measured {datetime.date.today()} on 2 CPU cores with `{command}`. "
        "Targets: Q1 = metric(CD 1 step) / metric(teacher Heun 35) ≤ 1.10, Q2 (2 steps) ≤ 1.00.",
        "",
        f"![{result['name']}: quality against NFE]({plot_path})",
        "",
        *markdown(result)[2:],
    ]
    table = "\n".join(body)
    print(table)
    heading = f"Quality against network evaluations: {result['name']}"
    write_section(f"quality-{result['name']}", heading, table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits,moons,8gaussians")
    parser.add_argument("--runs", default="bench_runs/quality")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply training steps")
    parser.add_argument("--n", type=int, help="samples per evaluation")
    args = parser.parse_args()
    start = time.perf_counter()
    for name in [d for d in args.data.split(",") if d]:
        result = run_data(name, Path(args.runs), args.scale, args.n)
        plot_path = f"bench/quality-{name}.png"
        plot(result, ROOT / plot_path)
        command = f"python bench/quality.py --data {name}"
        command += f" --scale {args.scale}" if args.scale != 1.0 else ""
        command += f" --n {args.n}" if args.n else ""
        write(result, command, plot_path)
    print(f"total {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
