"""The training loop: one readable loop shared by teachers, CD and CT.

A loss is any callable `loss_fn(online, target, x0, step, generator) -> scalar`; the loop owns
batching, the optimiser step, the target network (θ⁻ ← μθ⁻ + (1−μ)θ), the EMA used for
sampling, logging and checkpoint ticks.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint on disk is still the good one."""


@dataclass
class TrainState:
    """Everything that changes during training and is saved in a checkpoint."""

    online: nn.Module  # the wrapped model being optimised (denoiser or consistency function)
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # CPU generator for batches and noise
    ema: nn.Module  # a copy of online.net averaged for sampling
    target: nn.Module | None = None  # wrapped copy for θ⁻, or None for teachers
    step: int = 0
    losses: list[float] = field(default_factory=list)  # mean loss per log interval
    seconds: float = 0.0  # wall time spent in train()


@torch.no_grad()
def ema_update(average: nn.Module, current: nn.Module, decay: float) -> None:
    """average ← decay·average + (1 − decay)·current, parameters and buffers alike."""
    for a, c in zip(average.state_dict().values(), current.state_dict().values(), strict=True):
        if a.dtype.is_floating_point:
            a.lerp_(c, 1.0 - decay)
        else:
            a.copy_(c)


def train(
    state: TrainState,
    loss_fn: Callable,
    data: torch.Tensor,
    steps: int,
    batch_size: int,
    ema_rate: float,
    target_mu: Callable[[int], float] = lambda step: 0.0,
    grad_clip: float = 1.0,
    checkpoint: Callable[[TrainState], None] | None = None,
    checkpoint_every: int = 1000,
    progress: bool = True,
    log_every: int = 50,
) -> TrainState:
    """Run `steps` optimiser steps from `state.step`; `data` is in model units on the device."""
    device = next(state.online.parameters()).device
    bar = tqdm(total=steps, initial=state.step, disable=not progress, desc="training")
    running, started, seconds_before = [], time.perf_counter(), state.seconds
    while state.step < steps:
        # data: sampling with replacement from the CPU generator keeps runs reproducible
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=state.generator)
        x0 = data[idx.to(data.device)].to(device)
        loss = loss_fn(state.online, state.target, x0, state.step, state.generator)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"loss became {loss.item()} at step {state.step}")
        # backward, clip, step
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(state.online.parameters(), grad_clip)
        state.optimizer.step()
        # target network and the sampling EMA
        if state.target is not None:
            ema_update(state.target, state.online, target_mu(state.step))
        ema_update(state.ema, state.online.net, ema_rate)
        state.step += 1
        running.append(loss.item())
        if state.step % log_every == 0 or state.step == steps:
            state.losses.append(sum(running) / len(running))
            bar.set_postfix(loss=f"{state.losses[-1]:.4g}")
            running = []
        bar.update(1)
        state.seconds = seconds_before + time.perf_counter() - started
        if checkpoint is not None and (state.step % checkpoint_every == 0 or state.step == steps):
            checkpoint(state)
    bar.close()
    return state
