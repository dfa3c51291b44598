"""A sweep's results directory: claimed once per sweep name, never silently reused.

<results>/<name>/
    sweep.yaml            the sweep file as given (the report shows it)
    fingerprint           hash of the validated sweep; a different sweep under this name is refused
    .lock                 flock'ed by the `orchestrator sweep` using it, holds its pid (two drivers never share
                          a directory)
    evaluations.parquet   one row per evaluation
    trials.parquet        one row per trial
    trials/<trial_id>/    each trial's options.json, stats.jsonl, sample grids, latest checkpoint; error.txt when it
                          ended in error
    tune/                 Ray Tune's experiment state and persisted checkpoints (for --resume)
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.sweepfile.errors import SweepError
from orchestrator.sweepfile.sections import Sweep

ERROR_FILE = "error.txt"  # trials/<id>/error.txt: why a trial ended in error (Tune's traceback, or the reason)


class SweepDirError(RuntimeError):
    """One-line, user-facing reason why a sweep cannot use its results directory."""


def os_reason(exc: OSError) -> str:
    """'Not a directory: /a/b' from an OSError: the reason and the path the kernel refused."""
    reason = exc.strerror or str(exc)
    return f"{reason}: {exc.filename}" if exc.filename else reason


@dataclass
class SweepDir:
    path: Path
    _lock_fd: int | None = field(default=None, repr=False, compare=False)

    @property
    def tune_path(self) -> Path:
        return self.path / "tune"

    @property
    def lock_path(self) -> Path:
        return self.path / ".lock"

    @classmethod
    def claim(
        cls, sweep: Sweep, results_root: Path, *, resume: bool, fixed_on_resume: tuple[str, ...] = ()
    ) -> SweepDir:
        """This driver's directory for the sweep; `fixed_on_resume`: settings a --resume must keep as the sweep
        started (a SweepError names the first one that changed)."""
        path = (results_root / sweep.name).resolve()
        fingerprint_file = path / "fingerprint"
        if resume and not fingerprint_file.exists():
            raise SweepDirError(f"{path}: nothing to resume; run without --resume to start sweep '{sweep.name}'")
        sweep_dir = cls(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
            # Lock first: a second driver started at the same moment gets the lock message, not a
            # message about the half-claimed directory of the first.
            sweep_dir._lock()
            try:
                sweep_dir._check_or_write_fingerprint(sweep, resume=resume)
                if resume:
                    sweep_dir._check_unchanged(sweep, fixed_on_resume)
            except BaseException:
                sweep_dir.release()
                raise
        except OSError as exc:  # under a regular file, in /proc, on a read-only or full disk
            raise SweepDirError(f"{path}: cannot create or write the results directory ({os_reason(exc)})") from None
        return sweep_dir

    def _check_or_write_fingerprint(self, sweep: Sweep, *, resume: bool) -> None:
        fingerprint_file = self.path / "fingerprint"
        # A claim that never got as far as starting Tune (Ray failed to start, ^C) left no tune/:
        # that sweep never ran, so a plain start may take the directory over.
        ran = self.tune_path.exists()
        if fingerprint_file.exists():
            if fingerprint_file.read_text().strip() != sweep.fingerprint():
                raise SweepDirError(
                    f"{self.path}: holds a different sweep named '{sweep.name}'; rename the sweep or pass another "
                    "--results"
                )
            if resume and not ran:
                raise SweepDirError(f"{self.path}: nothing to resume (no Ray Tune state in tune/)")
            if not resume and ran:
                raise SweepDirError(
                    f"{self.path}: sweep '{sweep.name}' already ran here; pass --resume to continue it, "
                    "or another --results for a fresh run"
                )
            return
        (self.path / "sweep.yaml").write_text(sweep.source_text)
        tmp = self.path / ".fingerprint.tmp"
        tmp.write_text(sweep.fingerprint() + "\n")
        os.replace(tmp, fingerprint_file)

    def _check_unchanged(self, sweep: Sweep, keys: tuple[str, ...]) -> None:
        import yaml

        # sweep.yaml is the file as given when the sweep started (a --resume never rewrites it).
        started = yaml.safe_load((self.path / "sweep.yaml").read_text()) or {}
        for key in keys:
            before = started.get(key, Sweep.model_fields[key].default)
            now_ = getattr(sweep, key)
            if before != now_:
                raise SweepError(
                    sweep.source_path, key,
                    f"{now_} differs from {before}, the value the sweep started with; --resume keeps Ray Tune's "
                    f"saved setting, so set it back to {before} (or start a fresh sweep under another --results)",
                )

    def _lock(self) -> None:
        """Hold an exclusive flock on .lock while this driver runs.

        The kernel drops the lock when the driver exits however it dies (even SIGKILL), so a
        lock left by a killed driver never blocks --resume, and no driver has to guess from a
        pid whether another one is still alive.
        """
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by Ray's processes
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise SweepDirError(
                    f"{self.path}: another `orchestrator sweep` (pid {self._owner()}) is running this sweep"
                ) from None
            # The previous holder may have removed the file between our open() and flock(): then we
            # locked a file nobody else can see; lock the one at the path instead.
            try:
                current = os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _owner(self) -> str:
        try:
            return self.lock_path.read_text().strip() or "unknown"
        except FileNotFoundError:  # released in the meantime
            return "unknown"

    def release(self) -> None:
        if self._lock_fd is None:
            return
        self.lock_path.unlink(missing_ok=True)  # while still locked: nobody can take it in between
        os.close(self._lock_fd)
        self._lock_fd = None


def delete_checkpoints(trials: list[dict], keep: str) -> list[str]:
    """Delete the checkpoints `keep` ("all" | "completed" | "none") does not keep, once a sweep has ended;
    returns the trial ids whose checkpoint went. A path is local, or an s3:// / gs:// URI (pyarrow's file
    systems, with the credentials the driver has)."""
    import shutil

    gone = []
    for row in trials:
        path = row.get("checkpoint_path")
        if not path or keep == "all" or (keep == "completed" and row.get("status") == "completed"):
            continue
        try:  # Tune keeps one checkpoint per trial (num_to_keep=1): the one the table names
            if "://" in path:
                from pyarrow import fs

                filesystem, where = fs.FileSystem.from_uri(path)
                filesystem.delete_dir(where)
            else:
                shutil.rmtree(path, ignore_errors=True)
            gone.append(row["trial_id"])
        except (OSError, ValueError):
            continue  # kept: a warning would not help more than the path still being listed
    return gone
