"""Append-only part files: how a running sweep writes its tables at a constant cost per row.

While a sweep runs, rows go to small Arrow IPC files in `<sweep>/.parts/` named
`<table>.<level>.<first seq>.part` (a suffix other than `.parquet`, so tools that glob `*.parquet` see only the
compacted tables; Arrow IPC because writing one is several times cheaper than writing Parquet). Each part is
written to a temporary file, fsynced and renamed, so a crash leaves whole parts or none.

Every row carries `_seq`, a number that grows across parts and sessions: when rows share a key (an evaluation
re-reported after a restart, a trial's later update), the one with the highest `_seq` wins, whatever the order
in which parts are read or merged. A trial row with `_deleted` set removes that trial (a placeholder that Tune
later adds under its real id).

Parts are merged like a log-structured tree: when `MERGE_FANOUT` parts share a level, they become one part of
the next level, so the number of parts stays logarithmic and each row is rewritten a logarithmic number of
times. `compact` folds the parts into the documented `evaluations.parquet` and `trials.parquet`, then deletes
them; a crash between the two leaves rows that the next read or compaction deduplicates.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

PARTS_DIR = ".parts"
SEQ, DELETED = "_seq", "_deleted"  # bookkeeping columns of part files only, never of the compacted tables
MERGE_FANOUT = 16
_PART = re.compile(r"^(?P<table>[a-z]+)\.(?P<level>\d+)\.(?P<seq>\d+)\.part$")


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (a no-op where directories cannot be opened, e.g. some network mounts)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_atomic(table: pa.Table, path: Path, *, arrow: bool = False, sync: bool = True) -> None:
    """Write `table` to `path` (Parquet, or an Arrow IPC file): a temporary file renamed over `path`, so a
    reader or a crash sees the old file or the new one. With `sync`, the file and the rename are fsynced
    first (without, the caller fsyncs later: see WriteHealth)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if arrow:
            with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
        else:
            pq.write_table(table, tmp)
        if sync:
            fsync_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync:
        fsync_dir(path.parent)


def part_files(sweep_dir: Path, table: str) -> list[Path]:
    folder = sweep_dir / PARTS_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if (m := _PART.match(p.name)) and m["table"] == table)


def _level(path: Path) -> int:
    return int(_PART.match(path.name)["level"])


def read_parts(paths: Iterable[Path]) -> pa.Table | None:
    """All rows of `paths` as one table (None when there are none); a part that vanished meanwhile is skipped."""
    tables = []
    for path in paths:
        try:
            with pa.memory_map(str(path)) as source:
                tables.append(pa.ipc.open_file(source).read_all())
        except FileNotFoundError:  # merged or compacted by the writer while we listed
            continue
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="permissive")


def latest(table: pa.Table, key: list[str]) -> pa.Table:
    """One row per key: the one with the highest `_seq` (rows without one, from a compacted table, count as
    oldest). A float key (kimg) is compared rounded to 6 decimals, as evaluations are keyed."""
    if table.num_rows == 0:
        return table
    keys = table.select(key).to_pandas()
    for name in key:
        if pa.types.is_floating(table.schema.field(name).type):
            keys[name] = keys[name].round(6)
    seq = table.column(SEQ).to_pandas() if SEQ in table.column_names else pd.Series([None] * table.num_rows)
    keys["_seq"] = seq.fillna(-1).to_numpy()
    keys["_row"] = range(table.num_rows)
    kept = keys.sort_values("_seq", kind="stable").drop_duplicates(key, keep="last")
    return table.take(pa.array(sorted(kept["_row"])))


SYNC_EVERY_S = 1.0  # group commit: parts written since the last fsync are fsynced together at most this often


class WriteHealth:
    """Shared by the logs of one writer: their group commit, and a failing disk reported once (and its recovery
    once).

    A part is renamed into place at once (a killed driver never loses a flushed row: the rename is in the
    kernel), and fsynced with every part written since the last sync, at most every `SYNC_EVERY_S`: an fsync
    per result would cost more than everything else the driver does for it. A machine that loses power can
    lose at most that last second, as it would lose Ray Tune's own experiment state, which is not fsynced."""

    def __init__(self, clock: Callable[[], float] | None = None):
        import time

        self.failing = False
        self.logs: list[PartLog] = []
        self.unsynced: list[Path] = []
        self.clock = clock or time.monotonic
        self.last_sync = self.clock()

    def pending(self) -> bool:
        return any(log.buffer for log in self.logs)

    def wrote(self, path: Path) -> None:
        self.unsynced.append(path)
        if self.clock() - self.last_sync >= SYNC_EVERY_S:
            self.sync()

    def sync(self) -> None:
        """fsync every part written since the last sync, then their directory."""
        self.last_sync = self.clock()
        folders = set()
        for path in self.unsynced:
            try:
                fsync_file(path)
                folders.add(path.parent)
            except FileNotFoundError:  # merged away: the merged part was fsynced
                continue
        for folder in folders:
            fsync_dir(folder)
        self.unsynced = []


class PartLog:
    """Buffered, append-only rows of one table: flushed as a part every `flush_rows` rows or `flush_seconds`,
    and whenever `flush()` is called (Ray Tune's experiment checkpoints call it through the results callback)."""

    def __init__(self, sweep_dir: Path, table: str, to_table: Callable[[list[dict]], pa.Table], next_seq: int,
                 *, flush_rows: int = 256, flush_seconds: float = 5.0, clock: Callable[[], float] | None = None,
                 health: WriteHealth | None = None):
        import time

        self.dir = sweep_dir / PARTS_DIR
        self.table, self.to_table = table, to_table
        self.next_seq = next_seq
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self.clock = clock or time.monotonic
        self.buffer: list[dict] = []
        self.last_flush = self.clock()
        self.health = health or WriteHealth()
        self.health.logs.append(self)

    def append(self, row: dict) -> None:
        self.buffer.append({**row, SEQ: self.next_seq})
        self.next_seq += 1
        if len(self.buffer) >= self.flush_rows or self.clock() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one part. A failing write (a full disk, a lost mount) keeps the rows for
        the next flush and is reported once, on stderr: the sweep goes on."""
        self.last_flush = self.clock()
        if not self.buffer:
            return
        first = self.buffer[0][SEQ]
        try:
            path = self.dir / f"{self.table}.0.{first:012d}.part"
            write_atomic(self.to_table(self.buffer), path, arrow=True, sync=False)
            self.health.wrote(path)
            self._merge_full_levels()
        except OSError as exc:
            if not self.health.failing:
                print(f"warning: {self.dir}: cannot write the results ({exc.strerror or exc}); rows are kept in "
                      "memory and retried at the next flush", file=sys.stderr)
            self.health.failing = True
            return
        self.buffer = []
        if self.health.failing and not self.health.pending():
            print(f"warning: {self.dir}: the results are written again", file=sys.stderr)
            self.health.failing = False

    def _merge_full_levels(self) -> None:
        level = 0
        while True:
            same = [p for p in part_files(self.dir.parent, self.table) if _level(p) == level]
            if len(same) < MERGE_FANOUT:
                return
            merged = read_parts(same)
            first = int(_PART.match(same[0].name)["seq"])
            # fsynced before its sources go: a crash must find either them or it
            write_atomic(merged, self.dir / f"{self.table}.{level + 1}.{first:012d}.part", arrow=True)
            for p in same:
                p.unlink(missing_ok=True)
            level += 1


def max_seq(table: pa.Table | None) -> int:
    if table is None or SEQ not in table.column_names or table.num_rows == 0:
        return -1
    value = pc.max(table.column(SEQ)).as_py()
    return -1 if value is None else int(value)
