"""Flag parsing shared by every command: one-line errors, typed values, --config files.

Every command takes `--config FILE` (TOML or JSON whose keys are the long flag names, with
dashes or underscores); flags on the command line win over the file. A config value must
already have the type its flag parses to.
"""

import argparse
import json
import math
from pathlib import Path

import torch

from cmkit.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage stays available through --help)."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def finite(value) -> bool:
    """A number that is neither NaN nor ±inf, nor an integer too large for a float."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = None
    if values is None or not all(map(finite, values)):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r}")
    return values


def ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def guidance_scales(text: str) -> tuple[float, float]:
    """A guidance scale W or range W_MIN:W_MAX (see guidance.parse_guidance)."""
    from cmkit.guidance import parse_guidance

    try:
        return parse_guidance(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def clip_norm(text: str) -> float | str:
    """A gradient-norm bound, or 'none'/'off' for no clipping (kept as the string 'none')."""
    if text.lower() in ("none", "off"):
        return "none"
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (finite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0 or 'none', got {text!r}")
    return value


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, …")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def config_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    """Options from a TOML/JSON file, checked against the command's own flags."""
    file = Path(path)
    try:
        text = file.read_text()
        options = tomllib.loads(text) if file.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read --config {path}: {err}") from None
    if not isinstance(options, dict):
        raise UserError(f"--config {path} must hold a table of options, got {type(options)}")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("config", "help")}
    defaults = {}
    for key, value in options.items():
        action = actions.get(str(key).replace("-", "_"))
        if action is None:
            raise UserError(f"--config {path}: unknown option {key!r} for this command")
        if not _valid_option(action, value):
            expected = ", ".join(action.choices) if action.choices else _kind_of(action)
            raise UserError(f"--config {path}: {key} = {value!r}; expected {expected}")
        if action.type is float:
            value = float(value)
        elif action.type is guidance_scales:
            value = _guidance_value(key, value, path)
        defaults[action.dest] = value
    return defaults


def _guidance_value(key: str, value, path: str) -> tuple[float, float]:
    from cmkit.guidance import check_guidance, parse_guidance

    try:
        return parse_guidance(value) if isinstance(value, str) else check_guidance(value)
    except ValueError as err:
        raise UserError(f"--config {path}: {key}: {err}") from None


def _kind_of(action: argparse.Action) -> str:
    if action.nargs == 0:
        return "true or false"
    names = {
        int: "an integer",
        float: "a finite number",
        floats: "a list of numbers",
        ints: "a list of integers",
        json_object: "a table",
        clip_norm: "a number > 0 or 'none'",
        guidance_scales: "W or W_MIN:W_MAX",
    }
    return names.get(action.type, "a string")


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _valid_option(action: argparse.Action, value) -> bool:
    """A config value must already have the type the flag would parse to."""
    if action.nargs == 0:  # store_true flags
        ok = isinstance(value, bool)
    elif action.type is int:
        ok = _is_number(value) and isinstance(value, int)
    elif action.type is float:
        ok = _is_number(value) and finite(value)
    elif action.type is floats:
        ok = isinstance(value, list) and all(_is_number(v) and finite(v) for v in value)
    elif action.type is ints:
        ok = isinstance(value, list) and all(isinstance(v, int) and _is_number(v) for v in value)
    elif action.type is json_object:
        ok = isinstance(value, dict)
    elif action.type is clip_norm:
        ok = value == "none" or (_is_number(value) and finite(value) and value > 0)
    elif action.type is guidance_scales:  # options.json holds the parsed [w_min, w_max]
        ok = isinstance(value, str) or (
            isinstance(value, list) and len(value) == 2 and all(map(_is_number, value))
        )
    else:
        ok = isinstance(value, str)
    return ok and (not action.choices or value in action.choices)


def check_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Numbers argparse accepts but nothing downstream can use: NaN, ±inf, seeds beyond 63 bits."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.type is float and value is not None and not finite(value):
            raise UserError(f"{action.option_strings[0]} must be a finite number, got {value}")
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed < 2**63:
        raise UserError(f"--seed must be in [0, 2**63), got {seed}")


def require(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name, None) in (None, ""):
            raise UserError(
                f"{flag(name)} is required for `cmkit {args.command}` (or set it in --config)"
            )


def flag(option: str) -> str:
    """The command-line flag of an option name: batch_size -> --batch-size."""
    return "--" + option.replace("_", "-")


def check_device(device: str) -> str:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(
            f"--device {device!r} is not a device; expected cpu, cuda, cuda:N or mps"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: MPS is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {device!r}: expected cpu, cuda, cuda:N or mps")
    try:
        torch.empty(0, device=dev)
    except RuntimeError as err:  # e.g. cuda:3 on a machine with one GPU
        raise UserError(f"--device {device}: {str(err).splitlines()[0]}") from None
    return device
