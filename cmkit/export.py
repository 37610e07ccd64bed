"""Ship a consistency run's one- or few-step sampler as one graph: ONNX or torch.export (.pt2).

The graph is `sample_multistep` at the run's times followed by the data scaling, so its output
is samples in the user's units. It draws no random numbers: its one input `noise`, float32
(K, batch, *shape) for K steps, holds every standard-normal tensor the sampler uses, in the
order `generate` draws them (noise[0] the initial noise, noise[i] the re-noising to the i-th
intermediate time), so `cmkit sample --noise` on the same array computes the same samples.
The batch axis is dynamic. Conditioning (labels, a guidance scale), where a run has it,
becomes one more input per tensor after `noise`, with the batch first. A JSON file beside the
graph (FILE.json added to its name) lists the inputs, the output, their units and the run.

A flow-map run's graph is its K jumps (cmkit.flowmap.sample_jumps), whose noise is the
initial noise alone, (1, batch, *shape).
Teacher runs are refused (their sampler integrates an ODE over tens of evaluations), and so
are runs on the diffusers backbone, whose UNet2DModel cannot be traced with a dynamic batch.
"""

import hashlib
import io
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from cmkit import __version__
from cmkit.errors import OptionError, UserError
from cmkit.flowmap import jump_grid, sample_jumps
from cmkit.generate import Model, cm_times, load_model
from cmkit.networks.zoo import DIFFUSERS_TYPES
from cmkit.runs import atomic_write, read_json, save_json
from cmkit.sampling import clip_denoised, sample_multistep

FORMATS = ("onnx", "pt2")
BATCH = "batch"  # the name of the dynamic axis, in the graph and in the JSON
TRACE_BATCH = 2  # export treats sizes 0 and 1 as constants: tracing at batch 1 would fix it
WEIGHTS = "ema"  # the weights `cmkit sample` uses
NOISE_UNITS = (
    "standard normal N(0, I), drawn by the caller: noise[0] is the initial noise (at times[0] "
    "= T), noise[i] re-noises to times[i] (the layout of cmkit sample --noise)"
)
JUMP_NOISE_UNITS = "standard normal N(0, I), drawn by the caller: noise[0] is the initial noise"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the graph: shape with "batch" for the dynamic axis, and units."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str
    units: str

    def example(self) -> torch.Tensor:
        """A tensor to trace with, at batch TRACE_BATCH."""
        shape = [TRACE_BATCH if d == BATCH else d for d in self.shape]
        return torch.zeros(shape, dtype=getattr(torch, self.dtype))


class Sampler(nn.Module):
    """noise (K, B, *shape) [, cond tensors (B, ...)] -> samples (B, *shape) in the user's units.

    The times are constants of the graph; `cond` names the conditioning inputs, passed to
    every network evaluation under their names, as `generate`'s `cond` is.
    """

    def __init__(self, model: Model, times: list[float], cond: tuple[TensorSpec, ...] = ()):
        super().__init__()
        self.fn, self.process, self.times = model.fn, model.process, list(times)
        self.clip = model.config.sampling.clip_denoised
        self.jumps = model.kind == "flowmap"
        self.register_buffer("scale", torch.tensor(model.scaler.scale))
        self.register_buffer("shift", torch.tensor(model.scaler.shift))
        k, units = (1, JUMP_NOISE_UNITS) if self.jumps else (1 + len(times), NOISE_UNITS)
        noise = TensorSpec("noise", (k, BATCH, *model.shape), "float32", units)
        units = f"the data's units ({model.config.data.spec}): model units * scale + shift"
        self.inputs = (noise, *cond)
        self.output = TensorSpec("samples", (BATCH, *model.shape), "float32", units)

    def forward(self, noise: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        f = clip_denoised(self.fn) if self.clip else self.fn
        z, *renoise = noise.unbind(0)
        names = [spec.name for spec in self.inputs[1:]]
        cond_kwargs = dict(zip(names, cond, strict=True))
        if self.jumps:
            x = sample_jumps(self.fn, z, [1.0, *self.times, 0.0], cond_kwargs)
        else:
            x = sample_multistep(f, self.process, z, self.times, renoise, cond_kwargs)
        return x * self.scale + self.shift  # Scaler.to_raw: one value per feature, or one


def build_sampler(model: Model, steps: int | None, times: list[float] | None) -> Sampler:
    """The sampler `cmkit sample` runs with these --steps/--times, as a module to export."""
    if model.kind == "teacher":
        raise UserError(
            "export takes consistency runs (one- and few-step samplers); this is a teacher "
            "run, whose sampler integrates an ODE: distill it first (cmkit distill)"
        )
    if model.codec is not None:
        raise UserError(
            "export takes pixel runs; this run samples latents that its autoencoder "
            f"({model.config.data.latent.path}) decodes, which the graph does not include"
        )
    if model.config.network.type in DIFFUSERS_TYPES:
        raise UserError(
            "export takes runs of the built-in networks; diffusers' UNet2DModel branches on "
            "batch >= 64, which fixes the batch of a traced graph (a diffusers-unet run: use "
            "cmkit export-diffusers)"
        )
    if steps is not None and steps < 1:
        raise OptionError("steps", f"must be >= 1, got {steps}")
    times = cm_times(model, steps, times)
    if model.kind == "flowmap":
        jump_grid(model.config, times)
    sampler = Sampler(model, times, conditioning_inputs(model))
    return sampler.eval().requires_grad_(False)


def conditioning_inputs(model: Model) -> tuple[TensorSpec, ...]:
    """The graph's inputs beside the noise: a labelled run's class ids and, for a student
    distilled over a range of guidance scales, w (a fixed-w student has its w built in)."""
    classes = model.config.data.classes
    if classes is None:
        return ()
    k = len(classes)
    labels = TensorSpec("labels", (BATCH,), "int64", f"class ids 0..{k - 1}: {', '.join(classes)}")
    guidance = model.config.training.options.get("guidance")
    if guidance is None or guidance[0] == guidance[1]:
        return (labels,)
    w = f"classifier-free guidance scale w, distilled over [{guidance[0]:g}, {guidance[1]:g}]"
    return labels, TensorSpec("guidance", (BATCH,), "float32", w)


def exported_program(sampler: Sampler) -> torch.export.ExportedProgram:
    """torch.export of the sampler with a dynamic batch: the program both formats ship."""
    batch = torch.export.Dim(BATCH, min=1)
    examples = tuple(spec.example() for spec in sampler.inputs)
    dynamic = torch.export.ShapesCollection()  # by tensor: forward(noise, *cond) has varargs
    for spec, example in zip(sampler.inputs, examples, strict=True):
        dynamic[example] = {spec.shape.index(BATCH): batch}
    with torch.no_grad():
        return torch.export.export(sampler, examples, dynamic_shapes=dynamic)


def require_onnx() -> None:
    """torch.onnx's exporter needs onnx and onnxscript; a UserError saying how to get them."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError(
            "--format onnx needs the onnx and onnxscript packages (and onnxruntime to run the "
            "graph); install them with pip install 'cmkit[export]'"
        ) from None


def write_pt2(program: torch.export.ExportedProgram, path: Path) -> None:
    buffer = io.BytesIO()  # torch.export.save wants a .pt2 name; atomic_write stages a .tmp
    torch.export.save(program, buffer)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def write_onnx(program: torch.export.ExportedProgram, path: Path, sampler: Sampler) -> int:
    """One self-contained .onnx file (the weights inside) with the sampler's input and output
    names; returns its opset."""
    with warnings.catch_warnings(), _quiet("torch.onnx"):
        warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations, not ours
        onnx_program = torch.onnx.export(
            program,
            input_names=[spec.name for spec in sampler.inputs],
            output_names=[sampler.output.name],
            dynamo=True,
            verbose=False,
        )
    atomic_write(path, lambda tmp: onnx_program.save(tmp, external_data=False))
    return next(o.version for o in onnx_program.model_proto.opset_import if o.domain == "")


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """The logger at ERROR for a block: the ONNX exporter warns that torchvision is absent."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def manifest_path(path: Path) -> Path:
    """FILE.onnx -> FILE.onnx.json, so an .onnx and a .pt2 of one name do not collide."""
    return path.with_name(path.name + ".json")


def export_run(
    run_dir: str | Path,
    fmt: str,
    out: Path,
    steps: int | None = None,
    times: list[float] | None = None,
) -> dict:
    """Write the run's sampler to `out` in `fmt` and its manifest beside it; returns that."""
    if fmt not in FORMATS:
        raise OptionError("format", f"must be {' or '.join(FORMATS)}, got {fmt!r}")
    if not out.parent.is_dir():
        raise OptionError("out", f"{out}: folder {out.parent} does not exist")
    if fmt == "onnx":
        require_onnx()
    model = load_model(str(run_dir), which=WEIGHTS)
    sampler = build_sampler(model, steps, times)
    program = exported_program(sampler)
    if fmt == "onnx":
        details = {"opset": write_onnx(program, out, sampler)}
    else:
        write_pt2(program, out)
        details = {}
    manifest = {
        "file": out.name,
        "format": fmt,
        **details,
        "inputs": [asdict(spec) for spec in sampler.inputs],
        "outputs": [asdict(sampler.output)],
        "sampler": {
            "steps": len(sampler.times) + 1,
            "times": [model.process.t_max, *sampler.times],
            "kind": "jumps" if sampler.jumps else "consistency",
            "clip_denoised": sampler.clip,
        },
        "run": _run_record(Path(run_dir), model),
        "cmkit": __version__,
    }
    save_json(manifest_path(out), manifest)
    return manifest


def _run_record(run_dir: Path, model: Model) -> dict:
    """Which run and weights the graph holds: enough to find them and to tell them apart."""
    weights = run_dir / f"{WEIGHTS}.safetensors"
    state = run_dir / "state.json"
    return {
        "path": str(run_dir.resolve()),
        "weights": weights.name,
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "step": read_json(state).get("step") if state.is_file() else None,
        "recipe": model.config.training.recipe,
        "process": model.process.to_dict(),
        "data": {"spec": model.config.data.spec, "scaler": model.scaler.to_dict()},
    }
