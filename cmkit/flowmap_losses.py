"""The training objectives of flow maps (cmkit.flowmap): MeanFlow and shortcut models.

Both train u_θ(x_t, t, h), the average velocity over [t − h, t] on the flow path
x_t = (1 − t)·x₀ + t·z, and both spend part of each batch on plain flow matching (h = 0,
target v = z − x₀) and the rest on a target for h > 0 built from the network itself under
no-grad (`target`, the online weights: μ = 0):
  MeanFlow   u_tgt = v − h·(v·∂_x u + ∂_t u), the MeanFlow identity, from one JVP
  shortcut   u_tgt(2d) = ½·[u(x_t, t, d) + u(x_t − d·u(x_t, t, d), t − d, d)], two half jumps
Each loss is `loss(online, target, batch, step, generator)`, as cmkit.train expects.
"""

import math
from dataclasses import dataclass

import torch

from cmkit.batch import Batch
from cmkit.jvp import jvp
from cmkit.param import batch_column
from cmkit.process import FlowProcess
from cmkit.rng import device_rng_state, set_device_rng_state

# MeanFlow's CIFAR-10 settings (its UNet runs; ImageNet's DiTs use (−0.4, 1.0), 25%, p = 1)
MEANFLOW_P_MEAN, MEANFLOW_P_STD = -2.0, 2.0
MEANFLOW_FRACTION = 0.75  # share of the batch with r ≠ t
MEANFLOW_POWER = 0.75  # p of the adaptive weight
MEANFLOW_C = 1e-3
SHORTCUT_FRACTION = 0.25  # share of the batch on self-consistency (the paper's quarter)
SHORTCUT_MAX_STEPS = 128  # M: the smallest jump is 1/M
FLOW = FlowProcess()  # the path both train on; only its perturb is used


def logit_normal_pairs(
    count: int, p_mean: float, p_std: float, fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, r) of MeanFlow: two draws of sigmoid(N(P_mean, P_std²)), t the larger; r = t
    (flow matching) except in a `fraction` of the rows, each row chosen independently."""
    pair = torch.sigmoid(p_mean + p_std * torch.randn(count, 2, generator=generator))
    t, r = pair.max(dim=1).values, pair.min(dim=1).values
    jumps = torch.rand(count, generator=generator) < fraction
    return t, torch.where(jumps, r, t)


def adaptive_weight(delta_sq: torch.Tensor, p: float, c: float) -> torch.Tensor:
    """stopgrad(1/(‖Δ‖² + c)^p): the loss behaves as ‖Δ‖^{2(1−p)} (p = 0: plain L2)."""
    return 1 / (delta_sq.detach() + c) ** p


@dataclass
class MeanFlowLoss:
    """MeanFlow (Geng et al. 2025, arXiv 2505.13447): E[w·‖u_θ(z_t, r, t) − stopgrad(u_tgt)‖²],
    u_tgt = v − (t − r)·d/dt u, with d/dt u the JVP of u along (dz, dr, dt) = (v, 0, 1) (in the
    network's inputs (x, t, h = t − r): (v, 1, 1)), v = z − x₀ the sample's velocity, and the
    adaptive weight w = 1/(‖Δ‖² + c)^p over each sample's squared error summed."""

    p_mean: float = MEANFLOW_P_MEAN
    p_std: float = MEANFLOW_P_STD
    fraction: float = MEANFLOW_FRACTION
    power: float = MEANFLOW_POWER
    c: float = MEANFLOW_C
    jvp: str = "exact"

    def draw(self, batch: Batch, generator: torch.Generator):
        """(t, h = t − r, x_t, v) of one batch."""
        x0 = batch.x0
        pairs = batch.draw(
            lambda n: torch.stack(
                logit_normal_pairs(n, self.p_mean, self.p_std, self.fraction, generator), 1
            )
        )
        t, r = pairs.to(x0).unbind(1)
        z = batch.randn(x0.shape[1:], generator).to(x0)
        return t, t - r, FLOW.perturb(x0, t, z), z - x0

    def target(self, target, batch: Batch, t, h, x_t, v) -> torch.Tensor:
        """u_tgt from one JVP of the target network (the online weights under no-grad)."""

        def u(x: torch.Tensor, tt: torch.Tensor, hh: torch.Tensor) -> torch.Tensor:
            return target.average_velocity(x, tt, hh, **batch.cond)

        ones = torch.ones_like(t)
        _, dudt = jvp(u, (x_t, t, h), (v, ones, ones), self.jvp)
        return v - batch_column(h, v) * dudt

    def __call__(self, online, target, batch: Batch, step: int, generator) -> torch.Tensor:
        t, h, x_t, v = self.draw(batch, generator)
        device = x_t.device
        state = device_rng_state(device)  # the JVP and the training pass share dropout masks
        u_tgt = self.target(target, batch, t, h, x_t, v)
        set_device_rng_state(state, device)
        u_theta = online.average_velocity(x_t, t, h, **batch.cond)
        delta_sq = (u_theta - u_tgt).flatten(1).pow(2).sum(1)
        return (adaptive_weight(delta_sq, self.power, self.c) * delta_sq).mean()


@dataclass
class ShortcutLoss:
    """Shortcut models (Frans et al. 2025, ICLR): flow matching at h = 0 on most of the batch,
    self-consistency on a `fraction` of it: a jump of h = 2^−j (j = 0 … log₂M) from a time on
    the grid of d = h/2 (t = 1, 1 − d, …, 2d) is trained on two half jumps of the target
    network; at the smallest h = 1/M the halves read the instantaneous velocity (d → 0), as in
    the paper. Mean squared error over samples and dimensions."""

    fraction: float = SHORTCUT_FRACTION
    max_steps: int = SHORTCUT_MAX_STEPS

    def draw(self, batch: Batch, generator: torch.Generator):
        """(t, h, x_t, v, self-consistency rows) of one batch."""
        x0 = batch.x0
        u = batch.draw(lambda n: torch.rand(n, 3, generator=generator)).to(x0)
        z = batch.randn(x0.shape[1:], generator).to(x0)
        levels = int(math.log2(self.max_steps)) + 1
        h = 2.0 ** -(u[:, 1] * levels).floor().clamp(max=levels - 1)
        d = h / 2
        t_grid = 1 - (u[:, 2] * (1 / d - 1)).floor() * d  # i·d from 1 down to 2d
        bootstrap = u[:, 0] < self.fraction
        t = torch.where(bootstrap, t_grid, u[:, 2])
        h = torch.where(bootstrap, h, torch.zeros_like(h))
        return t, h, FLOW.perturb(x0, t, z), z - x0, bootstrap

    @torch.no_grad()
    def bootstrap(self, target, x_t, t, h, cond) -> torch.Tensor:
        """½·[u(x_t, t, d) + u(x_t − d·u(x_t, t, d), t − d, d)], d = h/2 (0 as the halves'
        interval at h = 1/M)."""
        d = h / 2
        d_in = torch.where(h <= 1 / self.max_steps, torch.zeros_like(d), d)
        u1 = target.average_velocity(x_t, t, d_in, **cond)
        x_mid = x_t - batch_column(d, x_t) * u1
        u2 = target.average_velocity(x_mid, t - d, d_in, **cond)
        return (u1 + u2) / 2

    def __call__(self, online, target, batch: Batch, step: int, generator) -> torch.Tensor:
        t, h, x_t, v, rows = self.draw(batch, generator)
        u_tgt = v.clone()
        if rows.any():
            cond = {k: c[rows] for k, c in batch.cond.items()}
            u_tgt[rows] = self.bootstrap(target, x_t[rows], t[rows], h[rows], cond)
        u_theta = online.average_velocity(x_t, t, h, **batch.cond)
        return (u_theta - u_tgt).pow(2).mean()
