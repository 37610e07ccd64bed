"""Run directories: config.json plus safetensors weights, written atomically, read safely.

A run directory holds everything needed to rebuild the model and its sampler without
unpickling code:
  config.json           what was trained, on what data (and its scaling), with which options
  online/target/ema.safetensors   the plain network's weights
  trainer.safetensors   optimiser tensors and RNG states, for --resume
  state.json            step, loss curve, optimiser hyper-parameters
"""

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cmkit.errors import UserError
from cmkit.networks.diffusers_unet import DiffusersUNet
from cmkit.networks.mlp import MLP
from cmkit.networks.unet import UNet
from cmkit.train import TrainState

FORMAT = 1
KINDS = ("teacher", "consistency")


def atomic_write(path: Path, write) -> None:
    """Write through `write(tmp_path)` then rename, so a crash never leaves a torn file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    plain = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(plain, str(tmp)))


def build_network(spec: dict) -> nn.Module:
    """Rebuild a plain network from {"type": "mlp" | "unet" | "diffusers-unet", "kwargs": {...}}."""
    kwargs = dict(spec.get("kwargs", {}))
    if spec.get("type") == "mlp":
        return MLP(**kwargs)
    if spec.get("type") == "unet":
        kwargs["channel_mult"] = tuple(kwargs.get("channel_mult", (1, 2)))
        kwargs["attention_levels"] = tuple(kwargs.get("attention_levels", ()))
        return UNet(**kwargs)
    if spec.get("type") == "diffusers-unet":
        return DiffusersUNet(**kwargs)
    raise UserError(
        f"unknown network type {spec.get('type')!r}; expected 'mlp', 'unet' or 'diffusers-unet'"
    )


def save_checkpoint(run_dir: Path, config: dict, state: TrainState) -> None:
    """Weights first, then the state that points at them, each file atomically."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_json(run_dir / "config.json", {"format": FORMAT, **config})
    save_tensors(run_dir / "online.safetensors", state.online.net.state_dict())
    save_tensors(run_dir / "ema.safetensors", state.ema.state_dict())
    if state.target is not None:
        save_tensors(run_dir / "target.safetensors", state.target.net.state_dict())
    opt = state.optimizer.state_dict()
    tensors = {
        f"optimizer.{i}.{k}": torch.as_tensor(v)
        for i, slots in opt["state"].items()
        for k, v in slots.items()
    }
    tensors["generator"] = state.generator.get_state()
    tensors["torch_rng"] = torch.get_rng_state()
    save_tensors(run_dir / "trainer.safetensors", tensors)
    meta = {
        "step": state.step,
        "losses": state.losses,
        "seconds": state.seconds,
        "param_groups": opt["param_groups"],
    }
    save_json(run_dir / "state.json", meta)


def load_config(run_dir: str | Path, kind: str | None = None) -> dict:
    """Read and check a run's config.json; `kind` ("teacher"/"consistency") when one is required."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a cmkit run directory (no config.json)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise UserError(f"{path} has run format {found!r}; this cmkit reads format {FORMAT}")
    if config.get("kind") not in KINDS or (kind and config["kind"] != kind):
        raise UserError(f"{run_dir} is a {config.get('kind')!r} run; expected {kind or KINDS}")
    return config


def store_times(run_dir: str | Path, steps: int, times: list[float], note: dict) -> None:
    """Record tuned intermediate times, which `steps`-step sampling then uses by default.

    Training that resumes rewrites config.json and drops them: they belong to these weights.
    """
    config = load_config(run_dir, "consistency")
    sampling = config.setdefault("sampling", {})
    sampling.setdefault("times", {})[str(steps)] = times
    sampling.setdefault("tuning", {})[str(steps)] = note
    save_json(Path(run_dir) / "config.json", config)


def load_weights(module: nn.Module, path: Path) -> None:
    """Load safetensors weights, refusing files that do not match the architecture."""
    if not path.is_file():
        raise UserError(f"missing weights file {path}")
    try:
        module.load_state_dict(load_file(str(path)))
    except Exception as err:  # safetensors header errors and key/shape mismatches alike
        raise UserError(f"cannot load {path}: {str(err).splitlines()[0]}") from None


def load_network(run_dir: str | Path, which: str = "ema") -> tuple[dict, nn.Module]:
    """The run's config and its plain network with the `which` weights (online, ema, target)."""
    config = load_config(run_dir)
    net = build_network(config["network"])
    load_weights(net, Path(run_dir) / f"{which}.safetensors")
    return config, net.eval()


def restore_state(run_dir: Path, state: TrainState) -> None:
    """Resume: put weights, optimiser moments, RNG states and the step back into `state`."""
    load_weights(state.online.net, run_dir / "online.safetensors")
    load_weights(state.ema, run_dir / "ema.safetensors")
    if state.target is not None:
        load_weights(state.target.net, run_dir / "target.safetensors")
    meta = json.loads((run_dir / "state.json").read_text())
    tensors = load_file(str(run_dir / "trainer.safetensors"))
    slots: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, i, name = key.split(".", 2)
            slots.setdefault(int(i), {})[name] = value
    state.optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
    state.generator.set_state(tensors["generator"])
    torch.set_rng_state(tensors["torch_rng"])
    state.step, state.losses, state.seconds = meta["step"], meta["losses"], meta["seconds"]
