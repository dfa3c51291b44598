"""Groups of trials (e.g. variants across seeds): counts, mean with a 95% interval, ranking key, comparisons.

- Counts per block: a group's row in a block counts the trials planned to be measured that way (measure.py).
- No silent pooling: a group whose trials differ in a parameter outside --group-by (other than seed and repeat)
  mixes configurations. It shows `n_configs`; its mean, interval, key and tests stay null unless `pool`.
- Ranks only for numbers: a group is ranked when its key (the median FID over completed and diverged trials,
  a diverged trial counting as +inf; orchestrator.store.failures) is finite and rests on at least 2 trials.
- Comparisons (comparisons.py): with a baseline, each group against the baseline group of the same values of
  the other --group-by columns, a baseline's null (a parameter it does not have) matching every value.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from orchestrator.analysis.comparisons import Baseline, compare
from orchestrator.analysis.measure import (
    Block,
    LeaderboardError,
    Measured,
    _plain,
    block_fields,
    in_block,
    ordered_blocks,
)
from orchestrator.analysis.statistics import bootstrap_mean_ci, bootstrap_warning, t_mean_ci
from orchestrator.store.failures import DIVERGED, UNFINISHED, finite_or_none
from orchestrator.store.reader import parameter_names

CI_METHODS = ("t", "bootstrap")  # --ci: interval of a group's mean
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
REPLICATES = ("seed", "repeat")  # parameters whose values are replicates of one configuration
MIN_RANKED = 2  # trials a group's ranking key must rest on


def mean_interval(values: Any, method: str = "t") -> dict[str, Any]:
    """Mean and 95% interval: Student t (symmetric: `half`) or a seeded percentile bootstrap (low, high)."""
    # Sorted: the bootstrap's draws then depend on the values only, never on the order of rows in the tables.
    x = np.sort(np.asarray([float(v) for v in values if v is not None and math.isfinite(float(v))], dtype=float))
    out: dict[str, Any] = {"mean": None, "half": None, "low": None, "high": None, "warning": None}
    if len(x) == 0:
        return out
    out["mean"] = float(np.mean(x))
    if len(x) < 2:
        return out
    if method == "bootstrap":
        out["low"], out["high"] = bootstrap_mean_ci(x, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED)
        out["warning"] = bootstrap_warning(len(x))
    else:
        _, out["half"] = t_mean_ci(x)
        out["low"], out["high"] = out["mean"] - out["half"], out["mean"] + out["half"]
    return out


def config_columns(trials: pd.DataFrame, by: list[str]) -> list[str]:
    """Parameters that make trials different configurations: all but --group-by and the replicates."""
    return [c for c in parameter_names(trials) if c not in by and c not in REPLICATES]


def configurations(group: pd.DataFrame, columns: list[str]) -> tuple[int, list[str]]:
    """How many configurations a group's trials hold, and the parameters in which they differ."""
    if not columns:
        return 1, []
    keys = group[columns].map(lambda v: repr(_plain(v)))
    differ = [c for c in columns if keys[c].nunique() > 1]
    return len(keys.drop_duplicates()), differ


def pooling_refusal(by: list[str], columns: list[str]) -> str:
    """The one line that refuses a mean over several configurations, naming what to add to --group-by."""
    return (f"--group-by {','.join(by)}: every group mixes configurations that differ in {', '.join(columns)}; "
            f"add {'it' if len(columns) == 1 else 'them'} (--group-by {','.join([*by, *columns])}), or pass "
            "--pool to average over them")


def group_trials(
    trials: pd.DataFrame, measured: Measured, by: list[str], blocks: dict[str, Block], *,
    top: int | None = None, baseline: Baseline | None = None, failures: str = "include", ci: str = "t",
    pool: bool = False, rung_samples: Any = None,
) -> list[dict[str, Any]]:
    """One row per group and block: counts by status, configurations, the ranking key, mean and interval of
    the measured FID and IS, where ASHA culled it, and (with a baseline) its comparison."""
    missing = [c for c in by if c not in trials.columns]
    if missing:
        raise LeaderboardError(f"--group-by: unknown column(s) {missing}; parameters are {parameter_names(trials)}")
    pair_on = [c for c in parameter_names(trials) if c not in by]  # seeds and whatever else varies
    config_on = config_columns(trials, by)
    rows: list[dict[str, Any]] = []
    every_group_pools, differ_all = True, []
    for block in ordered_blocks(blocks, set(measured.values["trial_id"])):
        part = trials[[blocks[t] == block for t in trials["trial_id"]]]
        values = in_block(measured.values, blocks, block).merge(trials[["trial_id", *by, *pair_on]], on="trial_id")
        groups = []
        for _, g in part.groupby(by, dropna=False, sort=True):
            row = _group_row(g, values, by, config_on, measured.prefix, failures, ci, pool, rung_samples)
            row.update(block_fields(block))
            every_group_pools &= row["n_configs"] > 1
            differ_all += [c for c in row["_differ"] if c not in differ_all]
            groups.append(row)
        groups.sort(key=lambda r: _group_order(r, measured.prefix))
        if baseline is not None:
            compare(groups, by, baseline, pair_on)
        ranks = iter(range(1, len(groups) + 1))
        for row in groups[:top] if top else groups:
            rows.append({"rank": next(ranks) if row["_ranked"] else None,
                         **{k: v for k, v in row.items() if not k.startswith("_")}})
    if every_group_pools and not pool:
        raise LeaderboardError(pooling_refusal(by, [c for c in config_on if c in differ_all]))
    return rows


def _group_row(g: pd.DataFrame, values: pd.DataFrame, by: list[str], config_on: list[str], p: str,
               failures: str, ci: str, pool: bool, rung_samples: Any) -> dict[str, Any]:
    mine = values[values["trial_id"].isin(g["trial_id"])]
    n_configs, differ = configurations(g, config_on)
    refused = n_configs > 1 and not pool
    # Diverged trials without a measured number count as the worst outcome in the key (not in the mean).
    lost = int(((g["status"] == DIVERGED) & ~g["trial_id"].isin(mine["trial_id"])).sum())
    key_values = [*mine["fid"].astype(float), *([math.inf] * lost if failures == "include" else [])]
    rank_key = None if refused or not key_values else float(np.median(key_values))
    fid = mean_interval([] if refused else mine["fid"], ci)
    isc = mean_interval([] if refused else mine["isc"].dropna(), ci)
    status = g["status"]
    stopped = g[g["stopped_at_kimg"].notna()]
    rung = _plain(stopped["stopped_at_kimg"].max()) if not stopped.empty else None
    ranked = rank_key is not None and math.isfinite(rank_key) and len(key_values) >= MIN_RANKED
    return {
        **{c: _plain(g[c].iloc[0]) for c in by},  # the key itself may have become a float
        "n": len(g),
        "n_measured": len(mine),
        "n_completed": int((status == "completed").sum()),
        "n_stopped_early": int((status == "stopped_early").sum()),
        "n_diverged": int((status == DIVERGED).sum()),
        "n_error": int((status == "error").sum()),
        "n_unfinished": int(status.isin(UNFINISHED).sum()),
        "n_configs": n_configs,
        "pooled_over": ", ".join(differ) if n_configs > 1 else None,
        f"{p}fid_median": finite_or_none(rank_key),
        f"{p}fid_mean": fid["mean"], f"{p}fid_ci95": fid["half"],
        f"{p}fid_ci95_low": fid["low"], f"{p}fid_ci95_high": fid["high"],
        f"{p}is_mean": isc["mean"], f"{p}is_ci95": isc["half"],
        f"{p}is_ci95_low": isc["low"], f"{p}is_ci95_high": isc["high"],
        "ci_method": ci, "ci_warning": fid["warning"],
        # Where ASHA culled this group (the latest rung any of its trials reached, and the metric it judged
        # there: the mean over seeds with unit config), and how many images that FID used.
        "stopped_at_kimg": rung,
        "stopped_metric": (_plain(stopped.loc[stopped["stopped_at_kimg"] == rung, "stopped_metric"].mean())
                           if rung is not None else None),
        "stopped_fid_samples": rung_samples(rung) if rung is not None and rung_samples else None,
        "unranked_reason": None if ranked else _unranked_reason(refused, n_configs, differ, rank_key, lost,
                                                                len(key_values), by),
        "_values": mine, "_key": rank_key, "_ranked": ranked, "_refused": refused, "_differ": differ,
    }


def _unranked_reason(refused: bool, n_configs: int, differ: list[str], key: float | None, lost: int,
                     n_key: int, by: list[str]) -> str:
    if refused:
        return (f"mixes {n_configs} configurations (they differ in {', '.join(differ)}): add "
                f"{', '.join(differ)} to --group-by, or pass --pool")
    if key is None:
        return "no measured or diverged trial"
    if not math.isfinite(key):
        return f"diverged on {lost} of {n_key} trials (half or more: its median is the worst outcome)"
    return f"its key rests on {n_key} trial (a rank needs at least {MIN_RANKED})"


def _group_order(row: dict[str, Any], p: str) -> tuple:
    """Ranked groups by their key (the median FID, diverged = +inf), then by mean; then those with a number on
    one trial; then those that mix configurations; then groups whose key is infinite (half or more diverged);
    then groups ASHA culled, latest rung and best metric first; then the rest."""
    key = row["_key"]
    mean = row[f"{p}fid_mean"] if row[f"{p}fid_mean"] is not None else math.inf
    if row["_ranked"]:
        return (0, key, mean)
    if key is not None and math.isfinite(key):
        return (1, key, mean)
    if row["_refused"]:
        return (2, -row["n_configs"], 0.0)
    if key is not None:
        return (3, -row["n_diverged"], 0.0)
    if row["stopped_at_kimg"] is not None:
        metric = row["stopped_metric"] if row["stopped_metric"] is not None else math.inf
        return (4, -row["stopped_at_kimg"], metric)
    return (5, 0.0, 0.0)
