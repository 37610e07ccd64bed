"""The training loop: one readable loop shared by teachers, CD and CT.

A loss is any callable `loss_fn(online, target, batch, step, generator) -> scalar` (see
cmkit.losses); the loop owns
batching, the optimiser step, the target network (θ⁻ ← μθ⁻ + (1−μ)θ), the EMA used for
sampling, logging, checkpoints by steps and by wall time, the NaN/inf guard and a graceful
stop on Ctrl-C or SIGTERM.
"""

import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from cmkit.batch import Batch
from cmkit.errors import OptionError

ON_NONFINITE = ("stop", "skip")
# Ctrl-C, and what `kill`, a scheduler's preemption or a container stop sends
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingDiverged(RuntimeError):
    """A loss, gradient or weight became NaN or infinite; no checkpoint holds the bad values."""


class TrainingInterrupted(KeyboardInterrupt):
    """A stop signal (SIGINT or SIGTERM) stopped training between two steps, after saving a
    checkpoint; `signal` says which, so the CLI can exit with 128 + its number."""

    def __init__(self, message: str, signum: signal.Signals) -> None:
        super().__init__(message)
        self.signal = signum


@dataclass
class TrainState:
    """Everything that changes during training and is saved in a checkpoint."""

    online: nn.Module  # the wrapped model being optimised (denoiser or consistency function)
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # CPU generator for batches and noise
    ema: nn.Module  # a copy of online.net averaged for sampling
    target: nn.Module | None = None  # wrapped copy for θ⁻, or None for teachers
    aux: nn.Module | None = None  # the loss's own trainable weights (sCM's w_φ), or None
    step: int = 0
    losses: list[float] = field(default_factory=list)  # mean loss per log interval
    running: list[float] = field(default_factory=list)  # losses since the last log entry
    skipped: int = 0  # batches skipped for a non-finite loss or gradient
    clipped: int = 0  # optimiser steps whose gradient norm exceeded grad_clip
    seconds: float = 0.0  # wall time spent in train()

    @property
    def device(self) -> torch.device:
        """Where training runs: the device of the online weights."""
        return next(self.online.parameters()).device

    def parameters(self) -> list[nn.Parameter]:
        """What the optimiser updates and the gradient clip bounds: the model, then aux."""
        return trainable_parameters(self.online, self.aux)


def trainable_parameters(online: nn.Module, aux: nn.Module | None) -> list[nn.Parameter]:
    """The model's parameters, then the loss's own (aux), in the optimiser's order."""
    modules = (online, aux)
    return [p for module in modules if module is not None for p in module.parameters()]


@torch.no_grad()
def ema_update(average: nn.Module, current: nn.Module, decay: float) -> None:
    """average ← decay·average + (1 − decay)·current, parameters and buffers alike."""
    for a, c in zip(average.state_dict().values(), current.state_dict().values(), strict=True):
        if a.dtype.is_floating_point:
            a.lerp_(c, 1.0 - decay)
        else:
            a.copy_(c)


def weights_finite(state: TrainState) -> bool:
    """True when the online, EMA and target weights hold no NaN or inf (checked before saving)."""
    modules = (state.online, state.ema, state.target, state.aux)
    return all(
        bool(torch.isfinite(t).all())
        for module in modules
        if module is not None
        for t in module.state_dict().values()
        if t.dtype.is_floating_point
    )


def optimiser_step(
    state: TrainState, loss_fn: Callable, batch: Batch, grad_clip: float | None
) -> tuple[float, float, str | None]:
    """(loss, gradient norm before clipping, None) after one Adam step with the gradient
    clipped to norm grad_clip (None: not clipped), or (loss, norm, reason) when the loss or the
    gradient is NaN/inf and no step was taken: nothing non-finite ever reaches the weights."""
    loss = loss_fn(state.online, state.target, batch, state.step, state.generator)
    value = loss.item()  # a sync point on GPUs, needed for the check anyway
    if not math.isfinite(value):
        return value, math.nan, f"the loss is {value}"
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = math.inf if grad_clip is None else grad_clip  # inf: measure the norm only
    norm = nn.utils.clip_grad_norm_(state.parameters(), max_norm).item()
    if not math.isfinite(norm):
        return value, norm, f"the gradient norm is {norm}"
    state.optimizer.step()
    state.clipped += int(norm > max_norm)
    return value, norm, None


@dataclass
class StopRequest:
    """The first stop signal received, if any, so the loop can save and stop between steps."""

    received: signal.Signals | None = None


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """A StopRequest filled in by the first of the STOP_SIGNALS to arrive.

    That signal gets the previous handlers of all of them back, so a second one acts at once
    (Ctrl-C: a KeyboardInterrupt; SIGTERM: the process ends), and the last committed
    checkpoint stays valid because its files are committed together. Nothing is installed
    outside the main thread, nor for a signal that is ignored (nohup, background jobs).
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    # None: a handler installed outside Python, which could not be put back
    handled = [s for s, h in previous.items() if h not in (signal.SIG_IGN, None)]

    def request_stop(signum, frame) -> None:
        stop.received = signal.Signals(signum)
        for s in handled:
            signal.signal(s, previous[s])

    for s in handled:
        signal.signal(s, request_stop)
    try:
        yield stop
    finally:
        for s in handled:
            signal.signal(s, previous[s])


def check_grad_clip(grad_clip: float | None) -> None:
    if grad_clip is not None and not (math.isfinite(grad_clip) and grad_clip > 0):
        raise OptionError("grad_clip", f"must be a finite number > 0 or None, got {grad_clip}")


def check_on_nonfinite(on_nonfinite: str) -> None:
    if on_nonfinite not in ON_NONFINITE:
        raise OptionError("on_nonfinite", f"must be 'stop' or 'skip', got {on_nonfinite!r}")


def _kept(saved: int | None) -> str:
    if saved is None:
        return "no checkpoint was written"
    return f"the checkpoint after step {saved} is kept"


def train(
    state: TrainState,
    loss_fn: Callable,
    data: Batch,
    steps: int,
    batch_size: int,
    ema_rate: float,
    target_mu: Callable[[int], float] = lambda step: 0.0,
    grad_clip: float | None = 1.0,
    checkpoint: Callable[[TrainState], None] | None = None,
    checkpoint_every: int = 1000,
    checkpoint_seconds: float = 600.0,
    progress: bool = True,
    log_every: int = 50,
    on_nonfinite: str = "stop",
    clock: Callable[[], float] = time.monotonic,
) -> TrainState:
    """Run `steps` optimiser steps from `state.step`; `data` (all training samples and their
    conditioning) is in model units, on the device or on the CPU.

    A checkpoint is written every `checkpoint_every` steps and whenever `checkpoint_seconds`
    of `clock` time have passed since the last one, so a slow run killed without warning
    loses minutes, not hours; when they are written changes no result.
    grad_clip: the largest gradient norm a step uses (None: no clipping); the steps where it
    bound are counted in state.clipped, so how often a clip binds is measured, not guessed.
    on_nonfinite: "stop" raises TrainingDiverged at the first NaN/inf loss or gradient;
    "skip" drops that batch (no optimiser, target or EMA update) and counts it in
    state.skipped. SIGINT or SIGTERM saves a checkpoint at the current step and raises
    TrainingInterrupted. With the same state, data and seed, every step is reproducible, so
    a run resumed from any checkpoint ends bit-identical to one that never stopped.
    """
    check_on_nonfinite(on_nonfinite)
    check_grad_clip(grad_clip)
    device = state.device
    saved = state.step if checkpoint is not None and state.step > 0 else None
    bar = tqdm(total=steps, initial=state.step, disable=not progress, desc="training")
    started, seconds_before = time.perf_counter(), state.seconds
    last_saved = clock()
    norms: list[float] = []  # gradient norms since the last log entry, for the progress bar
    with bar, stop_on_signals() as stop:
        while state.step < steps:
            # data: sampling with replacement from the CPU generator keeps runs reproducible
            idx = torch.randint(0, len(data), (batch_size,), generator=state.generator)
            batch = data.rows(idx).to(device)
            loss, norm, problem = optimiser_step(state, loss_fn, batch, grad_clip)
            if problem is None:
                # target network and the sampling EMA
                if state.target is not None:
                    ema_update(state.target, state.online, target_mu(state.step))
                ema_update(state.ema, state.online.net, ema_rate)
                state.running.append(loss)
                norms.append(norm)
            elif on_nonfinite == "stop":
                raise TrainingDiverged(f"{problem} at step {state.step + 1}; {_kept(saved)}")
            else:
                state.skipped += 1
                tqdm.write(f"step {state.step + 1}: {problem}; batch skipped", file=sys.stderr)
            state.step += 1
            _log(state, bar, state.step % log_every == 0 or state.step == steps, norms)
            state.seconds = seconds_before + time.perf_counter() - started
            due = (
                state.step % checkpoint_every == 0
                or state.step == steps
                or stop.received is not None
                or clock() - last_saved >= checkpoint_seconds
            )
            if checkpoint is not None and due:
                if not weights_finite(state):
                    raise TrainingDiverged(
                        f"the weights are not finite after step {state.step}; {_kept(saved)}"
                    )
                checkpoint(state)
                saved, last_saved = state.step, clock()
            if stop.received is not None:
                done = "saved a checkpoint" if saved == state.step else "saved nothing"
                raise TrainingInterrupted(
                    f"interrupted by {stop.received.name} after step {state.step} and {done}",
                    stop.received,
                )
    return state


def _log(state: TrainState, bar: tqdm, due: bool, norms: list[float]) -> None:
    """Append the mean loss of the interval (if any batch was not skipped) to the curve, and
    show it with the interval's mean gradient norm before clipping and the clipped steps."""
    bar.update(1)
    if not due:
        return
    if state.running:
        state.losses.append(sum(state.running) / len(state.running))
        postfix = {"loss": f"{state.losses[-1]:.4g}"}
        if norms:  # none yet when a resumed interval's only new batch was skipped
            postfix["grad"] = f"{sum(norms) / len(norms):.3g}"
        counts = {"clipped": state.clipped, "skipped": state.skipped}
        bar.set_postfix(postfix | {k: v for k, v in counts.items() if v})
    state.running = []
    norms.clear()
