"""Statistics for comparing groups of trials' final FIDs across seeds.

Pure functions of plain numbers (numpy and scipy only), so the leaderboard can report more than a t-test:
Holm-adjusted p-values, the probability of improvement with a bootstrap interval, Hedges' g, and intervals
of a mean.

Conventions:
- Lower FID is better. "group" is the configuration being judged, "baseline" the one it is compared with;
  differences are group - baseline, so a negative Hedges' g means the group is better.
- `paired=True` means the two sequences are aligned by seed (element i of each comes from the same seed);
  aligning them is the caller's job. Paired sequences of different lengths raise ValueError.
- Non-finite values (NaN, +inf, -inf) raise ValueError everywhere: a diverged trial's FID has no place in a
  mean or a rank, and the leaderboard decides how failures count before it calls these functions.
"""

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

ArrayLike = Sequence[float] | np.ndarray

BOOTSTRAP_MIN_N = 10
"""Fewest values for which a percentile bootstrap interval is reported without a warning.

The percentile bootstrap of a mean uses the plug-in standard deviation (divides by n) and normal-like tails, so
it is too narrow for small samples. Simulated on normal data, a nominal 95% interval of the mean covers the
true mean about 75% of the time at n = 3, 82% at n = 5, 88% at n = 8, 91-92% at n = 10 and 93-94% at n = 30.
From 10 on the shortfall is a few points; below it the interval misleads, hence the warning."""


# ---- input checks ----------------------------------------------------------------------------------


def _finite_array(values: ArrayLike, name: str) -> np.ndarray:
    """`values` as a 1-D float array; ValueError on NaN or infinity (see the module docstring for why)."""
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a one-dimensional sequence of numbers, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinity; pass finite values only")
    return array


def _nonempty_array(values: ArrayLike, name: str) -> np.ndarray:
    array = _finite_array(values, name)
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    return array


def _same_length(group: np.ndarray, baseline: np.ndarray) -> None:
    if len(group) != len(baseline):
        raise ValueError(f"paired samples differ in length: group has {len(group)}, baseline {len(baseline)}")


def _check_bootstrap_args(resamples: int, confidence: float) -> None:
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    _check_confidence(confidence)


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")


def _is_constant(values: np.ndarray) -> bool:
    # Exact test: the variance of equal floats computed through their mean may come out as 1e-34, not 0.
    return bool(np.all(values == values[0]))


# ---- multiple comparisons ---------------------------------------------------------------------------


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values of one family of tests.

    None entries (tests that could not be run) are skipped and stay None; the family size m counts only the
    others. With the p-values sorted ascending, the k-th (from 0) is multiplied by m - k, then a running maximum
    keeps the adjusted values in the raw order (step-down), and each is capped at 1. A p-value outside [0, 1],
    NaN included, raises ValueError.
    """
    present = [i for i, p in enumerate(p_values) if p is not None]
    raw = np.array([p_values[i] for i in present], dtype=float)
    if not np.all((raw >= 0.0) & (raw <= 1.0)):  # also False for NaN
        raise ValueError("p-values must be numbers in [0, 1] or None")
    adjusted: list[float | None] = [None] * len(p_values)
    for i, value in zip(present, _holm_adjust(raw), strict=True):
        adjusted[i] = float(value)
    return adjusted


def _holm_adjust(raw: np.ndarray) -> np.ndarray:
    m = len(raw)
    order = np.argsort(raw, kind="stable")
    scaled = (m - np.arange(m)) * raw[order]
    stepped = np.minimum(1.0, np.maximum.accumulate(scaled))
    adjusted = np.empty(m)
    adjusted[order] = stepped
    return adjusted


# ---- probability of improvement ---------------------------------------------------------------------


def _win_scores(group: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """1 where the group's FID is lower (better), 0.5 on a tie, 0 otherwise; broadcasts."""
    return (group < baseline) + 0.5 * (group == baseline)


def prob_improvement(group: ArrayLike, baseline: ArrayLike, paired: bool) -> float:
    """Probability that the group's FID is lower than the baseline's, ties counting half.

    Unpaired: over all n*m (group, baseline) pairs; this is U/(n*m) of the Mann-Whitney test counting the
    pairs in the group's favour (scipy's `mannwhitneyu(baseline, group).statistic`). Paired: over the n seed
    pairs (group[i], baseline[i]). 0.5 means no tendency either way. Empty input raises ValueError.
    """
    g, b = _nonempty_array(group, "group"), _nonempty_array(baseline, "baseline")
    if paired:
        _same_length(g, b)
        return float(np.mean(_win_scores(g, b)))
    return float(np.mean(_win_scores(g[:, None], b[None, :])))


def prob_improvement_ci(group: ArrayLike, baseline: ArrayLike, paired: bool, *, resamples: int = 10_000,
                        seed: int = 0, confidence: float = 0.95) -> tuple[float, float]:
    """Seeded percentile bootstrap interval of `prob_improvement`.

    Unpaired: each sample is resampled independently (they come from different seeds). Paired: seed pairs are
    resampled, which keeps whatever the two runs of a seed share. The same arguments give the same interval.
    Small samples give too narrow intervals: see BOOTSTRAP_MIN_N and `bootstrap_warning`.
    """
    g, b = _nonempty_array(group, "group"), _nonempty_array(baseline, "baseline")
    _check_bootstrap_args(resamples, confidence)
    if paired:
        _same_length(g, b)
        # The paired probability is the mean of the per-seed scores, so its bootstrap is that of a mean.
        return bootstrap_mean_ci(_win_scores(g, b), resamples=resamples, seed=seed, confidence=confidence)
    rng = np.random.default_rng(seed)
    counts_g = _resample_counts(rng, len(g), resamples)
    counts_b = _resample_counts(rng, len(b), resamples)
    # A resample's probability is the count-weighted mean of the n*m pair scores: one matrix product for all
    # resamples instead of materialising resamples*n*m pairs.
    weighted = (counts_g @ _win_scores(g[:, None], b[None, :])) * counts_b
    return _percentile_interval(weighted.sum(axis=1) / (len(g) * len(b)), confidence)


# ---- bootstrap machinery ----------------------------------------------------------------------------


def _resample_counts(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    """How often each of n values is drawn in each resample (resamples x n): a resample with replacement."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples)


def _percentile_interval(estimates: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(estimates, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_mean_ci(values: ArrayLike, *, resamples: int = 10_000, seed: int = 0,
                      confidence: float = 0.95) -> tuple[float, float]:
    """Seeded percentile bootstrap interval of the mean of `values`.

    Makes no normality assumption, but is too narrow below BOOTSTRAP_MIN_N values (see there); show
    `bootstrap_warning(n)` next to it. One value gives the degenerate interval (x, x); empty input raises
    ValueError. The same arguments give the same interval.
    """
    x = _nonempty_array(values, "values")
    _check_bootstrap_args(resamples, confidence)
    counts = _resample_counts(np.random.default_rng(seed), len(x), resamples)
    return _percentile_interval(counts @ x / len(x), confidence)


def bootstrap_warning(n: int) -> str | None:
    """One-line warning when a bootstrap interval rests on fewer than BOOTSTRAP_MIN_N values, else None."""
    if n >= BOOTSTRAP_MIN_N:
        return None
    return (f"bootstrap interval from {n} values (fewer than {BOOTSTRAP_MIN_N}): "
            "likely narrower than its stated confidence")


# ---- effect size and t interval ---------------------------------------------------------------------


def _small_sample_correction(df: int) -> float:
    """Hedges' J = 1 - 3/(4 df - 1): removes most of d's upward bias in small samples."""
    return 1.0 - 3.0 / (4.0 * df - 1.0)


def hedges_g(group: ArrayLike, baseline: ArrayLike, paired: bool) -> float | None:
    """Hedges' g of group - baseline: the bias-corrected standardised mean difference (negative: group better).

    Unpaired: (mean(group) - mean(baseline)) / pooled standard deviation, df = n + m - 2. Paired: d_z, the mean
    of the per-seed differences over their standard deviation, df = n - 1; it measures the difference against
    the seed-to-seed noise of the difference itself, which is what a paired comparison can detect (it is not
    comparable with the unpaired g, which measures against the spread of the FIDs). Both are multiplied by
    J = 1 - 3/(4 df - 1).

    None when undefined: fewer than 2 values in a group (unpaired), fewer than 3 pairs (paired: at df = 1 the
    correction J is 0, since d then has no finite mean), or zero variance (all values, or all differences,
    equal).
    """
    g, b = _finite_array(group, "group"), _finite_array(baseline, "baseline")
    if paired:
        _same_length(g, b)
        return _paired_g(g - b)
    return _unpaired_g(g, b)


def _paired_g(differences: np.ndarray) -> float | None:
    n = len(differences)
    if n < 3 or _is_constant(differences):
        return None
    d_z = np.mean(differences) / np.std(differences, ddof=1)
    return float(_small_sample_correction(n - 1) * d_z)


def _unpaired_g(group: np.ndarray, baseline: np.ndarray) -> float | None:
    n, m = len(group), len(baseline)
    if n < 2 or m < 2 or (_is_constant(group) and _is_constant(baseline)):
        return None
    df = n + m - 2
    pooled_var = ((n - 1) * np.var(group, ddof=1) + (m - 1) * np.var(baseline, ddof=1)) / df
    d = (np.mean(group) - np.mean(baseline)) / math.sqrt(pooled_var)
    return float(_small_sample_correction(df) * d)


def t_mean_ci(values: ArrayLike, confidence: float = 0.95) -> tuple[float | None, float | None]:
    """Mean of `values` and the half-width of its Student t interval (mean +- half_width).

    Assumes roughly normal values (a mean of seeds' FIDs usually is); same bounds as `scipy.stats.t.interval`.
    One value: (mean, None), no spread to estimate. No values: (None, None).
    """
    x = _finite_array(values, "values")
    _check_confidence(confidence)
    n = len(x)
    if n == 0:
        return None, None
    mean = float(np.mean(x))
    if n < 2:
        return mean, None
    standard_error = np.std(x, ddof=1) / math.sqrt(n)
    return mean, float(stats.t.ppf(0.5 + confidence / 2.0, n - 1) * standard_error)
