"""The diffusers backbone computes the pipeline's UNet call, and diffusers stays optional."""

import subprocess
import sys

import pytest
import torch

from cmkit.config import NetworkSpec
from cmkit.errors import UserError
from cmkit.networks.zoo import build_network, default_network

NO_DIFFUSERS = "diffusers not installed: pip install 'cmkit[diffusers]'"
TINY = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
}


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


@pytest.mark.slow
def test_core_modules_do_not_import_diffusers():
    modules = (
        "cli recipes runs generate sampling quickstart diffusers_io diffusers_teacher "
        "networks.diffusers_unet networks.diffusers_vp"
    )
    imports = "; ".join(f"import cmkit.{m}" for m in modules.split())
    proc = _python(f"import sys; {imports}; print('diffusers' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


@pytest.mark.slow
def test_missing_diffusers_is_a_one_line_user_error(tmp_path):
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "from cmkit.cli import main\n"
        f"sys.exit(main(['train', '--data', 'digits', '--backbone', 'diffusers-unet', "
        f"'--out', {str(tmp_path / 'r')!r}]))\n"
    )
    proc = _python(code)
    assert proc.returncode == 2
    assert proc.stderr == (
        "cmkit: error: the diffusers backbone and export need the diffusers package; "
        "install it with pip install 'cmkit[diffusers]'\n"
    )


def test_vectors_refuse_the_diffusers_backbone():
    with pytest.raises(UserError, match="needs images"):
        default_network((2,), backbone="diffusers-unet")
    with pytest.raises(UserError, match="backbone"):
        default_network((1, 8, 8), backbone="resnet")


def test_adapter_passes_250_ln_sigma_as_a_float_tensor():
    pytest.importorskip("diffusers", reason=NO_DIFFUSERS)
    torch.manual_seed(0)
    net = build_network(NetworkSpec("diffusers-unet", TINY)).eval()
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([80.0, 2.5, 0.0123])
    with torch.no_grad():
        ours = net(x, torch.log(sigma) / 4)
        pipeline = net.unet(x, 250 * torch.log(sigma.double())).sample
        truncated = net.unet(x[:1], float(250 * torch.log(sigma[2]))).sample
    torch.testing.assert_close(ours, pipeline, rtol=0, atol=1e-5)
    assert (truncated - ours[:1]).abs().max() > 1e-3  # a Python float becomes an integer


@pytest.mark.parametrize("side", [8, 16, 32, 64])
def test_default_diffusers_unet_for_8_to_64_px(side):
    pytest.importorskip("diffusers", reason=NO_DIFFUSERS)
    spec = default_network((3, side, side), backbone="diffusers-unet")
    assert spec.type == "diffusers-unet" and spec.kwargs["sample_size"] == side
    assert len(spec.kwargs["block_out_channels"]) == (3 if side >= 32 else 2)
    net = build_network(spec)
    with torch.no_grad():
        out = net(torch.randn(2, 3, side, side), torch.zeros(2))
    assert out.shape == (2, 3, side, side)
