"""Each device type's own RNG is read and restored: the one that draws dropout masks there."""

import pytest
import torch

from cmkit import rng
from cmkit.errors import UserError


@pytest.fixture
def fake_accelerators(monkeypatch):
    """torch.cuda's and torch.mps's RNG getters and setters, recording their calls."""
    calls = []
    for module, name, state in ((torch.cuda, "cuda", [5, 6, 7]), (torch.mps, "mps", [4, 5, 6])):

        def get(*device, name=name, state=state):
            calls.append((name, "get", *device))
            return torch.tensor(state, dtype=torch.uint8)

        def set_(new, *device, name=name):
            calls.append((name, "set", new.tolist(), *device))

        monkeypatch.setattr(module, "get_rng_state", get)
        monkeypatch.setattr(module, "set_rng_state", set_)
    return calls


def test_each_device_type_uses_its_own_rng(fake_accelerators):
    cuda, mps = torch.device("cuda:1"), torch.device("mps")
    assert rng.device_rng_state(cuda).tolist() == [5, 6, 7]
    assert rng.device_rng_state(mps).tolist() == [4, 5, 6]
    rng.set_device_rng_state(torch.tensor([9], dtype=torch.uint8), cuda)
    rng.set_device_rng_state(torch.tensor([8], dtype=torch.uint8), mps)
    assert fake_accelerators == [
        ("cuda", "get", cuda),
        ("mps", "get"),
        ("cuda", "set", [9], cuda),
        ("mps", "set", [8]),
    ]


def test_cpu_uses_the_global_generator(fake_accelerators):
    cpu = torch.device("cpu")
    state = rng.device_rng_state(cpu)
    assert torch.equal(state, torch.get_rng_state())
    first = torch.rand(4)
    rng.set_device_rng_state(state, cpu)
    assert torch.equal(torch.rand(4), first)
    assert fake_accelerators == []


def test_other_device_types_are_refused():
    with pytest.raises(UserError, match="no RNG for device meta"):
        rng.device_rng_state(torch.device("meta"))
    with pytest.raises(UserError, match="no RNG for device meta"):
        rng.set_device_rng_state(torch.get_rng_state(), torch.device("meta"))
