"""`cmkit edit`: the editing tasks on a loaded run, from the user's files to the user's files.

`run_task` works on arrays in model units; `edit_files` adds the units and the files: `.npy`
arrays are in the data's units (the run's Scaler converts them), image files map 0..255 to
the model's [−1, 1] (as `cmkit sample` writes them). All randomness (noise, strokes mask)
comes from one CPU generator seeded by `seed`, so an edit is repeatable.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cmkit import editing
from cmkit.batch import NO_COND, Cond
from cmkit.data import load_data, read_array
from cmkit.editing import MASKS, TASKS
from cmkit.errors import OptionError, UserError
from cmkit.flowmap import check_jumps
from cmkit.generate import Model, cm_times
from cmkit.image_files import IMAGE_SUFFIXES, load_image
from cmkit.plots import image_grid, save_image_grid
from cmkit.sampling import clip_denoised, sample_onestep
from cmkit.units import to_unit

# Network evaluations when neither --steps nor --times is given (see BENCHMARKS.md, editing).
DEFAULT_STEPS = {"inpaint": 4, "colorize": 4, "superres": 4, "sdedit": 2}
ARRAY_SUFFIXES = (".npy", ".npz")


@dataclass
class EditOptions:
    """Options of `cmkit edit`; each task reads the ones it needs and refuses the others."""

    mask: str | None = None  # inpaint: file, or a name from MASKS
    steps: int | None = None
    times: list[float] | None = None
    seed: int = 0
    factor: int = 2  # superres
    sigma: float | None = None  # denoise, in the data's units
    frames: int = 8  # interpolate


@dataclass
class Edited:
    """Model-unit arrays: the task's input as shown beside the result (None: no 'before')."""

    before: np.ndarray | None
    after: np.ndarray


def run_task(
    model: Model, task: str, inputs: list[np.ndarray], opts: EditOptions, cond: Cond = NO_COND
) -> Edited:
    """Run one task on inputs in model units (interpolate: standard-normal noise arrays);
    `cond` is the conditioning of the outputs, passed to every network evaluation."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if model.codec is not None:
        raise UserError(
            f"{task} edits pixels, and this run samples in the latent space of "
            f"{model.config.data.latent.path}, where masks and pixel operators do not apply; "
            "edit works on pixel runs"
        )
    if model.kind == "teacher" and task != "denoise":
        raise UserError(
            f"{task} needs a consistency run (from `cmkit distill` or `cmkit train`); "
            "this is a teacher run, which only does `denoise`"
        )
    _check_inputs(task, inputs)
    _check_options(task, opts)
    gen = torch.Generator().manual_seed(opts.seed)
    device = next(model.fn.parameters()).device
    ys = [torch.from_numpy(y).to(device) for y in inputs]
    cond = {k: v.to(device) for k, v in cond.items()}
    before, after = TASK_FUNCTIONS[task](model, ys, opts, gen, cond)
    return Edited(None if before is None else before.cpu().numpy(), after.cpu().numpy())


def _check_inputs(task: str, inputs: list[np.ndarray]) -> None:
    wanted = "none or two noise arrays" if task == "interpolate" else "one input"
    if len(inputs) not in ((0, 2) if task == "interpolate" else (1,)):
        raise UserError(f"{task} takes {wanted} (--input FILE), got {len(inputs)}")


def _check_options(task: str, opts: EditOptions) -> None:
    uses = {
        "mask": task == "inpaint",
        "steps": task in DEFAULT_STEPS,
        "times": task in DEFAULT_STEPS,
        "sigma": task == "denoise",
    }
    for name, used in uses.items():
        if getattr(opts, name) is not None and not used:
            raise OptionError(name, f"does not apply to {task}")
    if opts.steps is not None and opts.times is not None:
        raise UserError("give --steps or --times, not both")
    if opts.steps is not None and opts.steps < 1:
        raise OptionError("steps", f"must be >= 1, got {opts.steps}")


def edit_times(model: Model, task: str, opts: EditOptions) -> list[float]:
    """τ₁ > τ₂ > … for a task: --times, else T and the run's sampling times for k steps.

    SDEdit starts halfway along the noise grid instead: the last k of the 2k-step times
    (τ₁ = 2.52 with the default EDM σ range, 0.5 on the flow process).
    """
    if opts.times is not None:
        editing.check_edit_times(model.process, opts.times)
        return list(opts.times)
    k = opts.steps or DEFAULT_STEPS[task]
    if task == "sdedit":
        return cm_times(model, 2 * k, None)[k - 1 :]
    return [model.process.t_max, *cm_times(model, k, None)]


def _f(model: Model):
    """The consistency function, clamped to [−1, 1] where the run says so, as `generate` does
    (runs imported from diffusers with clip_denoised)."""
    return clip_denoised(model.fn) if model.config.sampling.clip_denoised else model.fn


def _edit(model: Model, task: str, opts, gen, cond, x_init, c: editing.Constraint | None = None):
    """Algorithm 4 at the task's times, with one noise per time drawn from `gen`; a flow map
    jumps between those times instead (editing.edit_jumps, the first noise only)."""
    times = edit_times(model, task, opts)
    noises = [torch.randn(x_init.shape, generator=gen).to(x_init) for _ in times]
    if model.kind == "flowmap":
        grid = [*times, 0.0]
        check_jumps(model.config, list(zip(grid, grid[1:], strict=False)))
        return editing.edit_jumps(model.fn, model.process, x_init, times, noises[0], c, cond)
    impose = editing.identity if c is None else c.impose
    return editing.edit(_f(model), model.process, x_init, times, noises, impose, cond)


def _constrained(model: Model, task: str, opts, gen, cond, c: editing.Constraint):
    start = c.start()
    return start, _edit(model, task, opts, gen, cond, start, c)


def _check_shape(y: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(y.shape[1:]) != tuple(shape):
        raise UserError(
            f"{what} has shape {tuple(y.shape[1:])} per sample; expected {tuple(shape)}"
        )


def _images_only(model: Model, task: str) -> tuple[int, int, int]:
    if len(model.shape) != 3:
        raise UserError(f"{task} needs an image run; this one has {model.shape[0]}-D data")
    return model.shape


def _inpaint(model: Model, ys, opts, gen, cond):
    (y,) = ys
    _check_shape(y, model.shape, "the input")
    if opts.mask is None:
        raise UserError(f"inpaint needs --mask FILE or one of {', '.join(MASKS)}")
    hole = _hole(opts.mask, model, y.shape, gen).to(y.device)
    return _constrained(model, "inpaint", opts, gen, cond, editing.inpaint(y, hole))


def _colorize(model: Model, ys, opts, gen, cond):
    (y,) = ys
    channels, h, w = _images_only(model, "colorize")
    if channels != 3:
        raise UserError(f"colorize needs an RGB run (3 channels); this one has {channels}")
    if y.ndim != 4 or y.shape[1] not in (1, 3) or tuple(y.shape[2:]) != (h, w):
        raise UserError(
            f"colorize input has shape {tuple(y.shape[1:])} per sample; "
            f"expected (1, {h}, {w}) gray or (3, {h}, {w}) RGB"
        )
    y = y.expand(-1, 3, -1, -1)
    return y, _constrained(model, "colorize", opts, gen, cond, editing.colorize(y))[1]


def _superres(model: Model, ys, opts, gen, cond):
    (y,) = ys
    channels, h, w = _images_only(model, "superres")
    p = opts.factor
    if p < 1 or h % p or w % p:
        raise OptionError("factor", f"{p} does not divide the model's image size {h}x{w}")
    _check_shape(y, (channels, h // p, w // p), f"the low-resolution input (factor {p})")
    return _constrained(model, "superres", opts, gen, cond, editing.superres(y, p))


def _sdedit(model: Model, ys, opts, gen, cond):
    (y,) = ys
    _check_shape(y, model.shape, "the input")
    return y, _edit(model, "sdedit", opts, gen, cond, y)


def _denoise(model: Model, ys, opts, gen, cond):
    (y,) = ys
    _check_shape(y, model.shape, "the input")
    if opts.sigma is None:
        raise UserError("denoise needs --sigma, the input's noise level in the data's units")
    scales = set(model.scaler.scale)
    if len(scales) != 1:
        raise UserError(
            "denoise needs data with one scale for all dimensions; this run scales each "
            "dimension differently, so one noise level in your units is several in the model's"
        )
    scale = scales.pop()
    lo, hi = (level * scale for level in model.process.noise_levels)
    if not lo < opts.sigma <= hi:
        raise UserError(
            f"--sigma {opts.sigma:g} is outside ({lo:g}, {hi:g}], this run's noise levels in "
            "the data's units"
        )
    return y, editing.denoise(model.fn, model.process, y, opts.sigma / scale, cond)


def _interpolate(model: Model, ys, opts, gen, cond):
    if opts.frames < 2:
        raise OptionError("frames", f"must be >= 2, got {opts.frames}")
    if not ys:  # one pair from the seed; z_a is the noise of `cmkit sample --n 1 --seed S`
        ys = [torch.randn((1, *model.shape), generator=gen) for _ in range(2)]
    device = next(model.fn.parameters()).device
    z_a, z_b = (y.to(device) for y in ys)
    _check_shape(z_a, model.shape, "the first noise")
    _check_shape(z_b, model.shape, "the second noise")
    if len(z_a) != len(z_b):
        raise UserError(f"the two noise arrays hold {len(z_a)} and {len(z_b)} samples")
    z = editing.slerp(z_a, z_b, torch.linspace(0, 1, opts.frames)).flatten(0, 1)
    return None, sample_onestep(_f(model), model.process, z, cond)


TASK_FUNCTIONS = {
    "inpaint": _inpaint,
    "colorize": _colorize,
    "superres": _superres,
    "denoise": _denoise,
    "interpolate": _interpolate,
    "sdedit": _sdedit,
}


def _hole(spec: str, model: Model, shape: torch.Size, gen) -> torch.Tensor:
    """The inpainting hole (True = fill in), shaped to broadcast against inputs of `shape`."""
    if spec in MASKS:
        _, h, w = _images_only(model, f"--mask {spec}")
        return editing.builtin_mask(spec, h, w, gen)
    path = Path(spec)
    if not path.is_file():
        raise UserError(
            f"--mask {spec}: no such file; expected a file or one of {', '.join(MASKS)}"
        )
    if path.suffix.lower() in IMAGE_SUFFIXES:
        mask = load_image(path)[0].max(axis=0) >= 128  # white (>= 128) = fill in
    else:
        mask = read_array(path)
        if not np.isin(mask, (0, 1)).all():
            raise OptionError("mask", f"{spec}: values must be 0 (keep) or 1 (fill in)")
    allowed = [tuple(shape[k:]) for k in range(len(shape) - 1, -1, -1)]  # trailing axes
    if len(shape) == 4:
        allowed = allowed[1:]  # (W,) alone is no image mask; (H, W) is
    if mask.shape not in allowed:
        raise UserError(
            f"--mask {spec} has shape {mask.shape}; expected one of "
            f"{', '.join(map(str, allowed))} to match the input {tuple(shape)}"
        )
    mask = torch.from_numpy(mask.astype(bool))
    return mask.reshape((1,) * (len(shape) - mask.ndim) + tuple(mask.shape))


# ---------------------------------------------------------------- files and units


def read_input(path: str, model: Model, noise: bool = False) -> tuple[np.ndarray, str]:
    """A file as a model-unit array (N, ...) and its kind, 'array' or 'image'.

    Noise arrays (interpolate) are standard normal and used as they are.
    """
    file = Path(path)
    if not file.is_file():
        raise OptionError("input", f"{path}: no such file")
    suffix = file.suffix.lower()
    if suffix in ARRAY_SUFFIXES:
        x = load_data(str(file))
        return (x if noise else model.scaler.to_model(x)), "array"
    if suffix in IMAGE_SUFFIXES and not noise:
        return load_image(file) / 127.5 - 1, "image"
    expected = ".npy or .npz noise" if noise else ".npy, .npz, .png or .jpg"
    raise OptionError("input", f"{path}: expected a {expected} file")


def write_output(path: Path, x: np.ndarray, model: Model, nrow: int | None = None) -> None:
    """.npy in the data's units; an image file: the image itself, or several side by side."""
    if path.suffix.lower() == ".npy":
        np.save(path, model.scaler.to_raw(x))
        return
    pixels = image_grid(to_unit(x), nrow=nrow, pad=0)
    Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels).save(path)


def edit_files(
    model: Model, task: str, inputs: list[str], out: Path, opts: EditOptions
) -> list[Path]:
    """Read the inputs, run the task, write `out` (same kind as the input) and a PNG grid
    of before | after beside it (interpolate: one row of frames per pair). Returns the files."""
    read = [read_input(p, model, noise=task == "interpolate") for p in inputs]
    suffix = out.suffix.lower()
    if suffix not in (".npy", *IMAGE_SUFFIXES):
        raise OptionError("out", f"{out}: expected a .npy, .png or .jpg file name")
    out_kind = "array" if suffix == ".npy" else "image"
    if any(kind != out_kind for _, kind in read):
        want = ".png or .jpg" if out_kind == "array" else ".npy"
        raise OptionError("out", f"{out}: the output is the kind of the input; expected {want}")
    if out_kind == "image" and len(model.shape) != 3:
        raise OptionError("out", f"{out}: image files need an image run; use .npy")
    result = run_task(model, task, [x for x, _ in read], opts)
    write_output(out, result.after, model, opts.frames if task == "interpolate" else None)
    if len(model.shape) != 3:
        return [out]
    grid = out.with_name(out.stem + "_grid.png")
    if result.before is None:
        save_image_grid(to_unit(result.after), grid, nrow=opts.frames)
    else:
        pairs = np.stack([result.before, result.after], 1).reshape(-1, *result.after.shape[1:])
        save_image_grid(to_unit(pairs), grid, nrow=2)
    return [out, grid]
