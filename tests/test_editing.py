"""Zero-shot editing (reference §8): the Algorithm 4 loop, the bases and the operator builders."""

import math

import pytest
import torch
import torch.nn.functional as F

from cmkit import editing
from cmkit.errors import UserError
from cmkit.networks.unet import UNet
from cmkit.process import EDMProcess, FlowProcess
from cmkit.sampling import sample_onestep

PROCESSES = [EDMProcess(), FlowProcess()]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0):
    return torch.randn(shape, generator=gen(seed))


class Recorder:
    """A consistency function that records its inputs and returns a fixed map of them."""

    def __init__(self, fn=lambda x, t: torch.tanh(x)):
        self.fn, self.calls = fn, []

    def __call__(self, x, t):
        self.calls.append((x.clone(), t))
        return self.fn(x, t)


def random_cm(process, channels=1):
    """An untrained UNet with random (not zero) weights, so f is a non-trivial function."""
    torch.manual_seed(0)
    net = UNet(channels, channels=8)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return process.consistency(net).eval()


def noises_for(x, times, seed=1):
    return [randn(*x.shape, seed=seed + i) for i in range(len(times))]


# ---------------------------------------------------------------- the loop


def test_edit_starts_from_reference_plus_tau1_noise_not_zero_noise():
    """Algorithm 4: the first input is y_init + τ₁·z (openai's notebook uses τ₁ = 0 by mistake)."""
    proc, y = EDMProcess(), randn(3, 1, 4, 4)
    c = editing.inpaint(y, editing.builtin_mask("center", 4, 4, gen()))
    times = [80.0, 2.0, 0.5]
    z = noises_for(y, times)
    f = Recorder()
    out = editing.edit(f, proc, c.start(), times, z, c.impose)
    assert [t for _, t in f.calls] == times
    torch.testing.assert_close(f.calls[0][0], c.start() + 80.0 * z[0], rtol=0, atol=0)
    x = c.impose(torch.tanh(f.calls[0][0]))
    torch.testing.assert_close(f.calls[1][0], x + math.sqrt(2.0**2 - 0.002**2) * z[1])
    x = c.impose(torch.tanh(f.calls[1][0]))
    torch.testing.assert_close(f.calls[2][0], x + math.sqrt(0.5**2 - 0.002**2) * z[2])
    torch.testing.assert_close(out, c.impose(torch.tanh(f.calls[2][0])), rtol=0, atol=0)


def test_edit_on_flow_perturbs_and_renoises_the_reflow_way():
    proc, y = FlowProcess(), randn(2, 1, 4, 4)
    z = noises_for(y, [0.6, 0.3])
    f = Recorder()
    editing.edit(f, proc, y, [0.6, 0.3], z)
    torch.testing.assert_close(f.calls[0][0], 0.4 * y + 0.6 * z[0])
    torch.testing.assert_close(f.calls[1][0], 0.7 * torch.tanh(f.calls[0][0]) + 0.3 * z[1])


def test_sdedit_from_a_middle_time_is_f_of_the_noised_stroke_image():
    proc, y = EDMProcess(), randn(2, 1, 4, 4)
    z = noises_for(y, [2.5])
    out = editing.edit(lambda x, t: 0.5 * x, proc, y, [2.5], z)
    torch.testing.assert_close(out, 0.5 * (y + 2.5 * z[0]))


@pytest.mark.parametrize(
    "proc, times",
    [
        (EDMProcess(), []),
        (EDMProcess(), [100.0]),  # above T
        (EDMProcess(), [1.0, 2.0]),
        (EDMProcess(), [1.0, 1.0]),
        (EDMProcess(), [1.0, 0.002]),  # = ε
        (FlowProcess(), [1.5]),
        (FlowProcess(), [0.5, 0.0]),
    ],
)
def test_bad_editing_times_are_refused(proc, times):
    with pytest.raises(UserError):
        editing.check_edit_times(proc, times)


def test_t_max_is_a_valid_first_time():
    editing.check_edit_times(EDMProcess(), [80.0, 2.52, 0.1])
    editing.check_edit_times(FlowProcess(), [1.0])


# ---------------------------------------------------------------- bases


@pytest.mark.parametrize(
    "q", [editing.colour_basis(), editing.patch_basis(2), editing.patch_basis(4)]
)
def test_bases_are_orthogonal(q):
    torch.testing.assert_close(q @ q.T, torch.eye(len(q), dtype=q.dtype), rtol=0, atol=1e-12)


def test_colour_basis_first_axis_is_normalised_luminance():
    w = torch.tensor(editing.LUMA, dtype=torch.float64)
    torch.testing.assert_close(editing.colour_basis()[0], w / w.norm(), rtol=0, atol=1e-15)


@pytest.mark.parametrize("p", [1, 2, 3])
def test_patch_basis_first_vector_is_uniform(p):
    first = editing.patch_basis(p)[0]
    torch.testing.assert_close(first, torch.full((p * p,), 1 / p, dtype=torch.float64))


def test_superres_basis_round_trips_and_first_coefficient_is_p_times_the_mean():
    x = randn(2, 3, 8, 8).double()
    c = editing.superres(torch.zeros(2, 3, 4, 4, dtype=torch.float64), 2)
    coef = c.to_basis(x)
    assert coef.shape == (2, 3, 4, 4, 4)
    torch.testing.assert_close(c.from_basis(coef), x)
    torch.testing.assert_close(coef[..., 0], 2 * F.avg_pool2d(x, 2))


# ---------------------------------------------------------------- builders, with a network


@pytest.mark.parametrize("proc", PROCESSES)
def test_inpainting_keeps_known_pixels_exactly(proc):
    f, y = random_cm(proc), randn(4, 1, 8, 8)
    hole = editing.builtin_mask("strokes", 8, 8, gen(3))
    c = editing.inpaint(y, hole)
    times = [proc.t_max, proc.t_max / 10]
    out = editing.edit(f, proc, c.start(), times, noises_for(y, times), c.impose)
    assert torch.equal(out[:, :, ~hole], y[:, :, ~hole])
    assert not torch.allclose(out[:, :, hole], y[:, :, hole], atol=1e-3)


@pytest.mark.parametrize("proc", PROCESSES)
@pytest.mark.parametrize("p", [2, 4])
def test_superres_output_average_pooled_equals_input(proc, p):
    f, y_low = random_cm(proc, channels=3), randn(2, 3, 8 // p, 8 // p)
    c = editing.superres(y_low, p)
    start = c.start()  # the known part alone is nearest upsampling
    nearest = y_low.repeat_interleave(p, 2).repeat_interleave(p, 3)
    torch.testing.assert_close(start, nearest, rtol=0, atol=1e-6)
    times = [proc.t_max]
    out = editing.edit(f, proc, start, times, noises_for(start, times), c.impose)
    assert out.shape == (2, 3, 8, 8)
    torch.testing.assert_close(F.avg_pool2d(out, p), y_low, rtol=0, atol=1e-6)
    assert not torch.allclose(out, start, atol=1e-3)


@pytest.mark.parametrize("proc", PROCESSES)
def test_colorisation_keeps_the_luminance(proc):
    f, y = random_cm(proc, channels=3), randn(3, 3, 8, 8)
    c = editing.colorize(y)
    times = [proc.t_max, proc.t_max / 4]
    out = editing.edit(f, proc, c.start(), times, noises_for(y, times), c.impose)
    torch.testing.assert_close(editing.luminance(out), editing.luminance(y), rtol=0, atol=1e-6)
    assert not torch.allclose(out, y, atol=1e-3)


def test_colorize_refuses_one_channel_images():
    with pytest.raises(UserError, match="RGB"):
        editing.colorize(randn(2, 1, 8, 8))


def test_denoise_edm_is_one_step_at_the_noise_level():
    f, y = Recorder(), randn(2, 1, 4, 4)
    editing.denoise(f, EDMProcess(), y, 0.7)
    ((x, t),) = f.calls
    assert t == 0.7 and torch.equal(x, y)
    for bad in (0.0, 0.001, 100.0):
        with pytest.raises(UserError):
            editing.denoise(f, EDMProcess(), y, bad)


def test_denoise_on_flow_matches_the_edm_posterior_mean_for_gaussian_data():
    """x₀ ~ N(0, S²): E[x₀ | x₀ + σz] = S²/(S² + σ²)·y; the flow denoiser at t = σ/(1+σ) on
    y/(1+σ) gives the same."""
    s, sigma, y = 0.5, 0.8, randn(3, 2).double()

    def flow_denoiser(x, t):
        return (1 - t) * s**2 / ((1 - t) ** 2 * s**2 + t**2) * x

    torch.testing.assert_close(
        editing.denoise(flow_denoiser, FlowProcess(), y, sigma), s**2 / (s**2 + sigma**2) * y
    )


def test_slerp_ends_are_exact_and_norm_is_kept_between_orthogonal_unit_noises():
    z_a, z_b = randn(5, 1, 4, 4, seed=1), randn(5, 1, 4, 4, seed=2)
    frames = editing.slerp(z_a, z_b, torch.linspace(0, 1, 7))
    assert frames.shape == (5, 7, 1, 4, 4)
    assert torch.equal(frames[:, 0], z_a) and torch.equal(frames[:, -1], z_b)
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    mid = editing.slerp(a, b, torch.tensor([0.5]))[0, 0]
    torch.testing.assert_close(mid, torch.tensor([0.5**0.5, 0.5**0.5]))
    same = editing.slerp(a, a, torch.tensor([0.0, 0.3, 1.0]))  # parallel: linear, no NaN
    torch.testing.assert_close(same[0], a.expand(3, 2))


@pytest.mark.parametrize("proc", PROCESSES)
def test_interpolation_ends_reproduce_the_one_step_samples(proc):
    f = random_cm(proc)
    z_a, z_b = randn(2, 1, 8, 8, seed=1), randn(2, 1, 8, 8, seed=2)
    frames = editing.slerp(z_a, z_b, torch.linspace(0, 1, 4))
    out = sample_onestep(f, proc, frames.flatten(0, 1)).reshape(frames.shape)
    torch.testing.assert_close(out[:, 0], sample_onestep(f, proc, z_a), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, -1], sample_onestep(f, proc, z_b), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- masks


def test_builtin_masks():
    center = editing.builtin_mask("center", 8, 8, gen())
    assert center.sum() == 16 and center[2:6, 2:6].all()
    left = editing.builtin_mask("left-half", 8, 6, gen())
    assert left.shape == (8, 6) and left[:, :3].all() and not left[:, 3:].any()
    strokes = editing.builtin_mask("strokes", 16, 16, gen(5))
    assert torch.equal(strokes, editing.builtin_mask("strokes", 16, 16, gen(5)))
    assert not torch.equal(strokes, editing.builtin_mask("strokes", 16, 16, gen(6)))
    assert 0 < strokes.sum() < 16 * 16
    with pytest.raises(UserError, match="center"):
        editing.builtin_mask("circle", 8, 8, gen())
