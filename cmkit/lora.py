"""LCM-LoRA (Luo et al. 2023, "LCM-LoRA: A Universal Stable-Diffusion Acceleration Module"):
consistency distillation that trains only low-rank adapters on the teacher's own network.

A LoRA adapter adds ΔW = (α/r)·B·A to chosen layers of the base network (peft's LoRA, B = 0
at the start, so a fresh adapter changes nothing); the teacher is the same network with the
adapters off, so the student starts as the teacher and the base is held once.

A LoRA run's network spec has type "lora" (`LoraSpec`): the base network's spec, the rank,
α and target modules, and the base run's directory with the sha256 of its ema.safetensors.
Its online/ema/target weight files hold the adapter alone (`LoraNetwork.state_dict`), and
building it reads the base's weights from the base run, refusing one that changed unless
told to take it anyway (`on_base`). `merged` folds an adapter into a plain network of the
base spec. peft is an optional extra (`pip install 'cmkit[lora]'`), imported when an
adapter is built.
"""

import copy
import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from safetensors.torch import save_file
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from cmkit.config import NetworkSpec
from cmkit.errors import OptionError, UserError
from cmkit.networks.zoo import build_network
from cmkit.runs import atomic_write, load_config, load_weights, save_config, save_tensors

LORA = "lora"  # the network type of a LoRA run
DEFAULT_RANK = 4  # 7.1% of the default digits UNet trains, as 7.8% of SD 1.5 at LCM-LoRA's 64
ADAPTER_FILE = "adapter.safetensors"
BASE_WEIGHTS = "ema.safetensors"  # the base run's weights that an adapter is trained on
WEIGHT_FILES = ("online", "ema", "target")
# LCM-LoRA's targets (diffusers' train_lcm_distill_lora_sd*.py): attention, feed-forward,
# the ResNet convs with their time-embedding projections and shortcuts, and the down- and
# up-sampling convs; not conv_in/conv_out nor the noise, class and guidance embeddings.
# Each pattern is matched in full against the names of the Linear and Conv2d layers.
_DIFFUSERS_TARGETS = (
    r"unet\.(down_blocks|mid_block|up_blocks)\..*\.(conv1|conv2|conv_shortcut|time_emb_proj"
    r"|to_q|to_k|to_v|to_out\.0|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2|conv)"
)
TARGETS = {
    "unet": r"down\.\d+|.*\.(conv1|conv2|skip|emb_proj|qkv|proj|conv)",
    "mlp": r"blocks\.\d+\.(fc1|fc2|emb)",
    "diffusers-unet": _DIFFUSERS_TARGETS,
    "diffusers-vp": _DIFFUSERS_TARGETS,
}
PEFT_MISSING = "needs peft: pip install 'cmkit[lora]'"


def require_peft(what: str = "a LoRA run"):
    """The peft module, or a one-line UserError saying that `what` needs it and how to get it."""
    try:
        import peft
    except ImportError:
        raise UserError(f"{what} {PEFT_MISSING}") from None
    return peft


@dataclass(frozen=True)
class LoraSpec:
    """The settings of a LoRA run's network: what `build_lora` rebuilds it from."""

    base: NetworkSpec  # the base network, as the base run's config has it
    rank: int  # r
    alpha: float  # α: the update is (α/r)·B·A
    targets: tuple[str, ...]  # the adapted modules' names
    base_run: str  # the base run's directory, resolved
    base_sha256: str  # of the base run's ema.safetensors

    def to_spec(self) -> NetworkSpec:
        kwargs = {**asdict(self), "targets": list(self.targets)}
        return NetworkSpec(LORA, kwargs)

    @classmethod
    def of(cls, spec: NetworkSpec, source: str = "this run") -> "LoraSpec":
        """A LoRA network spec's settings; a UserError naming `source` for any other spec."""
        if spec.type != LORA:
            raise UserError(f"{source} is not a LoRA run: its network is a {spec.type}")
        kw = spec.kwargs
        try:
            base = NetworkSpec(kw["base"]["type"], dict(kw["base"].get("kwargs", {})))
            return cls(
                base,
                int(kw["rank"]),
                float(kw["alpha"]),
                tuple(map(str, kw["targets"])),
                str(kw["base_run"]),
                str(kw["base_sha256"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise UserError(f"{source} has an incomplete LoRA network spec ({err!r})") from None


def file_sha256(path: Path) -> str:
    """The file's sha256, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_targets(spec_type: str, net: nn.Module) -> list[str]:
    """The names of `net`'s layers that LCM-LoRA adapts (TARGETS), in the network's order."""
    if spec_type not in TARGETS:
        raise OptionError("lora_rank", f"has no target layers for a {spec_type} network")
    return [
        name
        for name, module in net.named_modules()
        if isinstance(module, nn.Linear | nn.Conv2d) and re.fullmatch(TARGETS[spec_type], name)
    ]


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key is an adapter's tensor (peft names them lora_A, lora_B, …)."""
    return ".lora_" in key


class LoraNetwork(nn.Module):
    """The base network F with LoRA adapters of rank r on `targets`: F(x, c_noise, **cond) with
    each adapted layer computing W·x + (α/r)·B·A·x. Only the adapters train (peft freezes the
    rest), and the state dict is the adapters alone, so a run's weight files and the EMA and
    target updates hold no copy of the base."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, targets: list[str]) -> None:
        super().__init__()
        peft = require_peft()
        config = peft.LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0
        )
        self.net = peft.inject_adapter_in_model(config, base)  # in place, B = 0

    def forward(self, x, c_noise, **cond):
        return self.net(x, c_noise, **cond)

    def state_dict(self, *, destination=None, prefix="", keep_vars=False):
        """The adapter's tensors (also when a wrapper's state dict gathers this module's)."""
        full = super().state_dict(prefix=prefix, keep_vars=keep_vars)
        kept = OrderedDict((k, v) for k, v in full.items() if is_adapter_key(k))
        if destination is None:
            return kept
        destination.update(kept)
        return destination

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load an adapter: every adapter tensor must be there, and nothing else."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if is_adapter_key(k)]
        unexpected = list(result.unexpected_keys)
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"not this network's adapter: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        return _IncompatibleKeys(missing, unexpected)


def tuner_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every peft layer in `net`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in net.named_modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_disabled(net: nn.Module) -> Iterator[None]:
    """`net` as its base network for a while: every adapter off and every module in eval
    mode (a teacher draws no dropout), then all as before, requires_grad flags included
    (peft's enable_adapters sets them, and the EMA's and target's must stay off)."""
    layers = [layer for _, layer in tuner_layers(net)]
    flags = [(p, p.requires_grad) for p in net.parameters()]
    training = net.training
    net.eval()
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)
        net.train(training)


class AdaptersOff(nn.Module):
    """The base network F of a LoRA network: the same modules, run with the adapters off.
    LCM-LoRA's teacher, which so shares its weights with the student instead of a copy."""

    def __init__(self, lora: LoraNetwork) -> None:
        super().__init__()
        self.lora = lora

    def forward(self, x, c_noise, **cond):
        with adapters_disabled(self.lora):
            return self.lora(x, c_noise, **cond)


def parameter_counts(net: nn.Module) -> dict[str, int]:
    """How many of the network's parameters train, and how many it has (base and adapter)."""
    params = list(net.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return {"trainable_parameters": trainable, "parameters": sum(p.numel() for p in params)}


def trainable_line(counts: dict[str, int]) -> str:
    n, m = counts["trainable_parameters"], counts["parameters"]
    return f"cmkit: trainable parameters: {n} of {m} ({100 * n / m:.1f}%)"


def lora_student(
    base: nn.Module, base_spec: NetworkSpec, base_run: str, rank: int, alpha: float
) -> tuple[LoraSpec, LoraNetwork]:
    """Adapters on the default targets of `base` (the base run's network, changed in place)
    and the spec that rebuilds them on the base run."""
    targets = default_targets(base_spec.type, base)
    run = Path(base_run).resolve()
    sha = file_sha256(run / BASE_WEIGHTS)
    spec = LoraSpec(base_spec, rank, alpha, tuple(targets), str(run), sha)
    return spec, LoraNetwork(base.train(), rank, alpha, targets)


def build_lora(spec: NetworkSpec) -> LoraNetwork:
    """A LoRA run's network: its base run's network and weights (refused in one line when the
    base run is missing or its weights changed) with fresh adapters on top."""
    lora = LoraSpec.of(spec)
    weights = Path(lora.base_run) / BASE_WEIGHTS
    if not weights.is_file():
        raise UserError(
            f"the base run {lora.base_run} of this LoRA run is missing (no {BASE_WEIGHTS}); "
            "pass --base DIR, a teacher run of the same network"
        )
    if file_sha256(weights) != lora.base_sha256:
        raise UserError(
            f"the base run {lora.base_run} has changed since the adapter was trained on it (its "
            f"{BASE_WEIGHTS} has another sha256); pass --base {lora.base_run} --force to "
            "apply the adapter to it anyway"
        )
    base = build_network(lora.base)
    load_weights(base, weights)
    return LoraNetwork(base, lora.rank, lora.alpha, list(lora.targets))


def _json(spec: NetworkSpec):
    return json.loads(json.dumps(asdict(spec)))


def on_base(spec: NetworkSpec, base: str | None, force: bool) -> NetworkSpec:
    """A LoRA run's spec applied to the teacher run `base` (None: its own base run): refused
    when that run's network differs from the adapter's base network, and, unless `force`,
    when its weights are not those the adapter was trained on (another sha256)."""
    if spec.type != LORA:
        raise OptionError("base", f"applies to LoRA runs (distill --lora-rank), not a {spec.type}")
    lora = LoraSpec.of(spec)
    run = Path(base or lora.base_run)
    config = load_config(run, "teacher")
    if _json(config.network) != _json(lora.base):
        raise OptionError(
            "base",
            f"{run} has another network ({config.network.type}) than the one the adapter was "
            f"trained on ({lora.base.type}, {lora.base.kwargs}); an adapter fits only that one",
        )
    weights = run / BASE_WEIGHTS
    if not weights.is_file():
        raise UserError(f"missing weights file {weights}")
    sha = file_sha256(weights)
    if sha != lora.base_sha256 and not force:
        raise OptionError(
            "base",
            f"{run} is not the run the adapter was trained on (its {BASE_WEIGHTS} has another "
            "sha256); add --force to apply the adapter to it anyway",
        )
    return replace(lora, base_run=str(run.resolve()), base_sha256=sha).to_spec()


def merged(net: LoraNetwork) -> nn.Module:
    """A plain network of the base spec with each adapter folded into its layer,
    W ← W + (α/r)·B·A (peft's merge); `net` is left as it was."""
    plain = copy.deepcopy(net.net)
    for name, layer in tuner_layers(plain):
        layer.merge()
        parent, _, attr = name.rpartition(".")
        setattr(plain.get_submodule(parent), attr, layer.get_base_layer())
    vars(plain).pop("peft_config", None)  # what inject_adapter_in_model left on the module
    return plain


def save_adapter(run_dir: Path, spec: NetworkSpec, ema: LoraNetwork) -> Path:
    """adapter.safetensors: the final EMA adapter in peft's layout (MODULE.lora_A.weight, …,
    what peft's set_peft_model_state_dict loads), with the settings and the base run's
    directory and sha256 in the file's metadata."""
    lora = LoraSpec.of(spec)
    state = require_peft().get_peft_model_state_dict(ema.net)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    metadata = {
        "format": "cmkit-lora-adapter",
        "base_run": lora.base_run,
        "base_sha256": lora.base_sha256,
        "base_network": json.dumps(asdict(lora.base)),
        "rank": str(lora.rank),
        "alpha": repr(lora.alpha),
        "targets": json.dumps(list(lora.targets)),
    }
    path = run_dir / ADAPTER_FILE
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path


def merge_run(model: str, out: str, base: str | None = None, force: bool = False) -> Path:
    """A plain consistency run in `out` from the LoRA run `model`: the same config with the
    base network's spec, and each of its online, EMA and target adapters folded into the
    base (`base`/`force`: another base run, as `on_base`)."""
    config = load_config(model, "consistency")
    LoraSpec.of(config.network, model)
    spec = on_base(config.network, base, force) if base or force else config.network
    lora = LoraSpec.of(spec)
    out_dir = Path(out)
    if (out_dir / "config.json").exists():
        raise OptionError("out", f"{out_dir} already holds a run; choose another directory")
    net = build_lora(spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    for which in WEIGHT_FILES:
        path = Path(model) / f"{which}.safetensors"
        if path.is_file():
            load_weights(net, path)
            save_tensors(out_dir / path.name, merged(net).state_dict())
    note = {"adapter": str(Path(model).resolve()), "base_run": lora.base_run}
    options = {**config.training.options, "merged": note | {"base_sha256": lora.base_sha256}}
    training = replace(config.training, options=options)
    save_config(out_dir, replace(config, network=lora.base, training=training))  # last: done
    return out_dir
