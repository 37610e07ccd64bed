"""`cmkit edit`, `quickstart`, `export`, `export-diffusers`, `import-diffusers`,
`import-teacher` and `merge-lora`."""

import argparse
from pathlib import Path

from cmkit.cli.options import add_device, check_device, floats, require
from cmkit.cli.run_flags import add_data_flags
from cmkit.editing import TASKS
from cmkit.errors import UserError
from cmkit.export import FORMATS, export_run, manifest_path


def add_edit(sub) -> None:
    p = sub.add_parser(
        "edit",
        help="zero-shot editing with a consistency run: inpaint, colorize, superres, denoise, "
        "interpolate, sdedit",
    )
    p.add_argument("task", choices=TASKS)
    p.add_argument("--config", help="TOML or JSON file of options")
    p.add_argument("--model", help="run directory (a consistency run; a teacher only denoises)")
    p.add_argument(
        "--input",
        action="append",
        help=".npy/.npz array (N, ...) in the data's units, or an image file; superres: the "
        "low-resolution image; interpolate: two standard-normal noise arrays (default: from "
        "--seed)",
    )
    p.add_argument("--out", help="FILE.npy or FILE.png, the kind of the input; a _grid.png beside")
    p.add_argument("--mask", help="inpaint: center | left-half | strokes | FILE (1/white = fill)")
    p.add_argument("--steps", type=int, help="network evaluations (default 4; sdedit 2)")
    p.add_argument(
        "--times",
        type=floats,
        help="editing times τ₁ > τ₂ > … (τ₁ ≤ T: where editing starts; default T and the "
        "sampling times for --steps)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds all noise (and the strokes mask)")
    p.add_argument("--factor", type=int, default=2, help="superres: upscaling factor p")
    p.add_argument("--sigma", type=float, help="denoise: noise level in the data's units")
    p.add_argument("--frames", type=int, default=8, help="interpolate: frames per pair")
    add_device(p)


def edit(args: argparse.Namespace) -> None:
    from cmkit.edit_tasks import EditOptions, edit_files
    from cmkit.generate import load_model

    require(args, "model", "out")
    model = load_model(args.model, check_device(args.device))
    opts = EditOptions(
        args.mask, args.steps, args.times, args.seed, args.factor, args.sigma, args.frames
    )
    written = edit_files(model, args.task, args.input or [], Path(args.out), opts)
    print(f"wrote {', '.join(map(str, written))}")


def add_quickstart(sub) -> None:
    p = sub.add_parser("quickstart", help="the whole pipeline on digits in minutes")
    p.add_argument("--config", help="TOML or JSON file of options")
    p.add_argument("--out", default="quickstart", help="directory for runs and results")
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every step count (e.g. 0.1 for a smoke test)",
    )
    p.add_argument(
        "--recipes",
        default="ect",
        help="comma-separated students of the teacher to train and compare: ect (the default, "
        "the best on digits), cd, ict (e.g. ect,cd,ict: about twice as long)",
    )
    add_device(p)


def quickstart(args: argparse.Namespace) -> None:
    from cmkit.quickstart import quickstart

    if args.scale <= 0:
        raise UserError(f"--scale must be > 0, got {args.scale}")
    cm_recipes = tuple(name.strip() for name in args.recipes.split(",") if name.strip())
    device = check_device(args.device)
    quickstart(Path(args.out), args.scale, device, not args.no_progress, cm_recipes)


def add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a consistency run's 1- or K-step sampler as one ONNX or torch.export graph",
    )
    p.add_argument("--config", help="TOML or JSON file of options")
    p.add_argument("--model", help="consistency run directory")
    p.add_argument(
        "--format",
        choices=FORMATS,
        help="onnx (for onnxruntime; pip install 'cmkit[export]') or pt2 (torch.export.load)",
    )
    p.add_argument("--out", help="FILE.onnx or FILE.pt2; FILE.onnx.json (.pt2.json) describes it")
    p.add_argument(
        "--steps",
        type=int,
        help="sampling steps K (default 1): the graph's input is noise (K, batch, *shape)",
    )
    p.add_argument("--times", type=floats, help="intermediate times τ₁ > τ₂ > … (K: one more)")


def export(args: argparse.Namespace) -> None:
    require(args, "model", "format", "out")
    out = Path(args.out)
    manifest = export_run(args.model, args.format, out, args.steps, args.times)
    noise = ", ".join(map(str, manifest["inputs"][0]["shape"]))
    print(
        f"wrote a {manifest['sampler']['steps']}-step sampler to {out} (input noise "
        f"({noise}), standard normal; output samples in the data's units) and "
        f"{manifest_path(out)}"
    )


def add_export_diffusers(sub) -> None:
    p = sub.add_parser(
        "export-diffusers", help="write a consistency run as a diffusers ConsistencyModelPipeline"
    )
    p.add_argument("--config", help="TOML or JSON file of options")
    p.add_argument("--model", help="consistency run trained with --backbone diffusers-unet")
    p.add_argument("--out", help="new folder for the pipeline")
    p.add_argument(
        "--num-train-timesteps",
        type=int,
        help="N of the scheduler's Karras grid (default: the run's final training N)",
    )


def export_diffusers(args: argparse.Namespace) -> None:
    from cmkit.diffusers_io import export_pipeline, pipeline_calls

    require(args, "model", "out")
    model, n = export_pipeline(args.model, args.out, args.num_train_timesteps)
    side = model.shape[-1]
    print(f"wrote a {side}x{side} ConsistencyModelPipeline (N = {n}) to {args.out}; with")
    print("  pipe = ConsistencyModelPipeline.from_pretrained(OUT)")
    print("  g = torch.Generator().manual_seed(S)")
    for line in pipeline_calls(model, n):
        print(f"  {line}")


def add_import_diffusers(sub) -> None:
    p = sub.add_parser("import-diffusers", help="turn a ConsistencyModelPipeline folder into a run")
    p.add_argument("--config", help="TOML or JSON file of options")
    p.add_argument("--pipeline", help="folder written by save_pretrained or export-diffusers")
    p.add_argument("--out", help="run directory to create")


def import_diffusers(args: argparse.Namespace) -> Path:
    from cmkit.diffusers_io import import_pipeline

    require(args, "pipeline", "out")
    return import_pipeline(args.pipeline, args.out)


def add_import_teacher(sub) -> None:
    p = sub.add_parser(
        "import-teacher",
        help="turn a diffusers UNet2DModel with a DDPM, DDIM or Euler scheduler into a teacher "
        "run for distill",
    )
    p.add_argument("--config", help="TOML or JSON file of options")
    p.add_argument("--pipeline", help="folder written by save_pretrained (safetensors weights)")
    add_data_flags(p)  # the data the model was trained on (labelled when the UNet is)
    p.add_argument("--holdout", type=float, default=0.1, help="fraction of data held out")
    p.add_argument(
        "--null-label",
        type=int,
        help="class-conditional UNets: the class id that stands in when no labels are given "
        "(default none: every evaluation needs labels)",
    )
    p.add_argument("--out", help="run directory to create")


def import_teacher(args: argparse.Namespace) -> Path:
    from cmkit.diffusers_teacher import import_teacher

    require(args, "pipeline", "data", "out")
    return import_teacher(
        args.pipeline,
        args.out,
        args.data,
        holdout=args.holdout,
        null_label=args.null_label,
        data_key=args.data_key,
        layout=args.layout,
        label_key=args.label_key,
    )


def add_merge_lora(sub) -> None:
    p = sub.add_parser(
        "merge-lora", help="fold a LoRA run's adapter into its base: a plain consistency run"
    )
    p.add_argument("--config", help="TOML or JSON file of options")
    p.add_argument("--model", help="LoRA run directory (distill --lora-rank)")
    p.add_argument("--out", help="run directory to create")
    p.add_argument(
        "--base", help="merge into this teacher run of the same network (default: its own base)"
    )
    p.add_argument("--force", action="store_true", help="take a base it was not trained on")


def merge_lora(args: argparse.Namespace) -> Path:
    from cmkit.lora import merge_run

    require(args, "model", "out")
    return merge_run(args.model, args.out, args.base, args.force)


COMMANDS = {
    "edit": (add_edit, edit),
    "quickstart": (add_quickstart, quickstart),
    "export": (add_export, export),
    "export-diffusers": (add_export_diffusers, export_diffusers),
    "import-diffusers": (add_import_diffusers, import_diffusers),
    "import-teacher": (add_import_teacher, import_teacher),
    "merge-lora": (add_merge_lora, merge_lora),
}
