"""Run directories: config.json plus safetensors weights, committed atomically, read safely.

A run directory holds everything needed to rebuild the model and its sampler without
unpickling code:
  config.json           what was trained, on what data (and its scaling), with which options
  online/target/ema.safetensors   the plain network's weights (a LoRA run's: the adapter's)
  adapter.safetensors   a LoRA run's final EMA adapter, with its base run's sha256 (cmkit.lora)
  aux.safetensors       the loss's own trained weights, where it has some (sCM's w_φ)
  trainer.safetensors   optimiser tensors and RNG states (CPU, and the training device's), for
                        --resume
  state.json            step, loss curve, skipped and clipped steps, optimiser settings, the
                        number of processes each stretch of the run was trained with
  history/              with keep_history: ema-STEP.safetensors per checkpoint, and
                        index.json (step → training seconds), for quality-against-time curves

A checkpoint is several files that must agree, so it is written like a journal: every file
is staged as NAME.tmp and fsynced, then checkpoint.commit (the list of names) is written
atomically, then the staged files are renamed over the old ones. A crash before the commit
leaves the previous checkpoint untouched; a crash after it is finished by
`finish_checkpoint` (renaming is idempotent), so a run killed at any moment resumes from a
consistent set of files.
"""

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cmkit.config import RunConfig
from cmkit.errors import UserError
from cmkit.networks.zoo import build_network
from cmkit.rng import device_rng_state, set_device_rng_state
from cmkit.train import TrainState

COMMIT = "checkpoint.commit"
CHECKPOINT_FILES = (
    "config.json",
    "online.safetensors",
    "ema.safetensors",
    "target.safetensors",
    "aux.safetensors",
    "trainer.safetensors",
    "state.json",
)
Writer = Callable[[Path], object]


def fsync_dir(path: Path) -> None:
    """Make renames inside `path` durable; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def stage(path: Path, write: Writer) -> Path:
    """Write through `write(tmp_path)` to PATH.tmp and flush it to disk; returns the tmp path."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    return tmp


def atomic_write(path: Path, write: Writer) -> None:
    """Stage then rename, so a crash never leaves a torn file."""
    os.replace(stage(path, write), path)
    fsync_dir(path.parent)


def _json_writer(obj) -> Writer:
    return lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n")


def _tensors_writer(tensors: dict[str, torch.Tensor]) -> Writer:
    plain = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    return lambda tmp: save_file(plain, str(tmp))


def save_json(path: Path, obj) -> None:
    atomic_write(path, _json_writer(obj))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    atomic_write(path, _tensors_writer(tensors))


def _trainer_tensors(state: TrainState) -> dict[str, torch.Tensor]:
    """Optimiser moments and RNG states: what, with the weights, makes resume exact."""
    opt = state.optimizer.state_dict()
    tensors = {
        f"optimizer.{i}.{k}": torch.as_tensor(v)
        for i, slots in opt["state"].items()
        for k, v in slots.items()
    }
    tensors["generator"] = state.generator.get_state()
    tensors["torch_rng"] = torch.get_rng_state()
    if state.device.type != "cpu":  # dropout masks on a GPU come from the GPU's own RNG
        tensors[_device_rng_key(state.device)] = device_rng_state(state.device)
    return tensors


def _device_rng_key(device: torch.device) -> str:
    """Named by device type, so that a run resumed on another kind of device is not handed a
    state its RNG cannot take (cuda and mps states differ)."""
    return f"device_rng.{device.type}"


def save_checkpoint(run_dir: Path, config: RunConfig, state: TrainState) -> None:
    """Stage every file, commit them together, then rename (see the module docstring)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "config.json": _json_writer(config.to_dict()),
        "online.safetensors": _tensors_writer(state.online.net.state_dict()),
        "ema.safetensors": _tensors_writer(state.ema.state_dict()),
        "trainer.safetensors": _tensors_writer(_trainer_tensors(state)),
        "state.json": _json_writer(
            {
                "step": state.step,
                "losses": state.losses,
                "running": state.running,
                "skipped": state.skipped,
                "clipped": state.clipped,
                "seconds": state.seconds,
                "world_sizes": state.world_sizes,
                "param_groups": state.optimizer.state_dict()["param_groups"],
            }
        ),
    }
    if state.target is not None:
        files["target.safetensors"] = _tensors_writer(state.target.net.state_dict())
    if state.aux is not None:
        files["aux.safetensors"] = _tensors_writer(state.aux.state_dict())
    for name, write in files.items():
        stage(run_dir / name, write)
    fsync_dir(run_dir)
    save_json(run_dir / COMMIT, sorted(files))  # the commit point
    finish_checkpoint(run_dir)


def save_history(run_dir: Path, state: TrainState) -> None:
    """Keep this checkpoint's EMA weights as history/ema-STEP.safetensors, indexed by step
    with the training seconds so far (each file atomic; the index last)."""
    history = run_dir / "history"
    history.mkdir(exist_ok=True)
    save_tensors(history / f"ema-{state.step:08d}.safetensors", state.ema.state_dict())
    index_path = history / "index.json"
    index = read_json(index_path) if index_path.is_file() else {}
    index[str(state.step)] = state.seconds
    save_json(index_path, index)


def finish_checkpoint(run_dir: Path) -> None:
    """Complete a committed checkpoint's renames and drop files staged without a commit."""
    commit = run_dir / COMMIT
    if commit.is_file():
        committed = read_json(commit)
        for name in CHECKPOINT_FILES:
            tmp = run_dir / f"{name}.tmp"
            if name in committed and tmp.is_file():
                os.replace(tmp, run_dir / name)
        fsync_dir(run_dir)
        commit.unlink()
        fsync_dir(run_dir)
    for name in (*CHECKPOINT_FILES, COMMIT):
        (run_dir / f"{name}.tmp").unlink(missing_ok=True)


def read_json(path: Path):
    """A JSON file's value, or a UserError naming the file."""
    try:
        return json.loads(path.read_text())
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise UserError(f"{path} is not valid JSON ({err})") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; anything else (a pickle, a torn file) is refused unread."""
    if not path.is_file():
        raise UserError(f"missing weights file {path}")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise UserError(f"cannot load {path}: {str(err).splitlines()[0]}") from None


def resumable(run_dir: Path, notify: bool = True) -> bool:
    """Resume: False, after a notice on stderr (if `notify`), for a run killed before its
    first checkpoint (no checkpoint file at all, maybe an options.json), so that the same
    command, resume included, starts it; True otherwise, and load_config then checks what is
    there."""
    if any((run_dir / name).exists() for name in CHECKPOINT_FILES):
        return True
    if notify:
        print(f"cmkit: {run_dir} has no checkpoint yet; starting from step 0", file=sys.stderr)
    return False


def load_config(run_dir: str | Path, kind: str | None = None) -> RunConfig:
    """Read and check a run's config.json; `kind` ("teacher"/"consistency") when one is required."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a cmkit run directory (no config.json)")
    config = RunConfig.from_dict(read_json(path), str(path))
    if kind and config.kind != kind:
        raise UserError(f"{run_dir} is a {config.kind!r} run; expected {kind!r}")
    return config


def save_config(run_dir: str | Path, config: RunConfig) -> None:
    save_json(Path(run_dir) / "config.json", config.to_dict())


def store_times(run_dir: str | Path, steps: int, times: list[float], note: dict) -> None:
    """Record tuned intermediate times, which `steps`-step sampling then uses by default.

    Training that resumes rewrites config.json and drops them: they belong to these weights.
    """
    config = load_config(run_dir)
    if config.kind == "teacher":
        raise UserError(f"{run_dir} is a teacher run, which has no intermediate times")
    config.sampling.times[str(steps)] = times
    config.sampling.tuning[str(steps)] = note
    save_config(run_dir, config)


def load_weights(module: nn.Module, path: Path) -> None:
    """Load safetensors weights, refusing files that do not match the architecture."""
    tensors = read_tensors(path)
    try:
        module.load_state_dict(tensors)
    except RuntimeError as err:  # key and shape mismatches
        raise UserError(f"cannot load {path}: {str(err).splitlines()[0]}") from None


def load_network(
    run_dir: str | Path, which: str = "ema", base: str | None = None, force: bool = False
) -> tuple[RunConfig, nn.Module]:
    """The run's config and its plain network with the `which` weights (online, ema, target).

    A LoRA run's adapter goes on its base run's network, or with `base` on that teacher run's
    (of the same network); `force` takes a base whose weights are not those it was trained on
    (cmkit.lora.on_base)."""
    config = load_config(run_dir)
    if base is not None or force:
        from cmkit.lora import on_base

        config.network = on_base(config.network, base, force)
    net = build_network(config.network)
    load_weights(net, Path(run_dir) / f"{which}.safetensors")
    return config, net.eval()


def restore_state(run_dir: Path, state: TrainState) -> None:
    """Resume: put weights, optimiser moments, RNG states and the step back into `state`."""
    load_weights(state.online.net, run_dir / "online.safetensors")
    load_weights(state.ema, run_dir / "ema.safetensors")
    if state.target is not None:
        load_weights(state.target.net, run_dir / "target.safetensors")
    if state.aux is not None:
        load_weights(state.aux, run_dir / "aux.safetensors")
    meta = read_json(run_dir / "state.json")
    tensors = read_tensors(run_dir / "trainer.safetensors")
    try:
        slots: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, i, name = key.split(".", 2)
                slots.setdefault(int(i), {})[name] = value
        state.optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
        state.generator.set_state(tensors["generator"])
        torch.set_rng_state(tensors["torch_rng"])
        # absent from CPU runs, from runs saved on another device type and from older runs
        if _device_rng_key(state.device) in tensors:
            set_device_rng_state(tensors[_device_rng_key(state.device)], state.device)
        state.step, state.losses, state.seconds = meta["step"], meta["losses"], meta["seconds"]
        # runs saved before the loss buffer and the counts were recorded resume with empty ones
        state.running, state.skipped = meta.get("running", []), meta.get("skipped", 0)
        state.clipped = meta.get("clipped", 0)
        state.world_sizes = meta.get("world_sizes", [[0, 1]])  # older runs: one process
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as err:
        raise UserError(
            f"{run_dir} holds a damaged trainer state ({err!r}); start a new run"
        ) from None
