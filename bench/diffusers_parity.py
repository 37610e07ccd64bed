"""Same seed, same images: diffusers' ConsistencyModelPipeline against `cmkit sample`.

Loads a run and the folder `cmkit export-diffusers` wrote from it, draws --n images with one
seed from both for one step and for each step count the exported grid can express, and prints
the largest absolute difference in the pipeline's output units ([0, 1]).

    python bench/diffusers_parity.py --model RUN --pipeline DIR [--n 1000] [--seed 0]
"""

import argparse

import torch
from diffusers import ConsistencyModelPipeline

from cmkit.diffusers_io import pipeline_timesteps
from cmkit.errors import UserError
from cmkit.generate import cm_times, generate, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = load_model(args.model)
    pipe = ConsistencyModelPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    n = pipe.scheduler.config.num_train_timesteps
    print(f"| steps | pipeline timesteps | max abs difference ({args.n} images, [0, 1]) |")
    print("|---|---|---|")
    for steps in (1, 2, 3):
        try:
            timesteps = pipeline_timesteps(model.process, n, cm_times(model, steps, None))
        except UserError:
            continue
        gen = torch.Generator().manual_seed(args.seed)
        call = {"num_inference_steps": None, "timesteps": timesteps, "generator": gen}
        ref = pipe(args.n, output_type="pt", **call).images
        ours = model.scaler.to_model(generate(model, args.n, args.seed, steps))
        diff = (ref - torch.from_numpy(ours / 2 + 0.5).clamp(0, 1)).abs().max().item()
        print(f"| {steps} | {timesteps} | {diff:.2e} |")


if __name__ == "__main__":
    main()
