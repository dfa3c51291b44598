"""A sweep's results directory: claimed once per sweep name, never silently reused.

<results>/<name>/
    sweep.yaml            the sweep file as given (the report shows it)
    fingerprint           hash of the validated sweep; a different sweep under this name is refused
    .lock                 pid of the `orchestrator sweep` using it (two drivers never share a directory)
    evaluations.parquet   one row per evaluation
    trials.parquet        one row per trial
    trials/<trial_id>/    each trial's options.json, stats.jsonl, sample grids, latest checkpoint
    tune/                 Ray Tune's experiment state and persisted checkpoints (for --resume)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from orchestrator.schema import Sweep


class SweepDirError(RuntimeError):
    """One-line, user-facing reason why a sweep cannot use its results directory."""


@dataclass
class SweepDir:
    path: Path

    @property
    def tune_path(self) -> Path:
        return self.path / "tune"

    @property
    def lock_path(self) -> Path:
        return self.path / ".lock"

    @classmethod
    def claim(cls, sweep: Sweep, results_root: Path, *, resume: bool) -> "SweepDir":
        path = (results_root / sweep.name).resolve()
        fingerprint_file = path / "fingerprint"
        if fingerprint_file.exists():
            if fingerprint_file.read_text().strip() != sweep.fingerprint():
                raise SweepDirError(
                    f"{path}: holds a different sweep named '{sweep.name}'; rename the sweep or pass another --results"
                )
            if not resume:
                raise SweepDirError(
                    f"{path}: sweep '{sweep.name}' already ran here; pass --resume to continue it, "
                    "or another --results for a fresh run"
                )
            if not (path / "tune").exists():
                raise SweepDirError(f"{path}: nothing to resume (no Ray Tune state in tune/)")
        elif resume:
            raise SweepDirError(f"{path}: nothing to resume; run without --resume to start sweep '{sweep.name}'")
        path.mkdir(parents=True, exist_ok=True)
        sweep_dir = cls(path)
        sweep_dir._lock()
        if not fingerprint_file.exists():
            (path / "sweep.yaml").write_text(sweep.source_text)
            tmp = path / ".fingerprint.tmp"
            tmp.write_text(sweep.fingerprint() + "\n")
            os.replace(tmp, fingerprint_file)
        return sweep_dir

    def _lock(self) -> None:
        try:
            fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = int(self.lock_path.read_text().strip() or 0)
            if _alive(pid):
                raise SweepDirError(f"{self.path}: another `orchestrator sweep` (pid {pid}) is running this sweep")
            self.lock_path.unlink(missing_ok=True)  # left by a killed driver
            return self._lock()
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))

    def release(self) -> None:
        self.lock_path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
