"""ECT: the staged mapping r(t, stage) by hand, continuous pairs in range, a zero weight for
empty pairs, tuning from a teacher's weights, and bad values refused in one line."""

import json

import pytest
import torch
from conftest import TINY, run_cli
from safetensors.torch import load_file

from cmkit import recipes
from cmkit.batch import Batch
from cmkit.losses import ConsistencyLoss, UnbiasedEstimate, inverse_gap_weight, l2_distance
from cmkit.networks.mlp import MLP
from cmkit.noise import ECT_MIN_RATIO, ECTSchedule
from cmkit.process import EDMProcess
from cmkit.recipes.common import VECTOR_DEFAULTS
from cmkit.training_times import ContinuousPairs, KarrasTimes, LognormalTimes


@pytest.mark.parametrize(
    "t,step,r",
    [
        # stage 3 (double 100): ratio 2^-4·(1 + 8·sigmoid(−1)) = 0.196971
        (1.0, 350, 0.8030292893150024),
        # stage 2: 2^-3·(1 + 8·sigmoid(−10)) = 0.125045
        (10.0, 200, 8.749546021312975),
        (0.01, 599, 0.009221874973958594),  # stage 5
        (1.0, 99, 0.0),  # stage 0: 1 − 0.5·3.15 < 0, clamped
    ],
)
def test_ect_mapping_matches_hand_computed_values(t, step, r):
    schedule = ECTSchedule(q=2.0, double=100, k=8.0, b=1.0)
    got = schedule.lower(torch.tensor([t], dtype=torch.float64), step)
    assert got.item() == pytest.approx(r, rel=1e-12, abs=1e-15)


def test_each_stage_shrinks_the_gap_by_q():
    schedule = ECTSchedule(q=4.0, double=10)
    t = torch.tensor([0.5, 3.0, 40.0], dtype=torch.float64)
    gaps = [t - schedule.lower(t, 10 * s) for s in (2, 3, 4)]
    assert torch.allclose(gaps[0] / gaps[1], torch.full_like(t, 4.0))
    assert torch.allclose(gaps[1] / gaps[2], torch.full_like(t, 4.0))


def test_continuous_pairs_stay_in_the_process_range_with_t_above_r():
    process = EDMProcess()
    pairs = ContinuousPairs(process, ECTSchedule(double=50), LognormalTimes(-1.1, 2.0))
    x0 = torch.zeros(20000, 2)
    t, r = pairs(Batch(x0), 120, torch.Generator().manual_seed(0))
    assert t.dtype == x0.dtype and t.shape == r.shape == (20000,)
    assert (t >= process.t_min).all() and (t <= process.t_max).all()
    assert (r >= process.t_min).all() and (r <= t).all()
    inside = t[(t > 0.01) & (t < 50)]  # away from the clipped tails: ln t ~ N(−1.1, 2.0²)
    assert torch.log(t).median().item() == pytest.approx(-1.1, abs=0.05)
    assert len(inside) > 10000


def test_a_pair_clipped_to_the_boundary_weighs_zero_not_infinity():
    process = EDMProcess()
    loss = ConsistencyLoss(
        process,
        lambda x0, step, gen: (torch.full((4,), process.t_min), torch.full((4,), process.t_min)),
        UnbiasedEstimate(process.perturb),
        l2_distance,
        inverse_gap_weight,
    )
    f = process.consistency(MLP(2, hidden=8, depth=1))
    value = loss(f, f, Batch(torch.randn(4, 2)), 0, torch.Generator().manual_seed(0))
    assert value.item() == 0.0


NET = ["--network", '{"hidden": 32, "depth": 1}']


def test_ect_from_a_teacher_starts_from_its_weights(tmp_path):
    teacher = tmp_path / "teacher"
    assert run_cli("train-teacher", "--data", "moons", "--out", teacher, *NET, *TINY) == 0
    out = tmp_path / "ect"
    args = ["train", "--recipe", "ect", "--data", "moons", "--init-from", teacher, *NET]
    assert run_cli(*args, "--out", out, "--lr", "1e-30", *TINY) == 0
    before, after = load_file(teacher / "ema.safetensors"), load_file(out / "online.safetensors")
    assert before.keys() == after.keys()
    for key in before:  # lr 1e-30 moves no float32 weight
        assert torch.equal(before[key], after[key]), key
    options = json.loads((out / "config.json").read_text())["training"]["options"]
    assert options["init_from"] == str(teacher.resolve()) and options["q"] == 2.0
    assert run_cli("sample", "--model", out, "--n", "8", "--out", tmp_path / "s.npy") == 0


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--q", "1"], "--q must be > 1"),
        (["--double", "0"], "--double must be >= 1"),
        (["--weighting", "ict"], "--weighting must be 'inverse-gap' or 'snr'"),
        (["--distance", "l1"], "--distance must be 'pseudo-huber' or 'l2'"),
        (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
        (["--process", "flow"], "the flow process starts at 0"),
        (["--s0", "4"], "--s0 does not apply to --recipe ect"),
        (["--warmup", "4"], "--warmup does not apply to --recipe ect"),
        (["--init-from", "nowhere"], "nowhere"),
    ],
)
def test_bad_ect_values_are_one_line_exit_2(tmp_path, capsys, extra, message):
    args = ["train", "--recipe", "ect", "--data", "moons", "--out", tmp_path / "r", *TINY]
    assert run_cli(*args, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_ect_refuses_a_teacher_of_another_network_or_a_consistency_run(
    moons_runs, tmp_path, capsys
):
    args = ["train", "--recipe", "ect", "--data", "moons", *TINY]
    teacher = moons_runs / "teacher"  # the default MLP (hidden 256, depth 4)
    assert run_cli(*args, "--init-from", teacher, *NET, "--out", tmp_path / "a") == 2
    err = capsys.readouterr().err.strip()
    assert "--init-from" in err and "must match" in err and len(err.splitlines()) == 1
    assert run_cli(*args, "--init-from", moons_runs / "cd", "--out", tmp_path / "b") == 2
    assert "expected a teacher run" in capsys.readouterr().err


def test_the_stage_stops_at_the_smallest_gap_ratio():
    schedule = ECTSchedule(q=2.0, double=10)
    last = schedule.last_stage()
    assert 2.0 ** -(last + 1) >= ECT_MIN_RATIO > 2.0 ** -(last + 2)
    assert ECTSchedule(q=2.0).last_stage() == 11  # the default q: stages 0..11
    assert schedule.stage(10 * last) == schedule.stage(10**6) == last
    t = torch.tensor([80.0])  # the gap at the last stage still shows in float32
    assert (t.float() - schedule.lower(t, 10**6).float()).item() > 0


def test_default_stages_span_the_run_and_an_explicit_double_is_kept():
    from cmkit.recipes.ect import check

    schedule = check(recipes.ECTOptions(), steps=3000)  # q = 2: 12 stages of 250 steps
    assert schedule.double == 250
    assert schedule.stage(2749) == 10 and schedule.stage(2750) == schedule.last_stage() == 11
    assert check(recipes.ECTOptions(double=400), steps=3000).double == 400
    assert check(recipes.ECTOptions(), steps=5).double == 1


def test_a_student_of_a_teacher_fine_tunes_at_a_quarter_of_the_learning_rate(moons_runs, tmp_path):
    """ECT with --init-from and sCD from the teacher's weights: a quarter of the data kind's
    rate; from scratch the full rate; --lr always wins."""
    teacher = moons_runs / "teacher"
    ect = ["train", "--recipe", "ect", "--data", "moons", *TINY]
    scd = ["distill", "--recipe", "scd", "--teacher", teacher, *TINY]
    runs = {
        "a": [*ect, "--init-from", teacher],
        "b": ect,
        "c": [*ect, "--init-from", teacher, "--lr", "0.003"],
        "d": scd,
        "e": [*scd, "--no-init-from-teacher"],
    }
    for name, args in runs.items():
        assert run_cli(*args, "--out", tmp_path / name) == 0, name
    lr = {
        name: json.loads((tmp_path / name / "config.json").read_text())["training"]["lr"]
        for name in runs
    }
    full = VECTOR_DEFAULTS["lr"]
    assert lr == {"a": full / 4, "b": full, "c": 0.003, "d": full / 4, "e": full}


def test_karras_times_are_uniform_along_the_ramp():
    """t = (t_min^{1/ρ} + u·(t_max^{1/ρ} − t_min^{1/ρ}))^ρ with u ~ U(0, 1): mapped back, u is
    uniform, and t's median is the middle of the 3-point Karras grid."""
    process = EDMProcess()
    t = KarrasTimes()(process, 40000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.float64 and (t >= process.t_min).all() and (t <= process.t_max).all()
    lo, hi = process.t_min ** (1 / 7), process.t_max ** (1 / 7)
    u = (t ** (1 / 7) - lo) / (hi - lo)
    levels = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    assert torch.allclose(torch.quantile(u, levels), levels, atol=0.01)
    assert t.median().item() == pytest.approx(process.grid(3)[1].item(), rel=0.05)


def test_ect_time_dist_option_picks_the_times():
    from cmkit.recipes.ect import _times

    process = EDMProcess()
    assert _times(recipes.ECTOptions(), process) == KarrasTimes(process.rho)
    lognormal = recipes.ECTOptions(time_dist="lognormal", p_mean=-1.0, p_std=1.5)
    assert _times(lognormal, process) == LognormalTimes(-1.0, 1.5)
