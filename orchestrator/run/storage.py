"""Where a sweep keeps Ray Tune's state and checkpoints, and a preflight that every node sees it.

On a multi-node cluster every path a trial writes (its run directory under the sweep directory, and a
local Tune storage path) must be one shared file system mounted at the same path on every node. A
folder that is only local gives each node its own empty copy, and Tune fails every trial on a worker
after its retries. So before any trial starts, the driver writes a marker with a fresh token into each
such folder and a task pinned to every alive node reads it back; a node that does not see the token
stops the sweep with one line naming the fix. Nodes the autoscaler adds later are checked by the trial
itself (`check_this_node`) before it trains.
"""
from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

MARKER_FILE = ".shared-storage-check"
URI_SCHEMES = ("s3", "gs")
PREFLIGHT_TIMEOUT_S = 180.0  # a worker process has to start on every node; slow on a busy machine
STORAGE_FILE = "storage"  # in <sweep>/tune/ when --storage puts Tune's state elsewhere


class StorageError(RuntimeError):
    """One-line, user-facing reason why the sweep's storage cannot be used."""


def is_uri(storage: str) -> bool:
    return "://" in storage


def normalise(storage: str) -> str:
    """An s3:// or gs:// URI as given, or a local path made absolute (every node must see that same path)."""
    if is_uri(storage):
        scheme = storage.split("://", 1)[0]
        if scheme not in URI_SCHEMES:
            raise StorageError(
                f"--storage {storage}: unsupported scheme {scheme!r} (use s3://BUCKET/PATH, gs://BUCKET/PATH "
                "or a path on a file system every node mounts)"
            )
        return storage.rstrip("/")
    return str(Path(storage).expanduser().resolve())


def resolve(storage: str | None, tune_path: Path, resume: bool) -> str | None:
    """The storage this run uses: --storage, else (on --resume) the one the sweep started with.

    <sweep>/tune/storage records a --storage given at the start, so `--resume` finds Tune's state
    without it and refuses a different one (Tune's state and checkpoints would not be there)."""
    record_file = tune_path / STORAGE_FILE
    recorded = record_file.read_text().strip() if resume and record_file.is_file() else None
    chosen = normalise(storage) if storage is not None else recorded
    if resume and chosen != recorded:
        started_with = recorded or f"its default, {tune_path}"
        raise StorageError(
            f"--storage {chosen}: the sweep started with storage {started_with}; --resume must use the same"
        )
    return chosen


def record(storage: str, tune_path: Path) -> None:
    """Leave <sweep>/tune/storage on a fresh start with --storage (it also marks the sweep as started)."""
    tune_path.mkdir(parents=True, exist_ok=True)
    tmp = tune_path / f".{STORAGE_FILE}.tmp"
    tmp.write_text(storage + "\n")
    os.replace(tmp, tune_path / STORAGE_FILE)


def write_markers(folders: list[Path]) -> str:
    """Write one fresh token into each folder; trials and the preflight look for it."""
    token = secrets.token_hex(16)
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{MARKER_FILE}.{os.getpid()}.tmp"
        tmp.write_text(token)
        os.replace(tmp, folder / MARKER_FILE)
    return token


def unseen(folders: list[str], token: str) -> list[str]:
    """The folders where this machine does not see the token (runs on any node)."""
    missing = []
    for folder in folders:
        try:
            if (Path(folder) / MARKER_FILE).read_text() != token:
                missing.append(folder)
        except OSError:
            missing.append(folder)
    return missing


def not_shared_message(folder: str, where: str, sweep_dir: Path) -> str:
    if Path(folder) == sweep_dir:
        fix = (
            "pass --results on a file system every node mounts at the same path (NFS, EFS, Filestore; "
            "the cluster configs mount one at /shared)"
        )
    else:
        fix = "pass --storage on a file system every node mounts at the same path, or an s3:// or gs:// URI"
    return (
        f"{folder}: not shared with {where}, which does not see the file the driver wrote there "
        f"(trials there would fail); {fix}"
    )


def check_nodes(folders: list[Path], token: str, sweep_dir: Path, timeout_s: float = PREFLIGHT_TIMEOUT_S) -> int:
    """Read the markers back on every alive node of the Ray cluster; returns how many nodes were checked."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return len(nodes)  # one machine: whatever the driver wrote, its trials see
    read_back = ray.remote(num_cpus=0, max_retries=0)(unseen)
    names = [str(f) for f in folders]
    pending = {
        read_back.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            names, token
        ): f"node {n['NodeManagerAddress']} ({n['NodeID'][:12]})"
        for n in nodes
    }
    ready, not_ready = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
    for ref in ready:
        missing = ray.get(ref)
        if missing:
            raise StorageError(not_shared_message(missing[0], pending[ref], sweep_dir))
    if not_ready:
        for ref in not_ready:
            ray.cancel(ref, force=True)
        raise StorageError(
            f"{pending[not_ready[0]]} did not answer the shared-storage check in {timeout_s:.0f} s "
            f"(is it overloaded or lost? `ray status` lists the nodes)"
        )
    return len(nodes)


@dataclass(frozen=True)
class SharedCheck:
    """The folders every node must share and the token the driver wrote into them (sent to trials)."""

    folders: tuple[str, ...]
    token: str


def preflight(sweep_dir: Path, storage: str | None, experiment: str) -> SharedCheck:
    """Before any trial: every alive node must see the sweep directory (trials write their run
    directories there) and a local --storage path as the driver does; raises StorageError if not."""
    folders = [sweep_dir]
    if storage is not None and not is_uri(storage):
        folders.append(Path(storage) / experiment)
    token = write_markers(folders)
    check_nodes(folders, token, sweep_dir)
    return SharedCheck(tuple(str(f) for f in folders), token)


def check_this_node(shared: SharedCheck, sweep_dir: Path) -> None:
    """In a trial: refuse to train on a node (e.g. one the autoscaler added later) that lacks the shared storage."""
    missing = unseen(list(shared.folders), shared.token)
    if missing:
        raise StorageError(not_shared_message(missing[0], f"this node ({socket.gethostname()})", sweep_dir))
