"""A sweep interrupted by a signal, pointed at a stale or absent Ray, says what happened and what to do.

Each sweep runs as `orchestrator sweep` in a subprocess with its own RAY_TMPDIR (a short directory:
Ray's socket paths must stay under 108 bytes), so Ray's address file and processes are this test's
alone; the test waits until every Ray process of that directory is gone and kills by pid any that is not.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import psutil
import pyarrow.parquet as pq
import pytest

from orchestrator.store.tables import read_rows

REPO = Path(__file__).resolve().parents[1]
ENDED = {"completed", "stopped_early", "diverged", "error"}
UNFINISHED = {"pending", "running", "interrupted"}
INTERRUPTED_LINE = re.compile(r"^interrupted: (\d+) of (\d+) trials unfinished; continue with: (.+)$", re.M)
# Two trials, four evaluations each: enough time between the first report and the end to be interrupted.
TINY = """\
name: tiny
data: {synthetic_count: 300}
model: {g_widths: [32, 16, 8, 8], d_widths: [8, 16, 16, 32], heads: 2}
train: {kimg: 2, batch_size: 25}
eval: {every_kimg: 0.25, fid_samples: 64, final_fid_samples: 64, extractor: tiny-conv, grid_size: 2}
parameters:
  seed: {values: [0, 1]}
resources: {cpu: 1}
"""


@pytest.fixture
def ray_tmpdir():
    """A private, short Ray temp dir; afterwards no process that uses it may be left."""
    path = new_ray_tmpdir()
    yield path
    leftovers = end_ray_tmpdir(path)
    assert not leftovers, f"Ray processes outlived their sweep (killed now): {leftovers}"


def new_ray_tmpdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="gi-", dir="/tmp"))


def end_ray_tmpdir(path: Path) -> list[str]:
    """Wait for the Ray processes that use `path` to end, kill those left after 90 s (named in the list
    returned), and delete the directory."""
    leftovers = wait_for_ray_processes_to_end(path, timeout=90)
    shutil.rmtree(path, ignore_errors=True)
    return leftovers


def ray_processes(tmpdir: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            text = " ".join(p.info["cmdline"] or []) + " " + ((p.info["environ"] or {}).get("RAY_TMPDIR") or "")
        except (psutil.Error, TypeError):
            continue
        if str(tmpdir) in text and p.pid != os.getpid():
            found.append(p)
    return found


def wait_for_ray_processes_to_end(tmpdir: Path, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while (alive := [p for p in ray_processes(tmpdir) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]):
        if time.monotonic() > deadline:
            names = [f"{p.pid} {' '.join(p.cmdline())[:80]}" for p in alive]
            for p in alive:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            return names
        time.sleep(0.5)
    return []


def closed_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the with-block ends: nothing listens there


def env_for(ray_tmpdir: Path, cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(ray_tmpdir), GAN_CACHE_DIR=str(cache), **extra)
    return env


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def wait_for_evaluations(proc: subprocess.Popen, sweep_dir: Path, log: Path, timeout: float = 400,
                         of_one_trial: int = 1) -> None:
    """Until `of_one_trial` evaluations of one trial are recorded (evaluations.parquet itself is written at the
    end). Tune records a reported checkpoint only after the result's callback and before the trial's next
    evaluation: a second row proves that the first one's checkpoint is in the state Tune saves."""
    deadline = time.monotonic() + timeout
    while max(Counter(e["trial_id"] for e in evaluations_so_far(sweep_dir)).values(), default=0) < of_one_trial:
        assert proc.poll() is None, f"sweep ended before its first evaluation:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, "no evaluation written"
        time.sleep(0.2)


def evaluations_so_far(sweep_dir: Path) -> list[dict]:
    """The evaluations as a reader sees them while the sweep runs (compacted rows and part files)."""
    try:
        return read_rows(sweep_dir, "evaluations")
    except OSError:  # a part merged while we listed
        return []


def finish(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def tables(sweep_dir: Path):
    return pq.read_table(sweep_dir / "trials.parquet").to_pylist(), pq.read_table(
        sweep_dir / "evaluations.parquet"
    ).to_pylist()


def assert_interrupted(output: str, total: int, trials: list[dict], resume_command: str) -> None:
    assert "Traceback" not in output and "done:" not in output, output[-4000:]
    assert "Tuner.restore" not in output and "Resume experiment" not in output, output[-4000:]
    lines = INTERRUPTED_LINE.findall(output)
    assert len(lines) == 1, output[-4000:]
    unfinished, listed_total, command = lines[0]
    assert int(listed_total) == total and command == resume_command
    # Every trial of the sweep is listed, each with a status a user can read.
    assert len(trials) == total
    assert {t["status"] for t in trials} <= ENDED | UNFINISHED
    assert int(unfinished) == sum(t["status"] in UNFINISHED for t in trials) > 0
    assert any(t["status"] == "interrupted" for t in trials)  # it was interrupted while trials ran


def shift_checkpoints(sweep_dir: Path, trial_ids: list[str]) -> dict[str, str]:
    """Rename each trial's checkpoint_N directories to checkpoint_N+1, newest first; trial -> its newest now."""
    newest = {}
    for trial_id in trial_ids:
        for trial_dir in (sweep_dir / "tune").glob(f"*_{trial_id}_*"):
            for checkpoint in sorted(trial_dir.glob("checkpoint_*"), reverse=True):
                moved = checkpoint.with_name(f"checkpoint_{int(checkpoint.name.removeprefix('checkpoint_')) + 1:06d}")
                checkpoint.rename(moved)
                newest.setdefault(trial_id, moved.name)
    return newest


@pytest.fixture(scope="module")
def side_runs(tmp_path_factory):
    """The module's short scenarios (SIGTERM then SIGINT; addresses nobody answers), started at once in the
    background when the long SIGINT-and-resume test below starts: their Ray start-ups and waits overlap its own.
    Each test of them waits for its scenario's outcome and checks it."""
    with ThreadPoolExecutor(2) as pool:
        yield SimpleNamespace(
            sigterm=pool.submit(sigterm_scenario, tmp_path_factory.mktemp("sigterm")),
            addresses=pool.submit(address_scenario, tmp_path_factory.mktemp("addresses"),
                                  tmp_path_factory.getbasetemp() / "gan-cache"),
        )


@pytest.mark.slow
def test_sigint_stops_the_smoke_sweep_and_resume_finishes_it(tmp_path, ray_tmpdir, side_runs):
    results = tmp_path / "results"
    sweep_dir = results / "smoke"
    env = env_for(ray_tmpdir, tmp_path / "cache")
    args = ["sweep", "sweeps/smoke.yaml", "--results", str(results)]
    log = tmp_path / "first.log"
    proc = start(args, env, log)
    try:
        wait_for_evaluations(proc, sweep_dir, log, of_one_trial=2)
        proc.send_signal(signal.SIGINT)
        returncode = finish(proc, timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert returncode == 130, output[-4000:]
    trials, evaluations = tables(sweep_dir)
    assert_interrupted(output, 6, trials, f"orchestrator sweep sweeps/smoke.yaml --resume --results {results}")
    assert evaluations and {e["trial_id"] for e in evaluations} <= {t["trial_id"] for t in trials}
    assert not wait_for_ray_processes_to_end(ray_tmpdir, timeout=90)  # the first driver's Ray is gone
    # What a driver killed at the wrong moment leaves (Ray deletes a trial's old checkpoint before it saves the
    # state that names the new one): each interrupted trial's saved state names a checkpoint that is gone,
    # and a newer one exists. Shifting every checkpoint directory up by one index makes exactly that.
    shifted = shift_checkpoints(sweep_dir, [t["trial_id"] for t in trials if t["status"] == "interrupted"])
    assert shifted, "no interrupted trial had a checkpoint"

    log = tmp_path / "resume.log"
    proc = start([*args, "--resume"], env, log)
    returncode = finish(proc, timeout=600)
    output = log.read_text()
    assert returncode == 0 and "done:" in output, output[-4000:]
    resumed, after = tables(sweep_dir)
    assert len(resumed) == 6 and {t["status"] for t in resumed} <= ENDED
    # Each trial whose saved state named a checkpoint resumed from its newest one that exists, and says so (one
    # interrupted before Tune recorded any checkpoint of it restarts, as it would anyway).
    notes = {t["trial_id"]: re.fullmatch(r"resumed from (checkpoint_\d+): its saved state named (checkpoint_\d+), "
                                         r"which no longer exists", t["reason"] or "") for t in resumed}
    notes = {trial_id: note for trial_id, note in notes.items() if note}
    assert notes, [t["reason"] for t in resumed]
    for trial_id, note in notes.items():
        assert note[1] == shifted[trial_id] and note[2] < note[1], note
    assert sorted((t["variant"], t["seed"]) for t in resumed) == sorted((t["variant"], t["seed"]) for t in trials)
    keys = [(e["trial_id"], round(e["kimg"], 6)) for e in after]
    assert len(keys) == len(set(keys))
    assert {(e["trial_id"], round(e["kimg"], 6)) for e in evaluations} <= set(keys)  # nothing written earlier lost


def sigterm_scenario(tmp_path: Path) -> SimpleNamespace:
    """TINY with a stale address file and RAY_ADDRESS that name a closed port: without --address the sweep still
    starts its own local Ray (it could not report an evaluation otherwise). After its first evaluation, SIGTERM
    and, half a second later, SIGINT."""
    ray_tmpdir = new_ray_tmpdir()
    try:
        port = closed_loopback_port()
        (ray_tmpdir / "ray").mkdir()
        (ray_tmpdir / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}\n")
        env = env_for(ray_tmpdir, tmp_path / "cache", RAY_ADDRESS=f"127.0.0.1:{port}")
        sweep_file = tmp_path / "tiny.yaml"
        sweep_file.write_text(TINY)
        results = tmp_path / "results"
        log = tmp_path / "sweep.log"
        proc = start(["sweep", str(sweep_file), "--results", str(results)], env, log)
        try:
            wait_for_evaluations(proc, results / "tiny", log)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)  # impatient: do not wait for Tune's graceful stop
            started = time.monotonic()
            returncode = finish(proc, timeout=120)
            seconds = time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        leftovers = end_ray_tmpdir(ray_tmpdir)
    return SimpleNamespace(returncode=returncode, seconds=seconds, output=log.read_text(), sweep_file=sweep_file,
                           results=results, leftovers=leftovers)


@pytest.mark.slow
def test_sigterm_ends_a_sweep_with_143_and_a_second_signal_ends_it_at_once(side_runs):
    run = side_runs.sigterm.result(timeout=900)  # sigterm_scenario
    output = run.output
    assert run.returncode == 143, output[-4000:]
    assert run.seconds < 60, f"{run.seconds:.0f} s from the second signal to the exit"
    trials, _ = tables(run.results / "tiny")
    assert_interrupted(output, 2, trials, f"orchestrator sweep {run.sweep_file} --resume --results {run.results}")
    assert not run.leftovers, f"Ray processes outlived their sweep (killed now): {run.leftovers}"


# --- Ray addresses that cannot be joined -----------------------------------------------------------


def address_scenario(root: Path, cache: Path):
    """`--address` cases, run at once; each must fail in one line without starting a sweep."""
    sweep_file = root / "tiny.yaml"
    sweep_file.write_text(TINY)
    port = closed_loopback_port()
    tmpdirs = {name: Path(tempfile.mkdtemp(prefix="ga-", dir="/tmp")) for name in ("auto", "stale", "closed")}
    stale_file = tmpdirs["stale"] / "ray" / "ray_current_cluster"
    stale_file.parent.mkdir()
    stale_file.write_text(f"127.0.0.1:{port}\n")
    cases = {"auto": "auto", "stale": "auto", "closed": f"127.0.0.1:{port}"}

    def run(name: str):
        env = env_for(tmpdirs[name], cache)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "orchestrator.cli",
                "sweep",
                str(sweep_file),
                "--results",
                str(root / name),
                "--address",
                cases[name],
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        return proc

    try:
        with ThreadPoolExecutor(3) as pool:
            runs = dict(zip(cases, pool.map(run, cases), strict=False))
    finally:
        for path in tmpdirs.values():
            shutil.rmtree(path, ignore_errors=True)
    return root, port, stale_file, runs


@pytest.mark.slow  # three drivers importing torch and Ray at once: about a minute on 2 busy cores
@pytest.mark.parametrize(
    "case, expected",
    [
        ("auto", ["at auto", "no Ray cluster to join", "RAY_ADDRESS is unset"]),
        ("stale", ["at auto", "nothing answers at 127.0.0.1:{port}", "{stale_file}"]),
        ("closed", ["at 127.0.0.1:{port}", "nothing answers at 127.0.0.1:{port}"]),
    ],
)
def test_an_address_nobody_answers_fails_in_one_line(case, expected, side_runs):
    root, port, stale_file, runs = side_runs.addresses.result(timeout=900)  # address_scenario
    proc = runs[case]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot join the Ray cluster"), proc.stderr
    for text in expected:
        assert text.format(port=port, stale_file=stale_file) in lines[0]
    assert "RAY_AUTH_MODE" not in lines[0]  # nothing answered: authentication is not the problem
    assert not (root / case / "tiny" / "tune").exists()  # no sweep started
