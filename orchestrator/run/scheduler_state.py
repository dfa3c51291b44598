"""Scheduler state that survives a killed driver: a journal of changes, and a snapshot when the sweep ends.

Ray Tune does not save a scheduler's state with the experiment, so the schedulers of
`orchestrator.run.schedulers` keep theirs in the sweep directory through this base class.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestrator.store.parts import SYNC_EVERY_S, fsync_later


def _write_json(path: Path, payload: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class SavedState:
    """Scheduler state that survives a killed driver, at a constant cost per change.

    Every change is one JSON line appended to the journal (`scheduler.jsonl` beside `state_file`); `snapshot()`
    writes the whole state to `state_file` (`scheduler.json`) and empties the journal, when the sweep ends.
    The copy Tune unpickles on --resume reads the snapshot, then replays the journal, on its first call.
    Journal events set values (never add to them), so replaying one that a snapshot already holds is harmless.
    """

    state_file: str
    _loaded: bool

    @property
    def journal_file(self) -> Path:
        return Path(self.state_file).with_suffix(".jsonl")

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_loaded"] = False  # a restored copy re-reads the files
        if "_trials" in state:
            state["_trials"] = {}  # Tune's Trial objects: on_trial_add hands them over again
        return state

    def _log(self, *event: Any) -> None:
        with open(self.journal_file, "a") as f:
            f.write(json.dumps(event) + "\n")

    def flush_state(self) -> None:
        """Make the journal durable, at most once a second and on the sync thread (Ray Tune's experiment
        checkpoints call this through the results callback; see orchestrator.store.parts.WriteHealth for why
        not on every call, nor on the driver's thread)."""
        now = time.monotonic()
        if now - getattr(self, "_last_sync", 0.0) < SYNC_EVERY_S:
            return
        self._last_sync = now
        if self.journal_file.exists():  # a journal removed meanwhile (snapshot) is skipped by the sync thread
            fsync_later([self.journal_file])

    def snapshot(self) -> None:
        """The whole state to `state_file`, then an empty journal."""
        self._load()
        _write_json(Path(self.state_file), self._state())
        self.journal_file.unlink(missing_ok=True)

    def _read_saved(self) -> tuple[dict | None, list[list]] | None:
        """(snapshot, journal events), the first time only (None once read)."""
        if self._loaded:
            return None
        self._loaded = True
        path = Path(self.state_file)
        snapshot = json.loads(path.read_text()) if path.exists() else None
        events = []
        if self.journal_file.exists():
            for line in self.journal_file.read_text().splitlines():
                try:
                    events.append(json.loads(line))
                except ValueError:  # the last line of a driver killed mid-write
                    break
        return snapshot, events

    def _load(self) -> None:
        """The saved state, on the first call of the copy Tune unpickled: the snapshot, then the journal."""
        saved = self._read_saved()
        if saved is None:
            return
        snapshot, events = saved
        if snapshot is not None:
            self._restore(snapshot)
        for kind, *args in events:
            self._set(kind, *args, log=False)

    def _state(self) -> dict:
        raise NotImplementedError

    def _restore(self, snapshot: dict) -> None:
        raise NotImplementedError

    def _set(self, kind: str, *args: Any, log: bool = True) -> None:
        raise NotImplementedError
