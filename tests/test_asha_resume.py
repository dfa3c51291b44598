"""Per-configuration ASHA survives a killed driver: `--resume` makes the decisions an uninterrupted run makes.

Two real runs of the same tiny sweep (3 configurations x 2 seeds, one trial at a time so the order of
results is fixed, and CPU training that resumes bit-identically from a checkpoint), side by side: one
uninterrupted, one SIGKILLed after ASHA's first decision and then resumed. Every trial must end in the same status, at
the same rung, judged on the same mean; the scheduler's saved state must be the same.
"""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from test_faults import (
    alive,
    cli_env,
    descendants,
    log_of,
    rows,
    start_sweep,
    stop,
    wait_for,
)

REPO = Path(__file__).resolve().parents[1]

SWEEP = """\
name: {name}
data: {{synthetic_count: 300}}
model: {{g_widths: [16, 8, 8, 8], d_widths: [8, 8, 16, 16]}}
train: {{kimg: 1.0, batch_size: 32}}
eval: {{every_kimg: 0.25, fid_samples: 64, final_fid_samples: 96, extractor: tiny-conv, grid_size: 2}}
parameters:
  lr_g: {{values: [1.0e-4, 3.0e-4, 1.0e-8]}}
  seed: {{values: [0, 1]}}
scheduler: {{type: asha, unit: config, grace_period: 0.25, reduction_factor: 2}}
max_concurrent: 1
"""


def saved_decisions(sweep_dir: Path) -> dict:
    """The decisions the scheduler saved so far: its snapshot (scheduler.json, written when a sweep ends), then
    its journal (scheduler.jsonl, a line per change while it runs)."""
    snapshot = sweep_dir / "scheduler.json"
    decided = json.loads(snapshot.read_text())["decided"] if snapshot.exists() else {}
    journal = sweep_dir / "scheduler.jsonl"
    for line in journal.read_text().splitlines() if journal.exists() else []:
        try:
            kind, *args = json.loads(line)
        except ValueError:  # the line being written
            continue
        if kind == "decide":
            config, rung, decision, _ = args
            decided.setdefault(config, {})[rung] = decision
    return decided


def outcome(sweep_dir: Path) -> dict:
    trials = rows(sweep_dir / "trials.parquet")
    return {(t["lr_g"], t["seed"]): (t["status"], t["stopped_at_kimg"], t["stopped_metric"]) for t in trials}


@pytest.mark.slow
def test_killed_driver_and_resume_cull_the_same_configurations(tmp_path, tmp_path_factory):
    env = cli_env(tmp_path_factory)
    results = tmp_path / "results"
    for name in ("straight", "killed"):
        (tmp_path / f"{name}.yaml").write_text(SWEEP.format(name=name))

    # The two runs are independent until they are compared, and each trains one trial at a time on one core:
    # they run at once, on the two cores.
    straight = start_sweep(tmp_path / "straight.yaml", results, env)
    killed_dir = results / "killed"
    first = start_sweep(tmp_path / "killed.yaml", results, env)
    resumed = None
    ray_of_first: dict[int, str] = {}
    try:
        def decided_and_unfinished():
            decided = saved_decisions(killed_dir)
            return any(decided.values()) and len([t for t in rows(killed_dir / "trials.parquet")
                                                  if t["status"] in ("completed", "stopped_early")]) < 6
        wait_for(decided_and_unfinished, 600, "the killed sweep's first ASHA decision", first)
        ray_of_first = descendants(first.pid)
        first.send_signal(signal.SIGKILL)
        first.wait()
        saved_before = {"decided": saved_decisions(killed_dir)}  # what the journal held when the driver died
        core = [pid for pid, cmd in ray_of_first.items()
                if "gcs_server" in cmd or "raylet" in cmd or cmd.startswith(("ray::ImplicitFunc", "ray::IDLE"))]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(alive(pid) for pid in core):
            time.sleep(0.2)
        resumed = start_sweep(tmp_path / "killed.yaml", results, env, "--resume")
        resumed.wait(timeout=1200)
        assert resumed.returncode == 0, log_of(resumed)[-3000:]
        straight.wait(timeout=1200)
    finally:
        for proc in (first, resumed, straight):
            if proc is not None:
                stop(proc, ray_of_first if proc is first else {})

    assert straight.returncode == 0, log_of(straight)[-3000:]
    expected = outcome(results / "straight")
    assert len(expected) == 6 and {s for s, _, _ in expected.values()} <= {"completed", "stopped_early"}
    assert any(s == "stopped_early" for s, _, _ in expected.values()), "ASHA culled no configuration"

    assert outcome(killed_dir) == expected
    state = json.loads((killed_dir / "scheduler.json").read_text())
    straight_state = json.loads((results / "straight" / "scheduler.json").read_text())
    for key in ("decided", "stopped", "means"):
        assert state[key] == straight_state[key], key
    # What was decided before the kill was read back, not decided again from empty rungs.
    for config, rungs in saved_before["decided"].items():
        assert all(state["decided"][config][rung] == decision for rung, decision in rungs.items())
