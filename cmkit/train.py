"""The training loop: one readable loop shared by teachers, CD and CT.

A loss is any callable `loss_fn(online, target, batch, step, generator) -> scalar` (see
cmkit.losses); the loop owns
batching, the optimiser step, the target network (θ⁻ ← μθ⁻ + (1−μ)θ), the EMA used for
sampling, logging, checkpoints by steps and by wall time, the NaN/inf guard and a graceful
stop on Ctrl-C or SIGTERM.

With several processes (cmkit.engine.Engine's world) each trains on its rows of the global
batch, and everything that decides what happens next (is the loss finite, was a stop
signal received, is a checkpoint due by time) is agreed by one all-reduce per step, so every
process stops at the same step and none waits alone in a collective.
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

from cmkit.batch import Batch, Samples
from cmkit.distributed import World
from cmkit.engine import Engine
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
    # [first step, processes] of each stretch trained with another number of processes
    world_sizes: list[list[int]] = field(default_factory=lambda: [[0, 1]])

    @property
    def device(self) -> torch.device:
        """Where training runs: the device of the online weights."""
        return next(self.online.parameters()).device

    def parameters(self) -> list[nn.Parameter]:
        """What the optimiser updates and the gradient clip bounds: the model, then aux."""
        return trainable_parameters(self.online, self.aux)


def trainable_parameters(online: nn.Module, aux: nn.Module | None) -> list[nn.Parameter]:
    """The model's parameters that train, then the loss's own (aux), in the optimiser's order
    (frozen ones, a LoRA run's base, are left out of the optimiser and the gradient clip)."""
    modules = (online, aux)
    params = (p for module in modules if module is not None for p in module.parameters())
    return [p for p in params if p.requires_grad]


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


def draw_batch(
    data: Samples, batch_size: int, generator: torch.Generator, world: World, step: int = 0
) -> Batch:
    """This process's rows of a global batch drawn with replacement from the CPU generator,
    which keeps runs reproducible; every process draws all of its indices. A source that
    prefetches (cmkit.folder.FolderRows) draws step `step`'s rows from its own stream of the
    run's seed instead, since the generator cannot tell the next step's rows ahead."""
    shard = world.shard(batch_size)
    batch_at = getattr(data, "batch_at", None)
    if batch_at is not None:
        return batch_at(generator.initial_seed(), step, batch_size, shard)
    idx = torch.randint(0, len(data), (batch_size,), generator=generator)
    return data.rows(idx[shard.rows], shard)


@dataclass(frozen=True)
class Agreed:
    """What every process knows after a step's gradients: the mean loss over processes, the
    stop signal one of them received, and whether a checkpoint is due by wall time."""

    loss: float
    stop: signal.Signals | None
    checkpoint_due: bool


def agree(world: World, loss: float, stop: signal.Signals | None, due: bool) -> Agreed:
    """One all-reduce of this process's loss, stop signal and clock (SIGTERM wins over
    SIGINT, a NaN on one process is a NaN everywhere); alone: the values themselves."""
    if world.size == 1:
        return Agreed(loss, stop, due)
    votes = [loss, stop == signal.SIGINT, stop == signal.SIGTERM, due]
    total, sigint, sigterm, dues = world.sum([float(v) for v in votes])
    received = signal.SIGTERM if sigterm else signal.SIGINT if sigint else None
    return Agreed(total / world.size, received, dues > 0)


def backward(
    state: TrainState, loss_fn: Callable, batch: Batch, grad_clip: float | None, engine: Engine
) -> tuple[float, float]:
    """(this process's loss, gradient norm before clipping) with the gradients averaged over
    the processes and clipped to norm grad_clip (None: not clipped).

    The backward pass runs whatever the loss: with several processes, DDP's gradient
    all-reduce must happen on all of them, and a NaN on one becomes a NaN gradient on all."""
    with engine.computing(state.online, state.generator.initial_seed(), state.step):
        loss = loss_fn(state.online, state.target, batch, state.step, state.generator)
    loss = loss.float()
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if state.aux is not None:
        engine.world.average_gradients(state.aux.parameters())
    max_norm = math.inf if grad_clip is None else grad_clip  # inf: measure the norm only
    norm = nn.utils.clip_grad_norm_(state.parameters(), max_norm).item()
    return loss.item(), norm  # sync points on GPUs, needed for the checks anyway


def optimiser_step(
    state: TrainState, agreed: Agreed, norm: float, grad_clip: float | None
) -> str | None:
    """One Adam step, or the reason there is none: a NaN/inf loss (over all processes) or
    gradient norm, so that nothing non-finite ever reaches the weights."""
    if not math.isfinite(agreed.loss):
        return f"the loss is {agreed.loss}"
    if not math.isfinite(norm):
        return f"the gradient norm is {norm}"
    state.optimizer.step()
    state.clipped += int(grad_clip is not None and norm > grad_clip)
    return None


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
    data: Samples,
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
    engine: Engine | None = None,
) -> TrainState:
    """Run `steps` optimiser steps from `state.step`; `data` (all training samples and their
    conditioning, or rows read from disk) is in model units, on the device or on the CPU.

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
    engine: the processes, precision and compiled forward (None: one process, float32);
    `batch_size` is the global batch, split evenly among the processes; rank 0 checkpoints.
    """
    check_on_nonfinite(on_nonfinite)
    check_grad_clip(grad_clip)
    engine = Engine(World(device=state.device)) if engine is None else engine
    world = engine.world
    world.check_batch_size(batch_size)
    device = state.device
    saved = state.step if checkpoint is not None and state.step > 0 else None
    shown = progress and world.main
    bar = tqdm(total=steps, initial=state.step, disable=not shown, desc="training")
    started, seconds_before = time.perf_counter(), state.seconds
    last_saved = clock()
    norms: list[float] = []  # gradient norms since the last log entry, for the progress bar
    with bar, stop_on_signals() as stop:
        while state.step < steps:
            batch = draw_batch(data, batch_size, state.generator, world, state.step)
            batch = batch.to(device)
            loss, norm = backward(state, loss_fn, batch, grad_clip, engine)
            due_by_time = clock() - last_saved >= checkpoint_seconds
            agreed = agree(world, loss, stop.received, due_by_time)
            problem = optimiser_step(state, agreed, norm, grad_clip)
            if problem is None:
                # target network and the sampling EMA
                if state.target is not None:
                    ema_update(state.target, state.online, target_mu(state.step))
                ema_update(state.ema, state.online.net, ema_rate)
                state.running.append(agreed.loss)
                norms.append(norm)
            elif on_nonfinite == "stop":
                raise TrainingDiverged(f"{problem} at step {state.step + 1}; {_kept(saved)}")
            else:
                state.skipped += 1
                if world.main:
                    tqdm.write(f"step {state.step + 1}: {problem}; batch skipped", file=sys.stderr)
            state.step += 1
            _log(state, bar, state.step % log_every == 0 or state.step == steps, norms)
            state.seconds = seconds_before + time.perf_counter() - started
            due = (
                state.step % checkpoint_every == 0
                or state.step == steps
                or agreed.stop is not None
                or agreed.checkpoint_due
            )
            if checkpoint is not None and due:
                if world.any(not weights_finite(state)):
                    raise TrainingDiverged(
                        f"the weights are not finite after step {state.step}; {_kept(saved)}"
                    )
                if world.main:
                    checkpoint(state)
                world.barrier()  # nobody reports a checkpoint that rank 0 has not committed
                saved, last_saved = state.step, clock()
            if agreed.stop is not None:
                done = "saved a checkpoint" if saved == state.step else "saved nothing"
                raise TrainingInterrupted(
                    f"interrupted by {agreed.stop.name} after step {state.step} and {done}",
                    agreed.stop,
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
