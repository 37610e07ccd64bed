"""Load a trained run and draw samples from it, in the user's units."""

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cmkit.batch import NO_COND, Cond, cond_rows
from cmkit.config import RunConfig
from cmkit.errors import OptionError
from cmkit.flowmap import FlowMap, check_jumps, jump_grid, sample_jumps
from cmkit.guidance import GuidedDenoiser
from cmkit.latent import Codec, load_codec
from cmkit.networks.zoo import NO_NULL_LABEL, has_null_label
from cmkit.process import Process
from cmkit.runs import load_network
from cmkit.sampling import (
    check_gamma,
    check_times,
    clip_denoised,
    sample_multistep,
    sample_ode,
    sample_tcd,
)
from cmkit.solvers import DEFAULT_GRID_POINTS, DEFAULT_SOLVER
from cmkit.units import Scaler


@dataclass
class Model:
    """A run ready to sample: the wrapped network (denoiser, consistency function or flow
    map) and context; a latent run's codec (cmkit.latent) decodes what the network makes."""

    config: RunConfig
    fn: nn.Module
    codec: Codec | None = None

    @property
    def process(self) -> Process:
        return self.config.process

    @property
    def scaler(self) -> Scaler:
        return self.config.data.scaler

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def shape(self) -> tuple[int, ...]:
        """What the network makes and its noise is: a latent run's latents."""
        return self.config.data.shape

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """What generate returns: a latent run's decoded images."""
        return self.config.data.sample_shape

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The network's output in model units of the data: latents decoded, else x."""
        return x if self.codec is None else self.codec.decode(x)


def load_model(
    run_dir: str,
    device: str = "cpu",
    which: str = "ema",
    base: str | None = None,
    force: bool = False,
) -> Model:
    """A run's network wrapped for sampling; a labelled teacher's denoiser is guided by the
    `guidance` conditioning (cmkit.guidance); a latent run's autoencoder, checked unchanged.
    `base`, `force`: a LoRA run's adapter on another teacher run (runs.load_network)."""
    config, net = load_network(run_dir, which, base, force)
    fn = wrap_network(config, net.to(device))
    if config.kind == "teacher" and config.data.classes is not None:
        fn = GuidedDenoiser(fn, len(config.data.classes))
    latent = config.data.latent
    return Model(config, fn, None if latent is None else load_codec(latent).to(device))


def wrap_network(config: RunConfig, net: nn.Module) -> nn.Module:
    """A plain network as its run samples it: denoiser, consistency function or flow map."""
    wraps = {
        "teacher": config.process.denoiser,
        "consistency": config.process.consistency,
        "flowmap": FlowMap,
    }
    return wraps[config.kind](net)


def conditioning(
    model: Model, n: int, label: str | None = None, guidance: float | None = None
) -> Cond:
    """The conditioning of n samples: class `label` (an id, or "all": ids 0..K−1 in turn,
    the default of a labelled run) and guidance scale w, checked against what the run was
    trained for: a teacher guides at any w (default 0, the conditional model), a student
    distilled at one w samples at that w, one distilled over [w_min, w_max] at any w in it."""
    classes = model.config.data.classes
    if classes is None:
        for name, value in (("label", label), ("guidance", guidance)):
            if value is not None:
                raise OptionError(name, "applies to runs trained with --labels; this one has none")
        return NO_COND
    k = len(classes)
    if label in (None, "all"):
        labels = torch.arange(n) % k
    elif label.isdigit() and int(label) < k:
        labels = torch.full((n,), int(label))
    else:
        raise OptionError("label", f"must be a class id 0..{k - 1} or all, got {label!r}")
    w = _guidance_for(model, guidance)
    cond = {"labels": labels}
    return cond if w is None else cond | {"guidance": torch.full((n,), w)}


def _guidance_for(model: Model, w: float | None) -> float | None:
    if w is not None and not (w >= 0 and math.isfinite(w)):
        raise OptionError("guidance", f"must be a finite number >= 0, got {w}")
    if model.kind == "teacher":
        if w and not has_null_label(model.config.network):
            raise OptionError("guidance", NO_NULL_LABEL)
        return w
    trained = model.config.training.options.get("guidance")
    if trained is None:
        if w:
            raise OptionError(
                "guidance", "needs a student distilled with --guidance; this one was not"
            )
        return None
    w_min, w_max = trained
    if w is None:
        return w_min
    if w_min == w_max and w != w_min:
        raise OptionError(
            "guidance",
            f"is {w:g}, but this student was distilled at w = {w_min:g}; sampling at other "
            "scales needs one distilled with --guidance W_MIN:W_MAX",
        )
    if not w_min <= w <= w_max:
        print(
            f"cmkit: w = {w:g} lies outside the distilled range {w_min:g}:{w_max:g}",
            file=sys.stderr,
        )
    return w


def cm_times(model: Model, steps: int | None, times: list[float] | None) -> list[float]:
    """Intermediate times for a consistency run or a flow map's jumps: explicit, stored by
    tuning, or the default (flow process: uniform, a flow map's K-jump grid).
    Explicit times fix the step count (one more than their number); a `steps` that says
    otherwise is refused rather than ignored."""
    if times is not None:
        check_times(model.process, times)
        if steps is not None and steps != len(times) + 1:
            raise OptionError(
                "steps",
                f"is {steps}, but {len(times)} intermediate time(s) make {len(times) + 1} "
                "steps: give one of the two, or both in agreement",
            )
        return times
    steps = steps or 1
    stored = model.config.sampling.times.get(str(steps))
    return stored if stored is not None else model.process.default_times(steps)


def check_tcd(model: Model, gamma: float | None, ode: bool = False) -> None:
    """γ, if given, is TCD's: it changes how a consistency run re-noises between its steps,
    so a teacher's solver and the ODE, which never re-noise, refuse it rather than ignore it."""
    if gamma is None:
        return
    if model.kind == "teacher" or ode:
        sampler = "a teacher's solver" if model.kind == "teacher" else "the ODE (--ode)"
        raise OptionError(
            "gamma", f"applies to consistency runs' multistep sampling, not {sampler}"
        )
    check_gamma(gamma)


@torch.no_grad()
def generate(
    model: Model,
    n: int,
    seed: int = 0,
    steps: int | None = None,
    times: list[float] | None = None,
    solver: str | None = None,
    ode: bool = False,
    gamma: float | None = None,
    chunk: int = 2048,
    progress: bool = False,
    cond: Cond = NO_COND,
    noise: np.ndarray | None = None,
) -> np.ndarray:
    """n samples in the user's units, float32; the same seed gives the same samples (a
    latent run's decoded images, of model.sample_shape).

    Teacher runs integrate the PF-ODE (Euler/Heun, `steps` grid points). Consistency runs use
    one step, the multistep sampler over `times`, or with `ode` the ODE v = (x − f)/t
    (TrigFlow: (cos t·x − f)/sin t = σ_d·F, the model's drift); `gamma` in [0, 1] makes the
    multistep sampler TCD's (sample_tcd; 1 is the multistep sampler itself, 0 deterministic).
    Flow-map runs jump 1 → τ₁ → … → 0 (`steps` jumps, no noise after the first), sample as
    the consistency model F(x, t → 0) with `gamma`, and with `ode` solve the ODE of their
    instantaneous velocity (h = 0);
    a run whose sampling section sets clip_denoised (imported from diffusers) clamps f to
    [−1, 1].
    All noise is drawn up front from one CPU generator, so chunking does not change results:
    K standard-normal tensors (n, *shape), the initial noise first, then one per intermediate
    time (K = 1 for the ODE). `noise`, a float32 (K, n, *shape) array, replaces that draw and
    the seed, so an exported sampler (cmkit.export) can be checked on the same input.
    `cond` holds the conditioning of the n samples (n rows per tensor).
    """
    if n < 1:
        raise OptionError("n", f"must be >= 1, got {n}")
    if steps is not None and steps < 1:
        raise OptionError("steps", f"must be >= 1, got {steps}")
    if solver not in (None, "euler", "heun"):
        raise OptionError("solver", f"must be 'euler' or 'heun', got {solver!r}")
    if times is not None and model.kind == "teacher":
        raise OptionError("times", "applies to consistency runs; a teacher takes a step count")
    check_tcd(model, gamma, ode)
    use_ode = model.kind == "teacher" or ode
    jumps = model.kind == "flowmap" and not use_ode and gamma is None
    if use_ode:
        k = steps or model.config.sampling.steps or DEFAULT_GRID_POINTS
        solver = solver or model.config.sampling.solver or DEFAULT_SOLVER
        taus = []
        ode_fn = model.fn.denoiser if model.kind == "flowmap" else model.fn
    else:
        taus = cm_times(model, steps, times)
        f = clip_denoised(model.fn) if model.config.sampling.clip_denoised else model.fn
    if jumps:
        grid = jump_grid(model.config, taus)
    elif model.kind == "flowmap" and not use_ode:  # gamma: consistency jumps τ → 0
        check_jumps(model.config, [(t, 0.0) for t in [model.process.t_max, *taus]])
    expected = (1 if jumps else 1 + len(taus), n, *model.shape)
    if noise is None:
        gen = torch.Generator().manual_seed(seed)
        z = torch.stack([torch.randn(expected[1:], generator=gen) for _ in range(expected[0])])
    else:
        z = torch.from_numpy(_checked_noise(noise, expected))
    device = next(model.fn.parameters()).device
    out = []
    for i in tqdm(range(0, n, chunk), disable=not progress, desc="sampling", unit="chunk"):
        zc, *ec = z[:, i : i + chunk].to(device).unbind(0)
        cc = cond_rows(cond, i, i + chunk, device)
        if use_ode:
            x = sample_ode(ode_fn, model.process, zc, k, solver, cc)
        elif jumps:
            x = sample_jumps(model.fn, zc, grid, cc)
        elif gamma is None:
            x = sample_multistep(f, model.process, zc, taus, ec, cc)
        else:
            x = sample_tcd(f, model.process, zc, taus, ec, gamma, cc)
        out.append(model.decode(x).cpu())
    return model.scaler.to_raw(torch.cat(out).numpy()).astype(np.float32)


def _checked_noise(noise: np.ndarray, expected: tuple[int, ...]) -> np.ndarray:
    """The caller's noise, if it is the float32 (K, n, *shape) array the sampler would draw."""
    if not isinstance(noise, np.ndarray) or noise.dtype != np.float32:
        kind = noise.dtype if isinstance(noise, np.ndarray) else type(noise).__name__
        raise OptionError("noise", f"holds {kind}; expected a float32 array")
    if noise.shape != expected:
        raise OptionError(
            "noise",
            f"has shape {noise.shape}; expected {expected}: {expected[0]} standard-normal "
            f"tensor(s) of {expected[1]} samples, the initial noise first, then one per "
            "intermediate time",
        )
    return noise
