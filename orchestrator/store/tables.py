"""The two Parquet tables of a sweep, one row per evaluation and one row per trial: their columns, the one
writer, and the merged read of what is on disk.

While a sweep runs, `ResultsWriter` appends rows to part files (orchestrator.store.parts) at a constant cost
per row; `compact` folds them into the documented `evaluations.parquet` and `trials.parquet`. `read_table`
reads compacted tables and parts as one table, keyed by `(trial_id, kimg)` for evaluations and by
`trial_id` (the latest update) for trials, so every reader sees the same rows during a run and after it.
"""
from __future__ import annotations

import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.store.failures import finite
from orchestrator.store.part_rows import RowCodec
from orchestrator.store.parts import (
    DELETED,
    PARTS_DIR,
    SEQ,
    PartLog,
    WriteHealth,
    drain_syncs,
    latest,
    max_seq,
    part_files,
    read_listed_parts,
    read_parts,
    write_atomic,
)
from orchestrator.sweepfile.sections import ModelSection, Sweep, TrainSection

EVALUATIONS_FILE = "evaluations.parquet"
TRIALS_FILE = "trials.parquet"
STATUSES = ("pending", "running", "interrupted", "completed", "stopped_early", "diverged", "error")

# Fixed columns and their types; parameter columns (typed from the sweep schema) come
# between the identity columns and these.

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
# What a trial's result (and its stats.jsonl) carries into an evaluation row.
EVAL_KEYS = (
    "kimg", "g_steps", "fid", "is_mean", "is_std", "kid_mean", "kid_std", "extractor", "fid_samples", "final",
    "loss_d", "loss_g", "images_per_s", "eval_seconds", "wall_s", "grid_path", "node", "node_ip", "data_source",
    "device_used",
)


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
    fields = {**ModelSection.model_fields, **TrainSection.model_fields}
    unknown = sorted(set(names) - set(fields))
    if unknown:
        raise ValueError(f"not sweep parameters: {unknown}")
    return {name: _parameter_type(fields[name].annotation) for name in names}


def parameter_columns(swept: Iterable[str]) -> list[str]:
    """Every swept parameter (`Sweep.swept_names`), plus the three every leaderboard needs, as Parquet columns."""
    return sorted(set(swept) | {"variant", "g_widths", "seed"})


def parameter_row(sweep: Sweep, params: dict[str, Any]) -> dict[str, Any]:
    """A trial's parameter columns; a conditional parameter that does not apply is null."""
    cfg = sweep.trial_config(params)
    row = {}
    swept = sweep.swept_names()
    for name in parameter_columns(swept):
        if name in swept:
            value = params.get(name)
        else:
            value = getattr(cfg.model, name) if hasattr(cfg.model, name) else getattr(cfg.train, name)
        row[name] = parameter_value(value)
    return row


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


# Layout of a sweep directory's results: 1 = compacted tables only; 2 = compacted tables plus Arrow IPC part
# files; 3 = flushed parts hold JSON rows (parts.RowCodec), merged parts Arrow IPC. Each version reads the older.
FORMAT_FILE = ".results-format"
FORMAT_VERSION = 3
KEYS = {"evaluations": ["trial_id", "kimg"], "trials": ["trial_id"]}
FILES = {"evaluations": EVALUATIONS_FILE, "trials": TRIALS_FILE}
READ_ATTEMPTS = 10


class ResultsFormatError(RuntimeError):
    """A results directory written by a newer version of the project; str() is one line."""


def check_format(sweep_dir: Path) -> None:
    """Refuse a layout newer than this code reads (an older one, without the marker, reads as it is)."""
    marker = sweep_dir / FORMAT_FILE
    try:
        version = int(marker.read_text().strip())
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        raise ResultsFormatError(f"{marker}: unreadable results format marker") from None
    if version > FORMAT_VERSION:
        raise ResultsFormatError(f"{sweep_dir}: results written in format {version}; this version of gan-sweeps "
                                 f"reads format {FORMAT_VERSION} and older: upgrade it to read them")


def read_table(sweep_dir: Path, name: str) -> pa.Table | None:
    """The table `name` ("evaluations" or "trials") as readers see it: compacted rows and parts merged, the
    latest row of each key, deleted trials dropped, sorted by key. None when nothing was written yet."""
    check_format(sweep_dir)
    compacted = sweep_dir / FILES[name]
    for _ in range(READ_ATTEMPTS):  # again while a merge or compaction moves rows under the listing
        tables = [pq.read_table(compacted)] if compacted.exists() else []
        parts, whole = read_listed_parts(sweep_dir, name)
        if whole:
            break
    if parts is not None:
        tables.append(parts)
    if not tables:
        return None
    merged = latest(pa.concat_tables(tables, promote_options="permissive"), KEYS[name])
    if DELETED in merged.column_names:
        merged = merged.filter(pa.compute.invert(pa.compute.fill_null(merged.column(DELETED), False)))
    merged = merged.drop_columns([c for c in (SEQ, DELETED) if c in merged.column_names])
    return merged.sort_by([(k, "ascending") for k in KEYS[name]])


def read_rows(sweep_dir: Path, name: str) -> list[dict[str, Any]]:
    table = read_table(sweep_dir, name)
    return [] if table is None else table.to_pylist()


def compact(sweep_dir: Path) -> None:
    """Fold the part files into `evaluations.parquet` and `trials.parquet`, then delete them. Idempotent: a
    crash before the parts are deleted leaves rows that the next read or compaction deduplicates."""
    drain_syncs()  # a merge renamed into place after this listing would bring back rows older than the tables
    for name in FILES:
        parts = part_files(sweep_dir, name)
        if not parts:
            continue
        table = read_table(sweep_dir, name)
        if table is not None:
            write_atomic(table, sweep_dir / FILES[name])
        for part in parts:
            part.unlink(missing_ok=True)
    folder = sweep_dir / PARTS_DIR
    if folder.is_dir():
        for leftover in folder.glob(".*.tmp"):  # never renamed into place by a killed writer: no row only there
            leftover.unlink(missing_ok=True)
        if not any(folder.iterdir()):
            folder.rmdir()


class _PartTable:
    """Builds a part from its rows in one conversion (a struct array) instead of one pyarrow call per column:
    a part holds a few rows, and per-column calls were most of its cost. The values are those `to_table`
    makes, plus `_seq` and `_deleted` (tests/test_results.py compares the two)."""

    def __init__(self, fixed: dict[str, pa.DataType], params: dict[str, pa.DataType]):
        fields = [pa.field(n, k) for part in (IDENTITY_COLUMNS, params, fixed) for n, k in part.items()]
        self.type = pa.struct([*fields, pa.field(SEQ, pa.int64()), pa.field(DELETED, pa.bool_())])
        self.floats = [n for n, k in fixed.items() if k == pa.float64()]
        self.labels = [n for n, k in params.items() if k == pa.string()]
        self.checked = {n: k for n, k in params.items() if k != pa.string()}
        exact = {pa.int64(): int, pa.float64(): float, pa.bool_(): bool}
        self.exact = {n: exact.get(k) for n, k in self.checked.items()}

    def _fit(self, name: str, value: Any) -> Any:
        """A parameter value through to_table's checked cast (2.5 for an int column raises), unless it already
        has the column's Python type."""
        if type(value) is self.exact[name]:
            return value
        return pa.array([value]).cast(self.checked[name])[0].as_py()

    def codec(self) -> RowCodec:
        """How the parts of this table hold their rows (orchestrator.store.parts.RowCodec)."""
        return RowCodec(pa.schema(list(self.type)), fit=self.fit)

    def __call__(self, rows: list[dict[str, Any]]) -> pa.RecordBatch:
        return pa.RecordBatch.from_struct_array(pa.array(self.fit(rows), type=self.type))

    def fit(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rows' values as the columns hold them."""
        ready = []
        for row in rows:
            row = dict(row)
            for name in self.floats:  # non-finite numbers are null; the trial's status says why
                value = row.get(name)
                if value is not None and not finite(value):
                    row[name] = None
            for name in self.labels:
                value = row.get(name)
                if value is not None:
                    row[name] = str(value)
            for name in self.checked:
                value = row.get(name)
                if value is not None:
                    row[name] = self._fit(name, value)
            row[DELETED] = bool(row.get(DELETED))
            ready.append(row)
        return ready


class ResultsWriter:
    """A sweep's tables while it runs: rows appended to part files at a constant cost per row, plus what the
    driver needs in memory (every trial's row; per trial, its evaluations' FID and IS and its latest row).

    Evaluations are keyed by (trial_id, kimg): a trial restarted from a checkpoint that re-reports a step
    replaces the row instead of duplicating it. `flush()` writes what is buffered; `close()` flushes and
    compacts (the driver calls it on every exit it survives).
    """

    def __init__(self, sweep_dir: Path, sweep_name: str, params: Iterable[str] | Mapping[str, pa.DataType], *,
                 flush_rows: int = 256, flush_seconds: float = 5.0, part_rows: int = 256):
        self.dir = sweep_dir
        self.sweep = sweep_name
        # Parameter names (typed from the sweep schema), or name -> Arrow type.
        self.params = dict(params) if isinstance(params, Mapping) else parameter_types(params)
        check_format(sweep_dir)
        drain_syncs()  # another writer's merges in this process end first: _seq continues from every row
        self.trials: dict[str, dict[str, Any]] = {row["trial_id"]: row for row in read_rows(sweep_dir, "trials")}
        self._scores: dict[str, dict[float, tuple[float | None, float | None]]] = {}  # trial -> kimg -> (fid, is)
        self._latest: dict[str, dict[str, Any]] = {}  # trial -> its evaluation at the highest kimg
        self._best: dict[str, list] = {}  # trial -> [(best fid, its kimg) or None, best IS or None]
        for row in read_rows(sweep_dir, "evaluations"):  # --resume continues the tables
            self._index(row)
        start = {name: max_seq(read_parts(part_files(sweep_dir, name))) + 1 for name in FILES}
        self._health = WriteHealth()
        options = {"flush_rows": flush_rows, "flush_seconds": flush_seconds, "part_rows": part_rows,
                   "health": self._health}
        columns = {"evaluations": EVALUATION_COLUMNS, "trials": TRIAL_COLUMNS}
        keys = {"evaluations": lambda row: (row["trial_id"], round(row["kimg"], 6)),
                "trials": lambda row: row["trial_id"]}
        self._logs = {
            name: PartLog(sweep_dir, name, _PartTable(columns[name], self.params).codec(), start[name], key=keys[name],
                          **options)
            for name in FILES
        }
        sweep_dir.mkdir(parents=True, exist_ok=True)
        marker = sweep_dir / FORMAT_FILE
        if not marker.exists() or marker.read_text().strip() != str(FORMAT_VERSION):  # an older layout resumed
            marker.write_text(f"{FORMAT_VERSION}\n")

    def _index(self, row: dict[str, Any]) -> None:
        trial, kimg = row["trial_id"], round(row["kimg"], 6)
        scores = self._scores.setdefault(trial, {})
        fid, is_mean = row.get("fid"), row.get("is_mean")
        best = self._best.get(trial)
        if kimg in scores:  # a re-reported evaluation may have been the best: summed up again when asked
            self._best.pop(trial, None)
        elif best is not None:  # as min() and max() over the scores in order would pick, one score at a time
            if fid is not None and finite(fid) and (best[0] is None or (fid, kimg) < best[0]):
                best[0] = (fid, kimg)
            if is_mean is not None and (best[1] is None or is_mean > best[1]):
                best[1] = is_mean
        scores[kimg] = (fid, is_mean)
        if trial not in self._latest or round(self._latest[trial]["kimg"], 6) <= kimg:
            self._latest[trial] = row

    def add_evaluation(self, row: dict[str, Any]) -> None:
        row = {"sweep": self.sweep, **row}
        self._index(row)
        self._logs["evaluations"].append(row)

    def update_trial(self, trial_id: str, **fields: Any) -> None:
        row = self.trials.setdefault(trial_id, {"sweep": self.sweep, "trial_id": trial_id})
        row.update(fields)
        self._logs["trials"].append(dict(row))

    def drop_trials(self, trial_ids: Iterable[str]) -> None:
        """Remove placeholder rows (trials that never started) before Tune adds them under their real ids."""
        for trial_id in list(trial_ids):
            if self.trials.pop(trial_id, None) is not None:
                self._logs["trials"].append({"sweep": self.sweep, "trial_id": trial_id, DELETED: True})

    def recorded_kimgs(self, trial_id: str) -> set[float]:
        """The kimg (rounded to 6 decimals) of every evaluation of the trial in the table."""
        return set(self._scores.get(trial_id, {}))

    def summary(self, trial_id: str) -> dict[str, Any]:
        """The trial's evaluations summed up: count, best FID (and where), best IS, and its latest evaluation
        (`last`, None before the first). Kept up to date as evaluations come: a result costs the same whatever
        the number of evaluations before it (one re-reported costs the trial's own evaluations once)."""
        scores = self._scores.get(trial_id, {})
        best = self._best.get(trial_id)
        if best is None:
            fids = [(fid, kimg) for kimg, (fid, _) in scores.items() if fid is not None and finite(fid)]
            is_values = [v for _, v in scores.values() if v is not None]
            best = self._best[trial_id] = [min(fids, default=None), max(is_values, default=None)]
        return {"evaluations": len(scores), "best_fid": best[0][0] if best[0] else None,
                "best_fid_kimg": best[0][1] if best[0] else None, "best_is": best[1],
                "last": self._latest.get(trial_id)}

    def flush(self) -> None:
        for log in self._logs.values():
            log.flush()
        self._health.maybe_sync()  # also when nothing was written: a quiet spell still gets its fsync

    def sync(self) -> None:
        """Make every row flushed so far durable (waits for the sync thread); `flush()` first for the buffered."""
        self._health.sync()

    def close(self) -> None:
        self.flush()
        for log in self._logs.values():
            log.close_part()
        self.sync()
        compact(self.dir)
        for log in self._logs.values():
            log.reset_parts()  # compaction deleted them


EXPORT_FORMATS = ("parquet", "csv")


def export_table(sweep_dir: Path, name: str, fmt: str, out: Path) -> int:
    """Write the table `name` as it stands now (a running sweep's part files included) to `out`, atomically;
    returns its row count. Raises ResultsFormatError for a newer layout, OSError when `out` can't be written."""
    import pyarrow.csv as pacsv

    table = read_table(sweep_dir, name)
    if table is None:
        table = to_table([], EVALUATION_COLUMNS if name == "evaluations" else TRIAL_COLUMNS, {})
    if fmt == "parquet":
        write_atomic(table, out)
        return table.num_rows
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        pacsv.write_csv(table, tmp)
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return table.num_rows
