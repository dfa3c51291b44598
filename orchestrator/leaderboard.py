"""Rank a sweep's trials by best FID, or compare groups (e.g. variants) across seeds.

Rows measured with different feature extractors are never ranked together: every
ranking and every group is computed within one extractor.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
from scipy import stats

from orchestrator.results import TRIAL_COLUMNS, TRIALS_FILE


class LeaderboardError(RuntimeError):
    """One-line, user-facing reason why there is nothing to rank."""


def find_sweep(results: Path, sweep: str | None) -> Path:
    if not results.is_dir():
        raise LeaderboardError(f"{results}: no results directory (run `orchestrator sweep FILE` first)")
    if sweep is not None:
        path = results / sweep
        if not path.is_dir():
            names = sorted(p.name for p in results.iterdir() if p.is_dir())
            raise LeaderboardError(f"{results}: no sweep named '{sweep}' (found: {', '.join(names) or 'none'})")
        return path
    sweeps = sorted(p for p in results.iterdir() if (p / "fingerprint").exists())
    if not sweeps:
        raise LeaderboardError(f"{results}: no sweeps here yet")
    if len(sweeps) > 1:
        raise LeaderboardError(f"{results}: several sweeps, pick one with --sweep: {', '.join(p.name for p in sweeps)}")
    return sweeps[0]


def load_trials(sweep_dir: Path) -> pd.DataFrame:
    file = sweep_dir / TRIALS_FILE
    if not file.exists():
        raise LeaderboardError(f"{sweep_dir}: no trials recorded yet (the sweep has not reported an evaluation)")
    try:
        df = pq.read_table(file).to_pandas(integer_object_nulls=True)  # heads stays 2, not 2.0, beside nulls
    except Exception as exc:  # a file not written by us; ours are replaced atomically
        raise LeaderboardError(f"{file}: unreadable Parquet ({exc.__class__.__name__}: {exc})") from None
    df = df[df["best_fid"].notna()]
    if df.empty:
        raise LeaderboardError(f"{sweep_dir}: no trial has an evaluation yet")
    return df


def parameter_names(df: pd.DataFrame) -> list[str]:
    fixed = set(TRIAL_COLUMNS) | {"sweep", "trial_id"}
    return [c for c in df.columns if c not in fixed]


def rank_trials(df: pd.DataFrame, top: int | None = None) -> list[dict[str, Any]]:
    rows = []
    for extractor, part in df.groupby("extractor", sort=True):
        part = part.sort_values(["best_fid", "trial_id"])
        if top:
            part = part.head(top)
        for rank, (_, r) in enumerate(part.iterrows(), start=1):
            row = {"rank": rank, "trial_id": r["trial_id"]}
            row.update({p: _plain(r[p]) for p in parameter_names(df)})
            row.update(
                status=r["status"], best_fid=_plain(r["best_fid"]), best_fid_kimg=_plain(r["best_fid_kimg"]),
                best_is=_plain(r["best_is"]), final_fid=_plain(r["final_fid"]), kimg=_plain(r["kimg"]),
                extractor=extractor,
            )
            rows.append(row)
    return rows


def mean_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float | None]:
    """Mean and half-width of the Student-t confidence interval (None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = pd.Series(values).std(ddof=1)
    return mean, float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n))


def group_trials(df: pd.DataFrame, by: list[str], top: int | None = None) -> list[dict[str, Any]]:
    missing = [c for c in by if c not in df.columns]
    if missing:
        raise LeaderboardError(f"--group-by: unknown column(s) {missing}; parameters are {parameter_names(df)}")
    rows = []
    for extractor, part in df.groupby("extractor", sort=True):
        groups = []
        for key, g in part.groupby(by, dropna=False, sort=True):
            key = key if isinstance(key, tuple) else (key,)
            fid_mean, fid_ci = mean_ci(g["best_fid"].tolist())
            is_values = g["best_is"].dropna().tolist()
            is_mean, is_ci = mean_ci(is_values) if is_values else (None, None)
            groups.append(
                {
                    **{c: _plain(g[c].iloc[0]) for c in by},  # the key itself may have become a float
                    "n": len(g),
                    "n_completed": int((g["status"] == "completed").sum()),
                    "best_fid_mean": fid_mean,
                    "best_fid_ci95": fid_ci,
                    "best_fid_min": float(g["best_fid"].min()),
                    "best_is_mean": is_mean,
                    "best_is_ci95": is_ci,
                    "extractor": extractor,
                }
            )
        groups.sort(key=lambda r: r["best_fid_mean"])
        for rank, row in enumerate(groups[:top] if top else groups, start=1):
            rows.append({"rank": rank, **row})
    return rows


def _plain(value: Any) -> Any:
    """numpy/pandas scalars and NaN to plain Python for JSON."""
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
