"""What is compared: one number per trial, and the block each trial belongs to.

A block is one way of measuring: (feature extractor, kimg, number of generated images). Numbers of different
blocks are never pooled. A trial belongs to the block of its planned measurement whether it got a number or
not, so a block's counts (n, completed, stopped early, ...) are those of the trials planned to be measured
that way, and sit next to a mean of that block only.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pandas as pd

from orchestrator.analysis.plan import Plan
from orchestrator.store.failures import UNFINISHED
from orchestrator.store.reader import ResultsError

Block = tuple[str | None, float | None, int | None]  # extractor, kimg, generated images


class LeaderboardError(ResultsError):
    """One-line, user-facing reason why there is nothing to rank."""


def unfinished_count(trials: pd.DataFrame) -> int:
    """Trials that have not ended (the sweep is partial: interrupted, or still running)."""
    return int(trials["status"].isin(UNFINISHED).sum())


@dataclass
class Measured:
    """One number per trial, all measured the same way within a block."""

    values: pd.DataFrame  # trial_id, fid, isc (IS), extractor, fid_kimg, fid_samples, kimg (actual), g_steps
    label: str  # "final FID" (at the budget) or "FID" (at --at-kimg)
    prefix: str  # column prefix: "final_" or ""
    at_kimg: float | None = None


VALUE_COLUMNS = ["trial_id", "fid", "isc", "extractor", "fid_kimg", "fid_samples", "kimg", "g_steps"]


def measure(trials: pd.DataFrame, evaluations: pd.DataFrame, at_kimg: float | None, every: float) -> Measured:
    if at_kimg is None:
        done = trials[(trials["status"] == "completed") & trials["final_fid"].notna()]
        values = pd.DataFrame({
            "trial_id": done["trial_id"], "fid": done["final_fid"].astype(float),
            "isc": done["final_is"].astype(float), "extractor": done["extractor"],
            "fid_kimg": done["kimg_budget"].astype(float), "fid_samples": done["final_fid_samples"],
            "kimg": done["kimg"].astype(float), "g_steps": done["g_steps"],
        }, columns=VALUE_COLUMNS)
        return Measured(values[values["fid"].map(math.isfinite)], "final FID", "final_")
    if not (math.isfinite(at_kimg) and at_kimg > 0):
        raise LeaderboardError(f"--at-kimg {at_kimg:g}: must be a number > 0")
    rows = []
    stopped_before = dict(zip(trials["trial_id"], trials["stopped_at_kimg"], strict=False))
    for trial_id, evals in evaluations.groupby("trial_id", sort=True):
        # The evaluation at K is the first at or past K: evaluations run at the first step past
        # each multiple of every_kimg, so it lies in [K, K + every_kimg).
        hit = evals[(evals["kimg"] >= at_kimg - 1e-9) & (evals["kimg"] < at_kimg + every - 1e-9)].sort_values("kimg")
        stop = stopped_before.get(trial_id)
        if hit.empty or (stop is not None and not pd.isna(stop) and float(stop) < at_kimg - 1e-9):
            continue  # not reached, or its configuration was culled at an earlier rung
        e = hit.iloc[0]
        if not math.isfinite(_float(e["fid"]) or math.nan):
            continue
        rows.append({"trial_id": trial_id, "fid": float(e["fid"]), "isc": _float(e.get("is_mean")),
                     "extractor": e["extractor"], "fid_kimg": float(at_kimg), "fid_samples": e["fid_samples"],
                     "kimg": float(e["kimg"]), "g_steps": _plain(e.get("g_steps"))})
    if not rows:
        raise LeaderboardError(f"--at-kimg {at_kimg:g}: no trial has an evaluation at {at_kimg:g} kimg "
                               f"(this sweep evaluates every {every:g} kimg)")
    return Measured(pd.DataFrame(rows, columns=VALUE_COLUMNS), "FID", "", at_kimg)


# ---- blocks -------------------------------------------------------------------------------------


def block_of(extractor: Any, kimg: Any, samples: Any) -> Block:
    """A comparable block (4 and 4.0 alike; None and NaN alike: tables written before a column existed)."""
    extractor, kimg, samples = _plain(extractor), _plain(kimg), _plain(samples)
    return (None if extractor is None else str(extractor), None if kimg is None else float(kimg),
            None if samples is None else int(samples))


def trial_blocks(trials: pd.DataFrame, measured: Measured, plan: Plan) -> dict[str, Block]:
    """Every trial's block: that of its number, else that of the measurement it was planned to get.

    The plan of a trial without a number: the extractor and budget (`kimg_budget`) it recorded, else the sweep
    file's; the final sample count it recorded, else the sweep file's `eval.final_fid_samples`. With --at-kimg:
    kimg K, and the sample count the measured trials of its extractor used at K (that evaluation may be the
    final one), else the sweep file's `eval.fid_samples`.
    """
    v = measured.values
    blocks = {t: block_of(e, k, s) for t, e, k, s in
              zip(v["trial_id"], v["extractor"], v["fid_kimg"], v["fid_samples"], strict=True)}
    at_k: dict[str | None, Counter] = {}
    for extractor, _, samples in blocks.values():
        at_k.setdefault(extractor, Counter())[samples] += 1
    for t in trials.itertuples(index=False):
        if t.trial_id in blocks:
            continue
        extractor = _plain(t.extractor) or plan.extractor
        if measured.at_kimg is None:
            budget = _plain(t.kimg_budget)
            samples = _plain(t.final_fid_samples) or plan.final_fid_samples
            blocks[t.trial_id] = block_of(extractor, budget if budget is not None else plan.kimg, samples)
        else:
            used = at_k.get(str(extractor))
            samples = used.most_common(1)[0][0] if used else plan.fid_samples
            blocks[t.trial_id] = block_of(extractor, measured.at_kimg, samples)
    return blocks


def ordered_blocks(blocks: dict[str, Block], measured_ids: set[str]) -> list[Block]:
    """Distinct blocks: those holding a number first, then those only planned; each by extractor, kimg, samples."""
    holding = {b for t, b in blocks.items() if t in measured_ids}
    return sorted(set(blocks.values()), key=lambda b: (b not in holding, *(str(x) for x in b)))


def in_block(values: pd.DataFrame, blocks: dict[str, Block], block: Block) -> pd.DataFrame:
    return values[[blocks.get(t) == block for t in values["trial_id"]]]


def block_fields(block: Block) -> dict[str, Any]:
    return {"extractor": block[0], "fid_kimg": block[1], "fid_samples": block[2]}


# ---- plain values -------------------------------------------------------------------------------


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


def stored(value: Any) -> Any:
    """Non-finite numbers become null in every export (JSON, CSV, LaTeX); the status columns say why."""
    value = _plain(value)
    return None if isinstance(value, float) and not math.isfinite(value) else value
