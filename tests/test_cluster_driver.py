"""The driver's side of running on a cluster, checked without one: `--results` that would vanish with the
driver's node is refused before anything starts; the storage check's pieces (an s3:// or gs:// style
write-and-read-back, through pyarrow's file:// here); the hang watchdog; the fallback to a trial's newest
existing checkpoint on --resume; the `hang_timeout_min` key. The end-to-end cases are in test_multinode.py
(a worker that joins late), test_faults.py (a hung trial, a trial on a node without the storage) and
test_interrupt.py (a deleted checkpoint before --resume)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.run.storage import SharedCheck, StorageError, check_results, preflight, storage_problem, uri_problem
from orchestrator.run.watchdog import Abandoned, HangWatch, run_watched
from orchestrator.sweepfile.errors import SweepError
from orchestrator.sweepfile.loading import load_sweep

# `orchestrator ARGS`, and at exit the names of all imported modules go to the file named by the first argument.
RUN_CLI = (
    "import atexit, sys\n"
    "modules_file = sys.argv.pop(1)\n"
    "atexit.register(lambda: open(modules_file, 'w').write('\\n'.join(sorted(sys.modules))))\n"
    "sys.argv[0] = 'orchestrator'\n"
    "from orchestrator.cli import app\n"
    "app()\n"
)


def refused(workdir: Path, results: str, **env: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "s.yaml").write_text("name: s\ndata: {synthetic_count: 100}\n")
    modules = workdir / "modules.txt"
    environ = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR", "TMPDIR")}
    proc = subprocess.run([sys.executable, "-c", RUN_CLI, str(modules), "sweep", "s.yaml", "--results", results,
                           "--address", "127.0.0.1:9"], cwd=workdir, env={**environ, **env}, capture_output=True,
                          text=True, timeout=180)
    return proc, set(modules.read_text().split()) if modules.exists() else set()


def test_address_needs_an_absolute_results_outside_rays_temp_dirs_refused_before_ray(tmp_path):
    ray_tmp = tmp_path / "rt"
    cases = {
        "relative": (tmp_path / "a", "results", {}),
        "tmp_ray": (tmp_path / "b", "/tmp/ray/session_latest/results", {}),
        "ray_tmpdir": (tmp_path / "c", str(ray_tmp / "ray" / "results"), {"RAY_TMPDIR": str(ray_tmp)}),
    }
    with ThreadPoolExecutor(len(cases)) as pool:
        runs = dict(zip(cases, pool.map(lambda c: refused(c[0], c[1], **c[2]), cases.values()), strict=True))
    expected = {
        "relative": "error: --results results: with --address, give an absolute path on storage every node mounts",
        "tmp_ray": "error: --results /tmp/ray/session_latest/results: under Ray's temporary directory /tmp/ray,",
        "ray_tmpdir": f"error: --results {ray_tmp}/ray/results: under Ray's temporary directory {ray_tmp}/ray,",
    }
    for name, (proc, modules) in runs.items():
        assert proc.returncode == 2, (name, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(expected[name]), (name, proc.stderr)
        assert "(e.g. --results /shared/results)" in lines[0]
        assert modules and not any(m == "ray" or m.startswith("ray.") for m in modules), name  # nothing connected
        assert not (cases[name][0] / "results").exists() and not (ray_tmp / "ray").exists()


def test_results_checks_pass_what_is_fine():
    check_results(Path("results"), None)  # a local Ray: relative is fine
    check_results(Path("/shared/results"), "auto")
    with pytest.raises(StorageError, match="Ray's temporary directory"):
        check_results(Path("/tmp/ray"), None)


def test_storage_uri_is_written_read_back_and_deleted_or_the_failure_named(tmp_path):
    assert uri_problem(f"file://{tmp_path}/bucket/exp") is None
    assert list((tmp_path / "bucket" / "exp").iterdir()) == []  # the probe object was deleted
    (tmp_path / "a-file").write_text("x")
    assert "a-file" in uri_problem(f"file://{tmp_path}/a-file/exp")
    shared = SharedCheck((), "token", (f"file://{tmp_path}/a-file/exp",))
    problem = storage_problem(shared, str(tmp_path), "node 10.0.0.7 (abc)")
    assert problem.startswith(f"--storage file://{tmp_path}/a-file/exp: node 10.0.0.7 (abc) cannot write an object")
    assert "instance profile or a service account" in problem and "\n" not in problem


def test_preflight_on_a_local_ray_checks_the_storage_from_the_driver(tmp_path):
    sweep_dir = tmp_path / "results" / "s"
    sweep_dir.mkdir(parents=True)
    shared = preflight(sweep_dir, f"file://{tmp_path}/bucket", "s", joined=False)
    assert shared.uris == (f"file://{tmp_path}/bucket/s",) and shared.folders == (str(sweep_dir),)
    assert storage_problem(shared, str(sweep_dir), "here") is None
    (tmp_path / "blocked").write_text("x")
    with pytest.raises(StorageError, match=r"^--storage file://.*/blocked: this machine \(the driver\) cannot write"):
        preflight(sweep_dir, f"file://{tmp_path}/blocked", "s", joined=False)


# --- the hang watchdog ------------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_hang_watch_allows_the_first_report_twice_the_timeout_and_then_the_timeout():
    clock = Clock()
    watch = HangWatch(10, clock=clock)
    clock.now = 19 * 60
    assert watch.give_up_if_overdue() is None  # the first report: data, compilation, real statistics
    with watch.reporting():
        clock.now = 500 * 60  # waiting for the driver inside a report is no hang
        assert watch.give_up_if_overdue() is None
    clock.now += 10 * 60
    assert watch.give_up_if_overdue() is None
    clock.now += 1
    assert watch.give_up_if_overdue() == "no progress for 10 min since the trial's last report (hang_timeout_min)"
    with pytest.raises(Abandoned):  # the stuck thread, if it wakes up, reports nothing more
        with watch.reporting():
            pass
    first = HangWatch(0.05, clock=Clock())
    first.clock.now = 7
    assert first.give_up_if_overdue().startswith("no progress for 0.1 min since the trial started")


def test_run_watched_returns_raises_or_gives_up():
    assert run_watched(lambda: None, HangWatch(1)) is None
    with pytest.raises(ValueError, match="boom"):
        run_watched(lambda: (_ for _ in ()).throw(ValueError("boom")), HangWatch(1))
    stuck = threading.Event()
    try:
        reason = run_watched(lambda: stuck.wait(60), HangWatch(0.005))  # 0.3 s; 0.6 s before a first report
        assert reason.startswith("no progress for 0.01 min")
    finally:
        stuck.set()


# --- the hang_timeout_min key -------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "message"), [
    ("0", "must be a number of minutes > 0, got 0.0"),
    ("-5", "must be a number of minutes > 0, got -5.0"),
    (".nan", "must be a number of minutes > 0, got nan"),
    ("soon", "expected a number, got 'soon'"),
    ("true", "expected a number, got true"),
])
def test_hang_timeout_min_must_be_minutes_above_zero(tmp_path, value, message):
    file = tmp_path / "h.yaml"
    file.write_text(f"name: h\nhang_timeout_min: {value}\n")
    with pytest.raises(SweepError) as error:
        load_sweep(file)
    assert str(error.value) == f"{file}: hang_timeout_min: {message}"


def test_hang_timeout_min_defaults_to_an_hour_and_is_not_part_of_the_fingerprint(tmp_path):
    file = tmp_path / "h.yaml"
    file.write_text("name: h\n")
    default = load_sweep(file)
    file.write_text("name: h\nhang_timeout_min: 5\n")
    assert default.hang_timeout_min == 60 and load_sweep(file).hang_timeout_min == 5
    assert load_sweep(file).fingerprint() == default.fingerprint()  # --resume may change it


# --- the checkpoint fallback on --resume ----------------------------------------------------------------------


def fake_trial(trial_dir: Path, named: int, keep: list[int]):
    from pyarrow.fs import LocalFileSystem
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult
    from ray.tune import Checkpoint, CheckpointConfig

    for index in keep:
        (trial_dir / f"checkpoint_{index:06d}").mkdir(parents=True)
        (trial_dir / f"checkpoint_{index:06d}" / "checkpoint.pt").write_bytes(b"state")
    manager = _CheckpointManager(CheckpointConfig(num_to_keep=1))
    named_result = _TrainingResult(Checkpoint(str(trial_dir / f"checkpoint_{named:06d}"), LocalFileSystem()),
                                   {"training_iteration": named + 1})
    manager._checkpoint_results, manager._latest_checkpoint_result = [named_result], named_result
    calls = []
    return SimpleNamespace(
        trial_id=trial_dir.name, status="PENDING", storage=SimpleNamespace(trial_fs_path=str(trial_dir),
                                                                          current_checkpoint_index=named),
        run_metadata=SimpleNamespace(checkpoint_manager=manager, invalidate_cache=lambda: calls.append("run")),
        invalidate_json_state=lambda: calls.append("json"), calls=calls,
    )


def test_a_trial_whose_named_checkpoint_is_gone_resumes_from_its_newest_existing_one(tmp_path):
    from orchestrator.run.restore import fall_back

    gone = fake_trial(tmp_path / "t1", named=3, keep=[2, 4, 5])
    (tmp_path / "t1" / "checkpoint_000005" / "checkpoint.pt").unlink()  # copied only partly: not complete
    intact = fake_trial(tmp_path / "t2", named=3, keep=[3])
    nothing = fake_trial(tmp_path / "t3", named=0, keep=[])
    [first, third] = fall_back([gone, intact, nothing])

    assert first.note() == ("resumed from checkpoint_000004: its saved state named checkpoint_000003, which no "
                            "longer exists")
    manager = gone.run_metadata.checkpoint_manager
    assert manager.latest_checkpoint_result.checkpoint.path == str(tmp_path / "t1" / "checkpoint_000004")
    assert manager.latest_checkpoint_result.metrics == {"training_iteration": 4}
    assert [r.checkpoint.path for r in manager._checkpoint_results] == [str(tmp_path / "t1" / "checkpoint_000004")]
    assert gone.storage.current_checkpoint_index == 4  # the next checkpoint is 5, never the one restored from
    assert set(gone.calls) == {"run", "json"}  # Tune's cached JSON of the trial is rebuilt
    assert intact.calls == [] and intact.run_metadata.checkpoint_manager.latest_checkpoint_result is not None
    assert third.used is None and "restarted from scratch" in third.note()
    assert nothing.run_metadata.checkpoint_manager.latest_checkpoint_result is None
