"""Zero-shot editing with a consistency model (Algorithm 4 of Song et al. 2023), in model units.

An edit keeps some coefficients of the image in an orthonormal basis (pixels for inpainting,
luminance for colorisation, patch means for super-resolution) and lets the consistency
function fill in the rest. `edit` is the one loop; the builders below make its `Constraint`.
Everything here takes any consistency function `f(x, t)` and noise drawn by the caller, so a
seed fixes the result and tests can pass a mock.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cmkit.batch import NO_COND, Cond
from cmkit.errors import OptionError, UserError
from cmkit.solvers import Denoiser

# ITU-R BT.601 luma weights, the luminance axis of the colour basis (reference §8).
LUMA = (0.2989, 0.587, 0.114)
MASKS = ("center", "left-half", "strokes")
TASKS = ("inpaint", "colorize", "superres", "denoise", "interpolate", "sdedit")  # `cmkit edit`

Transform = Callable[[torch.Tensor], torch.Tensor]


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class Constraint:
    """The known part of an edit: coefficients `values` where `known`, in the basis A.

    `to_basis` is an orthogonal map x -> A·x and `from_basis` its inverse (the transpose);
    `values` has A·x's shape and is zero where `known` is False, so `start()` is the paper's
    y ← A⁻¹[(A·y) ⊙ (1 − Ω)]: the reference with its unknown part set to zero.
    """

    to_basis: Transform
    from_basis: Transform
    known: torch.Tensor  # bool, broadcastable to A·x
    values: torch.Tensor

    def start(self) -> torch.Tensor:
        return self.from_basis(self.values)

    def impose(self, x: torch.Tensor) -> torch.Tensor:
        """A⁻¹[(A·y) ⊙ (1 − Ω) + (A·x) ⊙ Ω]: the known part of y, the unknown part of x."""
        return self.from_basis(torch.where(self.known, self.values, self.to_basis(x)))

    def noised(self, process, t: float, z: torch.Tensor) -> "Constraint":
        """The known part of x_t = perturb(y, t, z): perturb is linear and A orthogonal, so
        its coefficients are perturb(A·y, t, A·z)."""
        coef = self.to_basis(z)
        t_b = torch.full((coef.shape[0],), t, dtype=coef.dtype, device=coef.device)
        values = torch.where(self.known, process.perturb(self.values, t_b, coef), 0.0)
        return Constraint(self.to_basis, self.from_basis, self.known, values)


def check_edit_times(process, times: list[float]) -> None:
    """Editing times τ₁ > τ₂ > … with τ₁ ≤ T and every τ above the boundary time ε."""
    if not times:
        raise UserError("editing needs at least one time τ₁")
    for a, b in zip([math.inf, *times], times, strict=False):
        if not (process.t_min < b < a and b <= process.t_max):
            raise UserError(
                f"editing times must decrease strictly inside ({process.t_min:g}, "
                f"{process.t_max:g}]; got {', '.join(f'{t:g}' for t in times)}"
            )


@torch.no_grad()
def edit(
    f: Denoiser,
    process,
    x_init: torch.Tensor,
    times: list[float],
    noises: list[torch.Tensor],
    impose: Transform = identity,
    cond: Cond = NO_COND,
) -> torch.Tensor:
    """Algorithm 4 of Song et al. 2023: x ← f(x_init + τ₁·z, τ₁) (flow: (1 − τ₁)·x_init + τ₁·z),
    then for each later τ re-noise to τ and denoise again, applying `impose` (keep the known
    part) after every step.

    With a Constraint c: `edit(f, process, c.start(), times, noises, c.impose)`. With the
    identity and a rough image at a middle τ₁ it is SDEdit. The first step starts from the
    reference plus τ₁-level noise, not from zero noise (openai's notebook passes a grid index
    where τ₁ belongs, reference §10). `noises`: one tensor shaped like x_init per τ.
    NFE = len(times).
    """
    check_edit_times(process, times)
    if len(noises) != len(times):
        raise ValueError(f"need one noise per time, got {len(noises)} for {len(times)}")
    tau_1 = torch.tensor(times[0], dtype=x_init.dtype, device=x_init.device)
    x = impose(f(process.perturb(x_init, tau_1, noises[0]), times[0], **cond))
    for tau, z in zip(times[1:], noises[1:], strict=True):
        x = impose(f(process.renoise(x, tau, z), tau, **cond))
    return x


@torch.no_grad()
def edit_jumps(
    F,
    process,
    x_init: torch.Tensor,
    times: list[float],
    z: torch.Tensor,
    constraint: Constraint | None = None,
    cond: Cond = NO_COND,
) -> torch.Tensor:
    """Editing with a flow map (cmkit.flowmap): x = perturb(x_init, τ₁, z), then jump
    F(x, τ_i → τ_{i+1}) down to 0, imposing after each jump the known part of the reference
    at that time, perturb(y, τ, z) with the start's noise z (the straight path's point), and
    y's own known part at 0. Without a constraint it is SDEdit along the flow map.
    NFE = len(times)."""
    check_edit_times(process, times)
    tau_1 = torch.full((x_init.shape[0],), times[0], dtype=x_init.dtype, device=x_init.device)
    x = process.perturb(x_init, tau_1, z)
    grid = [*times, 0.0]
    for t, s in zip(grid, grid[1:], strict=False):
        x = F.jump(x, t, s, **cond)
        if constraint is not None:
            x = constraint.noised(process, s, z).impose(x)
    return x


@torch.no_grad()
def denoise(
    f: Denoiser, process, y: torch.Tensor, sigma: float, cond: Cond = NO_COND
) -> torch.Tensor:
    """One step from the known noise level: y = x + σ·z gives f at the process's point for y
    (reference §8; on the flow process y/(1 + σ) at t = σ/(1 + σ))."""
    if not sigma > 0:
        raise UserError(f"noise level must be > 0, got {sigma:g}")
    x_t, t = process.denoise_point(y, sigma)
    return f(x_t, t, **cond)


def slerp(z_a: torch.Tensor, z_b: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of noise pairs: (N, ...) and (N, ...) -> (N, K, ...) for K alphas.

    sin((1−α)θ)/sin θ·z_a + sin(αθ)/sin θ·z_b, θ the angle between each pair; α = 0 and 1
    give z_a and z_b exactly. Nearly parallel pairs fall back to linear interpolation.
    """
    a, b = z_a.flatten(1), z_b.flatten(1)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    theta = torch.arccos(cos.clamp(-1, 1))[:, None]
    alphas = alphas.to(a)[None]
    parallel = torch.sin(theta) < 1e-6
    sin_theta = torch.where(parallel, torch.ones_like(theta), torch.sin(theta))
    w_a = torch.where(parallel, 1 - alphas, torch.sin((1 - alphas) * theta) / sin_theta)
    w_b = torch.where(parallel, alphas, torch.sin(alphas * theta) / sin_theta)
    out = w_a[..., None] * a[:, None] + w_b[..., None] * b[:, None]
    return out.reshape(z_a.shape[0], len(alphas[0]), *z_a.shape[1:])


# ---------------------------------------------------------------- operator builders


def inpaint(y: torch.Tensor, hole: torch.Tensor) -> Constraint:
    """Pixel basis: keep y outside the hole. y (N, ...); hole bool, broadcastable to y."""
    known = ~hole.to(torch.bool)
    return Constraint(identity, identity, known, torch.where(known, y, torch.zeros_like(y)))


def basis_with_first(v: torch.Tensor) -> torch.Tensor:
    """An n×n orthogonal matrix whose first row is v/|v| (QR of [v, e₂, …, eₙ]; needs v₀ ≠ 0)."""
    m = torch.eye(len(v), dtype=torch.float64)
    m[:, 0] = v
    q, _ = torch.linalg.qr(m)
    return q.T * torch.sign(q[0, 0])  # QR may return −v/|v|; flipping every row keeps Q orthogonal


def colour_basis(dtype=torch.float64) -> torch.Tensor:
    """3×3 orthogonal matrix whose first row is the luminance weights, normalised; the other
    two rows span the chroma plane."""
    return basis_with_first(torch.tensor(LUMA, dtype=torch.float64)).to(dtype)


def luminance(x: torch.Tensor) -> torch.Tensor:
    """The luminance coefficient ⟨w/|w|, rgb⟩ of (N, 3, H, W) images: (N, H, W)."""
    return torch.einsum("c,nchw->nhw", colour_basis(x.dtype)[0].to(x.device), x)


def colorize(y: torch.Tensor) -> Constraint:
    """Colour basis per pixel: keep the luminance of y (N, 3, H, W), fill in the chroma."""
    if y.ndim != 4 or y.shape[1] != 3:
        raise UserError(f"colorisation needs RGB images (N, 3, H, W), got shape {tuple(y.shape)}")
    q = colour_basis(y.dtype).to(y.device)
    known = torch.tensor([True, False, False], device=y.device)[:, None, None]
    to_basis = lambda x: torch.einsum("kc,nchw->nkhw", q, x)  # noqa: E731
    from_basis = lambda c: torch.einsum("kc,nkhw->nchw", q, c)  # noqa: E731
    return Constraint(to_basis, from_basis, known, torch.where(known, to_basis(y), 0.0))


def patch_basis(p: int, dtype=torch.float64) -> torch.Tensor:
    """p²×p² orthogonal matrix with first row 1/p everywhere: coefficient p·(patch mean)."""
    return basis_with_first(torch.ones(p * p, dtype=torch.float64)).to(dtype)


def superres(y_low: torch.Tensor, p: int) -> Constraint:
    """Per p×p patch basis: keep each patch mean at y_low (N, C, h, w), fill in the detail.

    The result has shape (N, C, p·h, p·w) and its p×p average pooling equals y_low.
    """
    if p < 1:
        raise OptionError("factor", f"must be >= 1, got {p}")
    n, c, h, w = y_low.shape
    q = patch_basis(p, y_low.dtype).to(y_low.device)

    def to_basis(x: torch.Tensor) -> torch.Tensor:  # (N, C, p·h, p·w) -> (N, C, h, w, p²)
        patches = x.reshape(n, c, h, p, w, p).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h, w, p * p)
        return patches @ q.T

    def from_basis(coef: torch.Tensor) -> torch.Tensor:
        patches = (coef @ q).reshape(n, c, h, w, p, p).permute(0, 1, 2, 4, 3, 5)
        return patches.reshape(n, c, h * p, w * p)

    known = torch.zeros(p * p, dtype=torch.bool, device=y_low.device)
    known[0] = True
    values = torch.where(known, p * y_low[..., None], 0.0)
    return Constraint(to_basis, from_basis, known, values)


# ---------------------------------------------------------------- built-in masks


def builtin_mask(name: str, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """A named hole of shape (H, W), True where pixels are filled in.

    center: the middle square of half the side; left-half: columns < W/2; strokes: three
    random line segments about H/8 pixels wide, drawn from `gen`.
    """
    rows, cols = torch.arange(h)[:, None], torch.arange(w)[None]
    if name == "center":
        return (abs(2 * rows + 1 - h) <= h // 2) & (abs(2 * cols + 1 - w) <= w // 2)
    if name == "left-half":
        return (cols < w // 2).expand(h, w)
    if name == "strokes":
        return _strokes(h, w, gen)
    raise UserError(f"unknown mask {name!r}; expected a file or one of {', '.join(MASKS)}")


def _strokes(h: int, w: int, gen: torch.Generator, count: int = 3) -> torch.Tensor:
    """Pixels whose centre lies within half a stroke width of one of `count` random segments."""
    centres = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1) + 0.5
    ends = torch.rand((count, 2, 2), generator=gen, dtype=torch.float64) * torch.tensor([h, w])
    width = max(1.0, min(h, w) / 8)
    hole = torch.zeros(h, w, dtype=torch.bool)
    for a, b in ends:
        s = ((centres - a) @ (b - a) / (b - a).square().sum().clamp_min(1e-12)).clamp(0, 1)
        hole |= (centres - a - s[..., None] * (b - a)).norm(dim=-1) <= width / 2
    return hole
