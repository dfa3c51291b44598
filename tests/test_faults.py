"""Faults a long sweep meets, provoked for real: trials that diverge, run out of memory or crash, a
trial worker and a driver killed with SIGKILL, two drivers at once, a crash while a table is
written, a checkpoint that carries code. The sweep must survive, lose nothing and say what happened.

The sweeps run as `orchestrator sweep` subprocesses on their own local Ray (each module-scoped
fixture pays for its Ray start once). Processes are found through /proc (Linux).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import gan.losses
import gan.training
from gan.config import DataConfig, EvalConfig, ModelConfig, TrainConfig, TrialConfig
from gan.models import build_models
from gan.training import CHECKPOINT_FILE, training_loop
from orchestrator.store.sweep_dir import SweepDir, SweepDirError
from orchestrator.store.tables import EVALUATIONS_FILE, TRIALS_FILE, read_rows
from orchestrator.sweepfile.loading import load_sweep

EVERY_KIMG = 0.25
TERMINAL = {"completed", "stopped_early", "diverged", "error"}
SWEEP = """\
name: {name}
method: grid
data: {{synthetic_count: 300}}
model: {{g_widths: [32, 16, 8, 8], d_widths: [8, 16, 16, 32], heads: 2}}
train: {{kimg: {kimg}, batch_size: 25}}
eval: {{every_kimg: {every}, fid_samples: 64, final_fid_samples: 64, extractor: tiny-conv, grid_size: 2}}
resources: {{cpu: 1}}
max_failures: 1
"""


def sweep_file(folder: Path, name: str, kimg: float, extra: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(SWEEP.format(name=name, kimg=kimg, every=EVERY_KIMG) + extra)
    return path


def expected_kimgs(last: float) -> list[float]:
    return [round(EVERY_KIMG * i, 6) for i in range(1, round(last / EVERY_KIMG) + 1)]


# --- processes -----------------------------------------------------------------------------------


def cli_env(tmp_path_factory) -> dict[str, str]:
    env = {**os.environ, "GAN_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "gan-cache")}
    env.pop("RAY_ADDRESS", None)  # each driver starts its own local Ray
    return env


def start_sweep(file: Path, results_root: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    log_path = results_root.parent / f"{file.stem}{''.join(extra)}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "sweep", str(file), "--results",
                                 str(results_root), *extra], stdout=log, stderr=subprocess.STDOUT, env=env)
    proc.log_path = log_path
    return proc


def log_of(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text()


def process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, command line, working directory) of every process we may inspect."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        table[int(entry)] = (parent, command, cwd)
    return table


def descendants(pid: int) -> dict[int, str]:
    table = process_table()
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, command, _) in table.items():
            if ppid == parent and child not in found:
                found[child] = command
                frontier.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop(proc: subprocess.Popen, leftovers: dict[int, str]) -> None:
    """End a driver we started and any of its Ray processes still around, each by pid."""
    leftovers = {**leftovers, **descendants(proc.pid)} if proc.poll() is None else leftovers
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # a graceful ray.shutdown()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid in leftovers:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def wait_for(condition: Callable[[], Any], timeout: float, what: str, driver: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if driver is not None and driver.poll() is not None:
            pytest.fail(f"driver exited ({driver.returncode}) before {what}:\n{log_of(driver)[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def rows(path: Path) -> list[dict[str, Any]]:
    """A table as every reader sees it: compacted rows and, while the sweep runs, its part files."""
    try:
        return read_rows(path.parent, "trials" if path.name == TRIALS_FILE else "evaluations")
    except (FileNotFoundError, OSError):  # a part merged or compacted while we listed
        return []


def stats_kimgs(sweep_dir: Path, trial_id: str) -> list[float]:
    path = sweep_dir / "trials" / trial_id / "stats.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [round(json.loads(line)["kimg"], 6) for line in lines]


def tune_trial_dir(sweep_dir: Path, trial_id: str) -> Path | None:
    found = sorted((sweep_dir / "tune").glob(f"*_{trial_id}_*"))
    return found[0] if found else None


# --- a sweep with a healthy, a diverging, an out-of-memory and a crashing trial --------------------

# Four trials: healthy (its worker gets SIGKILLed once), batch_size larger than the training split
# (raises in every attempt), a generator too large to allocate (a real allocation failure), and
# lr_d = 1e30 (non-finite losses at once). ASHA with grace_period = max_t never stops one early
# but still receives every reported value.
FAULT_PARAMETERS = """\
parameters:
  lr_d: {values: [4.0e-4, 1.0e30]}
  g_widths: {values: [[32, 16, 8, 8], [268435456, 8, 8, 8]], when: {lr_d: [4.0e-4]}}
  batch_size: {values: [25, 1000], when: {g_widths: [[32, 16, 8, 8]]}}
scheduler: {type: asha, grace_period: 1.5, max_t: 1.5}
"""


def trial_options(sweep_dir: Path) -> dict[str, dict]:
    found = {}
    for options in (sweep_dir / "trials").glob("*/options.json"):
        try:
            found[options.parent.name] = json.loads(options.read_text())
        except (OSError, ValueError):  # being written
            continue
    return found


def kind_of(options: dict) -> str:
    if options["train"]["lr_d"] > 1:
        return "diverging"
    if options["model"]["g_widths"][0] > 1000:
        return "out_of_memory"
    return "crashing" if options["train"]["batch_size"] > 100 else "healthy"


@pytest.fixture(scope="module")
def fault_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault-sweep")
    results_root = root / "results"
    sweep_dir = results_root / "faults"
    driver = start_sweep(sweep_file(root, "faults", 1.5, FAULT_PARAMETERS), results_root, cli_env(tmp_path_factory))
    seen: dict[int, str] = {}
    try:
        healthy = wait_for(lambda: next((t for t, o in trial_options(sweep_dir).items() if kind_of(o) == "healthy"),
                                        None), 240, "the healthy trial to start", driver)
        # Kill its worker once the driver has processed its first result, and with it its first checkpoint.
        wait_for(lambda: any(r["trial_id"] == healthy for r in rows(sweep_dir / EVALUATIONS_FILE)), 120,
                 "the healthy trial's first evaluation", driver)

        def worker() -> int | None:
            seen.update(descendants(driver.pid))
            return next((pid for pid, (_, command, cwd) in process_table().items()
                         if pid in seen and command.startswith("ray::ImplicitFunc")
                         and f"_{healthy}_" in os.path.basename(cwd)), None)

        pid = wait_for(worker, 30, "the healthy trial's Ray worker process", driver)
        os.kill(pid, signal.SIGKILL)
        evaluated_before_kill = len(stats_kimgs(sweep_dir, healthy))
        driver.wait(timeout=300)
        trials = {r["trial_id"]: r for r in rows(sweep_dir / TRIALS_FILE)}
        yield SimpleNamespace(
            returncode=driver.returncode, log=log_of(driver), dir=sweep_dir, healthy=healthy,
            evaluated_before_kill=evaluated_before_kill,
            trials=trials, evaluations=rows(sweep_dir / EVALUATIONS_FILE),
            by_kind={kind_of(o): trials[t] for t, o in trial_options(sweep_dir).items()},
        )
    finally:
        stop(driver, seen)


@pytest.mark.slow
def test_sweep_finishes_despite_failing_trials_and_says_which_errored(fault_sweep):
    """Errors are infrastructure (missing results): exit 1, one line per errored trial, no traceback.
    A diverged trial is a result: it is counted, not an error."""
    assert fault_sweep.returncode == 1, fault_sweep.log[-3000:]
    assert len(fault_sweep.trials) == 4
    statuses = {kind: row["status"] for kind, row in fault_sweep.by_kind.items()}
    assert statuses == {"healthy": "completed", "diverging": "diverged", "out_of_memory": "error",
                        "crashing": "error"}
    log = fault_sweep.log
    assert "done with errors: 2 of 4 trials ended in error (1 diverged)" in log, log[-3000:]
    assert "Traceback" not in log and "\ndone:" not in log, log[-6000:]
    for kind in ("out_of_memory", "crashing"):
        row = fault_sweep.by_kind[kind]
        error_file = fault_sweep.dir / "trials" / row["trial_id"] / "error.txt"
        line = next(li for li in log.splitlines() if li.strip().startswith(row["trial_id"]))
        assert str(error_file) in line and row["reason"].splitlines()[-1] in line and "lr_d=" in line
        assert error_file.is_file()


@pytest.mark.slow
def test_diverged_trial_is_recorded_and_scheduler_saw_a_finite_value(fault_sweep):
    row = fault_sweep.by_kind["diverging"]
    assert row["reason"] == "non-finite loss"
    # It diverged before its first evaluation: no metrics, rather than garbage ones.
    assert row["evaluations"] == 0 and row["best_fid"] is None
    assert not [r for r in fault_sweep.evaluations if r["trial_id"] == row["trial_id"]]
    tune_results = (tune_trial_dir(fault_sweep.dir, row["trial_id"]) / "result.json").read_text().splitlines()
    last = json.loads(tune_results[-1])
    assert last["diverged"] is True and last["fid"] == 1e6  # what ASHA ranked it by, as the docs say
    assert "last_good_fid" not in last  # it diverged before any evaluation: no last good value


@pytest.mark.slow
def test_out_of_memory_trial_is_an_error_and_not_retried(fault_sweep):
    row = fault_sweep.by_kind["out_of_memory"]
    assert row["reason"].startswith("out of memory: ")
    assert "can't allocate memory" in row["reason"]
    assert not (tune_trial_dir(fault_sweep.dir, row["trial_id"]) / "error.txt").exists()  # no retry


@pytest.mark.slow
def test_crashing_trial_is_retried_then_recorded_with_its_error(fault_sweep):
    row = fault_sweep.by_kind["crashing"]
    assert row["reason"] == "ValueError: training split has 240 images, fewer than batch_size=1000"
    errors = (tune_trial_dir(fault_sweep.dir, row["trial_id"]) / "error.txt").read_text()
    assert "Failure # 2" in errors  # the first attempt and max_failures = 1 retry
    # The whole traceback is kept beside the trial's run directory; the table keeps its last line.
    ours = (fault_sweep.dir / "trials" / row["trial_id"] / "error.txt").read_text()
    # (Ray 2.60 writes a task's traceback without Python's "Traceback" header: its frames, then the error.)
    assert 'File "' in ours and "training_loop" in ours and ours.rstrip().endswith(row["reason"])


@pytest.mark.slow
def test_killed_trial_worker_resumes_from_its_checkpoint(fault_sweep):
    healthy = fault_sweep.healthy
    assert fault_sweep.trials[healthy]["status"] == "completed"
    errors = (tune_trial_dir(fault_sweep.dir, healthy) / "error.txt").read_text()
    assert "Failure # 1" in errors and "Failure # 2" not in errors  # the kill, seen and recovered from
    kimgs = stats_kimgs(fault_sweep.dir, healthy)
    k = fault_sweep.evaluated_before_kill
    expected = expected_kimgs(1.5)
    assert 1 <= k < len(expected), "the worker was killed after its first checkpoint, before its end"
    assert kimgs[:k] == expected[:k]
    first_after_restart = kimgs[k]
    assert first_after_restart > expected[0]  # not restarted from kimg 0 ...
    assert kimgs.count(expected[0]) == 1  # ... so the first evaluation ran exactly once
    assert first_after_restart >= kimgs[k - 1]  # at most the evaluation in flight was repeated
    assert sorted(set(kimgs)) == expected


@pytest.mark.slow
def test_evaluations_one_row_per_trial_and_kimg_without_gaps(fault_sweep):
    keys = [(r["trial_id"], round(r["kimg"], 6)) for r in fault_sweep.evaluations]
    assert len(keys) == len(set(keys))
    healthy = sorted(k for t, k in keys if t == fault_sweep.healthy)
    assert healthy == expected_kimgs(1.5)
    assert {t for t, _ in keys} == {fault_sweep.healthy}  # the others never produced a valid evaluation
    row = fault_sweep.trials[fault_sweep.healthy]
    assert row["evaluations"] == len(healthy) and row["kimg"] == 1.5 and row["final_fid"] is not None


# --- a killed driver, and a second sweep in the same results root meanwhile ------------------------

KILLED_PARAMETERS = """\
parameters:
  seed: {values: [0, 1, 2]}
max_concurrent: 1
"""
OTHER_PARAMETERS = """\
parameters:
  seed: {values: [0, 1]}
"""


@pytest.fixture(scope="module")
def killed_driver(tmp_path_factory):
    root = tmp_path_factory.mktemp("killed-driver")
    results_root = root / "results"
    env = cli_env(tmp_path_factory)
    killed_file = sweep_file(root, "killed", 1.0, KILLED_PARAMETERS)
    killed_dir = results_root / "killed"
    first = start_sweep(killed_file, results_root, env)
    other = start_sweep(sweep_file(root, "other", 0.5, OTHER_PARAMETERS), results_root, env)
    ray_of_first: dict[int, str] = {}
    resumed = None
    try:
        pid_in_lock = wait_for(lambda: (killed_dir / ".lock").exists() and (killed_dir / ".lock").read_text(), 120,
                               "the first driver to lock its directory", first)
        second_starts = [subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", str(killed_file),
                                         "--results", str(results_root), *resume], capture_output=True, text=True,
                                        env=env, timeout=120)
                         for resume in ([], ["--resume"])]
        # SIGKILL the driver the moment a trial has finished: the worst moment for Tune's own state.
        wait_for(lambda: any(r["status"] == "completed" for r in rows(killed_dir / TRIALS_FILE)), 240,
                 "the first trial of the killed sweep to finish", first)
        ray_of_first = descendants(first.pid)
        first.send_signal(signal.SIGKILL)
        first.wait()
        lock_after_kill = (killed_dir / ".lock").exists()
        parts_after_kill = sorted(p.name for p in (killed_dir / ".parts").glob("*.part"))
        trials_after_kill = rows(killed_dir / TRIALS_FILE)
        evaluations_after_kill = rows(killed_dir / EVALUATIONS_FILE)
        finished = {r["trial_id"] for r in trials_after_kill if r["status"] in TERMINAL}
        stats_after_kill = {t: (killed_dir / "trials" / t / "stats.jsonl").read_bytes() for t in finished}
        # Ray's processes share the driver's fate: its workers notice that their raylet is gone and
        # exit within seconds. Resuming before then could let one still finish an evaluation into a
        # trial directory that the resumed trial writes too.
        core = {pid: cmd for pid, cmd in ray_of_first.items()
                if "gcs_server" in cmd or "raylet" in cmd or cmd.startswith(("ray::ImplicitFunc", "ray::IDLE"))}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(alive(pid) for pid in core):
            time.sleep(0.2)
        core_left = {pid: cmd for pid, cmd in core.items() if alive(pid)}

        # Its dashboard and runtime-env agents take up to a minute to exit: resume meanwhile.
        resumed = start_sweep(killed_file, results_root, env, "--resume")
        resumed.wait(timeout=300)
        other.wait(timeout=300)
        yield SimpleNamespace(
            root=results_root, killed_dir=killed_dir, other_dir=results_root / "other", pid_in_lock=pid_in_lock,
            first_pid=first.pid, second_starts=second_starts, lock_after_kill=lock_after_kill,
            trials_after_kill=trials_after_kill, evaluations_after_kill=evaluations_after_kill,
            finished=finished, stats_after_kill=stats_after_kill, core_left=core_left,
            parts_after_kill=parts_after_kill,
            resumed=SimpleNamespace(returncode=resumed.returncode, log=log_of(resumed)),
            other=SimpleNamespace(returncode=other.returncode, log=log_of(other)),
        )
    finally:
        for proc in (first, other, resumed):
            if proc is not None:
                stop(proc, ray_of_first if proc is first else {})


@pytest.mark.slow
def test_second_driver_for_a_running_sweep_is_refused(killed_driver):
    for run in killed_driver.second_starts:
        assert run.returncode == 2
        lines = run.stderr.strip().splitlines()
        assert lines == [f"error: {killed_driver.killed_dir}: another `orchestrator sweep` "
                         f"(pid {killed_driver.first_pid}) is running this sweep"]


@pytest.mark.slow
def test_tables_are_whole_after_the_driver_is_killed(killed_driver):
    assert killed_driver.finished  # read back from trials.parquet right after the SIGKILL
    assert killed_driver.evaluations_after_kill
    keys = [(r["trial_id"], r["kimg"]) for r in killed_driver.evaluations_after_kill]
    assert len(keys) == len(set(keys))
    assert not killed_driver.core_left  # Ray's processes shared the driver's fate
    # Killed between a part write and a compaction: the rows were in part files, read as one table.
    assert killed_driver.parts_after_kill


@pytest.mark.slow
def test_resume_after_killed_driver_finishes_the_sweep_without_rerunning(killed_driver):
    assert killed_driver.lock_after_kill  # the killed driver's .lock was left behind, and did not block
    assert killed_driver.resumed.returncode == 0, killed_driver.resumed.log[-3000:]
    trials = rows(killed_driver.killed_dir / TRIALS_FILE)
    assert len(trials) == 3 and all(r["status"] == "completed" for r in trials)
    evaluations = rows(killed_driver.killed_dir / EVALUATIONS_FILE)
    keys = [(r["trial_id"], round(r["kimg"], 6)) for r in evaluations]
    assert len(keys) == len(set(keys))
    # --resume compacted what the killed driver left, and the sweep's end compacted the rest: no row lost or twice.
    assert not (killed_driver.killed_dir / ".parts").exists()
    assert pq.read_table(killed_driver.killed_dir / EVALUATIONS_FILE).num_rows == len(evaluations)
    for trial in trials:
        assert sorted(k for t, k in keys if t == trial["trial_id"]) == expected_kimgs(1.0)
    for trial_id in killed_driver.finished:  # not re-run: rows and stats.jsonl untouched
        before = [r for r in killed_driver.evaluations_after_kill if r["trial_id"] == trial_id]
        assert [r for r in evaluations if r["trial_id"] == trial_id] == before
        stats = (killed_driver.killed_dir / "trials" / trial_id / "stats.jsonl").read_bytes()
        assert stats == killed_driver.stats_after_kill[trial_id]


@pytest.mark.slow
def test_two_sweeps_in_one_results_root_keep_their_own_tables(killed_driver):
    assert killed_driver.other.returncode == 0, killed_driver.other.log[-3000:]
    other_trials = rows(killed_driver.other_dir / TRIALS_FILE)
    killed_trials = rows(killed_driver.killed_dir / TRIALS_FILE)
    assert {r["sweep"] for r in other_trials} == {"other"} and {r["sweep"] for r in killed_trials} == {"killed"}
    assert len(other_trials) == 2 and all(r["status"] == "completed" for r in other_trials)
    other_evaluations = rows(killed_driver.other_dir / EVALUATIONS_FILE)
    assert {r["sweep"] for r in other_evaluations} == {"other"}
    assert len(other_evaluations) == 2 * len(expected_kimgs(0.5))
    assert not {r["trial_id"] for r in other_trials} & {r["trial_id"] for r in killed_trials}


# --- claiming a results directory --------------------------------------------------------------------


def _claim_at_once(sweep, results_root: Path, start, done, answers) -> None:
    start.wait(timeout=60)
    try:
        sweep_dir = SweepDir.claim(sweep, results_root, resume=False)
        answers.put("claimed")
    except SweepDirError as exc:
        answers.put(str(exc))
        sweep_dir = None
    done.wait(timeout=60)  # hold the claim until every process has tried
    if sweep_dir is not None:
        sweep_dir.release()


def test_same_sweep_started_at_once_runs_once(tmp_path):
    """Drivers racing for one sweep: exactly one wins, the others get the lock message."""
    file = sweep_file(tmp_path, "race", 1.0, "")
    sweep = load_sweep(file)
    context = multiprocessing.get_context("fork")
    drivers = 6
    for attempt in range(8):
        results_root = tmp_path / f"results-{attempt}"
        start, done, answers = context.Barrier(drivers), context.Barrier(drivers), context.Queue()
        procs = [context.Process(target=_claim_at_once, args=(sweep, results_root, start, done, answers))
                 for _ in range(drivers)]
        for p in procs:
            p.start()
        outcomes = sorted(answers.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(timeout=60)
        assert outcomes.count("claimed") == 1, outcomes
        assert all("is running this sweep" in o for o in outcomes if o != "claimed"), outcomes
        assert not (results_root / "race" / ".lock").exists()  # released by the winner


def test_lock_of_a_killed_driver_does_not_block(tmp_path):
    file = sweep_file(tmp_path, "stale", 1.0, "")
    results_root = tmp_path / "results"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from orchestrator.sweepfile.loading import load_sweep\n"
         "from orchestrator.store.sweep_dir import SweepDir\n"
         "d = SweepDir.claim(load_sweep(sys.argv[1]), __import__('pathlib').Path(sys.argv[2]), resume=False)\n"
         "d.tune_path.mkdir()\n"  # as if Tune had started
         "print('claimed', flush=True)\n"
         "time.sleep(120)\n",
         str(file), str(results_root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        sweep = load_sweep(file)
        with pytest.raises(SweepDirError, match=f"pid {holder.pid}"):
            SweepDir.claim(sweep, results_root, resume=True)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert (results_root / "stale" / ".lock").read_text() == str(holder.pid)  # left behind ...
    resumed = SweepDir.claim(sweep, results_root, resume=True)  # ... and not in the way
    assert resumed.lock_path.read_text() == str(os.getpid())
    resumed.release()


def test_failed_start_leaves_a_directory_that_a_plain_start_can_take(tmp_path):
    """A driver that claimed the directory but died before Tune started (no tune/) ran nothing."""
    sweep = load_sweep(sweep_file(tmp_path, "never-ran", 1.0, ""))
    SweepDir.claim(sweep, tmp_path / "results", resume=False).release()
    with pytest.raises(SweepDirError, match="nothing to resume"):
        SweepDir.claim(sweep, tmp_path / "results", resume=True)
    SweepDir.claim(sweep, tmp_path / "results", resume=False).release()


# A failed or half-written table write: tests/test_results.py (part files are written atomically, retried,
# and reported once).


# --- training-level faults --------------------------------------------------------------------------


def tiny_config(kimg: float = 0.4) -> TrialConfig:
    return TrialConfig(
        model=ModelConfig(variant="dcgan", g_widths=(32, 16, 8, 8), d_widths=(8, 16, 16, 32)),
        data=DataConfig(synthetic_count=300),
        train=TrainConfig(kimg=kimg, batch_size=20),
        eval=EvalConfig(every_kimg=0.2, fid_samples=64, final_fid_samples=64, extractor="tiny-conv", grid_size=2),
    )


class ConstantGenerator(nn.Module):
    """A fully collapsed generator: one learnable image, whatever the noise."""

    def __init__(self, size: int):
        super().__init__()
        self.image = nn.Parameter(torch.rand(3, size, size) * 2 - 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.image).expand(len(z), -1, -1, -1)


def test_collapsed_generator_ends_the_trial_as_diverged(tmp_path, monkeypatch):
    def with_constant_generator(model_config):
        models = build_models(model_config)
        models["G"] = ConstantGenerator(model_config.image_size)
        return models

    monkeypatch.setattr(gan.training, "build_models", with_constant_generator)
    reports = []
    result = training_loop(tiny_config(), tmp_path, lambda metrics, checkpoint: reports.append(metrics))
    assert result.status == "diverged"
    assert result.reason.startswith("generator collapsed")
    assert reports == [] and not (tmp_path / "stats.jsonl").exists()


def test_late_divergence_keeps_the_last_good_metrics(tmp_path, monkeypatch):
    g_loss = gan.losses.dcgan_g_loss
    calls = 0

    def nan_after_first_evaluation(*args):
        nonlocal calls
        calls += 1
        out = g_loss(*args)
        return {**out, "loss_g": out["loss_g"] * float("nan")} if calls > 12 else out

    monkeypatch.setattr(gan.losses, "dcgan_g_loss", nan_after_first_evaluation)
    reports = []
    result = training_loop(tiny_config(), tmp_path, lambda metrics, checkpoint: reports.append(metrics))
    assert result.status == "diverged" and result.reason == "non-finite loss"
    assert len(reports) == 1 and result.metrics == reports[0] and result.best_fid == reports[0]["fid"]
    assert len((tmp_path / "stats.jsonl").read_text().splitlines()) == 1


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_carrying_code_is_refused_on_resume(tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil-checkpoint"
    evil.mkdir()
    torch.save({"models": _RunsCodeWhenUnpickled(marker)}, evil / CHECKPOINT_FILE)
    torch.load(evil / CHECKPOINT_FILE, weights_only=False)  # the file really runs code when fully unpickled
    assert marker.exists()
    marker.unlink()

    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        training_loop(tiny_config(), tmp_path / "run", resume_from=evil)
    assert not marker.exists()


# --- sweeps whose trials fail at once: no CUDA, a hung trial, a node that cannot use the storage ----------------

ALL_ERROR_SWEEP = """\
name: no-cuda
data: {synthetic_count: 300}
model: {g_widths: [16, 8, 8, 8], d_widths: [8, 8, 16, 16]}
train: {kimg: 0.5, batch_size: 25, device: cuda}
eval: {every_kimg: 0.25, fid_samples: 64, final_fid_samples: 64, extractor: tiny-conv, grid_size: 2}
parameters: {seed: {values: [0, 1]}}
resources: {cpu: 1}
max_failures: 2
"""


UNSHARED_PARAMETERS = "parameters:\n  seed: {values: [0, 1]}\nmax_concurrent: 1\n"


def run_cli(file: Path, results_root: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", str(file), "--results",
                           str(results_root), *extra], capture_output=True, text=True, env=env, timeout=600)


class CliRun:
    """`orchestrator sweep FILE --results RESULTS_ROOT` in a process of its own, started now."""

    def __init__(self, file: Path, results_root: Path, env: dict[str, str], *extra: str):
        self.file, self.results_root, self.started = file, results_root, time.monotonic()
        self.out, self.err = (results_root.parent / f"{file.stem}{''.join(extra)}.{kind}" for kind in ("out", "err"))
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "sweep", str(file), "--results",
                                          str(results_root), *extra], stdout=out, stderr=err, env=env)

    def result(self, timeout: float = 600) -> subprocess.CompletedProcess:
        """Wait for the sweep to end: its exit code, stdout and stderr."""
        try:
            self.proc.wait(timeout=timeout)
        finally:
            stop(self.proc, {})
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, self.out.read_text(),
                                           self.err.read_text())


@pytest.fixture(scope="module")
def failing_runs(tmp_path_factory):
    """The three sweeps of the tests below, whose trials end in error at once (no CUDA, a hung trial, a node
    without the storage), started side by side: each is mostly a local Ray's start and stop, which overlap."""
    from orchestrator.run.storage import INJECT_UNSHARED_ENV
    from orchestrator.run.trainable import INJECT_HANG_ENV

    env = cli_env(tmp_path_factory)
    runs: dict[str, CliRun] = {}
    try:
        if not torch.cuda.is_available():
            root = tmp_path_factory.mktemp("no-cuda")
            (root / "no-cuda.yaml").write_text(ALL_ERROR_SWEEP)
            runs["no-cuda"] = CliRun(root / "no-cuda.yaml", root / "results", env)
        root = tmp_path_factory.mktemp("hung")
        file = sweep_file(root, "hung", 0.5, "hang_timeout_min: 0.05\n")  # 3 s; 6 s for the first report
        runs["hung"] = CliRun(file, root / "results", {**env, INJECT_HANG_ENV: "900"})
        root = tmp_path_factory.mktemp("unshared")
        file = sweep_file(root, "unshared", 0.5, UNSHARED_PARAMETERS)
        runs["unshared"] = CliRun(file, root / "results", {**env, INJECT_UNSHARED_ENV: "1"})
        yield runs
    finally:
        for run in runs.values():
            stop(run.proc, {})


# First of the three: its --resume runs while the other two sweeps end.
@pytest.mark.slow
def test_a_node_without_the_storage_stops_the_sweep_in_one_line_and_resume_continues(failing_runs, tmp_path_factory):
    """Every trial's own check finds the results directory unshared (as on a node added without the mount):
    the first one stops the whole sweep, in one line, exit 2, with no trial retried or counted as an error;
    once the storage is fixed, --resume finishes the sweep."""
    run = failing_runs["unshared"]  # GAN_SWEEPS_INJECT_UNSHARED=1: every trial's check fails
    file, results_root = run.file, run.results_root
    sweep_dir = results_root / "unshared"
    proc = run.result()
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-4000:]
    assert "Traceback" not in output and "Tuner.restore" not in output and "Stop signal" not in output, output
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Unhandled error" not in output, proc.stderr
    assert lines[0].startswith(f"error: {sweep_dir}: not shared with this node ("), lines[0]
    assert "the sweep stopped: 2 of 2 trials unfinished" in lines[0], lines[0]
    assert lines[0].endswith(f"continue with: orchestrator sweep {file} --resume --results {results_root}"), lines[0]
    trials = rows(sweep_dir / TRIALS_FILE)
    assert sorted(t["status"] for t in trials) == ["interrupted", "pending"], trials
    stopped = next(t for t in trials if t["status"] == "interrupted")
    assert "not shared with this node" in stopped["reason"]
    assert not rows(sweep_dir / EVALUATIONS_FILE)

    resumed = run_cli(file, results_root, cli_env(tmp_path_factory), "--resume")  # the storage fixed
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    trials = rows(sweep_dir / TRIALS_FILE)
    assert sorted(t["status"] for t in trials) == ["completed", "completed"], trials
    assert stopped["trial_id"] in {t["trial_id"] for t in trials}  # the stopped trial itself was continued


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_all_error_sweep_exits_1_and_names_each_trial_without_a_traceback(failing_runs):
    """`train.device: cuda` where there is none: every trial is an error (not retried, never a silent CPU
    run), the sweep says so and exits 1."""
    run = failing_runs["no-cuda"]
    proc = run.result()
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-4000:]
    assert "done with errors: 2 of 2 trials ended in error" in proc.stdout, output[-4000:]
    assert "Traceback" not in output and "\ndone:" not in output, output[-4000:]
    sweep_dir = run.results_root / "no-cuda"
    trials = rows(sweep_dir / TRIALS_FILE)
    assert [t["status"] for t in trials] == ["error", "error"]
    for t in trials:
        assert t["reason"].startswith("no usable CUDA for cuda: torch ") and "driver" in t["reason"]
        assert t["device_used"] is None and t["evaluations"] == 0
        line = next(li for li in proc.stdout.splitlines() if li.strip().startswith(t["trial_id"]))
        assert f"seed={t['seed']}" in line and t["reason"] in line
        assert (sweep_dir / "trials" / t["trial_id"] / "error.txt").read_text().strip() == t["reason"]
        # Not retried under max_failures: Tune saw no exception at all.
        assert not (tune_trial_dir(sweep_dir, t["trial_id"]) / "error.txt").exists()


@pytest.mark.slow
def test_a_trial_that_reports_nothing_is_stopped_as_error_by_the_hang_watchdog(failing_runs):
    run = failing_runs["hung"]  # its trial sleeps 900 s before its first report
    proc = run.result()
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-4000:]
    assert "done with errors: 1 of 1 trials ended in error" in proc.stdout, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    assert time.monotonic() - run.started < 600, "the sweep waited for the stuck trial instead of stopping it"
    sweep_dir = run.results_root / "hung"
    [trial] = rows(sweep_dir / TRIALS_FILE)
    assert trial["status"] == "error" and trial["evaluations"] == 0, trial
    assert trial["reason"].startswith("no progress for 0.1 min since the trial started"), trial["reason"]
    line = next(li for li in proc.stdout.splitlines() if li.strip().startswith(trial["trial_id"]))
    assert "no progress for 0.1 min" in line
    assert not (tune_trial_dir(sweep_dir, trial["trial_id"]) / "error.txt").exists()  # not retried as a crash
