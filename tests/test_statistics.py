"""orchestrator.analysis.statistics against independent references (scipy.stats, statsmodels) and invariants."""

import gc
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from statsmodels.stats.multitest import multipletests

from orchestrator.analysis.statistics import (
    BOOTSTRAP_MIN_N,
    bootstrap_mean_ci,
    bootstrap_warning,
    hedges_g,
    holm,
    prob_improvement,
    prob_improvement_ci,
    t_mean_ci,
)

# FIDs with one decimal, as the leaderboard shows them: a coarse grid makes ties, which the rank statistics
# must count half, and keeps the data away from the ill-conditioning of near-constant floats.
fid = st.integers(0, 3000).map(lambda k: k / 10)
fids = st.lists(fid, min_size=1, max_size=12)
p_value = st.floats(0.0, 1.0)


def _pairs(min_size: int = 1):
    """Two equally long lists of FIDs (group, baseline), aligned by seed."""
    rows = st.lists(st.tuples(fid, fid), min_size=min_size, max_size=12)
    return rows.map(lambda pairs: ([g for g, _ in pairs], [b for _, b in pairs]))


# ---- holm -------------------------------------------------------------------------------------------


def test_holm_matches_statsmodels_on_random_families():
    rng = np.random.default_rng(1)
    # statsmodels' Holm ends each call with a full gc.collect(): a quarter of a second in a test process that has
    # imported torch and Ray. Freezing what exists makes that collection cheap; it changes no number.
    gc.freeze()
    try:
        for size in [1, 2, 3, 5, 8, 20]:
            for _ in range(6):
                # Mix small p-values with uniform ones so that both the cap at 1 and the running maximum act.
                raw = np.where(rng.random(size) < 0.5, rng.random(size) * 0.05, rng.random(size))
                expected = multipletests(raw, method="holm")[1]
                np.testing.assert_allclose(holm(list(raw)), expected, rtol=1e-12, atol=0)
    finally:
        gc.unfreeze()


def test_holm_matches_statsmodels_with_ties():
    raw = [0.01, 0.01, 0.04, 0.04, 0.3]
    np.testing.assert_allclose(holm(raw), multipletests(raw, method="holm")[1], rtol=1e-12)


def test_holm_hand_computation():
    # sorted 0.01, 0.02, 0.04 times 3, 2, 1 = 0.03, 0.04, 0.04; the running maximum changes nothing here.
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    # 0.02*3 = 0.06 > 0.025*2 = 0.05: the step-down keeps the second at 0.06.
    assert holm([0.02, 0.025, 0.9]) == pytest.approx([0.06, 0.06, 0.9])


def test_holm_skips_none_and_counts_only_the_others():
    assert holm([None, 0.01, None, 0.02]) == pytest.approx([None, 0.02, None, 0.02])
    assert holm([None, None]) == [None, None]
    assert holm([]) == []


@pytest.mark.parametrize("bad", [math.nan, -0.1, 1.5, math.inf])
def test_holm_refuses_p_values_outside_0_1(bad):
    with pytest.raises(ValueError, match="p-values"):
        holm([0.01, bad])


@given(st.lists(st.one_of(st.none(), p_value), max_size=15))
def test_holm_invariants(raw):
    adjusted = holm(raw)
    assert [a is None for a in adjusted] == [r is None for r in raw]
    pairs = [(r, a) for r, a in zip(raw, adjusted, strict=True) if r is not None]
    for r, a in pairs:
        assert r <= a <= 1.0
    for r_i, a_i in pairs:  # order-preserving
        for r_j, a_j in pairs:
            if r_i <= r_j:
                assert a_i <= a_j


@given(p_value)
def test_holm_family_of_one_is_unchanged(p):
    assert holm([p]) == [p]


# ---- probability of improvement ---------------------------------------------------------------------


def test_prob_improvement_is_mann_whitney_u_over_nm():
    rng = np.random.default_rng(2)
    for n, m in [(3, 5), (8, 8), (12, 4)]:
        group = np.round(rng.normal(40, 3, n), 1)
        baseline = np.round(rng.normal(42, 3, m), 1)
        # scipy's statistic is U of its first sample: pairs where it is greater, ties half. The group wins a
        # pair when its FID is lower, i.e. when the baseline's is greater: U of the baseline, first.
        expected = stats.mannwhitneyu(baseline, group).statistic / (n * m)
        assert prob_improvement(group, baseline, paired=False) == pytest.approx(expected)
        # Equivalently U_group + U_baseline = n*m.
        u_group = stats.mannwhitneyu(group, baseline).statistic
        assert prob_improvement(group, baseline, paired=False) == pytest.approx(1 - u_group / (n * m))


def test_prob_improvement_hand_computation():
    group, baseline = [10.0, 20.0], [15.0, 20.0, 30.0]
    # 10 beats all three; 20 loses to 15, ties 20, beats 30: (3 + 1.5) / 6.
    assert prob_improvement(group, baseline, paired=False) == pytest.approx(4.5 / 6)
    # Paired seed by seed: (10, 15) win, (20, 20) tie, (30, 25) loss.
    assert prob_improvement([10.0, 20.0, 30.0], [15.0, 20.0, 25.0], paired=True) == pytest.approx(1.5 / 3)


@given(fids, st.booleans())
def test_prob_improvement_of_identical_groups_is_one_half(values, paired):
    assert prob_improvement(values, values, paired=paired) == 0.5


@given(fids, fids)
def test_prob_improvement_is_antisymmetric_unpaired(group, baseline):
    both_ways = prob_improvement(group, baseline, paired=False) + prob_improvement(baseline, group, paired=False)
    assert both_ways == pytest.approx(1.0)


@given(_pairs())
def test_prob_improvement_paired_counts_seed_pairs(pair):
    group, baseline = pair
    pairs = list(zip(group, baseline, strict=True))
    wins = sum(g < b for g, b in pairs) + 0.5 * sum(g == b for g, b in pairs)
    assert prob_improvement(group, baseline, paired=True) == pytest.approx(wins / len(group))


def test_prob_improvement_refuses_bad_input():
    with pytest.raises(ValueError, match="empty"):
        prob_improvement([], [1.0], paired=False)
    with pytest.raises(ValueError, match="length"):
        prob_improvement([1.0, 2.0], [1.0], paired=True)


def test_prob_improvement_ci_is_deterministic_per_seed():
    rng = np.random.default_rng(10)
    group, baseline = np.round(rng.normal(40, 2, 15), 1), np.round(rng.normal(41, 2, 15), 1)
    for paired in (False, True):
        first = prob_improvement_ci(group, baseline, paired, seed=7)
        assert prob_improvement_ci(group, baseline, paired, seed=7) == first
        assert 0.0 <= first[0] <= prob_improvement(group, baseline, paired) <= first[1] <= 1.0
        # The statistic is discrete, so with 10,000 resamples its quantiles rarely move; with 50 they fall
        # between resamples and show that the seed drives the draws.
        assert len({prob_improvement_ci(group, baseline, paired, resamples=50, seed=s) for s in range(5)}) > 1


def test_prob_improvement_ci_unpaired_agrees_with_scipy_bootstrap():
    rng = np.random.default_rng(3)
    group, baseline = np.round(rng.normal(40, 2, 15), 1), np.round(rng.normal(41, 2, 12), 1)

    def statistic(g, b, axis):  # vectorised over scipy's resample axis
        return np.mean(((g[..., :, None] < b[..., None, :]) + 0.5 * (g[..., :, None] == b[..., None, :])),
                       axis=(-2, -1))

    reference = stats.bootstrap((group, baseline), statistic, n_resamples=10_000, method="percentile",
                                rng=np.random.default_rng(4), vectorized=True).confidence_interval
    low, high = prob_improvement_ci(group, baseline, paired=False)
    # Different random draws: the endpoints differ by Monte Carlo error, about 0.04 bootstrap SDs each at
    # 10,000 resamples; 0.2 SDs leaves room for that and still catches a wrong resampling scheme or quantile.
    bootstrap_sd = (reference.high - reference.low) / (2 * 1.96)
    assert low == pytest.approx(reference.low, abs=0.2 * bootstrap_sd)
    assert high == pytest.approx(reference.high, abs=0.2 * bootstrap_sd)


def test_prob_improvement_ci_paired_is_the_bootstrap_of_the_seed_scores():
    group, baseline = [10.0, 20.0, 30.0, 12.0], [15.0, 20.0, 25.0, 13.0]
    scores = [1.0, 0.5, 0.0, 1.0]
    assert prob_improvement_ci(group, baseline, True, resamples=500, seed=3) == bootstrap_mean_ci(
        scores, resamples=500, seed=3)


@settings(max_examples=50)
@given(fids, fids, st.booleans())
def test_prob_improvement_ci_lies_in_0_1(group, baseline, paired):
    if paired:
        baseline = (baseline * len(group))[: len(group)]
    low, high = prob_improvement_ci(group, baseline, paired, resamples=200)
    assert 0.0 <= low <= high <= 1.0


# ---- Hedges' g --------------------------------------------------------------------------------------


def test_hedges_g_unpaired_hand_computation():
    group, baseline = [1.0, 2.0, 3.0], [3.0, 4.0, 5.0, 6.0]
    # means 2 and 4.5; variances 1 and 5/3; pooled (2*1 + 3*5/3) / 5 = 1.4; d = -2.5/sqrt(1.4);
    # df = 5, J = 1 - 3/19 = 16/19.
    assert hedges_g(group, baseline, paired=False) == pytest.approx(16 / 19 * -2.5 / math.sqrt(1.4))


def test_hedges_g_paired_hand_computation():
    group, baseline = [10.0, 12.0, 11.0, 15.0], [11.0, 12.0, 14.0, 16.0]
    # differences -1, 0, -3, -1: mean -1.25, variance (0.0625 + 1.5625 + 3.0625 + 0.0625) / 3 = 4.75/3;
    # df = 3, J = 1 - 3/11 = 8/11.
    assert hedges_g(group, baseline, paired=True) == pytest.approx(8 / 11 * -1.25 / math.sqrt(4.75 / 3))


def test_hedges_g_against_t_statistics():
    rng = np.random.default_rng(5)
    for n, m in [(3, 3), (5, 9), (20, 20)]:
        group, baseline = rng.normal(40, 2, n), rng.normal(41, 3, m)
        # Student's t (pooled variance) is d / sqrt(1/n + 1/m).
        t = stats.ttest_ind(group, baseline, equal_var=True).statistic
        j = 1 - 3 / (4 * (n + m - 2) - 1)
        assert hedges_g(group, baseline, paired=False) == pytest.approx(j * t * math.sqrt(1 / n + 1 / m))
        # The paired t is d_z * sqrt(n).
        t_rel = stats.ttest_rel(group, baseline[:n]).statistic
        j_rel = 1 - 3 / (4 * (n - 1) - 1)
        assert hedges_g(group, baseline[:n], paired=True) == pytest.approx(j_rel * t_rel / math.sqrt(n))


def test_hedges_g_is_none_when_undefined():
    assert hedges_g([1.0], [1.0, 2.0], paired=False) is None
    assert hedges_g([], [], paired=False) is None
    assert hedges_g([1.0, 1.0], [1.0, 1.0, 1.0], paired=False) is None  # no variance
    assert hedges_g([0.1, 0.1, 0.1], [0.2, 0.2], paired=False) is None  # equal floats, not rounding noise
    assert hedges_g([1.0, 2.0], [2.0, 3.0], paired=True) is None  # df = 1: J = 0
    assert hedges_g([1.0, 2.0, 3.0], [2.0, 3.0, 4.0], paired=True) is None  # constant differences
    assert hedges_g([1.0, 1.0], [2.0, 4.0], paired=False) is not None  # one constant group is fine


@given(_pairs(min_size=3), st.booleans())
def test_hedges_g_changes_sign_when_swapped(pair, paired):
    group, baseline = pair
    g = hedges_g(group, baseline, paired)
    swapped = hedges_g(baseline, group, paired)
    assert (g is None) == (swapped is None)
    if g is not None:
        assert swapped == pytest.approx(-g, rel=1e-9, abs=1e-12)


@given(_pairs(min_size=3), st.booleans(), st.floats(0.1, 10), st.floats(-100, 100))
def test_hedges_g_is_invariant_to_units(pair, paired, scale, shift):
    group, baseline = pair
    g = hedges_g(group, baseline, paired)
    moved = hedges_g([scale * x + shift for x in group], [scale * x + shift for x in baseline], paired)
    if g is not None and moved is not None:  # rounding can make a near-constant sample exactly constant
        assert moved == pytest.approx(g, rel=1e-6, abs=1e-9)


# ---- intervals of a mean ----------------------------------------------------------------------------


def test_bootstrap_mean_ci_is_deterministic_per_seed():
    values = [40.1, 41.5, 39.8, 42.0, 40.7, 43.1, 39.9, 41.2, 40.0, 42.5]
    first = bootstrap_mean_ci(values, seed=11)
    assert bootstrap_mean_ci(values, seed=11) == first
    assert bootstrap_mean_ci(values, seed=12) != first
    assert first[0] < np.mean(values) < first[1]


def test_bootstrap_mean_ci_agrees_with_scipy_bootstrap():
    values = np.random.default_rng(6).normal(40, 3, 25)
    reference = stats.bootstrap((values,), np.mean, n_resamples=10_000, method="percentile",
                                rng=np.random.default_rng(7)).confidence_interval
    low, high = bootstrap_mean_ci(values)
    sd = np.std(values) / math.sqrt(len(values))  # the bootstrap SD of a mean
    # Monte Carlo error of either endpoint at 10,000 resamples is about 0.03 SD; see the test above.
    assert low == pytest.approx(reference.low, abs=0.2 * sd)
    assert high == pytest.approx(reference.high, abs=0.2 * sd)


def test_bootstrap_mean_ci_covers_the_true_mean_about_95_percent_at_n_30():
    rng = np.random.default_rng(8)
    n, datasets = 30, 800
    hits = 0
    for seed in range(datasets):
        low, high = bootstrap_mean_ci(rng.normal(0.0, 1.0, n), resamples=2000, seed=seed)
        hits += low <= 0.0 <= high
    # The percentile interval of a mean is about mean +- 1.96 * sd_plugin / sqrt(n), so its coverage on normal
    # data is P(|t_29| <= 1.96 * sqrt(29/30)) = 0.936, not 0.95. With 800 datasets the observed rate has a
    # standard error of sqrt(0.936 * 0.064 / 800) = 0.009; the bounds are about 3 SE either side of 0.936
    # (2,000 resamples add little noise). A 90% interval (0.89) or one twice too wide (~1.0) fails.
    assert 0.91 <= hits / datasets <= 0.965


def test_bootstrap_mean_ci_degenerate_and_bad_input():
    assert bootstrap_mean_ci([42.0]) == (42.0, 42.0)
    with pytest.raises(ValueError, match="empty"):
        bootstrap_mean_ci([])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_mean_ci([1.0, 2.0], confidence=1.0)
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_mean_ci([1.0, 2.0], resamples=0)


def test_bootstrap_warning_below_the_minimum_only():
    assert BOOTSTRAP_MIN_N == 10
    for n in [0, 1, 5, BOOTSTRAP_MIN_N - 1]:
        warning = bootstrap_warning(n)
        assert warning is not None and "\n" not in warning and str(n) in warning
    assert bootstrap_warning(BOOTSTRAP_MIN_N) is None
    assert bootstrap_warning(100) is None


def test_t_mean_ci_matches_scipy():
    rng = np.random.default_rng(9)
    for n in [2, 3, 10, 40]:
        values = rng.normal(40, 3, n)
        for confidence in [0.9, 0.95, 0.99]:
            mean, half = t_mean_ci(values, confidence)
            low, high = stats.t.interval(confidence, n - 1, loc=np.mean(values), scale=stats.sem(values))
            assert mean == pytest.approx(np.mean(values))
            assert (mean - half, mean + half) == pytest.approx((low, high))
        # The same interval as the one-sample t-test's.
        ci = stats.ttest_1samp(values, 0.0).confidence_interval(0.95)
        mean, half = t_mean_ci(values)
        assert (mean - half, mean + half) == pytest.approx((ci.low, ci.high))


def test_t_mean_ci_small_samples():
    assert t_mean_ci([]) == (None, None)
    assert t_mean_ci([41.5]) == (41.5, None)
    assert t_mean_ci([3.0, 3.0, 3.0]) == (3.0, 0.0)


# ---- non-finite input -------------------------------------------------------------------------------


CALLS = {
    "prob_improvement": lambda x: prob_improvement(x, [1.0, 2.0, 3.0], paired=False),
    "prob_improvement paired": lambda x: prob_improvement([1.0, 2.0, 3.0], x, paired=True),
    "prob_improvement_ci": lambda x: prob_improvement_ci(x, [1.0, 2.0, 3.0], paired=False, resamples=10),
    "hedges_g": lambda x: hedges_g(x, [1.0, 2.0, 3.0], paired=False),
    "hedges_g paired": lambda x: hedges_g([1.0, 2.0, 3.0], x, paired=True),
    "bootstrap_mean_ci": lambda x: bootstrap_mean_ci(x, resamples=10),
    "t_mean_ci": t_mean_ci,
}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", CALLS)
def test_non_finite_values_are_refused(name, bad):
    with pytest.raises(ValueError, match="NaN or infinity"):
        CALLS[name]([1.0, bad, 2.0])
