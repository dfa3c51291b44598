"""The two Parquet tables of a sweep: one row per evaluation, one row per trial.

Both are rewritten whole on every change (they hold hundreds or thousands of rows,
a few ms to write) into a temp file that is then renamed over the old one, so a
reader or a crash never sees a half-written file.
"""
from __future__ import annotations

import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.failures import finite

EVALUATIONS_FILE = "evaluations.parquet"
TRIALS_FILE = "trials.parquet"
STATUSES = ("pending", "running", "interrupted", "completed", "stopped_early", "diverged", "error")

# Fixed columns and their types; parameter columns (typed from the sweep schema) come
# between the identity columns and these.
# Parameters that make trials replicates of one configuration rather than different configurations.
REPLICATE_KEYS = ("seed", "repeat")

EVALUATION_COLUMNS: dict[str, pa.DataType] = {
    "kimg": pa.float64(),
    "g_steps": pa.int64(),
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
    "device_used": pa.string(),  # what ran: cpu, or cuda:<device name>
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
    "final_fid_samples": pa.int64(),
    "extractor": pa.string(),
    "kimg": pa.float64(),
    "kimg_budget": pa.float64(),
    "g_steps": pa.int64(),
    "stopped_at_kimg": pa.float64(),
    "stopped_metric": pa.float64(),
    "evaluations": pa.int64(),
    "checkpoint_path": pa.string(),
    "grid_path": pa.string(),
    "run_dir": pa.string(),
    "node": pa.string(),
    "data_source": pa.string(),
    "device_used": pa.string(),
    "started": pa.timestamp("us", tz="UTC"),
    "ended": pa.timestamp("us", tz="UTC"),
}
IDENTITY_COLUMNS: dict[str, pa.DataType] = {"sweep": pa.string(), "trial_id": pa.string()}


def parameter_value(value: Any) -> Any:
    """Lists (layer widths) become labels like '512-256-128-64': one comparable, groupable value."""
    if isinstance(value, (list, tuple)):
        return "-".join(str(v) for v in value)
    return value


def _parameter_type(annotation: Any) -> pa.DataType:
    """The Arrow type of a sweep-file field's Python annotation (`int | None` -> int64, tuples -> labels)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    # bool before int: bool is a subclass of int.
    for python_type, arrow_type in ((bool, pa.bool_()), (int, pa.int64()), (float, pa.float64())):
        if annotation is python_type:
            return arrow_type
    return pa.string()  # str, and list/tuple values written as labels like '512-256-128-64'


def parameter_types(names: Iterable[str]) -> dict[str, pa.DataType]:
    """Arrow types of parameter columns, from the sweep schema rather than from the values present:
    a conditional column that is null in early snapshots has the same type in every snapshot."""
    from orchestrator.schema import ModelSection, TrainSection  # pydantic mirrors of gan.config

    fields = {**ModelSection.model_fields, **TrainSection.model_fields}
    unknown = sorted(set(names) - set(fields))
    if unknown:
        raise ValueError(f"not sweep parameters: {unknown}")
    return {name: _parameter_type(fields[name].annotation) for name in names}


def to_table(rows: list[dict[str, Any]], fixed: dict[str, pa.DataType], params: dict[str, pa.DataType]) -> pa.Table:
    columns: dict[str, pa.Array] = {}
    for name, kind in IDENTITY_COLUMNS.items():
        columns[name] = pa.array([r.get(name) for r in rows], type=kind)
    for name, kind in params.items():
        values = [r.get(name) for r in rows]
        if kind == pa.string():
            columns[name] = pa.array([None if v is None else str(v) for v in values], type=kind)
        else:
            # A checked cast: a value that does not fit the schema's type raises instead of being truncated.
            columns[name] = pa.array(values).cast(kind)
    for name, kind in fixed.items():
        values = [r.get(name) for r in rows]
        if kind == pa.float64():  # non-finite numbers are null; the trial's status says why
            values = [v if v is None or finite(v) else None for v in values]
        columns[name] = pa.array(values, type=kind)
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

    def __init__(self, sweep_dir: Path, sweep_name: str, params: Iterable[str] | Mapping[str, pa.DataType]):
        self.dir = sweep_dir
        self.sweep = sweep_name
        # Parameter names (typed from the sweep schema), or name -> Arrow type.
        self.params = dict(params) if isinstance(params, Mapping) else parameter_types(params)
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

    def drop_trials(self, trial_ids: Iterable[str]) -> None:
        """Remove placeholder rows (trials that never started) before Tune adds them under their real ids."""
        dropped = [self.trials.pop(t) for t in list(trial_ids) if t in self.trials]
        if dropped:
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
