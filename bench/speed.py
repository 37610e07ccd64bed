"""Sampling speed, as ratios measured side by side in one process.

Times, interleaved round by round on the same network (the default digits UNet, or a run's):
a bare network forward on precomputed inputs; cmkit's one-step sampler; cmkit's end-to-end
`generate`; the teacher's Heun sampler at 35 evaluations; and, with `--backbone
diffusers-unet` (or such a run), diffusers' ConsistencyModelPipeline on the same network.
Reports images per second and ratios (medians over rounds), and writes them to BENCHMARKS.md.

    python bench/speed.py [--backbone builtin|diffusers-unet | --model RUN] [--rounds 30]
"""

import argparse
import datetime
import statistics
import time
from collections.abc import Callable

import torch
from benchmarks_md import write_section

from cmkit.config import DataSection, RunConfig, TrainingSection
from cmkit.generate import Model, generate, load_model
from cmkit.networks.zoo import default_network
from cmkit.param import consistency_scalings
from cmkit.process import EDMProcess
from cmkit.runs import build_network
from cmkit.sampling import sample_ode, sample_onestep
from cmkit.units import Scaler


def default_model(backbone: str) -> Model:
    """An untrained default digits network: speed does not depend on the weights."""
    spec = default_network((1, 8, 8), backbone=backbone)
    data = DataSection("digits", 0.1, (1, 8, 8), Scaler((8.0,), (8.0,)))
    process = EDMProcess()
    config = RunConfig("consistency", process, spec, data, TrainingSection("none"))
    torch.manual_seed(0)
    net = build_network(spec).eval()
    return Model(config, process.consistency(net))


def variants(model: Model, batch: int) -> dict[str, Callable[[], object]]:
    """The callables to time at one batch size; each makes `batch` images."""
    proc, f = model.process, model.fn
    z = torch.randn(batch, *model.shape)
    t = torch.full((batch,), proc.t_max)
    s = consistency_scalings(t, z, proc.sigma_data, proc.sigma_min)
    x_in, c_noise = s.c_in * proc.prior(z), s.c_noise
    teacher = proc.denoiser(f.net)
    out = {
        "bare forward": lambda: f.net(x_in, c_noise),
        "cmkit 1 step": lambda: sample_onestep(f, proc, z),
        "cmkit generate()": lambda: generate(model, batch, seed=0),
        "teacher Heun 35": lambda: sample_ode(teacher, proc, z, 18, "heun"),
    }
    if model.config.network.type == "diffusers-unet":
        pipe = pipeline(model)
        gen = torch.Generator()
        out["diffusers pipeline"] = lambda: pipe(
            batch_size=batch, num_inference_steps=1, generator=gen.manual_seed(0), output_type="pt"
        )
    return out


def pipeline(model: Model):
    """diffusers' ConsistencyModelPipeline around the model's own UNet2DModel."""
    import diffusers

    proc = model.process
    scheduler = diffusers.CMStochasticIterativeScheduler(
        num_train_timesteps=40,
        sigma_min=proc.sigma_min,
        sigma_max=proc.sigma_max,
        sigma_data=proc.sigma_data,
        rho=proc.rho,
    )
    pipe = diffusers.ConsistencyModelPipeline(unet=model.fn.net.unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def measure(fns: dict[str, Callable], rounds: int, min_seconds: float = 0.2) -> dict[str, float]:
    """Median seconds per call of each fn; the fns take turns in every round."""
    reps = {}
    for name, fn in fns.items():  # warm up, and pick repetitions filling min_seconds
        fn()
        start, k = time.perf_counter(), 0
        while time.perf_counter() - start < min_seconds:
            fn()
            k += 1
        reps[name] = max(1, k)
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / reps[name])
    return {name: statistics.median(v) for name, v in samples.items()}


def report(results: dict[int, dict[str, float]], command: str, label: str) -> str:
    lines = [
        f"Measured {datetime.date.today()} on 2 CPU cores with `{command}` ({label}).",
        "Medians over interleaved rounds; ratios are what to trust on this noisy machine.",
        "",
        "| batch | variant | images/s | time / bare forward |",
        "|---:|---|---:|---:|",
    ]
    for batch, times in results.items():
        bare = times["bare forward"]
        for name, sec in times.items():
            lines.append(f"| {batch} | {name} | {batch / sec:.0f} | {sec / bare:.3f} |")
    lines.append("")
    for batch, times in results.items():
        one, heun, bare = times["cmkit 1 step"], times["teacher Heun 35"], times["bare forward"]
        line = (
            f"- batch {batch}: 1-step throughput = **{heun / one:.1f}×** teacher Heun-35; "
            f"sampler overhead over a bare forward = **{100 * (one / bare - 1):.1f}%**"
        )
        if "diffusers pipeline" in times:
            pipe = times["diffusers pipeline"]
            line += f"; diffusers pipeline overhead {100 * (pipe / bare - 1):.1f}%"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a consistency run (default: untrained digits network)")
    parser.add_argument(
        "--backbone",
        default="builtin",
        choices=["builtin", "diffusers-unet"],
        help="network of the default model; diffusers-unet adds diffusers' pipeline",
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batches", default="1,64")
    args = parser.parse_args()
    model = load_model(args.model) if args.model else default_model(args.backbone)
    label = f"run {args.model}" if args.model else f"untrained {args.backbone} digits network"
    results = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        results[batch] = measure(variants(model, batch), args.rounds)
    command = "python bench/speed.py " + (
        f"--model {args.model}" if args.model else f"--backbone {args.backbone}"
    )
    table = report(results, command, label)
    print(table)
    key = "speed-model" if args.model else f"speed-{args.backbone}"
    write_section(key, f"Sampling speed ({label})", table)


if __name__ == "__main__":
    main()
