"""Flow maps from data: MeanFlow and shortcut models (cmkit.flowmap, cmkit.flowmap_losses).

Both train from scratch on the flow process with the data kind's default network given its
second time input (`interval`) and a positional embedding up to frequency MAX_FREQ rather
than 200, and both need only the online network (the targets are its own outputs under
no-grad, μ = 0), so a run is a plain `fit` with kind "flowmap".

Deviations from the papers' settings: MeanFlow defaults to its CIFAR-10 (UNet) settings on
every data kind, logit-normal(−2, 2) times, 75% of each batch with r ≠ t, p = 0.75, with Adam
at the data kind's learning rate rather than the paper's; shortcut models jump down to
1/M = 1/128 as on ImageNet, with the online network (not an EMA) making the targets.
"""

import copy
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from cmkit.config import RunConfig, SamplingSection
from cmkit.errors import OptionError
from cmkit.flowmap import SHORTCUT, FlowMap
from cmkit.flowmap_losses import (
    MEANFLOW_C,
    MEANFLOW_FRACTION,
    MEANFLOW_P_MEAN,
    MEANFLOW_P_STD,
    MEANFLOW_POWER,
    SHORTCUT_FRACTION,
    SHORTCUT_MAX_STEPS,
    MeanFlowLoss,
    ShortcutLoss,
)
from cmkit.jvp import JVP_METHODS
from cmkit.process import Process
from cmkit.recipes.common import RunOptions, fit, from_data, start, training_section
from cmkit.train import check_grad_clip

# The time embedding's highest frequency (--network '{"max_freq": F}' overrides it). MeanFlow's
# target differentiates the network in t, which scales each frequency's feature by it: on
# moons, 2000 steps, one-step energy distance 0.085 at 200 (every other network's), 0.016 at
# 50, 0.012 at 20, 0.032 at 5; shortcut models 0.020 at 200, 0.017 at 20.
MAX_FREQ = 20.0


@dataclass
class MeanFlowOptions:
    p_mean: float = MEANFLOW_P_MEAN  # t, r ~ sigmoid(N(P_mean, P_std²)), sorted
    p_std: float = MEANFLOW_P_STD
    fraction: float = MEANFLOW_FRACTION  # share of each batch with r ≠ t (the rest: r = t)
    power: float = MEANFLOW_POWER  # p of the adaptive weight 1/(‖Δ‖² + c)^p
    jvp: str = "exact"  # or "finite-difference"
    grad_clip: float | None = 1.0


@dataclass
class ShortcutOptions:
    fraction: float = SHORTCUT_FRACTION  # share of each batch on self-consistency
    max_steps: int = SHORTCUT_MAX_STEPS  # M, a power of two: the smallest jump is 1/M
    grad_clip: float | None = 1.0


def _check_fraction(fraction: float) -> None:
    if not 0 <= fraction <= 1:
        raise OptionError("fraction", f"must be in [0, 1], got {fraction}")


def meanflow_loss(opts: MeanFlowOptions) -> MeanFlowLoss:
    _check_fraction(opts.fraction)
    if not opts.p_std > 0:
        raise OptionError("p_std", f"must be > 0, got {opts.p_std}")
    if not opts.power >= 0:
        raise OptionError("power", f"must be >= 0 (0: plain L2), got {opts.power}")
    if opts.jvp not in JVP_METHODS:
        raise OptionError("jvp", f"must be {' or '.join(map(repr, JVP_METHODS))}, got {opts.jvp!r}")
    check_grad_clip(opts.grad_clip)
    return MeanFlowLoss(opts.p_mean, opts.p_std, opts.fraction, opts.power, MEANFLOW_C, opts.jvp)


def shortcut_loss(opts: ShortcutOptions) -> ShortcutLoss:
    _check_fraction(opts.fraction)
    m = opts.max_steps
    if not (isinstance(m, int) and m >= 1 and 2 ** round(math.log2(m)) == m):
        raise OptionError("max_steps", f"must be a power of two (1, 2, 4, …, 128), got {m}")
    check_grad_clip(opts.grad_clip)
    return ShortcutLoss(opts.fraction, m)


def meanflow_run(run: RunOptions, data_spec: str, process: Process, opts: MeanFlowOptions) -> Path:
    """Train a MeanFlow flow map on `data_spec`; returns the run directory."""
    return _flowmap_run(run, data_spec, process, "meanflow", opts, meanflow_loss(opts))


def shortcut_run(run: RunOptions, data_spec: str, process: Process, opts: ShortcutOptions) -> Path:
    """Train a shortcut model on `data_spec`; returns the run directory."""
    return _flowmap_run(run, data_spec, process, SHORTCUT, opts, shortcut_loss(opts))


def _flowmap_run(run: RunOptions, data_spec: str, process: Process, recipe: str, opts, loss):
    if process.name != "flow":
        raise OptionError("process", f"{recipe} trains on the flow process, got {process.name}")
    if run.backbone not in (None, "builtin"):
        raise OptionError(
            "backbone", f"{recipe} needs the built-in networks' interval input, not {run.backbone}"
        )
    run = replace(run, network={"max_freq": MAX_FREQ, **run.network, "interval": True})
    data, section, net_spec, net = from_data(run, data_spec, process)
    training = training_section(run, section.shape, "cm_steps", recipe, asdict(opts))
    config = RunConfig("flowmap", process, net_spec, section, training, SamplingSection())
    online, target = FlowMap(net), FlowMap(copy.deepcopy(net))
    state = start(run, config, online, target, net)
    return fit(run, config, state, data, loss, opts.grad_clip)
