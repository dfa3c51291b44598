"""Append-only part files: how a running sweep writes its tables at a constant cost per row.

While a sweep runs, rows go to small files in `<sweep>/.parts/` named `<table>.<level>.<first seq>.part` (a
suffix other than `.parquet`, so tools that glob `*.parquet` see only the compacted tables).

A flushed part (level 0) is a header naming the rows' Arrow schema, then one line of JSON rows per flush
(`RowCodec`): a flush appends one line to the part it has open, in one write, and a part is closed after
`part_rows` rows. Flushes happen in the callback that Ray Tune runs before each of its experiment checkpoints,
on the thread Tune's event loop runs on, and appending a line to an open file costs a small fraction of creating
and renaming a file, let alone of building an Arrow one. A line is whole once its write returns (a killed
driver loses none of it); a line cut short (the machine lost power, the disk filled up) is the part's last, as
nothing is appended to a part after a failed write, and readers stop before it. Merged parts (level 1 and up,
written on the sync thread) are Arrow IPC files, each written to a temporary file and renamed, so a crash
leaves whole ones or none. Every part is fsynced soon after it is written (`WriteHealth`).

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

from orchestrator.store.part_rows import RowCodec, decode_rows, is_rows_part

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


def _write_all(fd: int, data: bytes | pa.Buffer) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_temp(table: pa.Table | pa.RecordBatch, path: str) -> str:
    """`table` as an Arrow IPC file beside `path`, under a temporary name (not yet renamed into place).
    Serialised in memory, then one write: Arrow's file sink costs more per part than a few rows do."""
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
        _write_all(fd, sink.getvalue())
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    return tmp


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
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:  # merged or compacted by the writer while we listed
            whole = False
            continue
        if is_rows_part(data):
            table = decode_rows(data)
            if table is not None:
                tables.append(table)
        else:
            tables.append(pa.ipc.open_file(pa.py_buffer(data)).read_all())
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


def _merge(path: str, sources: list[str], cache: dict[str, list[dict] | pa.RecordBatch], codec: RowCodec) -> None:
    """Parts merged into one Arrow IPC part: written, fsynced, renamed into place, and only then its sources
    deleted, so a crash finds either them or it. Runs on the sync thread, after the merges that wrote its sources:
    those held in `cache` (the rows of a flushed part, or a merged part) are not read back from disk."""
    cached = [cache.pop(p, None) for p in sources]
    cached = [codec.build(t) if isinstance(t, list) else t for t in cached]
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
            self.jobs.append(fsync_later(dict.fromkeys(self.unsynced)))  # an open part: appended to many times
            self.unsynced = []

    def merge(self, path: str, sources: list[str], cache: dict, codec: RowCodec) -> None:
        """Merge `sources` into the part `path` on the sync thread (`_merge`)."""
        self.jobs.append(on_sync_thread(_merge, path, list(sources), cache, codec))

    def wait_synced(self) -> None:
        """Wait for this writer's jobs on the sync thread."""
        self._check(wait=True)

    def sync(self) -> None:
        """fsync every part written since the last sync, then their folder, before returning."""
        self.wait_synced()
        self.last_sync = self.clock()
        paths, self.unsynced = list(dict.fromkeys(self.unsynced)), []
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
    """Buffered, append-only rows of one table: flushed every `flush_rows` rows or `flush_seconds`, and whenever
    `flush()` is called (Ray Tune's experiment checkpoints call it through the results callback). A flush appends
    one line to the open part; a part is closed after `part_rows` rows, and closed parts are merged.

    With `key`, a row replaces a buffered row of the same key (a trial's later update, an evaluation
    re-reported): readers keep only the latest row of a key, so the earlier one need not be written."""

    def __init__(self, sweep_dir: Path, table: str, codec: RowCodec, next_seq: int, *, flush_rows: int = 256,
                 flush_seconds: float = 5.0, part_rows: int = 256, clock: Callable[[], float] | None = None,
                 health: WriteHealth | None = None, key: Callable[[dict], Any] | None = None):
        import time

        self.dir = sweep_dir / PARTS_DIR
        self.table, self.codec = table, codec
        self.next_seq = next_seq
        self.flush_rows, self.flush_seconds, self.part_rows = flush_rows, flush_seconds, part_rows
        self.clock = clock or time.monotonic
        self.key = key
        self.buffer: dict[Any, dict] = {}  # in _seq order
        self.last_flush = self.clock()
        self.health = health or WriteHealth()
        self.health.logs.append(self)
        self.open_path: str | None = None  # the level-0 part flushes append to, its descriptor and rows
        self.open_fd = -1
        self.open_rows: list[dict] = []
        self.reset_parts()

    def reset_parts(self) -> None:
        """Which parts exist, by level (read at the start and after a compaction, then kept in memory, so a
        flush lists no folder). Paths as strings: pathlib costs more than the rest of a flush."""
        self._let_go()  # after a compaction: the open part is gone with the others
        self.folder = str(self.dir)
        self.levels: dict[int, list[str]] = {}
        self.cached: dict[str, list[dict] | pa.RecordBatch] = {}  # rows of a closed level-0 part, or a merged part
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
        """Append the buffered rows to the open part, as one line in one write (a new part, header and line in
        one write, when none is open). A failing write (a full disk, a lost mount) keeps the rows for the next
        flush, closes the part (never appended to again, so a line it cut short stays its last) and is reported
        once, on stderr: the sweep goes on."""
        self.last_flush = self.clock()
        if not self.buffer:
            return
        rows = list(self.buffer.values())
        try:
            fitted = self.codec.fit(rows)
            line = self.codec.encode(fitted)
            if self.open_path is None:
                self._open_part(rows[0][SEQ], line)
            else:
                _write_all(self.open_fd, line)
            self.health.wrote(self.open_path)
        except OSError as exc:
            self.close_part()
            if not self.health.failing:
                print(f"warning: {self.dir}: cannot write the results ({exc.strerror or exc}); rows are kept in "
                      "memory and retried at the next flush", file=sys.stderr)
            self.health.failing = True
            return
        self.buffer = {}
        self.open_rows.extend(fitted)
        if len(self.open_rows) >= self.part_rows:
            self.close_part()
        if self.health.failing and not self.health.pending():
            print(f"warning: {self.dir}: the results are written again", file=sys.stderr)
            self.health.failing = False

    def _open_part(self, first_seq: int, line: bytes) -> None:
        """A new part named after its first row, holding the header and `line`. A name already taken (by a part
        whose first write failed: no line of it is read) moves on to the next number."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
        while True:
            path = f"{self.folder}/{self.table}.0.{first_seq:012d}.part"
            try:
                fd = os.open(path, flags, 0o644)
                break
            except FileExistsError:
                first_seq += 1
            except FileNotFoundError:  # the folder itself is gone (compacted away): made again
                os.makedirs(self.folder, exist_ok=True)
        self.open_path, self.open_fd, self.open_rows = path, fd, []
        _write_all(fd, self.codec.header + line)

    def _let_go(self) -> tuple[str | None, list[dict]]:
        """Stop appending to the open part: its path and rows (None when no part was open)."""
        path, rows = self.open_path, self.open_rows
        if path is not None:
            try:
                os.close(self.open_fd)
            except OSError:
                pass
        self.open_path, self.open_fd, self.open_rows = None, -1, []
        return path, rows

    def close_part(self) -> None:
        """Close the open part (if any): it joins level 0, with its rows kept for its merge."""
        path, rows = self._let_go()
        if path is None:
            return
        self.levels.setdefault(0, []).append(path)
        if len(rows) <= CACHED_ROWS:
            self.cached[path] = rows
        self._merge_full_levels()

    def _merge_full_levels(self) -> None:
        """Hand each level holding `MERGE_FANOUT` parts to the sync thread as one part of the next level; the
        rows are on disk meanwhile (readers see them once or twice, and keep one)."""
        level = 0
        while len(self.levels.get(level, ())) >= MERGE_FANOUT:
            same = sorted(self.levels[level])  # zero-padded sequence numbers: sorted by name is by _seq
            first = int(_PART.match(os.path.basename(same[0]))["seq"])
            path = f"{self.folder}/{self.table}.{level + 1}.{first:012d}.part"
            self.health.merge(path, same, self.cached, self.codec)
            self.levels[level] = []
            self.levels.setdefault(level + 1, []).append(path)
            level += 1


def max_seq(table: pa.Table | None) -> int:
    if table is None or SEQ not in table.column_names or table.num_rows == 0:
        return -1
    value = pc.max(table.column(SEQ)).as_py()
    return -1 if value is None else int(value)
