"""The two Parquet tables of a sweep: one row per evaluation, one row per trial.

Both are rewritten whole on every change (they hold hundreds or thousands of rows,
a few ms to write) into a temp file that is then renamed over the old one, so a
reader or a crash never sees a half-written file.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

EVALUATIONS_FILE = "evaluations.parquet"
TRIALS_FILE = "trials.parquet"
STATUSES = ("pending", "running", "completed", "stopped_early", "diverged", "error")

# Fixed columns and their types; parameter columns (typed by their values) come
# between the identity columns and these.
EVALUATION_COLUMNS: dict[str, pa.DataType] = {
    "kimg": pa.float64(),
    "fid": pa.float64(),
    "is_mean": pa.float64(),
    "is_std": pa.float64(),
    "kid_mean": pa.float64(),
    "kid_std": pa.float64(),
    "extractor": pa.string(),
    "fid_samples": pa.int64(),
    "final": pa.bool_(),
    "loss_d": pa.float64(),
    "loss_g": pa.float64(),
    "images_per_s": pa.float64(),
    "eval_seconds": pa.float64(),
    "wall_s": pa.float64(),
    "grid_path": pa.string(),
    "node": pa.string(),
    "node_ip": pa.string(),
    "data_source": pa.string(),
    "time": pa.timestamp("us", tz="UTC"),
}
TRIAL_COLUMNS: dict[str, pa.DataType] = {
    "status": pa.string(),
    "reason": pa.string(),
    "best_fid": pa.float64(),
    "best_fid_kimg": pa.float64(),
    "best_is": pa.float64(),
    "final_fid": pa.float64(),
    "final_is": pa.float64(),
    "extractor": pa.string(),
    "kimg": pa.float64(),
    "kimg_budget": pa.float64(),
    "evaluations": pa.int64(),
    "checkpoint_path": pa.string(),
    "grid_path": pa.string(),
    "run_dir": pa.string(),
    "node": pa.string(),
    "data_source": pa.string(),
    "started": pa.timestamp("us", tz="UTC"),
    "ended": pa.timestamp("us", tz="UTC"),
}
IDENTITY_COLUMNS: dict[str, pa.DataType] = {"sweep": pa.string(), "trial_id": pa.string()}


def parameter_value(value: Any) -> Any:
    """Lists (layer widths) become labels like '512-256-128-64': one comparable, groupable value."""
    if isinstance(value, (list, tuple)):
        return "-".join(str(v) for v in value)
    return value


def _parameter_type(values: Iterable[Any]) -> pa.DataType:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pa.bool_()
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pa.int64()
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return pa.float64()
    return pa.string()


def to_table(rows: list[dict[str, Any]], fixed: dict[str, pa.DataType], params: list[str]) -> pa.Table:
    columns: dict[str, pa.Array] = {}
    for name, kind in IDENTITY_COLUMNS.items():
        columns[name] = pa.array([r.get(name) for r in rows], type=kind)
    for name in params:
        values = [r.get(name) for r in rows]
        kind = _parameter_type(values)
        if kind == pa.string():
            values = [None if v is None else str(v) for v in values]
        columns[name] = pa.array(values, type=kind)
    for name, kind in fixed.items():
        columns[name] = pa.array([r.get(name) for r in rows], type=kind)
    return pa.table(columns)


def write_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return pq.read_table(path).to_pylist()


class ResultsWriter:
    """Keeps a sweep's rows in memory and rewrites its Parquet files after each change.

    Evaluations are keyed by (trial_id, kimg): a trial restarted from a checkpoint that
    re-reports a step replaces the row instead of duplicating it.
    """

    def __init__(self, sweep_dir: Path, sweep_name: str, params: list[str]):
        self.dir = sweep_dir
        self.sweep = sweep_name
        self.params = params
        self.evaluations: dict[tuple[str, float], dict[str, Any]] = {}
        self.trials: dict[str, dict[str, Any]] = {}
        for row in read_rows(sweep_dir / EVALUATIONS_FILE):  # --resume continues the tables
            self.evaluations[(row["trial_id"], round(row["kimg"], 6))] = row
        for row in read_rows(sweep_dir / TRIALS_FILE):
            self.trials[row["trial_id"]] = row

    def add_evaluation(self, row: dict[str, Any]) -> None:
        self.evaluations[(row["trial_id"], round(row["kimg"], 6))] = {"sweep": self.sweep, **row}
        self._write_evaluations()

    def update_trial(self, trial_id: str, **fields: Any) -> None:
        row = self.trials.setdefault(trial_id, {"sweep": self.sweep, "trial_id": trial_id})
        row.update(fields)
        self._write_trials()

    def trial_evaluations(self, trial_id: str) -> list[dict[str, Any]]:
        rows = [r for (t, _), r in self.evaluations.items() if t == trial_id]
        return sorted(rows, key=lambda r: r["kimg"])

    def _write_evaluations(self) -> None:
        rows = sorted(self.evaluations.values(), key=lambda r: (r["trial_id"], r["kimg"]))
        write_atomic(to_table(rows, EVALUATION_COLUMNS, self.params), self.dir / EVALUATIONS_FILE)

    def _write_trials(self) -> None:
        rows = sorted(self.trials.values(), key=lambda r: r["trial_id"])
        write_atomic(to_table(rows, TRIAL_COLUMNS, self.params), self.dir / TRIALS_FILE)
