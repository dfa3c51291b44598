"""`orchestrator sweep --address` on a real multi-node Ray cluster, all on this machine.

The cluster is built the way a real one is: a head started with `ray start --head` and worker nodes
started with `ray start --address`, each its own raylet with its own node id. The head has no CPUs, so
every trial must run on a worker. The cluster uses token authentication, explicitly: with RAY_AUTH_MODE
unset, `ray start --head` turns token auth on by itself when ~/.ray/auth_token exists, but a worker and a
driver given an explicit address do not, and then fail with InvalidAuthToken. So every process here gets
RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (a temp file, never the user's ~/.ray).

The results path is a local directory: every node of this cluster sees it, as every node of a real
cluster sees a shared filesystem mounted at the same path.
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import ray  # noqa: F401

from orchestrator.store.tables import read_rows

pytestmark = pytest.mark.slow

RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` command of this interpreter's Ray
UNSHARE_MOUNT = ["unshare", "--mount", "--propagation", "private"]
NODE_START_TIMEOUT_S = 90
SWEEP_TIMEOUT_S = 300
WORKERS = ("worker_a", "worker_b")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a running process and everything it started, by pid; then reap it."""
    if proc.poll() is not None:  # already reaped: its pid may belong to someone else now
        return
    for p in process_tree(proc.pid):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def log_tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


class LocalCluster:
    """A Ray head and worker nodes, each a `ray start --block` process of this test.

    `--block` keeps every node's daemons (GCS, raylet, dashboard, workers) children of that one
    process, so a node is stopped, or lost, by killing its process tree: nothing else on the
    machine (another test's or another user's Ray) is touched, as `ray stop` would."""

    def __init__(self, logs: Path):
        self.logs = logs
        # Short: Ray's Unix socket paths under the temp dir must fit in 107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray-mn-", dir="/tmp"))
        token_file = self.temp_dir / "auth_token"
        token_file.write_text(secrets.token_hex(32))
        token_file.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH_")}
        self.env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, subprocess.Popen] = {}

    def start(self, workers: tuple[str, ...], private: dict[str, Path] | None = None, *, worker_cpus: int = 1,
              worker_gpus: int = 0) -> None:
        """`private`: worker name -> a folder that node sees as its own empty one (a local disk where the
        other nodes have shared storage), through a mount namespace of its own. `worker_gpus`: GPUs each
        worker declares to Ray (a logical resource: torch still finds no CUDA device and trains on the CPU)."""
        self._spawn(
            "head",
            "--head",
            f"--port={self.port}",
            "--num-cpus=0",
            "--num-gpus=0",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
        )
        self._wait_started("head")
        for name in workers:  # one at a time: nodes starting together race for the same socket file names
            self.add_worker(name, (private or {}).get(name), cpus=worker_cpus, gpus=worker_gpus)

    def add_worker(self, name: str, private: Path | None = None, *, cpus: int = 1, gpus: int = 0) -> None:
        """Start a worker node and wait until it runs (`private`: as in `start`)."""
        self._spawn(name, f"--address={self.address}", f"--num-cpus={cpus}", f"--num-gpus={gpus}", private=private)
        self._wait_started(name)

    def node_id(self, name: str) -> str:
        """The Ray node id of a node: its raylet's --node_id argument."""
        for p in process_tree(self.nodes[name].pid):
            for arg in p.cmdline():
                if arg.startswith("--node_id="):
                    return arg.removeprefix("--node_id=")
        raise AssertionError(f"{name}: no raylet running")

    def lose(self, name: str) -> None:
        """The node's machine vanishes: its raylet, object store and trial processes die at once."""
        kill_tree(self.nodes.pop(name))

    def remove(self, name: str) -> None:
        """Stop a node as `ray stop` does (SIGTERM: its raylet leaves the cluster at once, while a lost node stays
        listed as alive until the head's health checks give up on it); SIGKILL what is left after 30 s."""
        proc = self.nodes.pop(name)
        tree = process_tree(proc.pid)
        for p in reversed(tree):  # the node's daemons, then `ray start --block` itself
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=30)
        for p in tree:
            try:
                p.kill()  # psutil checks that the pid is still the same process
            except psutil.NoSuchProcess:
                pass
        proc.wait()

    def shutdown(self) -> None:
        for proc in self.nodes.values():
            kill_tree(proc)
        self.nodes.clear()
        # Keep Ray's own logs (raylet crashes and the like) next to the test's for a failure's post-mortem.
        ray_logs = self.temp_dir / "session_latest" / "logs"
        if ray_logs.is_dir():
            shutil.copytree(ray_logs, self.logs / "ray-session", symlinks=True, dirs_exist_ok=True)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _spawn(self, name: str, *args: str, private: Path | None = None) -> None:
        # On one machine, every node's dashboard agent would take Ray's default port 52365.
        command = [
            *RAY_CLI,
            "start",
            "--block",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            f"--object-store-memory={200 * 2**20}",
            f"--dashboard-agent-listen-port={free_port()}",
            *args,
        ]
        if private is not None:
            private.mkdir(parents=True, exist_ok=True)
            # exec: the node's process is still this Popen's pid, so kill_tree stops all of it.
            command = [*UNSHARE_MOUNT, "sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"', str(private), *command]
        with open(self.logs / f"{name}.log", "w") as log:
            self.nodes[name] = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def _wait_started(self, name: str) -> None:
        log = self.logs / f"{name}.log"
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while "Ray runtime started" not in log_tail(log, 100_000):
            if self.nodes[name].poll() is not None:
                raise AssertionError(
                    f"`ray start` of {name} exited with {self.nodes[name].returncode}:\n{log_tail(log)}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} did not start in {NODE_START_TIMEOUT_S} s:\n{log_tail(log)}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory):
    """A head with no CPUs and two 1-CPU workers, started once for the tests of this module that use `cluster`;
    always torn down, also when a test fails."""
    logs = tmp_path_factory.mktemp("ray-logs")
    local = LocalCluster(logs)
    try:
        local.start(WORKERS)
        yield local
    finally:
        local.shutdown()


@pytest.fixture
def cluster(shared_cluster):
    """`shared_cluster` with both workers running: a worker an earlier test lost is started again (the test of
    an unshared results folder adds a third worker for itself, and removes it)."""
    for name in WORKERS:
        if name not in shared_cluster.nodes or shared_cluster.nodes[name].poll() is not None:
            shared_cluster.add_worker(name)
    return shared_cluster


def write_sweep(path: Path, name: str, *, seeds: list[int], kimg: float, every_kimg: float) -> Path:
    path.write_text(f"""\
name: {name}
method: grid
metric: {{name: fid, goal: minimize}}
data: {{path: null, image_size: 64, synthetic_count: 200}}
model: {{g_widths: [32, 16, 8, 8], d_widths: [8, 16, 32, 32], heads: 2}}
train: {{kimg: {kimg}, batch_size: 32}}
eval: {{every_kimg: {every_kimg}, fid_samples: 64, final_fid_samples: 64, extractor: tiny-conv, grid_size: 2}}
parameters:
  seed: {{values: {seeds}}}
scheduler: {{type: fifo}}
resources: {{cpu: 1, gpu: 0}}
max_failures: 2
""")
    return path


def start_sweep(
    cluster: LocalCluster, sweep_file: Path, results: Path, cwd: Path, *extra: str
) -> tuple[subprocess.Popen, Path]:
    log = cwd.parent / f"{sweep_file.stem}-driver.log"
    command = [
        sys.executable,
        "-m",
        "orchestrator.cli",
        "sweep",
        str(sweep_file),
        "--address",
        cluster.address,
        "--results",
        str(results),
        *extra,
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=cwd, env=cluster.env, stdout=out, stderr=subprocess.STDOUT)
    return proc, log


def finish(proc: subprocess.Popen, log: Path, returncode: int = 0) -> None:
    try:
        proc.wait(timeout=SWEEP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise AssertionError(f"sweep did not finish in {SWEEP_TIMEOUT_S} s:\n{log_tail(log)}") from None
    assert proc.returncode == returncode, log_tail(log)


def evaluation_rows(path: Path) -> list[dict]:
    """The evaluations as a reader sees them while the sweep runs (compacted rows and part files)."""
    try:
        return read_rows(path.parent, "evaluations")
    except OSError:  # a part merged while we listed
        return []


def evaluation_count(path: Path) -> int:
    return len(evaluation_rows(path))


def test_trials_run_on_several_worker_nodes_and_results_land_under_results_path(cluster, tmp_path):
    sweep_file = write_sweep(tmp_path / "spread.yaml", "spread", seeds=[0, 1], kimg=1, every_kimg=0.5)
    results = tmp_path / "shared-results"
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    proc, log = start_sweep(cluster, sweep_file, results, cwd)
    try:
        finish(proc, log)
    finally:
        kill_tree(proc)

    sweep_dir = results / "spread"
    evaluations = pq.read_table(sweep_dir / "evaluations.parquet").to_pylist()
    # Two 1-CPU trials at once on two 1-CPU workers: one on each; none on the CPU-less head.
    assert {row["node"] for row in evaluations} == {cluster.node_id(name)[:12] for name in WORKERS}
    trials = pq.read_table(sweep_dir / "trials.parquet").to_pylist()
    assert [t["status"] for t in trials] == ["completed", "completed"]
    for trial in trials:
        run_dir = sweep_dir / "trials" / trial["trial_id"]
        assert Path(trial["run_dir"]) == run_dir
        assert (run_dir / "options.json").is_file()
        assert Path(trial["grid_path"]).is_file() and Path(trial["grid_path"]).is_relative_to(run_dir)
        checkpoint = Path(trial["checkpoint_path"])
        assert checkpoint.is_dir() and any(checkpoint.iterdir())
        assert checkpoint.is_relative_to(sweep_dir / "tune")
        # Written once, on the trial's node, and copied once by Tune: none in the shared run directory.
        assert not list(run_dir.glob("*checkpoint*")), sorted(p.name for p in run_dir.iterdir())
    assert list(cwd.iterdir()) == [], "the sweep wrote files relative to its working directory"


def test_trial_of_a_lost_node_resumes_from_its_checkpoint_on_a_surviving_node(cluster, tmp_path):
    sweep_file = write_sweep(tmp_path / "nodeloss.yaml", "nodeloss", seeds=[0], kimg=2, every_kimg=0.25)
    results = tmp_path / "shared-results"
    storage = tmp_path / "shared-tune-storage"  # --storage: Tune's state and checkpoints outside --results
    evaluations_file = results / "nodeloss" / "evaluations.parquet"
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    proc, log = start_sweep(cluster, sweep_file, results, cwd, "--storage", str(storage))
    try:
        # Tune records a reported checkpoint only after a save round trip to the trial that follows
        # the result callback (which writes the row); the trial computes its next evaluation only
        # after that round trip. So a second row proves the first evaluation's checkpoint is on record.
        deadline = time.monotonic() + SWEEP_TIMEOUT_S
        while evaluation_count(evaluations_file) < 2:
            assert proc.poll() is None, f"sweep ended before its second evaluation:\n{log_tail(log)}"
            assert time.monotonic() < deadline, f"no two evaluations in {SWEEP_TIMEOUT_S} s:\n{log_tail(log)}"
            time.sleep(0.1)
        first_node = evaluation_rows(evaluations_file)[0]["node"]
        lost = next(name for name in WORKERS if cluster.node_id(name).startswith(first_node))
        survivor = next(name for name in WORKERS if name != lost)
        survivor_node = cluster.node_id(survivor)[:12]
        cluster.lose(lost)
        finish(proc, log)
    finally:
        kill_tree(proc)

    trials = pq.read_table(results / "nodeloss" / "trials.parquet").to_pylist()
    assert [(t["status"], t["kimg"] >= 2) for t in trials] == [("completed", True)], trials
    assert Path(trials[0]["checkpoint_path"]).is_relative_to(storage / "nodeloss"), trials[0]["checkpoint_path"]
    assert (results / "nodeloss" / "tune" / "storage").read_text().strip() == str(storage)
    evaluations = pq.read_table(evaluations_file).to_pylist()
    keys = [(row["trial_id"], row["kimg"]) for row in evaluations]
    assert len(keys) == len(set(keys)), f"duplicate (trial_id, kimg) rows: {keys}"
    rows = sorted(evaluations, key=lambda row: row["kimg"])
    nodes = [row["node"] for row in rows]
    where = (
        f"(kimg, node) rows {[(row['kimg'], row['node']) for row in rows]}; lost {first_node}, survivor {survivor_node}"
    )
    # Resumed, not restarted: a restart from scratch would re-report, and so replace, the lost node's rows.
    assert nodes[0] == first_node and survivor_node in nodes, where
    lost_rows = nodes.index(survivor_node)
    assert nodes == [first_node] * lost_rows + [survivor_node] * (len(nodes) - lost_rows), where


def can_make_private_mounts() -> bool:
    try:
        return (
            subprocess.run(
                [*UNSHARE_MOUNT, "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True, timeout=30
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_results_folder_a_node_does_not_share_stops_the_sweep_before_any_trial(shared_cluster, tmp_path):
    """One worker sees its own empty folder where the others see the shared results (as a node without
    the EFS mount would): the sweep must stop before any trial, naming the folder and the fix.
    The module's cluster with one more worker, the one that does not share: its workers that do (both, or the
    one an earlier test did not lose) must not be named."""
    if not can_make_private_mounts():
        if os.environ.get("CI"):
            pytest.fail("CI runs as root and must be able to give a test node its own mount namespace (unshare -m)")
        pytest.skip("needs root (or CAP_SYS_ADMIN) for `unshare --mount`, to give one node a private folder")
    results = tmp_path / "shared-results"
    sharing = [shared_cluster.node_id(name)[:12] for name in WORKERS if name in shared_cluster.nodes]
    assert sharing
    try:
        shared_cluster.add_worker("worker_private", private=results)
        private = shared_cluster.node_id("worker_private")[:12]
        sweep_file = write_sweep(tmp_path / "unshared.yaml", "unshared", seeds=[0, 1], kimg=1, every_kimg=0.5)
        cwd = tmp_path / "cwd"
        cwd.mkdir()
        proc, log = start_sweep(shared_cluster, sweep_file, results, cwd)
        try:
            proc.wait(timeout=SWEEP_TIMEOUT_S)
        finally:
            kill_tree(proc)
    finally:
        if "worker_private" in shared_cluster.nodes:
            shared_cluster.remove("worker_private")
    output = log_tail(log)
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2, output
    assert len(errors) == 1 and "Traceback" not in output, output
    assert errors[0].startswith(f"error: {results / 'unshared'}: not shared with node "), errors
    assert f"({private})" in errors[0] and not [node for node in sharing if node in errors[0]], errors
    assert "--results on a file system every node mounts" in errors[0]
    assert not (results / "unshared" / "trials.parquet").exists()
    assert not (results / "unshared" / "trials").exists(), "a trial ran"


def test_preflight_waits_for_a_worker_that_joins_later_and_refuses_its_unshared_results(tmp_path):
    """A cloud cluster as a sweep finds it: a head with 0 CPUs and no workers yet. The preflight must wait for
    a node that can run a trial (not skip the check because one node is alive), check the storage from it
    when it joins, and stop the sweep before any trial when that node does not share the results."""
    if not can_make_private_mounts():
        if os.environ.get("CI"):
            pytest.fail("CI runs as root and must be able to give a test node its own mount namespace (unshare -m)")
        pytest.skip("needs root (or CAP_SYS_ADMIN) for `unshare --mount`, to give one node a private folder")
    results = tmp_path / "shared-results"
    logs = tmp_path / "ray-logs"
    logs.mkdir()
    local = LocalCluster(logs)
    try:
        local.start(())  # the head alone: 0 CPUs, nothing can run a trial
        sweep_file = write_sweep(tmp_path / "late.yaml", "late", seeds=[0], kimg=1, every_kimg=0.5)
        cwd = tmp_path / "cwd"
        cwd.mkdir()
        proc, log = start_sweep(local, sweep_file, results, cwd)
        try:
            deadline = time.monotonic() + SWEEP_TIMEOUT_S
            while "no node can run a trial (1 CPU) yet; waiting up to" not in log_tail(log):
                assert proc.poll() is None, f"the sweep ended instead of waiting for a worker:\n{log_tail(log)}"
                assert time.monotonic() < deadline, f"the preflight did not wait:\n{log_tail(log)}"
                time.sleep(0.2)
            local.add_worker("late_worker", private=results)  # joins without the shared results
            late = local.node_id("late_worker")[:12]
            proc.wait(timeout=SWEEP_TIMEOUT_S)
        finally:
            kill_tree(proc)
    finally:
        local.shutdown()
    output = log_tail(log)
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2, output
    assert len(errors) == 1 and "Traceback" not in output, output
    assert errors[0].startswith(f"error: {results / 'late'}: not shared with node "), errors
    assert f"({late})" in errors[0] and "--results on a file system every node mounts" in errors[0], errors
    assert not (results / "late" / "trials").exists(), "a trial ran"
