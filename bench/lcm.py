"""Latent consistency models: an autoencoder's latent space, full LCM against LCM-LoRA, and
TCD sampling, against the guided latent teacher.

Trains (or reuses, in --runs) the built-in KL autoencoder on the data, a class-conditional
EDM teacher in its latent space (label dropout p_uncond = 0.1), full LCM (`distill --recipe
lcm` over w ∈ [min w, max w], w as the student's input) and LCM-LoRA (rank-r adapters on the
teacher's own network at one w, μ = 0), each with the recipes' defaults. Scores, with the
labels 0..9 in turn: label accuracy under the feature network's classifier head (digitsnet
for digits, mnistnet for MNIST), FD on its features against the held-out images, and the mean
per-class FD; the teacher is sampled with Heun (18 points, 35 evaluations) on the guided
denoiser at each w, the students at 1, 2 and 4 steps, and at 4 steps with TCD's γ ∈ {0, 0.3,
1}. The autoencoder's ceiling is the classifier's accuracy on reconstructions of the
held-out images. Sampling speed end to end (decode included) is timed against a pixel-space
consistency model of the default network for the image size at the same NFE, alternating.
Writes the tables into BENCHMARKS.md and a sample grid to bench/lcm-<data>.png.

    python bench/lcm.py [--data digits] [--ws 0,1,2,4] [--lora-w 2] [--runs bench_runs/lcm]
    python bench/lcm.py --data mnist     # ../shared/data/mnist.npz, in a 4×8×8 latent
"""

import argparse
import copy
import datetime
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from benchmarks_md import write_section
from conditional import MNIST, Judge, save_class_rows, steps_of
from recipe_runs import run_stages

from cmkit import recipes
from cmkit.autoencoder import load_autoencoder, reconstruct
from cmkit.data import run_splits
from cmkit.features import accuracy
from cmkit.generate import Model, conditioning, generate, load_model
from cmkit.labels import run_labels
from cmkit.networks.zoo import build_for_data, default_network
from cmkit.process import EDMProcess
from cmkit.train_autoencoder import AutoencoderOptions, train_autoencoder
from cmkit.units import to_unit

ROOT = Path(__file__).resolve().parent.parent
STEPS = (1, 2, 4)
GAMMAS = (0.0, 0.3, 1.0)
TEACHER_POINTS = 18  # Heun: 35 evaluations
SPEED_ROUNDS = 3


def train(
    out: Path,
    data: str,
    ws: list[float],
    lora_w: float,
    rank: int,
    scale: float,
    only: tuple[str, ...] = ("teacher", "lcm", "lcm-lora"),
):
    """Train (or reuse) the autoencoder, then the latent teacher and its students (the runs
    in `only`); the autoencoder's folder and each run's training minutes."""
    ae = out / "autoencoder"
    if not (ae / "metrics.json").is_file():
        steps = max(1, round(AutoencoderOptions(out="").steps * scale))
        options = AutoencoderOptions(out=str(ae), steps=steps, progress=False)
        train_autoencoder(data, replace(options, resume=(ae / "checkpoint").exists()))
    teacher = str(out / "teacher")
    lcm = recipes.LCMOptions(teacher, guidance=(min(ws), max(ws)))
    lora = recipes.LCMOptions(teacher, guidance=(lora_w, lora_w), lora_rank=rank)
    stages = {
        "teacher": ("teacher_steps", lambda run: recipes.teacher_run(run, data, EDMProcess())),
        "lcm": ("cm_steps", lambda run: recipes.lcm_run(run, lcm)),
        "lcm-lora": ("cm_steps", lambda run: recipes.lcm_run(run, lora)),
    }
    stages = {name: stage for name, stage in stages.items() if name in only}
    minutes = run_stages(out, data, stages, scale, labels=True, latent=str(ae))
    return ae, minutes


def autoencoder_rows(ae: Path, teacher: Model, judge: Judge) -> dict:
    """PSNR of the autoencoder on the held-out images, and the classifier's accuracy on them
    and on their reconstructions (the ceiling of any latent sampler)."""
    metrics = json.loads((ae / "metrics.json").read_text())
    _, net = load_autoencoder(ae)
    train_x, held = run_splits(teacher.config.data)
    y = run_labels(teacher.config.data, len(train_x) + len(held))[1]
    x = torch.from_numpy(teacher.scaler.to_model(held))
    with torch.no_grad():
        rec = reconstruct(net, x).numpy()
    return {
        **metrics,
        "accuracy": accuracy(judge.classifier, to_unit(x.numpy()), y),
        "accuracy rec": accuracy(judge.classifier, to_unit(rec), y),
    }


def evaluate_runs(out: Path, ws: list[float], lora_w: float, n: int):
    """The table's rows and, for the grid, each sampler's first samples."""
    teacher = load_model(str(out / "teacher"))
    judge = Judge(teacher)
    rows, grids = [], {}

    def score(run: str, model, w: float, steps: int, nfe: int, gamma=None) -> None:
        cond = conditioning(model, n, None, w)
        started = time.perf_counter()
        samples = generate(model, n, seed=0, steps=steps, gamma=gamma, cond=cond)
        seconds = time.perf_counter() - started
        metrics = judge(samples, cond["labels"].numpy())
        row = {"run": run, "w": w, "NFE": nfe, "gamma": gamma, **metrics, "sample s": seconds}
        rows.append(row)
        grids.setdefault((run, w, gamma), samples[:20])
        label = f"{run} w={w:g} NFE {nfe}" + ("" if gamma is None else f" γ={gamma:g}")
        print(label + ": " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)

    for w in ws:
        score("teacher (Heun)", teacher, w, TEACHER_POINTS, 2 * TEACHER_POINTS - 1)
    students = {"LCM": (load_model(str(out / "lcm")), ws)}
    students["LCM-LoRA"] = (load_model(str(out / "lcm-lora")), [lora_w])
    for name, (model, its_ws) in students.items():
        for w in its_ws:
            for steps in STEPS:
                score(name, model, w, steps, steps)
            for gamma in GAMMAS:
                score(name, model, w, 4, 4, gamma)
    return teacher, judge, rows, grids


def pixel_twin(model: Model) -> Model:
    """A consistency model of the default pixel-space network for the latent run's image
    size and classes, untrained: what sampling costs without the autoencoder."""
    config = copy.deepcopy(model.config)
    shape = config.data.sample_shape
    config.data = replace(config.data, shape=shape, latent=None)
    config.network = default_network(shape, {}, "builtin", len(config.data.classes))
    net = build_for_data(config.network, shape).eval()
    return Model(config, config.process.consistency(net))


def speed(model: Model, n: int) -> list[dict]:
    """Seconds to draw n decoded samples at each NFE, latent against pixel space, the two
    alternating SPEED_ROUNDS times (median)."""
    twin = pixel_twin(model)
    cond = conditioning(model, n, None, None)
    rows = []
    for steps in STEPS:
        times = {"latent": [], "pixel": []}
        for _ in range(SPEED_ROUNDS):
            for key, m in (("latent", model), ("pixel", twin)):
                started = time.perf_counter()
                generate(m, n, seed=0, steps=steps, cond=cond)
                times[key].append(time.perf_counter() - started)
        median = {k: float(np.median(v)) for k, v in times.items()}
        rows.append({"NFE": steps, **median, "ratio": median["pixel"] / median["latent"]})
    return rows


def sizes(out: Path) -> dict[str, dict]:
    """Trainable parameters and weight-file bytes of LCM (all of the network) and LCM-LoRA
    (the adapter), against the teacher's whole network."""
    full = (out / "teacher" / "ema.safetensors").stat().st_size
    lora = json.loads((out / "lcm-lora" / "config.json").read_text())["training"]["options"]
    teacher = load_model(str(out / "teacher"))
    params = sum(p.numel() for p in teacher.fn.parameters())
    return {
        "LCM": {"trainable": params, "parameters": params, "bytes": full, "full bytes": full},
        "LCM-LoRA": {
            "trainable": lora["trainable_parameters"],
            "parameters": lora["parameters"],
            "bytes": (out / "lcm-lora" / "adapter.safetensors").stat().st_size,
            "full bytes": full,
        },
    }


def row_of(rows: list[dict], run: str, w: float, nfe: int, gamma=None) -> dict:
    return next(
        r
        for r in rows
        if r["run"] == run and r["w"] == w and r["NFE"] == nfe and r["gamma"] == gamma
    )


def checks(rows, ws, lora_w, size, speeds) -> list[str]:
    """The issue's targets, each with its measured numbers."""
    lines = []
    teacher = {w: row_of(rows, "teacher (Heun)", w, 2 * TEACHER_POINTS - 1) for w in ws}
    for w in ws:
        lcm, t = row_of(rows, "LCM", w, 4), teacher[w]
        gap = 100 * (lcm["accuracy"] - t["accuracy"])
        lines.append(
            f"- LCM at w = {w:g}, 4 steps: accuracy {100 * lcm['accuracy']:.1f}% vs the "
            f"teacher's {100 * t['accuracy']:.1f}% ({gap:+.1f} points; target within 3), FD "
            f"{lcm['FD']:.3g} = {lcm['FD'] / t['FD']:.2f}× the teacher's Heun-35 (target ≤ 1.25×)."
        )
    lo = size["LCM-LoRA"]
    lines.append(
        f"- LCM-LoRA: {lo['trainable']:,} of {lo['parameters']:,} parameters trainable "
        f"({100 * lo['trainable'] / lo['parameters']:.1f}%; target ≤ 15%); adapter file "
        f"{lo['bytes'] / 1024:.0f} KiB = {100 * lo['bytes'] / lo['full bytes']:.1f}% of the "
        "full weights (target ≤ 20%)."
    )
    for steps in STEPS:
        lora, lcm = row_of(rows, "LCM-LoRA", lora_w, steps), row_of(rows, "LCM", lora_w, steps)
        gap = 100 * (lora["accuracy"] - lcm["accuracy"])
        lines.append(
            f"- LCM-LoRA at w = {lora_w:g}, {steps} step(s): accuracy "
            f"{100 * lora['accuracy']:.1f}% vs full LCM's {100 * lcm['accuracy']:.1f}% "
            f"({gap:+.1f} points; target within 5), FD {lora['FD']:.3g} vs {lcm['FD']:.3g}."
        )
    ratios = ", ".join(f"{r['ratio']:.2f}× at {r['NFE']} NFE" for r in speeds)
    lines.append(
        f"- Latent sampling (decode included) against pixel-space sampling of the same image "
        f"size: {ratios} faster (target > 1×)."
    )
    return lines


def markdown(rows, ae: dict, size: dict, minutes: dict, speeds: list[dict]) -> list[str]:
    lines = [
        "| autoencoder | held-out PSNR | accuracy on originals | on reconstructions | train min |",
        "|---|---:|---:|---:|---:|",
        f"| built-in KL | {ae['psnr']:.2f} dB | {100 * ae['accuracy']:.1f}% | "
        f"{100 * ae['accuracy rec']:.1f}% | {ae['seconds'] / 60:.1f} |",
        "",
        "| run | trainable parameters | weights file | train min |",
        "|---|---:|---:|---:|",
        f"| teacher | {size['LCM']['parameters']:,} | {size['LCM']['full bytes'] / 1024:.0f} KiB "
        f"| {minutes['teacher']:.1f} |",
    ]
    for name, key in (("LCM", "lcm"), ("LCM-LoRA", "lcm-lora")):
        s = size[name]
        share = 100 * s["trainable"] / s["parameters"]
        lines.append(
            f"| {name} | {s['trainable']:,} ({share:.1f}%) | {s['bytes'] / 1024:.0f} KiB | "
            f"{minutes[key]:.1f} |"
        )
    lines += [
        "",
        "| sampler | w | NFE | TCD γ | accuracy | FD (held-out) | FD per class | sampling s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        gamma = "" if r["gamma"] is None else f"{r['gamma']:g}"
        lines.append(
            f"| {r['run']} | {r['w']:g} | {r['NFE']} | {gamma} | {100 * r['accuracy']:.1f}% | "
            f"{r['FD']:.3g} | {r['FD per class']:.3g} | {r['sample s']:.1f} |"
        )
    lines += [
        "",
        "| NFE | latent s (decode included) | pixel-space s | pixel / latent |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['NFE']} | {r['latent']:.2f} | {r['pixel']:.2f} | **{r['ratio']:.2f}×** |"
        for r in speeds
    ]
    return lines


def save_grid(grids: dict, ws: list[float], lora_w: float, model: Model, path: Path) -> None:
    """Rows: the teacher at each w, LCM's 4 steps at each w, LCM-LoRA's 4 steps at its w."""
    rows = [grids[("teacher (Heun)", w, None)] for w in ws]
    rows += [grids[("LCM", w, None)] for w in ws]
    rows.append(grids[("LCM-LoRA", lora_w, None)])
    save_class_rows(rows, model, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits", help="digits or mnist")
    parser.add_argument("--ws", default="0,1,2,4", help="guidance scales w, comma-separated")
    parser.add_argument("--lora-w", type=float, default=2.0, help="LCM-LoRA's one w")
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument("--runs", default="bench_runs/lcm")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply training steps")
    parser.add_argument("--n", type=int, default=2000, help="samples per evaluation")
    args = parser.parse_args()
    ws = sorted(float(w) for w in args.ws.split(","))
    if args.lora_w not in ws:
        parser.error(f"--lora-w {args.lora_w:g} must be one of --ws {args.ws}")
    data = str(MNIST) if args.data == "mnist" else args.data
    out = Path(args.runs) / args.data
    started = time.perf_counter()
    ae_dir, minutes = train(out, data, ws, args.lora_w, args.lora_rank, args.scale)
    teacher, judge, rows, grids = evaluate_runs(out, ws, args.lora_w, args.n)
    ae = autoencoder_rows(ae_dir, teacher, judge)
    size = sizes(out)
    speeds = speed(load_model(str(out / "lcm")), args.n)
    grid_path = ROOT / "bench" / f"lcm-{args.data}.png"
    save_grid(grids, ws, args.lora_w, teacher, grid_path)
    command = "python bench/lcm.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if parser.get_default(k) != v
    )
    trained = ", ".join(f"{name} {steps_of(out / name)} steps" for name in minutes)
    shape = "×".join(map(str, teacher.shape))
    body = "\n".join(
        [
            f"`{command.strip()}` on {datetime.date.today()} with {torch.get_num_threads()} "
            f"torch thread(s); latent {shape}; {args.n} samples per row, labels 0..9 in turn; "
            f"{(time.perf_counter() - started) / 60:.0f} min in all; {trained}.",
            "",
            *markdown(rows, ae, size, minutes, speeds),
            "",
            *checks(rows, ws, args.lora_w, size, speeds),
            "",
            f"![LCM samples]({grid_path.relative_to(ROOT)}): rows are the teacher (Heun 35) "
            f"at w = {', '.join(f'{w:g}' for w in ws)}, full LCM's 4 steps at the same w, and "
            f"LCM-LoRA's 4 steps at w = {args.lora_w:g}; columns are the classes 0..9.",
        ]
    )
    write_section(f"lcm-{args.data}", f"Latent consistency models ({args.data})", body)
    print(body)


if __name__ == "__main__":
    main()
