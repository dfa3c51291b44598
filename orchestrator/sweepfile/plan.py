"""A sweep expanded once for a run: its trials, how many, the names and seeds it sweeps, the data to prepare.

Expanding a 10,000-trial grid takes seconds. The steps of `orchestrator sweep` (Tune's grid, the scheduler's
expected seeds, the tables' columns and placeholder rows) read one plan instead of each expanding the sweep
file again, and hand it down as plain values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gan.config import DataConfig
from orchestrator.sweepfile.sections import Sweep


@dataclass(frozen=True)
class SweepPlan:
    name: str
    trials: list[dict[str, Any]] | None  # grid and random, in order; None: Optuna proposes trials at run time
    total: int  # trials the sweep runs (Optuna: num_samples configurations x the swept seeds)
    swept: list[str]  # every parameter a trial may set (Sweep.swept_names)
    seeds: list[int] | None  # the swept seed values, when seed is a listed parameter
    data: DataConfig  # the data every trial trains on (no parameter changes it)


def plan_sweep(sweep: Sweep) -> SweepPlan:
    """Expand the sweep once (grid and random); the run reads the plan from then on."""
    trials = None if sweep.method == "optuna" else sweep.trials()
    return SweepPlan(
        name=sweep.name,
        trials=trials,
        total=sweep.trial_count() if trials is None else len(trials),
        swept=sweep.swept_names(),
        seeds=sweep.seed_values(),
        data=sweep.trial_config({}).data,
    )
