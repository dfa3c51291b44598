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
times. A merged part is fsynced, renamed into place and only then are its sources deleted, on the sync thread
(`fsync_later`): until then readers see its rows twice, and keep one. `compact` folds the parts into the
documented `evaluations.parquet` and `trials.parquet`, then deletes them; a crash between the two leaves rows
that the next read or compaction deduplicates.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

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


_IPC_OPTIONS = pa.ipc.IpcWriteOptions()  # given, so pyarrow does not read its environment variables per part


def _write_temp(table: pa.Table | pa.RecordBatch, path: str) -> str:
    """`table` as an Arrow IPC file beside `path`, under a temporary name (not yet renamed into place).
    Serialised in memory, then one write: a part holds a few rows, and Arrow's file sink costs more per part
    than the rows do."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema, options=_IPC_OPTIONS) as writer:
        writer.write(table)
    folder, name = os.path.split(path)
    tmp = f"{folder}/.{name}.{os.getpid()}.tmp"  # one writer per sweep: the name is its own
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except FileNotFoundError:  # the folder itself is gone (compacted away): made again
        os.makedirs(folder, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        data = memoryview(sink.getvalue())
        while data:
            data = data[os.write(fd, data):]
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    return tmp


def _write_part(table: pa.Table | pa.RecordBatch, path: str) -> None:
    """A part renamed into place at once, fsynced later (WriteHealth)."""
    tmp = _write_temp(table, path)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_atomic(table: pa.Table, path: Path, *, arrow: bool = False, sync: bool = True) -> None:
    """Write `table` to `path` (Parquet, or an Arrow IPC file): a temporary file renamed over `path`, so a
    reader or a crash sees the old file or the new one. With `sync`, the file and the rename are fsynced
    first (without, the caller fsyncs later: see WriteHealth)."""
    if arrow:
        tmp = Path(_write_temp(table, str(path)))
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        if not arrow:
            pq.write_table(table, tmp)
        if sync:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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


def _read(paths: Iterable[Path | str]) -> tuple[pa.Table | None, bool]:
    """The rows of `paths` as one table (None when none), and whether every part was still there."""
    tables, whole = [], True
    for path in paths:
        try:
            with pa.memory_map(str(path)) as source:
                tables.append(pa.ipc.open_file(source).read_all())
        except FileNotFoundError:  # merged or compacted by the writer while we listed
            whole = False
    return (pa.concat_tables(tables, promote_options="permissive") if tables else None), whole


def read_parts(paths: Iterable[Path | str]) -> pa.Table | None:
    """All rows of `paths` as one table (None when there are none); a part that vanished meanwhile is skipped."""
    return _read(paths)[0]


def read_listed_parts(sweep_dir: Path, table: str) -> tuple[pa.Table | None, bool]:
    """The rows of the table's parts as listed now, and False if one of them vanished before it was read: its
    rows went to a part (or compacted table) the listing missed, so the caller reads again."""
    return _read(part_files(sweep_dir, table))


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
CACHED_ROWS = 4096  # parts up to this size stay in memory until merged, so a merge reads no file back
_syncer: ThreadPoolExecutor | None = None


def _fsync_all(paths: list[str | Path]) -> None:
    """fsync `paths`, then their folders; a path merged away meanwhile is skipped (the merged part is fsynced)."""
    folders = set()
    for path in map(Path, paths):
        try:
            fsync_file(path)
            folders.add(path.parent)
        except FileNotFoundError:
            continue
    for folder in folders:
        fsync_dir(folder)


def _merge(path: str, sources: list[str], cache: dict[str, pa.Table | pa.RecordBatch]) -> None:
    """Parts merged into one: written, fsynced, renamed into place, and only then its sources deleted, so a crash
    finds either them or it. Runs on the sync thread, after the merges that wrote its sources: those held in
    `cache` are not read back from disk."""
    cached = [cache.pop(p, None) for p in sources]
    on_disk = read_parts(p for p, t in zip(sources, cached, strict=True) if t is None)
    if on_disk is None and all(isinstance(t, pa.RecordBatch) for t in cached):
        merged = pa.concat_batches(cached)  # built by one writer: one schema, and one batch per merged part
    else:  # parts of an earlier session may have another schema
        tables = [pa.Table.from_batches([t]) if isinstance(t, pa.RecordBatch) else t for t in cached if t is not None]
        merged = pa.concat_tables(tables + ([on_disk] if on_disk is not None else []),
                                  promote_options="permissive").combine_chunks()
    tmp = _write_temp(merged, path)
    fsync_file(Path(tmp))
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)
    for source in sources:
        Path(source).unlink(missing_ok=True)
    if merged.num_rows <= CACHED_ROWS:
        cache[path] = merged


def on_sync_thread(job: Callable[..., None], *args: Any) -> Future:
    """Run `job` on the process's one sync thread, after every job handed over before it. An fsync waits for
    the disk, a millisecond or more per file, and merging parts is upkeep: the driver's thread, which Ray Tune
    runs its event loop on, need not wait for either."""
    global _syncer
    if _syncer is None:
        _syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="results-fsync")
    return _syncer.submit(job, *args)


def fsync_later(paths: Iterable[Path]) -> Future:
    """fsync `paths`, then their folders, on the sync thread."""
    return on_sync_thread(_fsync_all, list(paths))


def drain_syncs() -> None:
    """Wait for every job handed to the sync thread so far (compaction must not race a merge's rename)."""
    if _syncer is not None:
        _syncer.submit(lambda: None).result()


class WriteHealth:
    """Shared by the logs of one writer: their group commit, and a failing disk reported once (and its recovery
    once).

    A part is renamed into place at once (a killed driver never loses a flushed row: the rename is in the
    kernel), and fsynced with every part written since the last sync, at most every `SYNC_EVERY_S`, on the sync
    thread: an fsync per result would cost more than everything else the driver does for it. A machine that
    loses power can lose about that last second, as it would lose Ray Tune's own experiment state, which is not
    fsynced."""

    def __init__(self, clock: Callable[[], float] | None = None):
        import time

        self.failing = False
        self.logs: list[PartLog] = []
        self.unsynced: list[str | Path] = []
        self.clock = clock or time.monotonic
        self.last_sync = self.clock()
        self.jobs: list[Future] = []  # on the sync thread, not yet checked
        self.sync_failed = False

    def pending(self) -> bool:
        return any(log.buffer for log in self.logs)

    def wrote(self, path: str | Path) -> None:
        self.unsynced.append(path)
        self.maybe_sync()

    def maybe_sync(self) -> None:
        """Hand the parts written since the last sync to the sync thread, if that sync is `SYNC_EVERY_S` old."""
        self._check(wait=False)
        if self.unsynced and self.clock() - self.last_sync >= SYNC_EVERY_S:
            self.last_sync = self.clock()
            self.jobs.append(fsync_later(self.unsynced))
            self.unsynced = []

    def merge(self, path: str, sources: list[str], cache: dict) -> None:
        """Merge `sources` into the part `path` on the sync thread (`_merge`)."""
        self.jobs.append(on_sync_thread(_merge, path, list(sources), cache))

    def wait_synced(self) -> None:
        """Wait for this writer's jobs on the sync thread."""
        self._check(wait=True)

    def sync(self) -> None:
        """fsync every part written since the last sync, then their folder, before returning."""
        self.wait_synced()
        self.last_sync = self.clock()
        paths, self.unsynced = self.unsynced, []
        _fsync_all(paths)

    def _check(self, *, wait: bool) -> None:
        left = []
        for job in self.jobs:
            if not wait and not job.done():
                left.append(job)
                continue
            exc = job.exception()
            if exc is not None and not self.sync_failed:  # fsync cannot usefully be retried: said once
                print(f"warning: cannot make the results durable ({getattr(exc, 'strerror', None) or exc}); "
                      "rows written are kept, but may not survive a power loss", file=sys.stderr)
            self.sync_failed = self.sync_failed or exc is not None
        self.jobs = left


class PartLog:
    """Buffered, append-only rows of one table: flushed as a part every `flush_rows` rows or `flush_seconds`,
    and whenever `flush()` is called (Ray Tune's experiment checkpoints call it through the results callback).

    With `key`, a row replaces a buffered row of the same key (a trial's later update, an evaluation
    re-reported): readers keep only the latest row of a key, so the earlier one need not be written."""

    def __init__(self, sweep_dir: Path, table: str, to_table: Callable[[list[dict]], pa.Table | pa.RecordBatch],
                 next_seq: int, *, flush_rows: int = 256, flush_seconds: float = 5.0,
                 clock: Callable[[], float] | None = None, health: WriteHealth | None = None,
                 key: Callable[[dict], Any] | None = None):
        import time

        self.dir = sweep_dir / PARTS_DIR
        self.table, self.to_table = table, to_table
        self.next_seq = next_seq
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self.clock = clock or time.monotonic
        self.key = key
        self.buffer: dict[Any, dict] = {}  # in _seq order
        self.last_flush = self.clock()
        self.health = health or WriteHealth()
        self.health.logs.append(self)
        self.reset_parts()

    def reset_parts(self) -> None:
        """Which parts exist, by level (read at the start and after a compaction, then kept in memory, so a
        flush lists no folder). Paths as strings: pathlib costs more than the rest of a flush."""
        self.folder = str(self.dir)
        self.levels: dict[int, list[str]] = {}
        self.cached: dict[str, pa.Table | pa.RecordBatch] = {}
        for path in part_files(self.dir.parent, self.table):
            self.levels.setdefault(_level(path), []).append(str(path))

    def append(self, row: dict) -> None:
        seq = self.next_seq
        self.next_seq += 1
        key = seq if self.key is None else self.key(row)
        self.buffer.pop(key, None)  # and added last: the buffer stays in _seq order
        self.buffer[key] = {**row, SEQ: seq}
        if len(self.buffer) >= self.flush_rows or self.clock() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one part. A failing write (a full disk, a lost mount) keeps the rows for
        the next flush and is reported once, on stderr: the sweep goes on."""
        self.last_flush = self.clock()
        if not self.buffer:
            return
        rows = list(self.buffer.values())
        try:
            path = f"{self.folder}/{self.table}.0.{rows[0][SEQ]:012d}.part"
            table = self.to_table(rows)
            _write_part(table, path)
            self.health.wrote(path)
            self.levels.setdefault(0, []).append(path)
            if table.num_rows <= CACHED_ROWS:
                self.cached[path] = table
            self._merge_full_levels()
        except OSError as exc:
            if not self.health.failing:
                print(f"warning: {self.dir}: cannot write the results ({exc.strerror or exc}); rows are kept in "
                      "memory and retried at the next flush", file=sys.stderr)
            self.health.failing = True
            return
        self.buffer = {}
        if self.health.failing and not self.health.pending():
            print(f"warning: {self.dir}: the results are written again", file=sys.stderr)
            self.health.failing = False

    def _merge_full_levels(self) -> None:
        """Hand each level holding `MERGE_FANOUT` parts to the sync thread as one part of the next level; the
        rows are on disk meanwhile (readers see them once or twice, and keep one)."""
        level = 0
        while len(self.levels.get(level, ())) >= MERGE_FANOUT:
            same = sorted(self.levels[level])  # zero-padded sequence numbers: sorted by name is by _seq
            first = int(_PART.match(os.path.basename(same[0]))["seq"])
            path = f"{self.folder}/{self.table}.{level + 1}.{first:012d}.part"
            self.health.merge(path, same, self.cached)
            self.levels[level] = []
            self.levels.setdefault(level + 1, []).append(path)
            level += 1


def max_seq(table: pa.Table | None) -> int:
    if table is None or SEQ not in table.column_names or table.num_rows == 0:
        return -1
    value = pc.max(table.column(SEQ)).as_py()
    return -1 if value is None else int(value)
