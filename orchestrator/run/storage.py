"""Where a sweep keeps Ray Tune's state and checkpoints, and a preflight that every node able to run a
trial can write and read it.

On a multi-node cluster every path a trial writes (its run directory under the sweep directory, and a
local Tune storage path) must be one shared file system mounted at the same path on every node, and an
s3:// or gs:// storage must be writable from every node. A folder that is only local gives each node its
own empty copy, and a node without credentials cannot write the bucket: Tune would fail every trial there.
So before any trial starts, the driver writes a marker with a fresh token into each such folder, and a
task on every node that can run a trial reads the token back, writes a file of its own, reads it back
and deletes it (an object in the bucket, for s3:// and gs://). A problem stops the sweep with one line
naming the fix. Where no node can run a trial yet (a head with 0 CPUs whose workers are still starting),
a task with the trial's own resources waits for one, up to `NODE_WAIT_S`. Nodes added later are checked by
each trial before it trains (`problem_here`).
"""
from __future__ import annotations

import os
import secrets
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MARKER_FILE = ".shared-storage-check"
PROBE_PREFIX = ".storage-check-"  # a node's own write-and-read-back file, deleted at once
URI_SCHEMES = ("s3", "gs")
PREFLIGHT_TIMEOUT_S = 180.0  # a worker process has to start on every node; slow on a busy machine
# How long the preflight waits for a node that can run a trial (cloud GPU nodes take minutes to start).
NODE_WAIT_S = 15 * 60.0
NODE_WAIT_ENV = "GAN_SWEEPS_NODE_WAIT_S"  # seconds; overrides NODE_WAIT_S (tests lower it)
STORAGE_FILE = "storage"  # in <sweep>/tune/ when --storage puts Tune's state elsewhere
# In a trial's result: this node cannot use the sweep's storage. The driver stops the whole sweep (resumable).
STORAGE_FAILED_KEY = "storage_failed"
# Tests set this to "1" (in the Ray workers' environment): every trial's own check then finds the results
# directory unshared, as on a node added without the mount.
INJECT_UNSHARED_ENV = "GAN_SWEEPS_INJECT_UNSHARED"


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


def ray_temp_dirs() -> list[Path]:
    """Ray's temporary directories, as Ray 2.60 picks them (RAY_TMPDIR, else TMPDIR on Linux, else /tmp, then
    /ray), without importing Ray. Ray deletes what lies there (job working directories) and no other node sees it."""
    base = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
    found = [Path("/tmp/ray")]
    if base:
        found.append(Path(base) / "ray")
    return [Path(os.path.realpath(p)) for p in dict.fromkeys(found)]


def check_results(results: Path, address: str | None) -> None:
    """Refuse, before anything starts, a --results that would vanish with the driver's node or container."""
    if address is not None and not results.expanduser().is_absolute():
        raise StorageError(
            f"--results {results}: with --address, give an absolute path on storage every node mounts (e.g. "
            "--results /shared/results); a relative one lands in the driver's working directory, which is gone "
            "with its container or node"
        )
    where = Path(os.path.realpath(results.expanduser()))
    for temp in ray_temp_dirs():
        if where == temp or where.is_relative_to(temp):
            raise StorageError(
                f"--results {results}: under Ray's temporary directory {temp}, which Ray cleans up and no other "
                "node sees; give a path on storage every node mounts (e.g. --results /shared/results)"
            )


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


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def write_read_back(folder: str) -> str | None:
    """Write a file of this node's own into the folder, read it back and delete it; None, or what failed."""
    probe = Path(folder) / f"{PROBE_PREFIX}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    data = secrets.token_bytes(32)
    try:
        probe.write_bytes(data)
        back = probe.read_bytes()
        probe.unlink()
    except OSError as exc:
        return exc.strerror or one_line(exc)
    return None if back == data else "a file written there read back different bytes"


def uri_problem(uri: str) -> str | None:
    """Write a small object under the URI, read it back and delete it (pyarrow, as Tune does); None, or why not."""
    try:
        from pyarrow.fs import FileSystem

        fs, path = FileSystem.from_uri(uri)
        if fs.type_name == "local":  # file:// (tests): a bucket needs no directories
            fs.create_dir(path, recursive=True)
        probe = f"{path.rstrip('/')}/{PROBE_PREFIX}{socket.gethostname()}-{secrets.token_hex(6)}"
        data = secrets.token_bytes(32)
        with fs.open_output_stream(probe) as out:
            out.write(data)
        with fs.open_input_stream(probe) as stream:
            back = stream.read()
        fs.delete_file(probe)
    except Exception as exc:  # pyarrow raises OSError, ArrowInvalid and friends: any of them is the answer
        return one_line(exc)
    return None if back == data else "an object written there read back different bytes"


def not_shared_message(folder: str, where: str, sweep_dir: Path) -> str:
    return (
        f"{folder}: not shared with {where}, which does not see the file the driver wrote there "
        f"(trials there would fail); {folder_fix(folder, sweep_dir)}"
    )


def folder_fix(folder: str, sweep_dir: Path) -> str:
    if Path(folder) == sweep_dir:
        return (
            "pass --results on a file system every node mounts at the same path (NFS, EFS, Filestore; "
            "the cluster configs mount one at /shared)"
        )
    return "pass --storage on a file system every node mounts at the same path, or an s3:// or gs:// URI"


@dataclass(frozen=True)
class SharedCheck:
    """The folders every node must share, the token the driver wrote into them, and the s3:// or gs://
    storage every node must be able to write (sent to trials, which check their own node)."""

    folders: tuple[str, ...]
    token: str
    uris: tuple[str, ...] = ()


def storage_problem(shared: SharedCheck, sweep_dir: str, where: str) -> str | None:
    """Runs on a node: None if it sees the driver's token in every folder, can write and read back each of
    them, and can write, read back and delete an object under each URI; else the one-line problem."""
    missing = unseen(list(shared.folders), shared.token)
    if missing:
        return not_shared_message(missing[0], where, Path(sweep_dir))
    for folder in shared.folders:
        failed = write_read_back(folder)
        if failed:
            return (f"{folder}: {where} cannot write a file there and read it back ({failed}); "
                    f"{folder_fix(folder, Path(sweep_dir))}")
    for uri in shared.uris:
        failed = uri_problem(uri)
        if failed:
            return (f"--storage {uri}: {where} cannot write an object there and read it back ({failed}); give "
                    "every node credentials for it (an instance profile or a service account: see the cluster docs)")
    return None


def problem_here(shared: SharedCheck, sweep_dir: Path) -> str | None:
    """In a trial: the storage problem of this node (e.g. one the autoscaler added after the preflight)."""
    where = f"this node ({socket.gethostname()})"
    if os.environ.get(INJECT_UNSHARED_ENV) == "1":
        return not_shared_message(shared.folders[0], where, sweep_dir)
    return storage_problem(shared, str(sweep_dir), where)


def check_this_node(shared: SharedCheck, sweep_dir: Path) -> None:
    problem = problem_here(shared, sweep_dir)
    if problem:
        raise StorageError(problem)


def node_check(shared: SharedCheck, sweep_dir: str) -> tuple[str, str | None]:
    """The preflight's task: (this node's id, its storage problem or None)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    where = f"node {ray.util.get_node_ip_address()} ({node_id[:12]})"
    return node_id, storage_problem(shared, sweep_dir, where)


def fits(node: dict, cpu: float, gpu: float) -> bool:
    """Whether a node (an entry of ray.nodes()) has the resources of one trial."""
    have = node.get("Resources") or {}
    return have.get("CPU", 0.0) >= cpu and have.get("GPU", 0.0) >= gpu


def resources_text(cpu: float, gpu: float) -> str:
    return f"{cpu:g} CPU" + (f" and {gpu:g} GPU" if gpu else "")


def node_wait_s() -> float:
    try:
        return float(os.environ.get(NODE_WAIT_ENV, NODE_WAIT_S))
    except ValueError:
        return NODE_WAIT_S


def check_nodes(shared: SharedCheck, sweep_dir: Path, *, cpu: float, gpu: float,
                note: Callable[[str], None] = lambda line: None, wait_s: float | None = None,
                timeout_s: float = PREFLIGHT_TIMEOUT_S) -> int:
    """Check the storage from every alive node that can run a trial; first wait (up to `wait_s`) for one if
    there is none yet. Returns how many nodes were checked; raises StorageError for a problem."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    check = ray.remote(max_retries=0)(node_check)
    checked: set[str] = set()
    if not any(fits(n, cpu, gpu) for n in ray.nodes() if n.get("Alive")):
        wait_s = node_wait_s() if wait_s is None else wait_s
        note(f"storage: no node can run a trial ({resources_text(cpu, gpu)}) yet; waiting up to "
             f"{wait_s / 60:g} min for one to check the storage from")
        # The task's demand is what an autoscaler scales for; without one, it runs when a worker joins.
        ref = check.options(num_cpus=cpu, num_gpus=gpu).remote(shared, str(sweep_dir))
        ready, _ = ray.wait([ref], timeout=wait_s)
        if not ready:
            ray.cancel(ref, force=True)
            raise StorageError(
                f"no node that can run a trial ({resources_text(cpu, gpu)}) joined the Ray cluster in "
                f"{wait_s / 60:g} min, so the storage could not be checked before the trials (`ray status` "
                "lists the nodes and the pending demand; are the workers starting?)"
            )
        checked.add(_answer(ref, "the node that joined"))
    nodes = [n for n in ray.nodes() if n.get("Alive") and fits(n, cpu, gpu) and n["NodeID"] not in checked]
    pending = {
        check.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
        .remote(shared, str(sweep_dir)): f"node {n['NodeManagerAddress']} ({n['NodeID'][:12]})"
        for n in nodes
    }
    ready, not_ready = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
    for ref in ready:
        checked.add(_answer(ref, pending[ref]))
    if not_ready:
        for ref in not_ready:
            ray.cancel(ref, force=True)
        raise StorageError(
            f"{pending[not_ready[0]]} did not answer the shared-storage check in {timeout_s:.0f} s "
            f"(is it overloaded or lost? `ray status` lists the nodes)"
        )
    return len(checked)


def _answer(ref, where: str) -> str:
    import ray

    try:
        node_id, problem = ray.get(ref)
    except Exception as exc:  # the task's worker died, or its node was lost
        raise StorageError(f"the storage check on {where} failed: {one_line(exc)}") from None
    if problem:
        raise StorageError(problem)
    return node_id


def preflight(sweep_dir: Path, storage: str | None, experiment: str, *, cpu: float = 1.0, gpu: float = 0.0,
              joined: bool = True, note: Callable[[str], None] = lambda line: None) -> SharedCheck:
    """Before any trial: the driver can write the sweep directory (trials write their run directories there),
    a local --storage path and an s3:// or gs:// --storage; on a cluster it joined (`joined`), so can every
    node that can run a trial (see check_nodes). Raises StorageError if not."""
    folders = [sweep_dir]
    uris: tuple[str, ...] = ()
    if storage is not None and is_uri(storage):
        uris = (f"{storage}/{experiment}",)
        failed = uri_problem(uris[0])
        if failed:
            raise StorageError(f"--storage {storage}: this machine (the driver) cannot write an object there "
                               f"and read it back ({failed}); check its credentials")
    elif storage is not None:
        folders.append(Path(storage) / experiment)
    try:
        token = write_markers(folders)
    except OSError as exc:
        raise StorageError(f"{exc.filename or folders[-1]}: the driver cannot write there "
                           f"({exc.strerror or one_line(exc)})") from None
    shared = SharedCheck(tuple(str(f) for f in folders), token, uris)
    if joined:  # a local Ray runs on this machine: whatever the driver wrote, its trials see
        check_nodes(shared, sweep_dir, cpu=cpu, gpu=gpu, note=note)
    return shared
