"""Which configurations of a finished sweep go on to its confirm stage, and why: the selection rule.

A configuration is the set of swept parameters other than the seed replicates (seed, repeat); its trials are
its seeds. Every configuration gets a tier and a value on `metric.name`, then configurations are ranked:

1. **completed**: every seed that did not error ran its whole budget (completed or diverged). Value: the
   median final metric over those seeds, a diverged seed counting as the worst (the leaderboard's default
   key). Ranked first, best value first.
2. **cut**: some seed was stopped by ASHA (or is unfinished, with --allow-partial). Value: the seed mean at
   the highest ASHA rung (FIFO: evaluation) that all its seeds reached, each seed's first intermediate
   evaluation at or past it; a seed that diverged earlier counts as the worst. Ranked below every completed
   configuration, higher rung first, then by value.
3. **unranked**: completed, but half or more of its seeds diverged (the leaderboard ranks it nowhere).
4. **unmeasured**: nothing to go on (every seed errored, or none reached an evaluation).

`top` takes the best K of tiers 1 and 2; `include` adds every configuration matching an entry, whatever its
tier. Errored seeds are left out of every value and counted (`n_error`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd

from orchestrator.run.rungs import rung_milestones
from orchestrator.store.failures import COMPLETED, DIVERGED, ERROR, UNFINISHED
from orchestrator.store.reader import load_evaluations, load_trials
from orchestrator.store.tables import parameter_value
from orchestrator.sweepfile.params import REPLICATE_PARAMS
from orchestrator.sweepfile.sections import Sweep
from orchestrator.sweepfile.stages import confirm_name, grid_configurations, matches

TIERS = ("completed", "cut", "unranked", "unmeasured")
SELECTION_FORMAT = 1


class SelectionError(RuntimeError):
    """One-line, user-facing reason why no selection can be made."""


@dataclass
class Candidate:
    configuration: dict[str, Any]
    label: str
    tier: str
    value: float | None  # the ranking value (None: unmeasured); +-inf when diverged seeds decide it
    seed_mean: float | None
    n: int  # seeds that entered the value
    n_diverged: int
    n_error: int
    rung: float | None
    rank: int | None = None
    why: list[str] = field(default_factory=list)

    @property
    def chosen(self) -> bool:
        return bool(self.why)

    def as_json(self) -> dict[str, Any]:
        return {"configuration": self.configuration, "label": self.label, "rank": self.rank, "tier": self.tier,
                "value": _finite(self.value), "seed_mean": _finite(self.seed_mean), "n": self.n,
                "n_diverged": self.n_diverged, "n_error": self.n_error, "rung": self.rung, "chosen": self.chosen,
                "why": "; ".join(self.why) or None}


def rule_text(metric: str, mode: str, top: int, include: list[dict[str, Any]]) -> str:
    better = "lowest" if mode == "min" else "highest"
    chosen = f"the best {top} configuration{'s' if top > 1 else ''}"
    inc = f", plus every configuration matching {_include_text(include)}" if include else ""
    return (f"{chosen} of the first stage on {metric} ({better} is best){inc}. Configurations whose seeds all ran "
            f"the whole budget rank first, on the median final {metric} over completed and diverged seeds (a "
            f"diverged seed counts as the worst); configurations cut by ASHA rank below every one of them, by the "
            f"highest rung all their seeds reached, then by their seed mean {metric} there; a configuration with "
            f"half or more seeds diverged is unranked; errored seeds are left out and counted.")


def rule_short(metric: str, top: int, include: list[dict[str, Any]]) -> str:
    text = f"top {top} on final {metric}"
    return text + (f" + include {_include_text(include)}" if include else "")


def _include_text(include: list[dict[str, Any]]) -> str:
    return " / ".join(",".join(f"{k}={parameter_value(v)}" for k, v in entry.items()) for entry in include)


def select(sweep_dir, first: Sweep, *, top: int, include: list[dict[str, Any]]) -> list[Candidate]:
    """Every configuration of the first stage, ranked, with what was chosen and why."""
    trials = load_trials(sweep_dir)
    evaluations = load_evaluations(sweep_dir)
    metric, mode = first.metric.name, first.metric.mode
    worst = math.inf if mode == "min" else -math.inf
    names = [n for n in first.swept_names() if n not in REPLICATE_PARAMS]
    decode = _decoder(first, names)
    rungs = _rungs(first, evaluations)
    candidates = []
    keys = trials[names].apply(lambda r: tuple(_cell(v) for v in r), axis=1) if names else pd.Series(
        [()] * len(trials), index=trials.index)
    for key, seeds in trials.groupby(keys, sort=False):
        config = decode(dict(zip(names, key, strict=True)))
        candidates.append(_candidate(config, seeds, evaluations, metric, worst, rungs))
    order = {t: i for i, t in enumerate(TIERS)}
    sign = 1.0 if mode == "min" else -1.0

    def sort_key(c: Candidate):
        value = sign * c.value if c.value is not None else math.inf
        return (order[c.tier], -(c.rung or 0.0) if c.tier == "cut" else 0.0, value, c.label)

    candidates.sort(key=sort_key)
    for rank, c in enumerate((c for c in candidates if c.tier in ("completed", "cut")), start=1):
        c.rank = rank
    for c in [c for c in candidates if c.tier in ("completed", "cut")][:top]:
        c.why.append(f"top {top}")
    for entry in include:
        hits = [c for c in candidates if matches(entry, c.configuration)]
        if not hits:
            shown = ", ".join(f"{k}: {parameter_value(v)}" for k, v in entry.items())
            raise SelectionError(f"confirm include {{{shown}}} matches no configuration of sweep {first.name}")
        for c in hits:
            c.why.append(f"include {_include_text([entry])}")
    return candidates


def _candidate(config: dict[str, Any], seeds: pd.DataFrame, evaluations: pd.DataFrame, metric: str, worst: float,
               rungs: list[float]) -> Candidate:
    status = seeds["status"].tolist()
    n_error = status.count(ERROR)
    kept = seeds[~seeds["status"].isin((ERROR, "pending"))]  # a seed never started measured nothing
    diverged = int((kept["status"] == DIVERGED).sum())
    label = ", ".join(f"{k}={parameter_value(v)}" for k, v in config.items()) or "(fixed settings)"
    evals = evaluations[evaluations["trial_id"].isin(set(kept["trial_id"]))]
    base = {"configuration": config, "label": label, "n_diverged": diverged, "n_error": n_error}
    if kept.empty:
        return Candidate(**base, tier="unmeasured", value=None, seed_mean=None, n=0, rung=None)
    if kept["status"].isin((COMPLETED, DIVERGED)).all():
        finals = [_final(evals, tid, metric) for tid in kept.loc[kept["status"] == COMPLETED, "trial_id"]]
        finals = [v for v in finals if v is not None]
        values = finals + [worst] * diverged
        if values:
            budget = float(kept["kimg_budget"].dropna().max()) if kept["kimg_budget"].notna().any() else None
            tier = "unranked" if 2 * diverged >= len(values) else "completed"
            return Candidate(**base, tier=tier, value=float(np.median(values)),
                             seed_mean=float(np.mean(finals)) if finals else None, n=len(values), rung=budget)
    # Cut (or unfinished): the highest rung that every seed reached, diverged seeds counting as the worst.
    for rung in sorted(rungs, reverse=True):
        values = []
        for tid, status_ in zip(kept["trial_id"], kept["status"], strict=True):
            value = _at_or_past(evals, tid, rung, metric)
            if value is None and status_ == DIVERGED:
                value = worst
            if value is None:
                break
            values.append(value)
        else:
            mean = float(np.mean(values))
            return Candidate(**base, tier="cut", value=mean, seed_mean=mean, n=len(values), rung=rung)
    return Candidate(**base, tier="unmeasured", value=None, seed_mean=None, n=0, rung=None)


def _final(evals: pd.DataFrame, trial_id: str, metric: str) -> float | None:
    rows = evals[(evals["trial_id"] == trial_id) & (evals["final"] == True)]  # noqa: E712 - nullable column
    values = [float(v) for v in rows[metric] if _number(v)] if metric in rows else []
    return values[-1] if values else None


def _at_or_past(evals: pd.DataFrame, trial_id: str, kimg: float, metric: str) -> float | None:
    """The trial's first intermediate evaluation at or past `kimg` (what ASHA recorded at that rung)."""
    rows = evals[(evals["trial_id"] == trial_id) & (evals["final"] != True)]  # noqa: E712
    rows = rows[rows["kimg"].astype(float) >= kimg - 1e-9].sort_values("kimg")
    for v in rows[metric] if metric in rows else []:
        return float(v) if _number(v) else None
    return None


def _rungs(first: Sweep, evaluations: pd.DataFrame) -> list[float]:
    """Where cut configurations are compared: ASHA's rungs, or (FIFO) every evaluation point."""
    s = first.scheduler
    if s.type == "asha":
        return rung_milestones(s.grace_period, s.max_t, s.reduction_factor)
    return sorted({float(k) for k in evaluations.get("kimg", []) if _number(k)})


def _decoder(first: Sweep, names: list[str]):
    """A trials-table row's configuration columns back to the sweep's values (widths are stored as labels)."""
    known: dict[str, dict[Any, Any]] = {}
    configs = grid_configurations(first) if first.method != "optuna" else []
    for name in names:
        spec = first.parameters.get(name)
        values = list(spec.choices) if spec is not None and spec.categorical else []
        values += [c[name] for c in configs if name in c] + [c[name] for c in first.configurations or [] if name in c]
        known[name] = {parameter_value(v): v for v in values}

    def decode(row: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for name, cell in row.items():
            if cell is None:
                continue  # a conditional parameter that does not apply to this configuration
            out[name] = known[name].get(cell, cell)
        return out

    return decode


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def first_stage_counts(sweep_dir) -> dict[str, int]:
    status = load_trials(sweep_dir)["status"]
    return {"trials": int(len(status)), "unfinished": int(status.isin(UNFINISHED).sum()),
            "errored": int((status == ERROR).sum()), "diverged": int((status == DIVERGED).sum())}


def selection_record(first: Sweep, candidates: list[Candidate], *, top: int, include: list[dict[str, Any]],
                     seeds: list[int], kimg: float, fid_split: str, allow_partial: bool,
                     counts: dict[str, int]) -> dict[str, Any]:
    """selection.json: the first stage's fingerprint, the rule, every candidate, and what was chosen and why."""
    return {
        "format": SELECTION_FORMAT, "sweep": first.name, "confirm_sweep": confirm_name(first.name),
        "first_stage_fingerprint": first.fingerprint(),
        "metric": {"name": first.metric.name, "mode": first.metric.mode},
        "rule": rule_text(first.metric.name, first.metric.mode, top, include),
        "rule_short": rule_short(first.metric.name, top, include),
        "top": top, "include": [dict(e) for e in include],
        "seeds": seeds, "kimg": kimg, "fid_split": fid_split, "allow_partial": allow_partial,
        "first_stage": counts, "candidates": [c.as_json() for c in candidates],
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
