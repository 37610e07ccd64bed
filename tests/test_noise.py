"""Noise grids, curricula, index samplers and the two noise processes (reference §1, §3, §4, §6)."""

import math

import pytest
import torch

from cmkit.errors import UserError
from cmkit.noise import (
    CTCurriculum,
    FixedScales,
    ICTCurriculum,
    karras_sigmas,
    lognormal_index_probs,
)
from cmkit.param import ConsistencyFunction, EDMDenoiser, FlowParam
from cmkit.process import EDMProcess, FlowProcess, process_from_dict
from cmkit.training_times import LognormalIndices, uniform_indices

# ---------------------------------------------------------------- Karras grid


@pytest.mark.parametrize(
    "n, sigma_min, sigma_max, rho",
    [(5, 0.002, 80.0, 7.0), (18, 0.002, 80.0, 7.0), (2, 0.01, 1.0, 3.0), (1281, 0.002, 80.0, 7.0)],
)
def test_karras_endpoints_order_length(n, sigma_min, sigma_max, rho):
    grid = karras_sigmas(n, sigma_min, sigma_max, rho)
    assert grid.shape == (n,)
    assert grid.dtype == torch.float64
    assert grid[0].item() == sigma_min  # exactly, not approximately
    assert grid[-1].item() == sigma_max
    assert (grid[1:] > grid[:-1]).all()


@pytest.mark.parametrize("sigma_min, sigma_max, rho", [(0.002, 80.0, 7.0), (0.1, 10.0, 3.0)])
def test_karras_matches_formula_n5(sigma_min, sigma_max, rho):
    # t_i = (ε^{1/ρ} + (i−1)/(N−1)·(T^{1/ρ} − ε^{1/ρ}))^ρ, i = 1..5, written out term by term
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    expected = [
        lo**rho,
        (lo + 0.25 * (hi - lo)) ** rho,
        (lo + 0.50 * (hi - lo)) ** rho,
        (lo + 0.75 * (hi - lo)) ** rho,
        hi**rho,
    ]
    grid = karras_sigmas(5, sigma_min, sigma_max, rho)
    torch.testing.assert_close(
        grid, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0
    )


def test_karras_known_value():
    # middle point of the default 3-point grid: ((0.002^{1/7} + 80^{1/7})/2)^7 ≈ 2.5160
    mid = ((0.002 ** (1 / 7) + 80 ** (1 / 7)) / 2) ** 7
    assert karras_sigmas(3, 0.002, 80.0)[1].item() == pytest.approx(mid, rel=1e-12)
    assert mid == pytest.approx(2.516, abs=1e-3)


@pytest.mark.parametrize(
    "n, sigma_min, sigma_max",
    [(1, 0.002, 80.0), (0, 0.002, 80.0), (5, 80.0, 80.0), (5, 1.0, 0.5), (5, -0.1, 1.0)],
)
def test_karras_rejects_bad_args(n, sigma_min, sigma_max):
    with pytest.raises(UserError):
        karras_sigmas(n, sigma_min, sigma_max)


# ---------------------------------------------------------------- curricula


@pytest.mark.parametrize("s0", [2, 5, 10])
def test_ct_curriculum_starts_at_s0(s0):
    # ⌈√(s0²) − 1⌉ + 1 = s0
    assert CTCurriculum(total_steps=1000, s0=s0, s1=150).scales(0) == s0


@pytest.mark.parametrize("s0, s1, total", [(2, 150, 1000), (2, 200, 37), (5, 20, 10)])
def test_ct_curriculum_ends_at_s1_plus_one_and_is_monotone(s0, s1, total):
    cur = CTCurriculum(total_steps=total, s0=s0, s1=s1)
    values = [cur.scales(k) for k in range(total + 1)]
    assert values[-1] == s1 + 1
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert cur.scales(10 * total) == s1 + 1  # clamped after the end


@pytest.mark.parametrize(
    "k, expected",
    [
        # K = 100, s0 = 2, s1 = 150: √(k/100·(151² − 4) + 4), then ⌈· − 1⌉ + 1
        (1, 16),  # √(227.97 + 4) = 15.231 -> ⌈14.231⌉ + 1
        (50, 107),  # √(11398.5 + 4) = 106.78 -> ⌈105.78⌉ + 1
        (99, 151),  # √(22569.03 + 4) = 150.24 -> ⌈149.24⌉ + 1
    ],
)
def test_ct_curriculum_values_by_hand(k, expected):
    assert CTCurriculum(total_steps=100, s0=2, s1=150).scales(k) == expected


def test_ct_mu_variants():
    paper = CTCurriculum(total_steps=100, s0=2, s1=150, mu0=0.9, variant="paper")
    openai = CTCurriculum(total_steps=100, s0=2, s1=150, mu0=0.9, variant="openai")
    # k = 0: N = 2; paper exp(2·ln 0.9 / 2) = 0.9, openai exp(2·ln 0.9 / 1) = 0.81
    assert paper.target_mu(0) == pytest.approx(0.9, rel=1e-12)
    assert openai.target_mu(0) == pytest.approx(0.81, rel=1e-12)
    # k = K: N = 151
    assert paper.target_mu(100) == pytest.approx(0.9 ** (2 / 151), rel=1e-12)
    assert openai.target_mu(100) == pytest.approx(0.9 ** (2 / 150), rel=1e-12)
    mus = [paper.target_mu(k) for k in range(101)]
    assert all(b >= a for a, b in zip(mus, mus[1:], strict=False))
    assert all(0 < m < 1 for m in mus)


def test_ict_curriculum_default():
    cur = ICTCurriculum(total_steps=8000)  # s0 = 10, s1 = 1280: K' = ⌊8000 / (log2 128 + 1)⌋ = 1000
    assert cur.scales(0) == 11
    assert cur.scales(999) == 11
    assert cur.scales(1000) == 21
    assert cur.scales(1999) == 21
    assert cur.scales(2000) == 41
    assert cur.scales(6999) == 641
    assert cur.scales(7000) == 1281
    assert cur.scales(8000) == 1281
    assert cur.scales(100_000) == 1281  # capped at s1 + 1
    assert all(cur.target_mu(k) == 0 for k in (0, 1000, 8000))


def test_ict_curriculum_non_power_of_two_ratio():
    # s1/s0 = 15: K' = ⌊1000 / (log2 15 + 1)⌋ = ⌊1000 / 4.9069⌋ = 203
    cur = ICTCurriculum(total_steps=1000, s0=10, s1=150)
    assert [cur.scales(k) for k in (0, 202, 203, 405, 406, 609, 812, 1000)] == [
        11,
        11,
        21,
        21,
        41,
        81,
        151,
        151,
    ]


def test_fixed_scales():
    sched = FixedScales(18, 0.95)
    assert [sched.scales(k) for k in (0, 5, 10**6)] == [18, 18, 18]
    assert sched.target_mu(123) == 0.95


# ---------------------------------------------------------------- index samplers


def test_lognormal_probs_by_hand_on_four_points():
    grid = torch.tensor([0.01, 0.1, 1.0, 10.0], dtype=torch.float64)
    p_mean, p_std = -1.1, 2.0

    def cdf(s):
        return math.erf((math.log(s) - p_mean) / (math.sqrt(2) * p_std))

    raw = [cdf(0.1) - cdf(0.01), cdf(1.0) - cdf(0.1), cdf(10.0) - cdf(1.0)]
    expected = torch.tensor([r / sum(raw) for r in raw], dtype=torch.float64)
    probs = lognormal_index_probs(grid, p_mean, p_std)
    assert probs.shape == (3,)
    torch.testing.assert_close(probs, expected, rtol=1e-12, atol=0)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-12)
    # ln σ is centred at −1.1 (σ ≈ 0.33): the middle interval [0.1, 1] is the most likely one
    assert probs.argmax().item() == 1


@pytest.mark.parametrize("n", [2, 11, 1281])
def test_lognormal_probs_sum_to_one(n):
    probs = lognormal_index_probs(EDMProcess().grid(n))
    assert probs.shape == (n - 1,)
    assert (probs >= 0).all()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-12)


def test_lognormal_indices_range_reproducible_and_distributed():
    grid = EDMProcess().grid(11)
    lognormal_indices = LognormalIndices()
    a = lognormal_indices(grid, 20000, torch.Generator().manual_seed(3))
    b = lognormal_indices(grid, 20000, torch.Generator().manual_seed(3))
    c = lognormal_indices(grid, 20000, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 9
    freq = torch.bincount(a, minlength=10).double() / len(a)
    torch.testing.assert_close(freq, lognormal_index_probs(grid), atol=0.015, rtol=0)


def test_uniform_indices_range_and_reproducible():
    grid = EDMProcess().grid(6)
    a = uniform_indices(grid, 5000, torch.Generator().manual_seed(0))
    b = uniform_indices(grid, 5000, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert a.shape == (5000,)
    assert set(a.tolist()) == {0, 1, 2, 3, 4}  # pairs (t_n, t_{n+1}): n ≤ N − 2
    freq = torch.bincount(a).double() / len(a)
    torch.testing.assert_close(freq, torch.full((5,), 0.2, dtype=torch.float64), atol=0.03, rtol=0)
    two = EDMProcess().grid(2)
    assert set(uniform_indices(two, 100, torch.Generator().manual_seed(1)).tolist()) == {0}


# ---------------------------------------------------------------- processes


def _x0_t_z():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, generator=g, dtype=torch.float64)
    z = torch.randn(3, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    return x0, t, z


def test_edm_process_formulas():
    proc = EDMProcess()
    x0, t, z = _x0_t_z()
    expected = torch.stack([x0[i] + t[i] * z[i] for i in range(3)])
    torch.testing.assert_close(proc.perturb(x0, t, z), expected, rtol=1e-15, atol=0)
    torch.testing.assert_close(proc.prior(z), 80.0 * z, rtol=1e-15, atol=0)
    tau = 0.821
    torch.testing.assert_close(
        proc.renoise(x0, tau, z), x0 + math.sqrt(tau**2 - 0.002**2) * z, rtol=1e-15, atol=0
    )
    assert (proc.t_min, proc.t_max) == (0.002, 80.0)


def test_flow_process_formulas():
    proc = FlowProcess()
    x0, _, z = _x0_t_z()
    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    expected = torch.stack([(1 - t[i]) * x0[i] + t[i] * z[i] for i in range(3)])
    torch.testing.assert_close(proc.perturb(x0, t, z), expected, rtol=1e-15, atol=0)
    assert torch.equal(proc.perturb(x0, t, z)[0], x0[0])  # t = 0 is the data
    assert torch.equal(proc.perturb(x0, t, z)[2], z[2])  # t = 1 is the noise
    assert torch.equal(proc.prior(z), z)
    torch.testing.assert_close(proc.renoise(x0, 0.3, z), 0.7 * x0 + 0.3 * z, rtol=1e-15, atol=0)
    assert (proc.t_min, proc.t_max) == (0.0, 1.0)


@pytest.mark.parametrize("proc", [EDMProcess(), EDMProcess(0.01, 10.0, 3.0, 1.0), FlowProcess()])
@pytest.mark.parametrize("k", [2, 3, 18])
def test_sampling_times(proc, k):
    times = proc.sampling_times(k)
    assert times.shape == (k + 1,)
    assert times[0].item() == proc.t_max
    assert times[-1].item() == 0.0
    assert (times[1:] < times[:-1]).all()


def test_sampling_times_values():
    edm = EDMProcess()
    times = edm.sampling_times(3)
    torch.testing.assert_close(times[:-1], karras_sigmas(3, 0.002, 80.0).flip(0), rtol=0, atol=0)
    assert times[-2].item() == 0.002
    torch.testing.assert_close(
        FlowProcess().sampling_times(4),
        torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64),
    )
    torch.testing.assert_close(
        FlowProcess().sampling_times(1), torch.tensor([1.0, 0.0], dtype=torch.float64)
    )


def test_grids_ascending():
    torch.testing.assert_close(
        FlowProcess().grid(5), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    )
    g = EDMProcess().grid(18)
    assert g[0].item() == 0.002 and g[-1].item() == 80.0


@pytest.mark.parametrize(
    "proc", [EDMProcess(), EDMProcess(sigma_min=0.01, sigma_max=5.0, rho=3.0, sigma_data=1.0)]
)
def test_process_dict_round_trip(proc):
    d = proc.to_dict()
    assert d["name"] == "edm"
    rebuilt = process_from_dict(d)
    assert rebuilt == proc
    assert rebuilt.sigma_data == proc.sigma_data and rebuilt.rho == proc.rho


def test_flow_dict_round_trip():
    assert process_from_dict(FlowProcess().to_dict()) == FlowProcess()
    assert isinstance(process_from_dict({"name": "flow"}), FlowProcess)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sigma_min": 1.0, "sigma_max": 0.5},
        {"sigma_min": 1.0, "sigma_max": 1.0},
        {"sigma_min": 0.0},
        {"sigma_min": -0.002},
        {"sigma_data": 0.0},
        {"rho": -7.0},
    ],
)
def test_edm_process_rejects_bad_args(kwargs):
    with pytest.raises(UserError):
        EDMProcess(**kwargs)


def test_process_from_dict_unknown_name():
    with pytest.raises(UserError, match="unknown process"):
        process_from_dict({"name": "vp"})


def test_process_wrappers():
    net = torch.nn.Linear(2, 2)
    edm = EDMProcess(sigma_data=0.7, sigma_min=0.01)
    f = edm.consistency(net)
    assert isinstance(f, ConsistencyFunction)
    assert (f.sigma_data, f.sigma_min) == (0.7, 0.01)
    d = edm.denoiser(net)
    assert isinstance(d, EDMDenoiser) and d.sigma_data == 0.7
    assert isinstance(FlowProcess().consistency(net), FlowParam)
    assert isinstance(FlowProcess().denoiser(net), FlowParam)
