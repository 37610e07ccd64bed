"""Quality against network evaluations: score a run's samples at several NFEs, tune τ.

A `Scorer` holds a reference set and the metrics for its kind of data (vectors: energy
distance, sliced Wasserstein, MMD; images: Fréchet distance (optionally FD∞), KID and k-NN
precision/recall on an extractor's features, the Fréchet distance on raw pixels and the
pixel-range statistics). `reference_splits` picks the reference and the real data that
measures its floor. `evaluate` samples a run at each NFE asked and scores it;
`tune_times` searches the intermediate times of multistep sampling (the paper's ternary
search) against the training split, so the held-out split stays unseen.
"""

import math
from dataclasses import dataclass
from functools import cached_property
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from cmkit import data as datalib
from cmkit.batch import NO_COND, Cond
from cmkit.errors import OptionError, UserError
from cmkit.features import make_extractor
from cmkit.flowmap import SHORTCUT
from cmkit.generate import Model, check_tcd, generate
from cmkit.labels import run_labels
from cmkit.metrics import (
    energy_distance,
    extract_features,
    frechet_distance,
    frechet_distance_inf,
    kernel_distance,
    knn_precision_recall,
    mmd_rbf,
    pixel_range_stats,
    sliced_wasserstein,
)
from cmkit.sampling import check_times
from cmkit.solvers import nfe as count_nfe
from cmkit.units import Scaler, to_unit

MMD_POINTS = 2000  # MMD and precision/recall cost O(n²) memory: score on this many per side
REFERENCE_POINTS = 5000  # a larger reference set is subsampled (seeded) to this size
ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)


def subsample(rows: ArrayOrTensor, n: int) -> ArrayOrTensor:
    """At most n rows, drawn at random (seeded, without replacement, in their order): the first
    n rows of a file sorted by anything would be a biased subset."""
    if len(rows) <= n:
        return rows
    keep = np.sort(np.random.default_rng(0).choice(len(rows), n, replace=False))
    return rows[torch.from_numpy(keep)] if isinstance(rows, torch.Tensor) else rows[keep]


@dataclass
class Scorer:
    """Metrics of samples (user's units) against a fixed reference set."""

    reference: np.ndarray  # (m, ...) in the user's units
    scaler: Scaler  # maps images to model units [-1, 1], hence to [0, 1] features
    extractor: nn.Module | None = None  # images only
    fd_inf: bool = False  # images: add FD∞, the Fréchet distance extrapolated to N → ∞

    @property
    def primary(self) -> str:
        """The headline metric: energy distance for vectors, the Fréchet distance for images."""
        return "ED" if self.extractor is None else f"FD-{self.extractor.name}"

    @cached_property
    def reference_features(self) -> torch.Tensor:
        """Extracted once: tuning scores many sample sets against the same reference."""
        return self._features(self.reference)

    @cached_property
    def reference_pixels(self) -> torch.Tensor:
        """(m, C·H·W) raw pixels of the reference on the unit scale, for FD-pixels."""
        return _pixels(self._unit(self.reference))

    def primary_value(self, samples: np.ndarray) -> float:
        """The headline metric alone: what tuning minimises."""
        if self.extractor is None:
            return energy_distance(samples, self.reference)
        return frechet_distance(self.reference_features, self._features(samples))

    def __call__(self, samples: np.ndarray) -> dict[str, float]:
        """Every metric; MMD and precision/recall on random subsets of both sets (seeded), so
        no metric depends on row order: a reference file may be sorted, and real data may be
        scored as samples."""
        if self.extractor is None:
            x, y = samples, self.reference
            return {
                "ED": energy_distance(x, y),
                "SWD": sliced_wasserstein(x, y),
                "MMD": mmd_rbf(subsample(x, MMD_POINTS), subsample(y, MMD_POINTS)),
            }
        return self._image_metrics(samples)

    def _image_metrics(self, samples: np.ndarray) -> dict[str, float]:
        """FD (and FD∞), KID, precision/recall on the features; FD on raw pixels; pixel stats."""
        unit = self._unit(samples)
        x, y = extract_features(self.extractor, unit), self.reference_features
        precision, recall = knn_precision_recall(subsample(y, MMD_POINTS), subsample(x, MMD_POINTS))
        name = self.extractor.name
        out = {f"FD-{name}": frechet_distance(y, x)}
        if self.fd_inf:
            out[f"FD∞-{name}"] = frechet_distance_inf(y, x)
        out |= {f"KID-{name}": kernel_distance(y, x), "precision": precision, "recall": recall}
        if name != "pixels":  # else FD-pixels is the headline already
            out["FD-pixels"] = frechet_distance(self.reference_pixels, _pixels(unit))
        stats = pixel_range_stats(unit)
        return out | {"near-bg": stats.near_background, "out-of-range": stats.out_of_range}

    def _unit(self, images: np.ndarray) -> np.ndarray:
        """Images in the user's units on the [0, 1] scale extractors read, unclipped."""
        return to_unit(self.scaler.to_model(images))

    def _features(self, images: np.ndarray) -> torch.Tensor:
        """Features of images in the user's units, which the extractor reads in [0, 1]."""
        return extract_features(self.extractor, self._unit(images))


def _pixels(unit: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(unit, dtype=np.float64)).flatten(1)


def make_scorer(
    model: Model, reference: np.ndarray, features: str | None = None, fd_inf: bool = False
) -> Scorer:
    """A scorer for the model's data kind; the reference must have the model's sample shape
    (a latent run's: its images). fd_inf adds the FD∞ column for images (slower: eight FDs
    per sample set)."""
    shape = model.sample_shape
    if tuple(reference.shape[1:]) != shape:
        raise UserError(
            f"reference data has samples of shape {tuple(reference.shape[1:])}; "
            f"the model makes {shape}"
        )
    if len(reference) < 10:
        raise UserError(f"reference data has {len(reference)} samples; expected at least 10")
    reference = subsample(reference, REFERENCE_POINTS)
    images = len(shape) == 3
    if features is not None and not images:
        raise OptionError("features", "applies to image data; vectors are scored directly")
    if fd_inf and not images:
        raise OptionError("fd_inf", "applies to image data; vectors have no Fréchet distance")
    extractor = make_extractor(features, shape) if images else None
    return Scorer(reference, model.scaler, extractor, fd_inf)


def held_out(model: Model, data_spec: str | None) -> np.ndarray:
    """The reference set: the user's --data, else the run's held-out split (never trained on)."""
    section = model.config.data
    if data_spec is not None and data_spec != section.spec:
        return datalib.load_data(data_spec)
    x = datalib.run_splits(section)[1]
    if len(x) == 0:
        raise UserError(
            "this run was trained on all of its data (holdout 0); pass --data with held-out data"
        )
    return x


REFERENCES = ("heldout", "train", "all")


@dataclass
class Reference:
    """A reference set of a run's data and the real data that scores its floor."""

    which: str  # one of REFERENCES
    data: np.ndarray  # the reference, user's units
    floor: np.ndarray  # real samples outside the reference, scored as if generated
    label: str  # for reports, e.g. "training split (1617)"


def reference_splits(model: Model, which: str = "heldout", label: int | None = None) -> Reference:
    """The reference `which` of the run's data and its real-data floor (of class `label`
    only, when given, for scoring samples of that class).

    heldout: the held-out split, floored by the training split (the default; with 180 digits
    real data itself scores FD 0.97, about the teacher's). train: the training split, floored
    by the held-out split (use FD∞ for so few floor samples); the teacher was fitted to this
    split, so a model that memorised it could score below the floor. all: both splits; no
    real data lies outside it, so its floor is the held-out split, inside the reference, and
    flatters real data.
    """
    if which not in REFERENCES:
        raise OptionError("reference", f"expected one of {', '.join(REFERENCES)}, got {which!r}")
    train, held = datalib.run_splits(model.config.data)
    if len(held) == 0:
        raise UserError(
            "this run was trained on all of its data (holdout 0); pass --data with held-out data"
        )
    if label is not None:
        y_train, y_held = run_labels(model.config.data, len(train) + len(held))
        train, held = train[y_train == label], held[y_held == label]
    if which == "heldout":
        return Reference(which, held, train, f"held-out split ({len(held)})")
    if which == "train":
        return Reference(which, train, held, f"training split ({len(train)})")
    data = np.concatenate([train, held])
    return Reference(which, data, held, f"training + held-out splits ({len(data)})")


def training_split(model: Model) -> np.ndarray:
    """The run's training split, for tuning (tuning on held-out data would flatter the eval)."""
    return datalib.run_splits(model.config.data)[0]


def teacher_grid_points(solver: str, nfe: int) -> int:
    """Most grid points K whose solve uses ≤ nfe evaluations (Euler K, Heun 2K − 1: its last
    step, to t = 0, is an Euler step)."""
    return nfe if solver == "euler" else max(1, (nfe + 1) // 2)


@dataclass
class Plan:
    """One way to sample a run: a label, its network evaluations, and generate() options."""

    label: str
    nfe: int
    options: dict


def plans(
    model: Model,
    nfes: list[int],
    solvers: tuple[str, ...] = ("euler", "heun"),
    gamma: float | None = None,
):
    """Samplers to evaluate: a teacher's solvers at each NFE, or a CM's k-step sampler (TCD's
    with `gamma`, which its label names).

    Heun spends 2K − 1 evaluations on K points, so an even NFE asked of it is rounded down
    (and a repeat dropped); each plan reports the NFE it really uses.
    """
    if any(k < 1 for k in nfes):
        raise OptionError("nfe", f"values must be >= 1, got {nfes}")
    check_tcd(model, gamma)
    if model.kind != "teacher":
        return [_cm_plan(k, gamma) for k in nfes]
    out = []
    for solver in solvers:
        seen = set()
        for nfe in nfes:
            k = teacher_grid_points(solver, nfe)
            used = count_nfe(solver, model.process.sampling_times(k))
            if used not in seen:
                seen.add(used)
                out.append(Plan(f"{solver}", used, {"steps": k, "solver": solver}))
    return out


def _cm_plan(k: int, gamma: float | None) -> Plan:
    label = f"{k} step" + ("s" if k > 1 else "")
    if gamma is None:
        return Plan(label, k, {"steps": k})
    return Plan(f"{label}, TCD γ = {gamma:g}", k, {"steps": k, "gamma": gamma})


def evaluate(
    model: Model,
    scorer: Scorer,
    nfes: list[int],
    n: int,
    seed: int = 0,
    cond: Cond = NO_COND,
    gamma: float | None = None,
) -> list[dict]:
    """Rows of {sampler, nfe, metric: value, …}, sampling each plan from the same seed
    (with `cond`, n rows of conditioning, for every sample set; with `gamma`, a CM's TCD
    sampler)."""
    rows = []
    for plan in plans(model, nfes, gamma=gamma):
        samples = generate(model, n, seed, **plan.options, cond=cond)
        rows.append({"sampler": plan.label, "nfe": plan.nfe, **scorer(samples)})
    return rows


def _golden_min(fn, lo: float, hi: float, iters: int) -> tuple[float, float]:
    """Golden-section search for the minimum of fn on [lo, hi]: (argmin, min) over all calls."""
    inv_phi = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = fn(c), fn(d)
    seen = [(fc, c), (fd, d)]
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = fn(c)
            seen.append((fc, c))
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = fn(d)
            seen.append((fd, d))
    best, arg = min(seen)
    return arg, best


def tune_times(
    model: Model,
    scorer: Scorer,
    steps: int,
    n: int,
    seed: int = 0,
    iters: int = 12,
    start: list[float] = (),
) -> tuple[list[float], float]:
    """Greedy search of τ₁ > τ₂ > … for `steps`-step sampling: each τ in turn minimises the
    scorer's primary metric with the earlier ones fixed (Song et al. 2023 tuned 2-step τ by
    ternary search on FID); `start` holds leading times already tuned. Each τ is searched in
    the process's own coordinate (EDM: log σ). Returns (times, best metric)."""
    if model.kind == "teacher":
        raise UserError("tune-times applies to consistency runs; a teacher has no τ to tune")
    if model.config.training.recipe == SHORTCUT:
        raise UserError(
            "a shortcut model jumps by powers of two on its own grid; it has no times to tune"
        )
    if steps < 2:
        raise OptionError("steps", f"must be >= 2 to have an intermediate time, got {steps}")
    proc = model.process
    times = list(start)
    check_times(proc, times)
    best = math.nan
    for _ in range(steps - 1 - len(times)):
        upper = times[-1] if times else proc.t_max

        def metric(u: float) -> float:
            x = generate(model, n, seed, len(times) + 2, [*times, proc.from_search(u)])
            return scorer.primary_value(x)

        lo, hi = proc.to_search(proc.t_min), proc.to_search(upper)
        u, best = _golden_min(metric, lo, hi, iters)
        times.append(proc.from_search(u))
    return times, best


def markdown_table(rows: list[dict]) -> str:
    """Rows of evaluate() as a Markdown table, metrics in the order of the first row."""
    metrics = [k for k in rows[0] if k not in ("sampler", "nfe")]
    lines = [
        "| sampler | NFE | " + " | ".join(metrics) + " |",
        "|---|---:|" + "---:|" * len(metrics),
    ]
    for row in rows:
        cells = " | ".join(f"{row[m]:.4g}" for m in metrics)
        lines.append(f"| {row['sampler']} | {row['nfe']} | {cells} |")
    return "\n".join(lines)
