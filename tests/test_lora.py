"""LCM-LoRA: adapters that start as nothing, a teacher that is the network with them off,
merges equal to the adapted network, gradients for the adapters only, run files that hold
the adapter alone, exact resume, bases checked by hash, and peft as an optional extra."""

import copy
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_resume import _start, _wait_for_checkpoint, assert_identical

from cmkit.config import NetworkSpec
from cmkit.lora import (
    AdaptersOff,
    LoraNetwork,
    LoraSpec,
    default_targets,
    file_sha256,
    is_adapter_key,
    merged,
)
from cmkit.networks.zoo import build_network, default_network
from cmkit.runs import load_config, load_network
from cmkit.train import trainable_parameters

peft = pytest.importorskip("peft")

MLP = NetworkSpec("mlp", {"dim": 2, "hidden": 16, "depth": 2})
UNET = NetworkSpec("unet", {"in_channels": 1, "channels": 8, "attention_levels": [1]})
DIFFUSERS_UNET = default_network((1, 8, 8), backbone="diffusers-unet")
NETWORKS = {
    "mlp": (MLP, (4, 2)),
    "unet": (UNET, (4, 1, 8, 8)),
    "diffusers-unet": (DIFFUSERS_UNET, (4, 1, 8, 8)),
}
NET = ["--network", '{"hidden": 16, "depth": 1}']
SMALL = ["--batch-size", "16", "--no-progress"]
NO_PEFT = "cmkit: error: --lora-rank needs peft: pip install 'cmkit[lora]'"


def trained_like(spec: NetworkSpec) -> torch.nn.Module:
    """A network of `spec` with every weight random (a fresh UNet's zeroed convs output 0)."""
    if spec.type == "diffusers-unet":
        pytest.importorskip("diffusers")
    torch.manual_seed(0)
    net = build_network(spec).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.1)
    return net


def inputs(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """x and c_noise of a batch."""
    gen = torch.Generator().manual_seed(1)
    return torch.randn(shape, generator=gen), torch.randn(shape[0], generator=gen)


def adapted(spec: NetworkSpec, rank: int = 2) -> tuple[torch.nn.Module, LoraNetwork]:
    """A base network and a copy of it with adapters on LCM-LoRA's targets."""
    base = trained_like(spec)
    targets = default_targets(spec.type, base)
    return base, LoraNetwork(copy.deepcopy(base), rank, 2.0 * rank, targets).eval()


def perturb_adapters(net: LoraNetwork) -> None:
    """B ≠ 0, so the adapters change the output."""
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in net.net.named_parameters():
            if is_adapter_key(name):
                p.normal_(0.0, 0.1)


# ---------------------------------------------------------------- the adapted network


def test_default_targets_are_lcm_loras_layers():
    unet = build_network(UNET)
    targets = default_targets("unet", unet)
    assert {"down.0.conv1", "down.0.conv2", "down.0.emb_proj", "down.1"} <= set(targets)
    assert {"down.2.skip", "down.2.attn.qkv", "down.2.attn.proj", "up.1.conv"} <= set(targets)
    assert not {"conv_in", "conv_out", "emb_mlp.0", "emb_mlp.2"} & set(targets)
    layers = torch.nn.Conv2d | torch.nn.Linear
    assert all(isinstance(unet.get_submodule(t), layers) for t in targets)
    mlp = default_targets("mlp", build_network(MLP))
    assert mlp == [f"blocks.{i}.{n}" for i in range(2) for n in ("fc1", "emb", "fc2")]


@pytest.mark.parametrize("kind", list(NETWORKS))
def test_a_fresh_adapter_leaves_the_output_bit_identical(kind):
    spec, shape = NETWORKS[kind]
    base, net = adapted(spec)
    x, c = inputs(shape)
    with torch.no_grad():
        assert torch.equal(net(x, c), base(x, c))


@pytest.mark.parametrize("kind", list(NETWORKS))
def test_adapters_off_is_the_base_network_exactly(kind):
    spec, shape = NETWORKS[kind]
    base, net = adapted(spec)
    perturb_adapters(net)
    net.train()
    x, c = inputs(shape)
    with torch.no_grad():
        before = net(x, c)
        assert not torch.allclose(before, base(x, c))
        assert torch.equal(AdaptersOff(net)(x, c), base(x, c))
        assert torch.equal(net(x, c), before)  # on again afterwards
    assert net.training  # and in its own mode
    flags = {is_adapter_key(n): p.requires_grad for n, p in net.net.named_parameters()}
    assert flags == {True: True, False: False}


@pytest.mark.parametrize("kind", list(NETWORKS))
def test_merged_network_is_the_adapted_one_within_1e_6(kind):
    spec, shape = NETWORKS[kind]
    base, net = adapted(spec)
    perturb_adapters(net)
    plain = merged(net)
    assert type(plain) is type(base) and plain.state_dict().keys() == base.state_dict().keys()
    x, c = inputs(shape)
    with torch.no_grad():
        want, got = net(x, c), plain(x, c)
    assert not torch.allclose(want, base(x, c))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    rebuilt = build_network(spec)
    rebuilt.load_state_dict(plain.state_dict())  # a plain network of the base spec


@pytest.mark.parametrize("kind", list(NETWORKS))
def test_only_the_adapters_receive_gradients(kind):
    spec, shape = NETWORKS[kind]
    _, net = adapted(spec)
    x, c = inputs(shape)
    net.train()(x, c).square().sum().backward()
    for name, p in net.net.named_parameters():
        if is_adapter_key(name):
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    adapters = {id(p) for n, p in net.net.named_parameters() if is_adapter_key(n)}
    assert {id(p) for p in trainable_parameters(net, None)} == adapters


def test_the_state_dict_is_the_adapter_alone():
    _, net = adapted(UNET)
    state = net.state_dict()
    assert state and all(is_adapter_key(k) for k in state)
    perturb_adapters(net)
    other = adapted(UNET)[1]
    other.load_state_dict(net.state_dict())
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in net.state_dict().items())
    with pytest.raises(RuntimeError, match="not this network's adapter"):
        other.load_state_dict(dict(list(state.items())[1:]))


# ---------------------------------------------------------------- LoRA runs end to end


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A tiny moons teacher and its LoRA student (rank 2)."""
    root = tmp_path_factory.mktemp("lora")
    teacher = ["train-teacher", "--data", "moons", *NET, "--out", root / "teacher"]
    assert run_cli(*teacher, "--steps", 10, *SMALL) == 0
    student = ["distill", "--teacher", root / "teacher", "--lora-rank", 2]
    assert run_cli(*student, "--out", root / "lora", "--steps", 10, *SMALL) == 0
    return root


def test_a_lora_run_holds_the_adapter_and_a_pointer_to_its_base(runs):
    config = load_config(runs / "lora")
    kw = config.network.kwargs
    assert config.network.type == "lora" and kw["rank"] == 2 and kw["alpha"] == 2.0
    assert kw["base"] == {"type": "mlp", "kwargs": {"dim": 2, "hidden": 16, "depth": 1}}
    assert kw["base_run"] == str((runs / "teacher").resolve())
    assert kw["base_sha256"] == file_sha256(runs / "teacher" / "ema.safetensors")
    teacher_size = (runs / "teacher" / "ema.safetensors").stat().st_size
    for which in ("online", "ema", "target"):
        path = runs / "lora" / f"{which}.safetensors"
        assert all(is_adapter_key(k) for k in load_file(path)), which
        assert path.stat().st_size < teacher_size / 5
    options = config.training.options
    assert options["lora_rank"] == 2 and options["mu"] == 0.0
    assert 0 < options["trainable_parameters"] < options["parameters"] / 5


def test_adapter_file_is_the_final_ema_adapter_with_its_base_hash(runs):
    path = runs / "lora" / "adapter.safetensors"
    with safe_open(path, "pt") as f:
        meta, adapter = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["base_sha256"] == file_sha256(runs / "teacher" / "ema.safetensors")
    assert meta["base_run"] == str((runs / "teacher").resolve()) and meta["rank"] == "2"
    ema = load_file(runs / "lora" / "ema.safetensors")
    assert {k.removeprefix("net.").replace(".default.", ".") for k in ema} == adapter.keys()
    for key, value in ema.items():
        assert torch.equal(adapter[key.removeprefix("net.").replace(".default.", ".")], value)
    # peft loads it onto the base run's network, which is then the LoRA run's network
    config, net = load_network(runs / "lora")
    _, base = load_network(runs / "teacher")
    lora = LoraSpec.of(config.network)
    fresh = LoraNetwork(base, lora.rank, lora.alpha, list(lora.targets))
    peft.set_peft_model_state_dict(fresh.net, adapter)
    x, c = inputs((8, 2))
    with torch.no_grad():
        assert torch.equal(fresh(x, c), net(x, c))


def test_the_teacher_is_the_lora_network_with_adapters_off(runs):
    _, teacher = load_network(runs / "teacher")
    _, net = load_network(runs / "lora", "online")
    x, c = inputs((8, 2))
    with torch.no_grad():
        assert torch.equal(AdaptersOff(net)(x, c), teacher(x, c))
        assert not torch.equal(net(x, c), teacher(x, c))  # ten steps moved the adapter


def test_trainable_parameters_are_printed_at_the_start(runs, tmp_path, capsys):
    args = ["distill", "--teacher", runs / "teacher", "--lora-rank", "--steps", 1, *SMALL]
    assert run_cli(*args, "--out", tmp_path / "r") == 0
    options = load_config(tmp_path / "r").training.options
    n, m = options["trainable_parameters"], options["parameters"]
    line = f"cmkit: trainable parameters: {n} of {m} ({100 * n / m:.1f}%)"
    assert line in capsys.readouterr().err.splitlines()
    assert load_config(tmp_path / "r").network.kwargs["rank"] == 4  # --lora-rank alone: 4


def sample(model: Path, out: Path, *extra) -> int:
    return run_cli("sample", "--model", model, "--n", 32, "--out", out, "--no-progress", *extra)


def test_merge_lora_writes_a_run_that_samples_like_the_adapter(runs, tmp_path):
    assert run_cli("merge-lora", "--model", runs / "lora", "--out", tmp_path / "merged") == 0
    config = load_config(tmp_path / "merged")
    assert config.kind == "consistency" and config.network == load_config(runs / "teacher").network
    assert config.training.options["merged"]["adapter"] == str((runs / "lora").resolve())
    for which in ("online", "ema", "target"):
        keys = load_file(tmp_path / "merged" / f"{which}.safetensors").keys()
        assert keys == load_file(runs / "teacher" / "ema.safetensors").keys()
    for steps in ("1", "2"):
        assert sample(runs / "lora", tmp_path / "a.npy", "--steps", steps) == 0
        assert sample(tmp_path / "merged", tmp_path / "b.npy", "--steps", steps) == 0
        a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)


def _teacher_copy(runs: Path, tmp_path: Path, scale: float) -> Path:
    """The teacher run with its EMA weights scaled: the same network, another sha256."""
    copy = tmp_path / f"teacher-{scale}"
    shutil.copytree(runs / "teacher", copy)
    weights = copy / "ema.safetensors"
    save_file({k: v * scale for k, v in load_file(weights).items()}, weights)
    return copy


def test_a_base_with_another_hash_is_refused_unless_forced(runs, tmp_path, capsys):
    same = _teacher_copy(runs, tmp_path, 1.0)  # a copy elsewhere: the same weights
    assert sample(runs / "lora", tmp_path / "own.npy") == 0
    assert sample(runs / "lora", tmp_path / "same.npy", "--base", same) == 0
    assert np.array_equal(np.load(tmp_path / "own.npy"), np.load(tmp_path / "same.npy"))
    other = _teacher_copy(runs, tmp_path, 1.1)
    capsys.readouterr()
    assert sample(runs / "lora", tmp_path / "x.npy", "--base", other) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "is not the run the adapter was trained on" in line and "--force" in line
    assert sample(runs / "lora", tmp_path / "forced.npy", "--base", other, "--force") == 0
    assert not np.array_equal(np.load(tmp_path / "own.npy"), np.load(tmp_path / "forced.npy"))
    merge = ["merge-lora", "--model", runs / "lora", "--base", other]
    assert run_cli(*merge, "--out", tmp_path / "m") == 2
    assert run_cli(*merge, "--force", "--out", tmp_path / "m") == 0
    assert load_config(tmp_path / "m").training.options["merged"]["base_run"] == str(other)


def test_a_base_of_another_network_is_refused_even_forced(runs, tmp_path, capsys):
    wider = ["train-teacher", "--data", "moons", "--network", '{"hidden": 8, "depth": 1}']
    assert run_cli(*wider, "--out", tmp_path / "wider", "--steps", 1, *SMALL) == 0
    capsys.readouterr()
    assert sample(runs / "lora", tmp_path / "x.npy", "--base", tmp_path / "wider", "--force") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "has another network" in line


def test_a_missing_base_run_is_one_line(runs, tmp_path, capsys):
    shutil.copytree(runs / "lora", tmp_path / "lora")
    path = tmp_path / "lora" / "config.json"
    config = json.loads(path.read_text())
    config["network"]["kwargs"]["base_run"] = str(tmp_path / "gone")
    path.write_text(json.dumps(config))
    assert sample(tmp_path / "lora", tmp_path / "x.npy") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"cmkit: error: the base run {tmp_path / 'gone'} of this LoRA run")
    assert sample(tmp_path / "lora", tmp_path / "x.npy", "--base", runs / "teacher") == 0


def test_sample_base_applies_to_lora_runs_only(runs, tmp_path, capsys):
    assert sample(runs / "teacher", tmp_path / "x.npy", "--base", runs / "teacher") == 2
    assert "--base applies to LoRA runs" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--mu", "0.5"], "--mu must be 0 with --lora-rank"),
        (["--no-init-from-teacher"], "--lora-rank adapts the teacher's own weights"),
        (["--recipe", "scd"], "--lora-rank does not apply to --recipe scd"),
        (["--backbone", "diffusers-unet"], "not a diffusers-unet"),
        (["--lora-rank", "0"], "--lora-rank must be >= 1, got 0"),
        (["--lora-alpha", "0"], "--lora-alpha must be > 0"),
    ],
)
def test_what_lora_fixes_is_refused_in_one_line(runs, tmp_path, capsys, extra, needle):
    args = ["distill", "--teacher", runs / "teacher", "--lora-rank", "2", *extra, *SMALL]
    assert run_cli(*args, "--out", tmp_path / "r", "--steps", 1) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert needle in line


def test_without_peft_the_flag_says_how_to_install_it(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    args = ["distill", "--teacher", runs / "teacher", "--lora-rank", "2", *SMALL]
    assert run_cli(*args, "--out", tmp_path / "r", "--steps", 1) == 2
    assert capsys.readouterr().err.strip().splitlines() == [NO_PEFT]
    assert sample(runs / "lora", tmp_path / "x.npy") == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "cmkit: error: a LoRA run needs peft: pip install 'cmkit[lora]'"
    ]


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")
def test_sigkill_mid_run_then_resume_is_bit_identical(runs, tmp_path):
    """As test_resume's: the killed process checkpoints every step, so the kill most likely
    lands inside a checkpoint write."""
    args = ["distill", "--teacher", runs / "teacher", "--lora-rank", 2, "--steps", 200, *SMALL]
    proc = _start([*args, "--checkpoint-every", 1, "--out", tmp_path / "killed"], tmp_path)
    _wait_for_checkpoint(proc, tmp_path / "killed")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "adapter.safetensors").exists()
    assert run_cli(*args, "--out", tmp_path / "killed", "--resume") == 0
    assert run_cli(*args, "--out", tmp_path / "straight") == 0
    assert_identical(tmp_path / "straight", tmp_path / "killed")
    a, b = (load_file(tmp_path / r / "adapter.safetensors") for r in ("straight", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_guided_lora_on_a_labelled_unet_teacher(tmp_path):
    """A fixed-w LCM-LoRA student of a labelled digits UNet: the teacher is the guided base
    with its adapters off; the student samples at that w, and merges within 1e-6."""
    teacher = ["train-teacher", "--data", "digits", "--labels", "--network", '{"channels": 8}']
    assert run_cli(*teacher, "--out", tmp_path / "t", "--steps", 4, "--batch-size", 8) == 0
    student = ["distill", "--teacher", tmp_path / "t", "--lora-rank", 2, "--guidance", 1]
    assert run_cli(*student, "--out", tmp_path / "s", "--steps", 4, "--batch-size", 8) == 0
    config = load_config(tmp_path / "s")
    assert config.training.options["guidance"] == [1.0, 1.0]
    assert "down.1" in config.network.kwargs["targets"]  # the downsampling conv
    assert run_cli("merge-lora", "--model", tmp_path / "s", "--out", tmp_path / "m") == 0
    for model, out in (("s", "a.npy"), ("m", "b.npy")):
        assert sample(tmp_path / model, tmp_path / out, "--guidance", 1, "--label", 3) == 0
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 * max(1.0, float(np.abs(a).max())))
