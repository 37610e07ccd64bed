"""Classifier-free guidance (Ho & Salimans 2022) in LCM's form, and guided distillation.

A labelled teacher learns the unconditional model beside the conditional one by training
with each label dropped to the null label ∅ with probability p_uncond (`LabelDropout`). The
guided denoiser is then D_w = D(x, σ, c) + w·(D(x, σ, c) − D(x, σ, ∅)): w = 0 is the
conditional model, Imagen's scale is 1 + w (`GuidedDenoiser`). The guidance scale travels as
the `guidance` conditioning (one w per sample): the guided denoiser reads it, a student
distilled over a range of w takes it as a network input (LCM), and `WithGuidance` draws it
for each training batch.
"""

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from cmkit.batch import Batch
from cmkit.param import as_batch_times, batch_column


@dataclass
class LabelDropout:
    """A teacher loss whose batches have each label replaced by ∅ with probability p_uncond,
    drawn from the loop's generator before the loss draws its own noise."""

    loss: Callable
    p_uncond: float
    null_label: int

    def __call__(self, online, target, batch: Batch, step: int, generator) -> torch.Tensor:
        labels = batch.cond["labels"]
        drop = batch.rand(generator).to(labels.device) < self.p_uncond
        labels = torch.where(drop, torch.full_like(labels, self.null_label), labels)
        return self.loss(online, target, _with(batch, labels=labels), step, generator)


@dataclass
class WithGuidance:
    """A distillation loss whose batches carry the guidance scale w of each sample: w_min
    itself when w_min = w_max (one student per w), else w ~ U[w_min, w_max] (LCM)."""

    loss: Callable
    w_min: float
    w_max: float

    def __call__(self, online, target, batch: Batch, step: int, generator) -> torch.Tensor:
        n, device = len(batch), batch.x0.device
        if self.w_min == self.w_max:
            w = torch.full((n,), self.w_min)
        else:
            w = self.w_min + (self.w_max - self.w_min) * batch.rand(generator)
        return self.loss(online, target, _with(batch, guidance=w.to(device)), step, generator)


def _with(batch: Batch, **cond: torch.Tensor) -> Batch:
    return replace(batch, cond={**batch.cond, **cond})


class GuidedDenoiser(nn.Module):
    """D_w(x, σ, c) = D(x, σ, c) + w·(D(x, σ, c) − D(x, σ, ∅)) with w the `guidance` input
    (a float or one per sample), both halves in one batch of 2B; without labels or w, or at
    w = 0 everywhere, a single evaluation of D as it is.

    The drift of a process with its own ODE (TrigFlow: σ_d·F) is affine in D at fixed x and
    t, so it is guided the same way; elsewhere the solvers' (x − D_w)/t follows.
    """

    def __init__(self, denoiser: nn.Module, null_label: int) -> None:
        super().__init__()
        self.denoiser, self.null_label = denoiser, null_label

    def forward(self, x, t, labels=None, guidance=None, **cond) -> torch.Tensor:
        return self._guided(self.denoiser, x, t, labels, guidance, cond)

    def drift(self, x, t, labels=None, guidance=None, **cond) -> torch.Tensor:
        own = getattr(self.denoiser, "drift", None)
        if own is None:
            return (x - self(x, t, labels, guidance, **cond)) / batch_column(
                as_batch_times(t, x), x
            )
        return self._guided(own, x, t, labels, guidance, cond)

    def _guided(self, fn: Callable, x, t, labels, guidance, cond) -> torch.Tensor:
        if labels is None or guidance is None:
            return fn(x, t, labels=labels, **cond)
        w = torch.as_tensor(guidance, dtype=x.dtype, device=x.device).expand(len(x))
        if not w.any():
            return fn(x, t, labels=labels, **cond)
        both = torch.cat([labels, torch.full_like(labels, self.null_label)])
        t2 = t if isinstance(t, int | float) else torch.cat([as_batch_times(t, x)] * 2)
        cond2 = {k: torch.cat([v, v]) for k, v in cond.items()}
        conditional, unconditional = fn(torch.cat([x, x]), t2, labels=both, **cond2).chunk(2)
        return conditional + batch_column(w, x) * (conditional - unconditional)


GUIDANCE_DIM = 256  # the w-embedding width of diffusers' LCM distillation


def parse_guidance(text: str) -> tuple[float, float]:
    """'W' -> (W, W); 'W_MIN:W_MAX' -> (W_MIN, W_MAX); a ValueError unless 0 <= W_MIN <= W_MAX."""
    try:
        parts = tuple(float(p) for p in text.split(":"))
    except ValueError:
        parts = ()
    if len(parts) not in (1, 2):
        raise ValueError(f"expected W or W_MIN:W_MAX, got {text!r}")
    return check_guidance((parts[0], parts[-1]))


def check_guidance(scales) -> tuple[float, float]:
    """(w_min, w_max) as floats, if finite with 0 <= w_min <= w_max; else a ValueError."""
    try:
        w_min, w_max = (float(w) for w in scales)
    except (TypeError, ValueError):
        raise ValueError(f"expected (w_min, w_max), got {scales!r}") from None
    if not (0 <= w_min <= w_max < float("inf")):
        raise ValueError(f"expected finite 0 <= W_MIN <= W_MAX, got {w_min:g}:{w_max:g}")
    return w_min, w_max
