"""The lcm distill recipe: LCM's timesteps of a DDPM table, its defaults, the recorded spacing."""

import json
import shutil

import pytest
import torch
from conftest import TINY, run_cli

from cmkit.batch import Batch
from cmkit.errors import UserError
from cmkit.noise import FixedScales, TimestepGrid, lcm_timesteps
from cmkit.process import EDMProcess
from cmkit.training_times import GridPairs


def test_lcm_timesteps_are_diffusers_ddim_timesteps():
    """k = 20 of 1000: 0 then 19, 39, …, 999, the timesteps LCM's training pairs join."""
    t = lcm_timesteps(1000, 51)
    assert t.tolist() == [0, *range(19, 1000, 20)]
    assert lcm_timesteps(1000, 2).tolist() == [0, 999]
    assert lcm_timesteps(10, 6).tolist() == [0, 1, 3, 5, 7, 9]


@pytest.mark.parametrize("n", [1, 502])
def test_lcm_timesteps_refuse_grids_the_table_cannot_hold(n):
    with pytest.raises(UserError, match="2 to 501 points"):
        lcm_timesteps(1000, n)


def test_timestep_grid_takes_the_tables_sigmas_with_exact_ends():
    log_sigmas = torch.linspace(-3.5, 2.7, 1000, dtype=torch.float64)
    process = EDMProcess(
        sigma_min=float(log_sigmas[0].exp()), sigma_max=float(log_sigmas[-1].exp())
    )
    grid = TimestepGrid(log_sigmas, process).grid(51)
    assert grid[0] == process.sigma_min and grid[-1] == process.sigma_max
    torch.testing.assert_close(
        grid[1:-1], log_sigmas[torch.arange(19, 999, 20)].exp(), rtol=0, atol=0
    )
    # CD's pairs on it are adjacent grid points: (σ_{t+20}, σ_t)
    pairs = GridPairs(TimestepGrid(log_sigmas, process), FixedScales(51))
    t, r = pairs(Batch(torch.zeros(256, 2)), 0, torch.Generator().manual_seed(0))
    grid = grid.float()  # the pairs come in the batch's dtype
    index = torch.searchsorted(grid, r)
    assert torch.equal(grid[index], r) and torch.equal(grid[index + 1], t)


def test_lcm_recipe_on_a_teacher_trained_here(moons_runs, tmp_path):
    """LCM's defaults are recorded; a cmkit teacher has no timesteps, so the process's grid."""
    out = tmp_path / "lcm"
    assert (
        run_cli(
            "distill", "--recipe", "lcm", "--teacher", moons_runs / "teacher", "--out", out, *TINY
        )
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    options = config["training"]["options"]
    assert config["training"]["recipe"] == "lcm"
    assert (options["solver"], options["num_scales"], options["mu"]) == ("euler", 51, 0.95)
    assert options["spacing"] == "process" and options["distance"] == "l2"
    assert config["sampling"]["num_scales"] == 51


def test_timestep_spacing_needs_a_ddpm_teacher(moons_runs, tmp_path, capsys):
    out = tmp_path / "cd"
    code = run_cli(
        "distill",
        "--teacher",
        moons_runs / "teacher",
        "--spacing",
        "timesteps",
        "--out",
        out,
        *TINY,
    )
    err = capsys.readouterr().err
    assert code == 2 and "--spacing" in err and "DDPM" in err and len(err.strip().splitlines()) == 1


def test_lcm_recipe_on_an_imported_ddpm_teacher_uses_its_timesteps(tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed")
    from test_import_teacher import imported, tiny_unet

    teacher = imported(tmp_path, tiny_unet(seed=3), diffusers.DDIMScheduler())
    out = tmp_path / "lcm"
    tiny = ["--steps", "2", "--batch-size", "4", "--no-progress"]
    assert run_cli("distill", "--recipe", "lcm", "--teacher", teacher, "--out", out, *tiny) == 0
    options = json.loads((out / "config.json").read_text())["training"]["options"]
    assert options["spacing"] == "timesteps" and options["num_scales"] == 51
    shutil.rmtree(out)
    refused = ["distill", "--recipe", "lcm", "--teacher", teacher, "--num-scales", "600"]
    assert run_cli(*refused, "--out", out, *tiny) == 2


def test_lcm_lora_targets_the_online_network(moons_runs, tmp_path):
    """LCM-LoRA's μ = 0 is lcm's default with --lora-rank; LCM's own 0.95 without."""
    pytest.importorskip("peft", reason="peft not installed: pip install 'cmkit[lora]'")
    out = tmp_path / "lcm-lora"
    teacher = moons_runs / "teacher"
    args = ["distill", "--recipe", "lcm", "--teacher", teacher, "--lora-rank", "2"]
    assert run_cli(*args, "--out", out, *TINY) == 0
    options = json.loads((out / "config.json").read_text())["training"]["options"]
    assert options["mu"] == 0.0 and options["lora_rank"] == 2
    assert (out / "adapter.safetensors").is_file()
