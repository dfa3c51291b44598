"""Rank a sweep's trials, or compare groups (e.g. variants) across seeds, the way a reviewer would.

- Like with like: by default every number is the **final FID** (the evaluation at the end of a
  trial's budget, with `eval.final_fid_samples`). Trials without one (stopped early, diverged,
  errored, unfinished) are listed after the ranked ones with their status and never enter a mean.
  `at_kimg` compares instead every trial that reached an evaluation at that kimg, on the first
  evaluation at or past it.
- Numbers measured differently (another extractor, sample count or kimg) are never pooled: each
  such "block" gets its own ranking, and a trial is counted in the block it was planned for (measure.py).
- Groups (groups.py): counts by status within the block, the mean with a Student-t or bootstrap 95%
  interval over measured trials, a group mixing configurations refused unless `pool`; ranked on the median
  FID over measured and diverged trials (diverged = +inf), only when that key is finite and rests on at
  least 2 trials. With a baseline (comparisons.py): the difference, paired or Welch t-test, Holm-adjusted
  p-values within each block, probability of improvement and Hedges' g.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator.analysis.comparisons import Baseline, parse_baseline
from orchestrator.analysis.groups import CI_METHODS, group_trials
from orchestrator.analysis.measure import (
    LeaderboardError,
    Measured,
    _plain,
    block_of,
    measure,
    stored,
    trial_blocks,
    unfinished_count,
)
from orchestrator.analysis.plan import RungSamples, read_plan, samples_label
from orchestrator.analysis.statistics import t_mean_ci
from orchestrator.store.reader import load_evaluations, load_trials, parameter_names

FAILURE_MODES = ("include", "exclude")  # --failures: whether diverged trials enter the ranking key

__all__ = ["CI_METHODS", "FAILURE_MODES", "Baseline", "Board", "LeaderboardError", "block_title", "build_board",
           "mean_ci", "parse_baseline", "rank_trials", "ranking_title", "stopped_text"]


def mean_ci(values: Any, confidence: float = 0.95) -> tuple[float | None, float | None]:
    """Mean and half-width of the Student-t confidence interval (None for n < 2; (None, None) for n = 0)."""
    return t_mean_ci([float(v) for v in values], confidence)


# ---- trials -------------------------------------------------------------------------------------


def rank_trials(trials: pd.DataFrame, measured: Measured, top: int | None = None,
                rung_samples: Any = None) -> list[dict[str, Any]]:
    """Measured trials ranked by FID within each block, then every other trial, unranked, with its status."""
    params = parameter_names(trials)
    by_id = trials.set_index("trial_id")
    rows: list[dict[str, Any]] = []
    p = measured.prefix
    v = measured.values
    keys = [block_of(*k) for k in v[["extractor", "fid_kimg", "fid_samples"]].itertuples(index=False)]
    for block in sorted(set(keys), key=lambda b: tuple(str(x) for x in b)):
        part = v[[k == block for k in keys]].sort_values(["fid", "trial_id"])
        if top:
            part = part.head(top)
        for rank, m in enumerate(part.itertuples(index=False), start=1):
            t = by_id.loc[m.trial_id]
            rows.append({"rank": rank, "trial_id": m.trial_id, **{c: _plain(t[c]) for c in params},
                         "status": t["status"], f"{p}fid": m.fid, f"{p}is": _plain(m.isc),
                         "extractor": block[0], "fid_kimg": block[1], "fid_samples": block[2],
                         "kimg": m.kimg, "g_steps": _plain(m.g_steps), "stopped_at_kimg": None,
                         "stopped_metric": None, "stopped_fid_samples": None, "reason": None})
    others = trials[~trials["trial_id"].isin(set(v["trial_id"]))].sort_values(["status", "trial_id"])
    for _, t in others.iterrows():
        rung = _plain(t["stopped_at_kimg"])
        rows.append({"rank": None, "trial_id": t["trial_id"], **{c: _plain(t[c]) for c in params},
                     "status": t["status"], f"{p}fid": None, f"{p}is": None,
                     "extractor": _plain(t["extractor"]), "fid_kimg": None, "fid_samples": None,
                     "kimg": _plain(t["kimg"]), "g_steps": _plain(t["g_steps"]), "stopped_at_kimg": rung,
                     "stopped_metric": _plain(t["stopped_metric"]),
                     "stopped_fid_samples": rung_samples(rung) if rung is not None and rung_samples else None,
                     "reason": _plain(t["reason"]) or None})
    return rows


# ---- the whole board ----------------------------------------------------------------------------


@dataclass
class Board:
    rows: list[dict[str, Any]]
    grouped: bool
    label: str  # what the FID columns are: "final FID" / "FID" (at --at-kimg); blocks add kimg and samples
    n_trials: int
    n_unfinished: int
    failures: str = "include"  # whether diverged trials enter the groups' ranking key
    ci: str = "t"  # interval of a group's mean: Student t or percentile bootstrap
    at_kimg: float | None = None
    pool: bool = False
    warnings: list[str] = field(default_factory=list)  # for stderr when the output is JSON or CSV

    @property
    def partial_note(self) -> str | None:
        if not self.n_unfinished:
            return None
        return (f"partial sweep: {self.n_unfinished} of {self.n_trials} trials unfinished (pending, running or "
                "interrupted); continue it with `orchestrator sweep FILE --resume`")


def build_board(
    sweep_dir: Path, *, group_by: list[str] | None = None, top: int | None = None, at_kimg: float | None = None,
    baseline: str | None = None, failures: str = "include", ci: str = "t", pool: bool = False,
) -> Board:
    if failures not in FAILURE_MODES:
        raise LeaderboardError(f"--failures {failures}: must be one of {', '.join(FAILURE_MODES)}")
    if ci not in CI_METHODS:
        raise LeaderboardError(f"--ci {ci}: must be one of {', '.join(CI_METHODS)}")
    trials = load_trials(sweep_dir)
    evaluations = load_evaluations(sweep_dir)
    plan = read_plan(sweep_dir)
    measured = measure(trials, evaluations, at_kimg, plan.every_kimg)
    rung_samples = RungSamples(evaluations, plan)
    if baseline is not None and not group_by:
        raise LeaderboardError("--baseline needs --group-by (the baseline is one group, e.g. --group-by variant "
                               "--baseline variant=dcgan)")
    if pool and not group_by:
        raise LeaderboardError("--pool needs --group-by (it lets a group average over several configurations)")
    if group_by:
        base = parse_baseline(baseline, group_by, trials) if baseline is not None else None
        rows = group_trials(trials, measured, group_by, trial_blocks(trials, measured, plan), top=top,
                            baseline=base, failures=failures, ci=ci, pool=pool, rung_samples=rung_samples)
    else:
        rows = rank_trials(trials, measured, top, rung_samples)
    rows = [{k: stored(v) for k, v in row.items()} for row in rows]
    board = Board(rows, bool(group_by), measured.label, len(trials), unfinished_count(trials), failures, ci,
                  at_kimg, pool)
    board.warnings = board_warnings(board)
    return board


def board_warnings(board: Board) -> list[str]:
    """What a reader of JSON or CSV must be told beside the rows (the tables say it in their titles)."""
    out = [board.partial_note] if board.partial_note else []
    small = sorted({r["n_measured"] for r in board.rows if r.get("ci_warning")})
    if small:
        out.append(f"bootstrap intervals from {', '.join(map(str, small))} values (fewer than the documented "
                   "minimum): likely narrower than 95%")
    pooled = [r for r in board.rows if board.grouped and r.get("n_configs", 1) > 1]
    if pooled and board.pool:
        out.append(f"--pool: {len(pooled)} group(s) average over several configurations (see pooled_over)")
    elif pooled:
        out.append(f"{len(pooled)} group(s) mix configurations: no mean, rank or test for them (see "
                   "unranked_reason)")
    return out


def ranking_title(board: Board) -> str:
    """How a grouped board is ranked: the failure policy, said in the table's title."""
    what = f"median {board.label}"
    measured = "completed trials" if board.at_kimg is None else "trials measured there"
    if board.failures == "exclude":
        return f"ranked on the {what} of {measured} only (--failures exclude: diverged trials left out)"
    if board.at_kimg is not None:
        return (f"ranked on the {what} over trials measured there and diverged ones (a diverged trial without a "
                "number there counts as the worst)")
    return f"ranked on the {what} over completed and diverged trials (a diverged trial counts as the worst)"


def block_title(row: dict[str, Any], label: str, at_kimg: float | None = None) -> str:
    """What a block's FID columns are: extractor, kimg and sample count (never pooled across blocks)."""
    if row.get("fid_samples") is None:
        extractor = row.get("extractor") or "none"
        return f"extractor {extractor}: no {label} yet (nothing ranked)"
    where = (f"at the first evaluation at or past {row['fid_kimg']:g} kimg" if at_kimg is not None
             else f"at {row['fid_kimg']:g} kimg")
    return f"extractor {row['extractor']}: {label} {where}, {row['fid_samples']} generated images; lower FID is better"


def stopped_text(row: dict[str, Any]) -> str:
    """ASHA's stopping figure with its own sample count: 'FID-2k at 40 kimg: 31.20'."""
    if row.get("stopped_at_kimg") is None:
        return "-"
    metric = row.get("stopped_metric")
    value = "-" if metric is None else f"{metric:.2f}"
    return f"{samples_label(row.get('stopped_fid_samples'))} at {row['stopped_at_kimg']:g} kimg: {value}"
