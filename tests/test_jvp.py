"""Forward-mode AD through the networks and TrigFlowParam.F, and the time-embedding choice.

sCM's tangent needs one torch.func.jvp of F (reference §12); each JVP is checked against a
central finite difference (f(x + h·dx) − f(x − h·dx))/2h in float64.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp

from cmkit.config import NetworkSpec
from cmkit.errors import UserError
from cmkit.networks.embedding import FourierEmbedding, SinusoidalEmbedding
from cmkit.networks.mlp import MLP
from cmkit.networks.unet import UNet, attention
from cmkit.networks.zoo import build_for_data
from cmkit.param import TrigFlowParam

NETS = {
    "mlp": lambda **kw: MLP(2, hidden=32, depth=2, emb_dim=16, **kw),
    "unet-attention": lambda **kw: UNet(
        1, channels=8, channel_mult=(1, 2), attention_levels=(0, 1), emb_dim=16, **kw
    ),
}
SHAPES = {"mlp": (3, 2), "unet-attention": (2, 1, 8, 8)}


def perturbed(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight moved off its initial value (the UNet's zero-initialised convs too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return net


def primals_and_tangents(name: str, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    shape = SHAPES[name]
    x, dx = (torch.randn(shape, generator=g, dtype=dtype) for _ in range(2))
    c = torch.rand(shape[0], generator=g, dtype=dtype) * 1.5  # TrigFlow's t ∈ [0, π/2]
    dc = torch.randn(shape[0], generator=g, dtype=dtype)
    return (x, c), (dx, dc)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def central_difference(fn, primals, tangents, h=1e-4):
    plus = fn(*(p + h * t for p, t in zip(primals, tangents, strict=True)))
    minus = fn(*(p - h * t for p, t in zip(primals, tangents, strict=True)))
    return (plus - minus) / (2 * h)


@pytest.mark.parametrize("embedding", ["positional", "fourier"])
@pytest.mark.parametrize("name", list(NETS))
def test_jvp_matches_finite_difference(name, embedding):
    net = perturbed(NETS[name](embedding=embedding)).double().eval()
    primals, tangents = primals_and_tangents(name)
    out, tangent = jvp(net, primals, tangents)
    with torch.no_grad():
        torch.testing.assert_close(out, net(*primals), rtol=1e-12, atol=1e-12)
        fd = central_difference(net, primals, tangents)
    assert tangent.norm() > 1e-3
    assert relative(tangent, fd) <= 1e-3, relative(tangent, fd)
    # float32 gives the same tangent, loosely
    primals32 = tuple(p.float() for p in primals)
    tangents32 = tuple(t.float() for t in tangents)
    _, tangent32 = jvp(copy.deepcopy(net).float(), primals32, tangents32)
    assert tangent32.dtype == torch.float32
    assert relative(tangent32.double(), tangent) <= 1e-3


@pytest.mark.parametrize("name", list(NETS))
def test_jvp_in_training_mode_with_dropout(name):
    net = perturbed(NETS[name](dropout=0.1)).train()
    primals, tangents = primals_and_tangents(name, torch.float32)
    out, tangent = jvp(net, primals, tangents)
    assert out.shape == tangent.shape == primals[0].shape
    assert torch.isfinite(tangent).all()


def test_jvp_through_trigflow_F_in_x_and_t():
    param = TrigFlowParam(perturbed(NETS["mlp"]()).double(), sigma_data=0.5)
    (x, t), (dx, dt) = primals_and_tangents("mlp")
    out, tangent = jvp(param.F, (x, t), (dx, dt))
    with torch.no_grad():
        torch.testing.assert_close(out, param.net(x / 0.5, t), rtol=1e-12, atol=1e-12)
        fd = central_difference(param.F, (x, t), (dx, dt))
    assert relative(tangent, fd) <= 1e-3
    # along t alone it is ∂F/∂t, and along x alone it sees x through x_t/σ_d
    _, along_t = jvp(param.F, (x, t), (torch.zeros_like(x), dt))
    _, along_x = jvp(param.F, (x, t), (dx, torch.zeros_like(t)))
    torch.testing.assert_close(along_t + along_x, tangent, rtol=1e-10, atol=1e-12)


def test_attention_equals_sdpa():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(3, 64, 16, generator=g) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(attention(q, k, v), ref, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- the embedding choice


def test_fourier_embedding_is_seeded_and_saved():
    torch.manual_seed(0)
    a = FourierEmbedding(16)
    torch.manual_seed(1)
    b = FourierEmbedding(16)
    assert torch.equal(a.freqs, b.freqs) and "freqs" in a.state_dict()
    assert a.freqs.std() > 5  # N(0, 16²)
    c = torch.tensor([0.0, 0.5])
    expected = 2 * torch.pi * c[:, None] * a.freqs[None]
    torch.testing.assert_close(a(c), torch.cat([expected.cos(), expected.sin()], 1))
    assert "freqs" not in SinusoidalEmbedding(16).state_dict()


@pytest.mark.parametrize("name", list(NETS))
def test_embedding_choice_keeps_other_weights(name):
    """The fourier net has the positional net's parameters, same names and same init draws,
    plus one saved buffer; the global RNG is not touched by the frequencies."""
    torch.manual_seed(0)
    positional = NETS[name]().state_dict()
    torch.manual_seed(0)
    fourier = NETS[name](embedding="fourier").state_dict()
    extra = set(fourier) - set(positional)
    assert len(extra) == 1 and next(iter(extra)).endswith("freqs")
    assert all(torch.equal(positional[k], fourier[k]) for k in positional)


@pytest.mark.parametrize("name", list(NETS))
def test_unknown_embedding_is_refused(name):
    with pytest.raises(ValueError, match="'sinusoid'"):
        NETS[name](embedding="sinusoid")
    spec = NetworkSpec("mlp", {"dim": 2, "embedding": "sinusoid"})
    with pytest.raises(UserError, match="sinusoid"):
        build_for_data(spec, (2,))
