"""Each group against a baseline group: difference in mean FID with its 95% CI, the p-value of a t-test and its
Holm adjustment within the block, the probability of improvement with its bootstrap CI, and Hedges' g.

- The baseline of a group is the baseline group (e.g. variant=dcgan) with the same values of the other
  --group-by columns; a baseline whose value of a column is null (dcgan has no heads) matches every value, so
  `--group-by variant,heads --baseline variant=dcgan` compares every heads setting with dcgan. An exact match
  is preferred to one through a null.
- Paired t-test (scipy's `ttest_rel`) when both groups measured the same seeds and the same values of every
  other parameter not grouped by, once each; Welch's t-test (`ttest_ind(equal_var=False)`) otherwise.
- A row without a comparison says why (`no_comparison_reason`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from orchestrator.analysis.measure import LeaderboardError, _finite_or_none, _plain
from orchestrator.analysis.statistics import hedges_g, holm, prob_improvement, prob_improvement_ci

COMPARISON_FIELDS = ("diff_fid", "diff_ci95_low", "diff_ci95_high", "p_value", "p_holm", "test", "prob_improvement",
                     "prob_improvement_ci95_low", "prob_improvement_ci95_high", "hedges_g", "no_comparison_reason")


@dataclass
class Baseline:
    column: str
    value: Any
    text: str = field(default="")


def parse_baseline(text: str, by: list[str], trials: pd.DataFrame) -> Baseline:
    column, sep, raw = text.partition("=")
    column, raw = column.strip(), raw.strip()
    if not sep or not column or not raw:
        raise LeaderboardError(f"--baseline {text!r}: expected KEY=VALUE, e.g. variant=dcgan")
    if column not in by:
        raise LeaderboardError(f"--baseline {text!r}: {column!r} is not a --group-by column ({', '.join(by)})")
    present = {str(_plain(v)): _plain(v) for v in trials[column].dropna().unique()}
    if raw not in present:
        raise LeaderboardError(f"--baseline {text!r}: no trial has {column}={raw} "
                               f"(values: {', '.join(sorted(present))})")
    return Baseline(column, present[raw], f"{column}={raw}")


def compare(groups: list[dict[str, Any]], by: list[str], baseline: Baseline, pair_on: list[str]) -> None:
    """Fill each group's comparison with its baseline group; Holm-adjust the p-values of the block."""
    others = [c for c in by if c != baseline.column]
    bases = [g for g in groups if g[baseline.column] == baseline.value]
    for g in groups:
        g.update(baseline=baseline.text, is_baseline=g[baseline.column] == baseline.value,
                 **dict.fromkeys(COMPARISON_FIELDS))
        if g["is_baseline"]:
            g["no_comparison_reason"] = "the baseline"
            continue
        base, why = _find_baseline(g, bases, others, baseline)
        if base is None:
            g["no_comparison_reason"] = why
        elif g["_refused"]:
            g["no_comparison_reason"] = f"mixes {g['n_configs']} configurations (add {g['pooled_over']} to " \
                                        "--group-by, or --pool)"
        elif base["_refused"]:
            g["no_comparison_reason"] = (f"its baseline mixes {base['n_configs']} configurations (add "
                                         f"{base['pooled_over']} to --group-by, or --pool)")
        else:
            g.update(difference(g["_values"], base["_values"], pair_on))
    # The family is every comparison of this block: each p-value is Holm-adjusted within it.
    for g, adjusted in zip(groups, holm([g["p_value"] for g in groups]), strict=True):
        g["p_holm"] = adjusted


def _find_baseline(g: dict[str, Any], bases: list[dict[str, Any]], others: list[str],
                   baseline: Baseline) -> tuple[dict[str, Any] | None, str | None]:
    """The baseline group for g: equal on every other --group-by column, or null there (the baseline does not
    have that parameter); the fewest nulls wins, and a tie between different groups compares nothing."""
    fits = [b for b in bases if all(b[c] is None or b[c] == g[c] for c in others)]
    where = ", ".join(f"{c}={'-' if g[c] is None else g[c]}" for c in others)
    if not fits:
        return None, f"no {baseline.text} group with {where}" if where else f"no {baseline.text} group here"
    fewest = min(sum(b[c] is None for c in others) for b in fits)
    best = [b for b in fits if sum(b[c] is None for c in others) == fewest]
    if len(best) > 1:
        return None, f"{len(best)} {baseline.text} groups fit {where}: ambiguous"
    return best[0], None


def difference(group: pd.DataFrame, base: pd.DataFrame, pair_on: list[str]) -> dict[str, Any]:
    """Mean FID of `group` minus that of `base`, 95% CI and p-value: paired t-test when both measured the
    same seeds (and other parameters) once each, Welch's t-test otherwise; the probability of improvement
    (rliable: lower FID is better, ties count half) with its bootstrap CI, and Hedges' g."""
    if len(group) < 2 or len(base) < 2:
        return {"test": "n < 2", "no_comparison_reason": f"n < 2: {len(group)} measured trial(s) here, "
                                                          f"{len(base)} in the baseline"}
    keys_g = [tuple(str(v) for v in r) for r in group[pair_on].itertuples(index=False)]
    keys_b = [tuple(str(v) for v in r) for r in base[pair_on].itertuples(index=False)]
    with warnings.catch_warnings():  # equal values (a constant difference): no variance, p and CI null
        warnings.simplefilter("ignore", RuntimeWarning)
        if pair_on and len(set(keys_g)) == len(keys_g) and sorted(keys_g) == sorted(keys_b):
            a = group.assign(_k=keys_g).sort_values("_k")["fid"].to_numpy(float)
            b = base.assign(_k=keys_b).sort_values("_k")["fid"].to_numpy(float)
            result = stats.ttest_rel(a, b)
            test, diff, paired = "paired t", float(np.mean(a - b)), True
        else:
            a, b = np.sort(group["fid"].to_numpy(float)), np.sort(base["fid"].to_numpy(float))  # order-free bootstrap
            result = stats.ttest_ind(a, b, equal_var=False)
            test, diff, paired = "Welch t", float(np.mean(a) - np.mean(b)), False
        low, high = result.confidence_interval(0.95)
    pi_low, pi_high = prob_improvement_ci(a, b, paired)
    return {"diff_fid": diff, "diff_ci95_low": _finite_or_none(low), "diff_ci95_high": _finite_or_none(high),
            "p_value": _finite_or_none(result.pvalue), "test": test,
            "prob_improvement": prob_improvement(a, b, paired), "prob_improvement_ci95_low": pi_low,
            "prob_improvement_ci95_high": pi_high, "hedges_g": hedges_g(a, b, paired)}
