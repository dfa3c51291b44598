"""The tables of a sweep that did not finish: repaired before `--resume`, its unfinished trials marked.

A driver killed mid-sweep can leave evaluations that only a trial's `stats.jsonl` holds; a sweep that
stopped early lists the trials Tune never created as `pending` placeholders (Tune adds them under their real
ids on `--resume`), and the trials it left running as `interrupted`.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from orchestrator.store.failures import ENDED  # every status not in ENDED is unfinished
from orchestrator.store.tables import EVAL_KEYS, ResultsWriter, parameter_columns, parameter_row
from orchestrator.sweepfile.plan import SweepPlan
from orchestrator.sweepfile.sections import Sweep

# trial_id of a row that stands for a grid trial Tune had not created when the sweep was interrupted.
PLACEHOLDER_PREFIX = "pending-"


def open_writer(plan: SweepPlan, sweep_dir: Path) -> ResultsWriter:
    """The sweep's tables, to continue them (ResultsWriter reads what is on disk)."""
    return ResultsWriter(sweep_dir, plan.name, parameter_columns(plan.swept))


def record_unfinished(sweep: Sweep, plan: SweepPlan, writer: ResultsWriter) -> int:
    """After Tune returned: trials it left running become `interrupted`, and every grid/random trial
    without a row gets a `pending` placeholder row (Optuna trials never proposed do not exist).
    Returns how many trials of the sweep are unfinished."""
    for trial_id, row in list(writer.trials.items()):
        if row.get("status") == "running":
            writer.update_trial(trial_id, status="interrupted")
    if plan.trials is not None:
        columns = parameter_columns(plan.swept)
        listed = Counter(tuple(row.get(c) for c in columns) for row in writer.trials.values())
        for index, params in enumerate(plan.trials):
            row = parameter_row(sweep, params)
            key = tuple(row[c] for c in columns)
            if listed[key] > 0:  # a multiset: repeats of one configuration have equal parameter columns
                listed[key] -= 1
                continue
            writer.update_trial(
                f"{PLACEHOLDER_PREFIX}{index:04d}",
                **row,
                status="pending",
                kimg=0.0,
                evaluations=0,
                kimg_budget=float(sweep.train.kimg),
            )
    ended = sum(row.get("status") in ENDED for row in writer.trials.values())
    return max(plan.total - ended, 0)


def ready_to_resume(plan: SweepPlan, sweep_dir: Path) -> None:
    """Before --resume hands the sweep to Tune, in one pass over the tables: what a killed driver left in part
    files is compacted, the evaluations a trial wrote to its `stats.jsonl` but the driver never recorded (it
    died between the two) are added, and the placeholder rows go (Tune adds those trials under their real ids;
    `record_unfinished` puts back the ones it does not create)."""
    writer = open_writer(plan, sweep_dir)
    columns = parameter_columns(plan.swept)
    for trial_id, row in list(writer.trials.items()):
        stats = Path(row.get("run_dir") or sweep_dir / "trials" / trial_id) / "stats.jsonl"
        for evaluation in read_stats(stats):
            if round(float(evaluation["kimg"]), 6) not in writer.recorded_kimgs(trial_id):
                params = {c: row.get(c) for c in columns}
                writer.add_evaluation({"trial_id": trial_id, **params,
                                       **{k: evaluation.get(k) for k in EVAL_KEYS if k in evaluation},
                                       "data_source": row.get("data_source"), "node": row.get("node"),
                                       "device_used": row.get("device_used")})
    writer.drop_trials([t for t in writer.trials if t.startswith(PLACEHOLDER_PREFIX)])
    writer.close()


def read_stats(path: Path) -> list[dict]:
    """A trial's stats.jsonl (one evaluation a line); a torn last line of a killed trial is skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "kimg" in record:
            out.append(record)
    return out
