"""Rank a sweep's trials, or compare groups (e.g. variants) across seeds, the way a reviewer would.

- Like with like: by default every number is the **final FID** (the evaluation at the end of a
  trial's budget, with `eval.final_fid_samples`). Trials without one (stopped early, diverged,
  errored, unfinished) are listed after the ranked ones with their status and never enter a mean.
  `at_kimg` compares instead every trial that reached an evaluation at that kimg, on that evaluation.
- Numbers measured differently (another extractor, sample count or kimg) are never pooled: each
  such "block" gets its own ranking, and every row says which kimg and sample count it holds.
- Groups carry their trial counts by status and the mean with a Student-t 95% CI over measured
  trials; with a baseline, the difference to it with a 95% CI and the p-value of a paired t-test
  (same seeds and other parameters on both sides) or Welch's t-test (otherwise).
- Failures count (orchestrator.failures): groups are ranked on the median FID over their measured and
  diverged trials, a diverged trial counting as +inf, so a group that diverges on half its trials or more
  is listed after the ranked ones, unranked. `failures="exclude"` ranks on measured trials only.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import yaml
from scipy import stats

from orchestrator.failures import DIVERGED, UNFINISHED, finite_or_none
from orchestrator.results import EVALUATIONS_FILE, TRIAL_COLUMNS, TRIALS_FILE

FAILURE_MODES = ("include", "exclude")  # --failures: whether diverged trials enter the ranking key
DEFAULT_EVERY_KIMG = 20.0  # gan.config.EvalConfig.every_kimg, for a sweep.yaml that leaves it out


class LeaderboardError(RuntimeError):
    """One-line, user-facing reason why there is nothing to rank."""


# ---- loading ------------------------------------------------------------------------------------


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


def _read(file: Path) -> pd.DataFrame:
    try:
        return pq.read_table(file).to_pandas(integer_object_nulls=True)  # heads stays 2, not 2.0, beside nulls
    except Exception as exc:  # a file not written by us; ours are replaced atomically
        raise LeaderboardError(f"{file}: unreadable Parquet ({exc.__class__.__name__}: {exc})") from None


def load_trials(sweep_dir: Path) -> pd.DataFrame:
    """Every trial of the sweep (all statuses); raises when none has an evaluation yet."""
    file = sweep_dir / TRIALS_FILE
    if not file.exists():
        raise LeaderboardError(f"{sweep_dir}: no trials recorded yet (the sweep has not reported an evaluation)")
    df = _read(file)
    for column, kind in TRIAL_COLUMNS.items():  # tables written before a column existed
        if column not in df.columns:
            df[column] = None
    if df["evaluations"].fillna(0).astype(int).sum() == 0 and df["best_fid"].isna().all():
        raise LeaderboardError(f"{sweep_dir}: no trial has an evaluation yet")
    return df


def load_evaluations(sweep_dir: Path) -> pd.DataFrame:
    file = sweep_dir / EVALUATIONS_FILE
    return _read(file) if file.exists() else pd.DataFrame(columns=["trial_id", "kimg", "fid"])


def every_kimg(sweep_dir: Path) -> float:
    """The sweep's evaluation interval, from the sweep file it was started with."""
    try:
        spec = yaml.safe_load((sweep_dir / "sweep.yaml").read_text()) or {}
        return float((spec.get("eval") or {}).get("every_kimg", DEFAULT_EVERY_KIMG))
    except (OSError, yaml.YAMLError, TypeError, ValueError, AttributeError):
        return DEFAULT_EVERY_KIMG


def parameter_names(df: pd.DataFrame) -> list[str]:
    fixed = set(TRIAL_COLUMNS) | {"sweep", "trial_id"}
    return [c for c in df.columns if c not in fixed]


def unfinished_count(trials: pd.DataFrame) -> int:
    """Trials that have not ended (the sweep is partial: interrupted, or still running)."""
    return int(trials["status"].isin(UNFINISHED).sum())


# ---- what is compared ---------------------------------------------------------------------------


@dataclass
class Measured:
    """One number per trial, all measured the same way within a block."""

    values: pd.DataFrame  # trial_id, fid, isc (IS), extractor, fid_kimg, fid_samples, kimg (actual)
    label: str  # "final FID" (at the budget) or "FID" (at --at-kimg)
    prefix: str  # column prefix: "final_" or ""


def measure(trials: pd.DataFrame, evaluations: pd.DataFrame, at_kimg: float | None, every: float) -> Measured:
    if at_kimg is None:
        done = trials[(trials["status"] == "completed") & trials["final_fid"].notna()]
        values = pd.DataFrame({
            "trial_id": done["trial_id"], "fid": done["final_fid"].astype(float),
            "isc": done["final_is"].astype(float), "extractor": done["extractor"],
            "fid_kimg": done["kimg_budget"].astype(float), "fid_samples": done["final_fid_samples"],
            "kimg": done["kimg"].astype(float), "g_steps": done["g_steps"],
        })
        return Measured(values, "final FID", "final_")
    if not (math.isfinite(at_kimg) and at_kimg > 0):
        raise LeaderboardError(f"--at-kimg {at_kimg:g}: must be a number > 0")
    rows = []
    stopped_before = dict(zip(trials["trial_id"], trials["stopped_at_kimg"]))
    for trial_id, evals in evaluations.groupby("trial_id", sort=True):
        # The evaluation at K is the first at or past K: evaluations run at the first step past
        # each multiple of every_kimg, so it lies in [K, K + every_kimg).
        hit = evals[(evals["kimg"] >= at_kimg - 1e-9) & (evals["kimg"] < at_kimg + every - 1e-9)].sort_values("kimg")
        stop = stopped_before.get(trial_id)
        if hit.empty or (stop is not None and not pd.isna(stop) and float(stop) < at_kimg - 1e-9):
            continue  # not reached, or its configuration was culled at an earlier rung
        e = hit.iloc[0]
        rows.append({"trial_id": trial_id, "fid": float(e["fid"]), "isc": _float(e.get("is_mean")),
                     "extractor": e["extractor"], "fid_kimg": float(at_kimg), "fid_samples": e["fid_samples"],
                     "kimg": float(e["kimg"]), "g_steps": _plain(e.get("g_steps"))})
    if not rows:
        raise LeaderboardError(f"--at-kimg {at_kimg:g}: no trial has an evaluation at {at_kimg:g} kimg "
                               f"(this sweep evaluates every {every:g} kimg)")
    columns = ["trial_id", "fid", "isc", "extractor", "fid_kimg", "fid_samples", "kimg", "g_steps"]
    return Measured(pd.DataFrame(rows, columns=columns), "FID", "")


def blocks(measured: Measured) -> list[tuple[Any, float | None, Any]]:
    """The distinct (extractor, kimg, sample count) of the measured numbers: never pooled together."""
    v = measured.values
    if v.empty:
        return [(None, None, None)]
    keys = v[["extractor", "fid_kimg", "fid_samples"]].drop_duplicates()
    return sorted((tuple(_plain(x) for x in k) for k in keys.itertuples(index=False)),
                  key=lambda k: tuple(str(x) for x in k))


def _block_key(extractor: Any, kimg: Any, samples: Any) -> str:
    """A comparable key (None and NaN alike: tables written before a column existed hold nulls)."""
    return "|".join(str(_plain(v)) for v in (extractor, kimg, samples))


def _in_block(values: pd.DataFrame, block: tuple) -> pd.DataFrame:
    if block[0] is None:
        return values.iloc[0:0]
    keys = [_block_key(*k) for k in values[["extractor", "fid_kimg", "fid_samples"]].itertuples(index=False)]
    return values[[k == _block_key(*block) for k in keys]]


def _block_fields(block: tuple) -> dict[str, Any]:
    return {"extractor": block[0], "fid_kimg": block[1], "fid_samples": block[2]}


# ---- trials -------------------------------------------------------------------------------------


def rank_trials(trials: pd.DataFrame, measured: Measured, top: int | None = None) -> list[dict[str, Any]]:
    """Measured trials ranked by FID within each block, then every other trial, unranked, with its status."""
    params = parameter_names(trials)
    by_id = trials.set_index("trial_id")
    rows: list[dict[str, Any]] = []
    p = measured.prefix
    for block in blocks(measured):
        part = _in_block(measured.values, block).sort_values(["fid", "trial_id"])
        if top:
            part = part.head(top)
        for rank, m in enumerate(part.itertuples(index=False), start=1):
            t = by_id.loc[m.trial_id]
            rows.append({"rank": rank, "trial_id": m.trial_id, **{c: _plain(t[c]) for c in params},
                         "status": t["status"], f"{p}fid": m.fid, f"{p}is": _plain(m.isc),
                         **_block_fields(block), "kimg": m.kimg, "g_steps": _plain(m.g_steps),
                         "stopped_at_kimg": None, "stopped_metric": None, "reason": None})
    ranked = set(measured.values["trial_id"])
    others = trials[~trials["trial_id"].isin(ranked)].sort_values(["status", "trial_id"])
    for _, t in others.iterrows():
        rows.append({"rank": None, "trial_id": t["trial_id"], **{c: _plain(t[c]) for c in params},
                     "status": t["status"], f"{p}fid": None, f"{p}is": None,
                     "extractor": _plain(t["extractor"]), "fid_kimg": None, "fid_samples": None,
                     "kimg": _plain(t["kimg"]), "g_steps": _plain(t["g_steps"]),
                     "stopped_at_kimg": _plain(t["stopped_at_kimg"]), "stopped_metric": _plain(t["stopped_metric"]),
                     "reason": _plain(t["reason"]) or None})
    return rows


# ---- groups -------------------------------------------------------------------------------------


def mean_ci(values: Iterable[float], confidence: float = 0.95) -> tuple[float | None, float | None]:
    """Mean and half-width of the Student-t confidence interval (None for n < 2; (None, None) for n = 0)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return None, None
    mean = float(np.mean(values))
    if n < 2:
        return mean, None
    sem = float(np.std(values, ddof=1)) / math.sqrt(n)
    return mean, float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sem)


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


def group_trials(
    trials: pd.DataFrame, measured: Measured, by: list[str], top: int | None = None,
    baseline: Baseline | None = None, failures: str = "include",
) -> list[dict[str, Any]]:
    """One row per group and block: counts by status, the ranking key (median FID, diverged = +inf), and
    mean ± 95% CI of the measured FID and IS."""
    missing = [c for c in by if c not in trials.columns]
    if missing:
        raise LeaderboardError(f"--group-by: unknown column(s) {missing}; parameters are {parameter_names(trials)}")
    p = measured.prefix
    pair_on = [c for c in parameter_names(trials) if c not in by]  # seeds and whatever else varies
    rows: list[dict[str, Any]] = []
    for block in blocks(measured):
        values = _in_block(measured.values, block).merge(trials[["trial_id", *by, *pair_on]], on="trial_id")
        groups = []
        for key, g in trials.groupby(by, dropna=False, sort=True):
            key = key if isinstance(key, tuple) else (key,)
            mine = values[values["trial_id"].isin(g["trial_id"])]
            # Diverged trials without a measured number count as the worst outcome in the key (not in the mean).
            lost = int(((g["status"] == DIVERGED) & ~g["trial_id"].isin(mine["trial_id"])).sum())
            key_values = [*mine["fid"].astype(float), *([math.inf] * lost if failures == "include" else [])]
            rank_key = float(np.median(key_values)) if key_values else None
            fid_mean, fid_ci = mean_ci(mine["fid"])
            is_mean, is_ci = mean_ci(mine["isc"].dropna())
            status = g["status"]
            stopped = g[g["stopped_at_kimg"].notna()]
            row = {
                **{c: _plain(g[c].iloc[0]) for c in by},  # the key itself may have become a float
                "n": len(g),
                "n_measured": len(mine),
                "n_completed": int((status == "completed").sum()),
                "n_stopped_early": int((status == "stopped_early").sum()),
                "n_diverged": int((status == "diverged").sum()),
                "n_error": int((status == "error").sum()),
                "n_unfinished": int(status.isin(UNFINISHED).sum()),
                f"{p}fid_median": finite_or_none(rank_key),
                f"{p}fid_mean": fid_mean, f"{p}fid_ci95": fid_ci,
                f"{p}is_mean": is_mean, f"{p}is_ci95": is_ci,
                # Where ASHA culled this group (the latest rung any of its trials reached, and the
                # metric it judged there: the mean over seeds with unit config).
                "stopped_at_kimg": _plain(stopped["stopped_at_kimg"].max()) if not stopped.empty else None,
                "stopped_metric": (_plain(stopped.loc[stopped["stopped_at_kimg"] == stopped["stopped_at_kimg"].max(),
                                                      "stopped_metric"].mean()) if not stopped.empty else None),
                **_block_fields(block),
                "unranked_reason": _unranked_reason(rank_key, lost, len(key_values), len(g)),
                "_values": mine,
                "_key": rank_key,
            }
            groups.append(row)
        groups.sort(key=lambda r: _group_order(r, p))
        if baseline is not None:
            _compare(groups, by, baseline, pair_on, p)
        ranks = iter(range(1, len(groups) + 1))
        for row in groups[:top] if top else groups:
            row.pop("_values")
            key = row.pop("_key")
            rows.append({"rank": next(ranks) if key is not None and math.isfinite(key) else None, **row})
    return rows


def _unranked_reason(key: float | None, lost: int, n_key: int, n: int) -> str | None:
    if key is None:
        return "no measured or diverged trial"
    if not math.isfinite(key):
        return f"diverged on {lost} of {n_key} trials (half or more: its median is the worst outcome)"
    return None


def _group_order(row: dict[str, Any], p: str) -> tuple:
    """Ranked groups by their key (the median FID, diverged = +inf), then by mean; then groups whose key is
    infinite (half or more diverged); then groups ASHA culled, latest rung and best mean first; then the rest."""
    key = row["_key"]
    if key is not None and math.isfinite(key):
        mean = row[f"{p}fid_mean"] if row[f"{p}fid_mean"] is not None else math.inf
        return (0, key, mean, 0.0)
    if key is not None:
        return (1, -row["n_diverged"], 0.0, 0.0)
    if row["stopped_at_kimg"] is not None:
        metric = row["stopped_metric"] if row["stopped_metric"] is not None else math.inf
        return (2, -row["stopped_at_kimg"], metric, 0.0)
    return (3, 0.0, 0.0, 0.0)


def _compare(groups: list[dict[str, Any]], by: list[str], baseline: Baseline, pair_on: list[str], p: str) -> None:
    """Difference of each group's mean FID to its baseline group (same values on the other --group-by columns)."""
    others = [c for c in by if c != baseline.column]
    bases = {tuple(g[c] for c in others): g for g in groups if g[baseline.column] == baseline.value}
    for g in groups:
        base = bases.get(tuple(g[c] for c in others))
        g.update(baseline=baseline.text, is_baseline=g[baseline.column] == baseline.value, diff_fid=None,
                 diff_ci95_low=None, diff_ci95_high=None, p_value=None, test=None)
        if base is None or base is g:
            continue
        g.update(_difference(g["_values"], base["_values"], pair_on))


def _difference(group: pd.DataFrame, base: pd.DataFrame, pair_on: list[str]) -> dict[str, Any]:
    """Mean FID of `group` minus that of `base`, 95% CI and p-value: paired t-test when both measured the
    same seeds (and other parameters) once each, Welch's t-test otherwise."""
    if len(group) < 2 or len(base) < 2:
        return {"test": "n < 2"}
    keys_g = [tuple(str(v) for v in r) for r in group[pair_on].itertuples(index=False)]
    keys_b = [tuple(str(v) for v in r) for r in base[pair_on].itertuples(index=False)]
    if pair_on and len(set(keys_g)) == len(keys_g) and sorted(keys_g) == sorted(keys_b):
        a = group.assign(_k=keys_g).sort_values("_k")["fid"].to_numpy(float)
        b = base.assign(_k=keys_b).sort_values("_k")["fid"].to_numpy(float)
        result = stats.ttest_rel(a, b)
        test, diff = "paired t", float(np.mean(a - b))
    else:
        a, b = group["fid"].to_numpy(float), base["fid"].to_numpy(float)
        result = stats.ttest_ind(a, b, equal_var=False)
        test, diff = "Welch t", float(np.mean(a) - np.mean(b))
    low, high = result.confidence_interval(0.95)
    return {"diff_fid": diff, "diff_ci95_low": _finite_or_none(low), "diff_ci95_high": _finite_or_none(high),
            "p_value": _finite_or_none(result.pvalue), "test": test}


# ---- the whole board ----------------------------------------------------------------------------


@dataclass
class Board:
    rows: list[dict[str, Any]]
    grouped: bool
    label: str  # what the FID columns are: "final FID" / "FID" (at --at-kimg); blocks add kimg and samples
    n_trials: int
    n_unfinished: int
    failures: str = "include"  # whether diverged trials enter the groups' ranking key

    @property
    def partial_note(self) -> str | None:
        if not self.n_unfinished:
            return None
        return (f"partial sweep: {self.n_unfinished} of {self.n_trials} trials unfinished (pending, running or "
                "interrupted); continue it with `orchestrator sweep FILE --resume`")


def build_board(
    sweep_dir: Path, *, group_by: list[str] | None = None, top: int | None = None, at_kimg: float | None = None,
    baseline: str | None = None, failures: str = "include",
) -> Board:
    if failures not in FAILURE_MODES:
        raise LeaderboardError(f"--failures {failures}: must be one of {', '.join(FAILURE_MODES)}")
    trials = load_trials(sweep_dir)
    measured = measure(trials, load_evaluations(sweep_dir), at_kimg, every_kimg(sweep_dir))
    if baseline is not None and not group_by:
        raise LeaderboardError("--baseline needs --group-by (the baseline is one group, e.g. --group-by variant "
                               "--baseline variant=dcgan)")
    if group_by:
        base = parse_baseline(baseline, group_by, trials) if baseline is not None else None
        rows = group_trials(trials, measured, group_by, top, base, failures)
    else:
        rows = rank_trials(trials, measured, top)
    rows = [{k: _stored(v) for k, v in row.items()} for row in rows]
    return Board(rows, bool(group_by), measured.label, len(trials), unfinished_count(trials), failures)


def ranking_title(board: Board) -> str:
    """How a grouped board is ranked: the failure policy, said in the table's title."""
    what = f"median {board.label}"
    if board.failures == "exclude":
        return f"ranked on the {what} of completed trials only (--failures exclude: diverged trials left out)"
    return f"ranked on the {what} over completed and diverged trials (a diverged trial counts as the worst)"


def _stored(value: Any) -> Any:
    """Non-finite numbers become null in every export (JSON, CSV, LaTeX); the status columns say why."""
    value = _plain(value)
    return None if isinstance(value, float) and not math.isfinite(value) else value


def block_title(row: dict[str, Any], label: str) -> str:
    """What a block's FID columns are: extractor, kimg and sample count (never pooled across blocks)."""
    if row.get("fid_samples") is None:
        extractor = row.get("extractor") or "none"
        return f"extractor {extractor}: no {label} yet (nothing ranked)"
    return (f"extractor {row['extractor']}: {label} at {row['fid_kimg']:g} kimg, {row['fid_samples']} generated "
            "images; lower FID is better")


def _plain(value: Any) -> Any:
    """numpy/pandas scalars and NaN to plain Python for JSON."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _float(value: Any) -> float | None:
    value = _plain(value)
    return None if value is None else float(value)


def _finite_or_none(value: Any) -> float | None:
    value = _float(value)
    return value if value is not None and math.isfinite(value) else None
