"""Recipe assembly without the CLI: each recipe's own defaults, its loss parts, the config it
writes, the shared set-up (σ_data reaches the scaler), and options refused by name."""

import numpy as np
import pytest
import torch
from conftest import TINY, run_cli
from safetensors.numpy import load_file

from cmkit import recipes
from cmkit.batch import Batch
from cmkit.data import run_splits
from cmkit.errors import OptionError
from cmkit.losses import inverse_gap_weight, unit_weight
from cmkit.noise import CTCurriculum, ICTCurriculum
from cmkit.process import EDMProcess, FlowProcess
from cmkit.recipes.ct import ct_loss
from cmkit.recipes.ict import ict_loss
from cmkit.runs import load_config
from cmkit.training_data import load_training_data
from cmkit.training_times import GridPairs, LognormalIndices


def test_each_recipe_has_its_own_defaults():
    ct, ict = recipes.CTOptions(), recipes.ICTOptions()
    assert (ct.distance, ct.s0, ct.s1, ct.mu0) == ("l2", 2, 150, 0.9)
    assert (ict.distance, ict.s0, ict.s1, ict.weighting) == ("pseudo-huber", 10, 1280, "ict")
    assert not hasattr(ict, "mu0") and not hasattr(ct, "pairs")  # no "ct only" fields


def test_ct_loss_is_uniform_pairs_unit_weight_and_the_papers_curriculum():
    loss, schedule = ct_loss(recipes.CTOptions(), EDMProcess(), 1000, (2,))
    assert isinstance(schedule, CTCurriculum) and schedule.scales(1000) == 151
    assert isinstance(loss.pairs, GridPairs) and loss.weighting is unit_weight
    assert schedule.target_mu(0) == pytest.approx(0.9)


def test_ict_loss_parts_follow_the_options():
    opts = recipes.ICTOptions(pairs="lognormal", p_mean=-1.0, p_std=1.5)
    loss, schedule = ict_loss(opts, EDMProcess(), 800, (2,))
    assert isinstance(schedule, ICTCurriculum) and schedule.target_mu(5) == 0.0
    assert loss.pairs.indices == LognormalIndices(-1.0, 1.5)
    assert loss.weighting is inverse_gap_weight
    draw = loss.draw(recipes_batch(), 0, torch.Generator().manual_seed(0))
    grid = EDMProcess().grid(11)
    assert set(draw.r.tolist()) <= set(grid.float().tolist()) and (draw.t > draw.r).all()


def recipes_batch() -> Batch:
    return Batch(torch.randn(64, 2, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize(
    "opts,option",
    [
        (recipes.ICTOptions(pairs="gaussian"), "pairs"),
        (recipes.ICTOptions(weighting="snr"), "weighting"),
        (recipes.ICTOptions(distance="lpips"), "distance"),
        (recipes.ICTOptions(grad_clip=0.0), "grad_clip"),
    ],
)
def test_bad_ict_options_name_the_option_not_a_flag(opts, option):
    with pytest.raises(OptionError) as info:
        ict_loss(opts, EDMProcess(), 100, (2,))
    assert info.value.option == option and "--" not in str(info.value)


def test_lognormal_pairs_need_noise_levels_above_zero():
    with pytest.raises(OptionError, match="lognormal needs noise levels"):
        ict_loss(recipes.ICTOptions(pairs="lognormal"), FlowProcess(), 100, (2,))


@pytest.mark.parametrize("sigma_data", [0.5, 1.0, 2.0])
def test_sigma_data_sets_the_std_of_vectors_in_model_units(sigma_data):
    """The README's promise: vectors are scaled to std σ_data, the σ_data the
    preconditioning uses (it was always 0.5 before the fix)."""
    data, section = load_training_data("moons", 0.1, sigma_data)
    std = data.x0.double().std(0)
    np.testing.assert_allclose(std.numpy(), sigma_data, rtol=1e-3)


def test_teacher_run_scales_by_its_process_sigma_data(tmp_path):
    run = recipes.RunOptions(out=str(tmp_path / "t"), steps=2, batch_size=8, progress=False)
    out = recipes.teacher_run(run, "moons", EDMProcess(sigma_data=1.0))
    config = load_config(out)
    assert config.process.sigma_data == 1.0
    model_units = config.data.scaler.to_model(run_splits(config.data)[0])
    np.testing.assert_allclose(model_units.std(0), 1.0, rtol=1e-3)


def test_runs_store_the_final_grid_and_the_teachers_solver(moons_runs):
    assert load_config(moons_runs / "cd").sampling.num_scales == 18
    ict = load_config(moons_runs / "ict")
    assert ict.sampling.num_scales == ICTCurriculum(40).scales(40)
    teacher = load_config(moons_runs / "teacher")
    assert (teacher.sampling.solver, teacher.sampling.steps) == ("heun", 18)


def test_cd_steps_with_the_teachers_solver(moons_runs, tmp_path):
    run = recipes.RunOptions(out=str(tmp_path / "cd"), steps=1, batch_size=8, progress=False)
    opts = recipes.CDOptions(teacher=str(moons_runs / "teacher"), solver="euler")
    config = load_config(recipes.distill_run(run, opts))
    assert config.training.recipe == "cd" and config.training.options["solver"] == "euler"
    with pytest.raises(OptionError) as info:
        recipes.distill_run(run, recipes.CDOptions(teacher=str(moons_runs / "cd")))
    assert info.value.option == "teacher"


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--recipe", "ict", "--mu0", "0.5"], "--mu0 does not apply to --recipe ict"),
        (["train", "--recipe", "ct", "--pairs", "lognormal"], "--pairs does not apply"),
        (["train-teacher", "--process", "flow", "--rho", "3"], "--rho does not apply"),
        (["train", "--steps", "0"], "--steps must be > 0, got 0"),
        (["distill", "--mu", "1.5"], "--mu must be in [0, 1), got 1.5"),
    ],
)
def test_the_cli_names_its_flag_for_a_bad_option(moons_runs, tmp_path, capsys, args, message):
    source = ["--teacher", moons_runs / "teacher"] if args[0] == "distill" else ["--data", "moons"]
    code = run_cli(args[0], *source, "--out", tmp_path / "r", *TINY, *args[1:])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_grad_clip_none_trains_unclipped(tmp_path):
    """`--grad-clip none` is stored as None and equals an unreachable bound."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli("train", "--data", "moons", "--out", a, *TINY, "--grad-clip", "none") == 0
    assert run_cli("train", "--data", "moons", "--out", b, *TINY, "--grad-clip", "1e30") == 0
    assert load_config(a).training.options["grad_clip"] is None
    wa, wb = load_file(str(a / "online.safetensors")), load_file(str(b / "online.safetensors"))
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
