"""Tests for the UNet backbone: shapes, zero init, conditioning, gradients, validation."""

import pytest
import torch

from cmkit.networks.unet import UNet

SMALL = dict(channels=8, emb_dim=16)


def perturbed(net: UNet, scale: float = 0.05) -> UNet:
    """Add noise to every parameter so zero-initialised layers no longer hide the input."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))
    return net


@pytest.mark.parametrize(
    ("shape", "kwargs"),
    [
        ((1, 8, 8), {}),
        ((3, 16, 16), {}),
        ((3, 32, 32), dict(channel_mult=(1, 2, 2))),
        ((2, 8, 16), {}),
        ((1, 64, 64), dict(SMALL, channel_mult=(1, 2, 2, 2))),
    ],
)
def test_output_shape_equals_input_shape(shape, kwargs):
    torch.manual_seed(0)
    net = perturbed(UNet(shape[0], **kwargs))
    x = torch.randn(2, *shape)
    out = net(x, torch.randn(2))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_fresh_network_outputs_exactly_zero():
    torch.manual_seed(0)
    net = UNet(3)
    out = net(torch.randn(4, 3, 16, 16), torch.randn(4))
    assert torch.count_nonzero(out) == 0


def test_output_depends_on_c_noise():
    torch.manual_seed(0)
    net = perturbed(UNet(1, **SMALL))
    x = torch.randn(3, 1, 8, 8)
    a = net(x, torch.full((3,), -1.0))
    b = net(x, torch.full((3,), 0.5))
    assert (a - b).abs().max() > 1e-4


def test_output_depends_on_x():
    torch.manual_seed(0)
    net = perturbed(UNet(1, **SMALL))
    c = torch.zeros(2)
    a = net(torch.randn(2, 1, 8, 8), c)
    b = net(torch.randn(2, 1, 8, 8), c)
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("attention_levels", [(), (0, 1)])
def test_gradients_reach_every_parameter(attention_levels):
    torch.manual_seed(0)
    net = perturbed(UNet(2, **SMALL, num_res_blocks=2, attention_levels=attention_levels))
    net(torch.randn(2, 2, 8, 8), torch.randn(2)).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert missing == []
    dead = [n for n, p in net.named_parameters() if p.grad.abs().max() == 0]
    assert dead == []


def test_attention_at_lowest_level_keeps_shape():
    torch.manual_seed(0)
    net = perturbed(UNet(3, attention_levels=(1,)))
    assert any("attn.qkv" in n for n, _ in net.named_parameters())
    x = torch.randn(2, 3, 16, 8)
    assert net(x, torch.randn(2)).shape == x.shape


def test_same_seed_gives_identical_parameters():
    torch.manual_seed(0)
    a = UNet(3, attention_levels=(0,))
    torch.manual_seed(0)
    b = UNet(3, attention_levels=(0,))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_batch_items_are_independent():
    torch.manual_seed(0)
    net = perturbed(UNet(1, **SMALL)).eval()
    x, c = torch.randn(4, 1, 8, 8), torch.randn(4)
    torch.testing.assert_close(net(x, c)[:2], net(x[:2], c[:2]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("x_shape", "c_shape", "match"),
    [
        ((2, 1, 7, 7), (2,), "7x7"),
        ((2, 1, 8, 6), (2,), "8x6"),
        ((2, 3, 8, 8), (2,), r"\(2, 3, 8, 8\)"),
        ((2, 1, 8, 8), (2, 1), r"\(2, 1\)"),
        ((2, 1, 8, 8), (3,), r"\(3,\)"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_value(x_shape, c_shape, match):
    net = UNet(1, channel_mult=(1, 2, 2), **SMALL)
    with pytest.raises(ValueError, match=match):
        net(torch.randn(x_shape), torch.randn(c_shape))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(channel_mult=()), "channel_mult"),
        (dict(attention_levels=(2,)), r"\[2\]"),
        (dict(attention_levels=(-1,)), r"\[-1\]"),
        (dict(num_res_blocks=0), "num_res_blocks"),
    ],
)
def test_bad_config_raises_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNet(1, **kwargs)
