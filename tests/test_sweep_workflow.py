"""`run_sweep`'s own steps, in-process and without Ray: the sweep expanded once into a plan, and the tables
finished (compacted, unfinished trials marked) when Tune fails after the tables were readied. The real
sweeps run end to end in tests/test_sweep_e2e.py, tests/test_interrupt.py and tests/test_asha_resume.py."""
from __future__ import annotations

import pytest
from rich.console import Console

from orchestrator.store.sweep_dir import SweepDir
from orchestrator.store.tables import read_rows
from orchestrator.sweepfile.loading import load_sweep
from orchestrator.sweepfile.plan import plan_sweep
from orchestrator.workflow import sweep as sweep_workflow

SWEEP = """\
name: plan
method: {method}
num_samples: {n}
data: {{synthetic_count: 60}}
model: {{g_widths: [32, 16, 8, 8], d_widths: [8, 16, 16, 32]}}
train: {{kimg: 0.5, batch_size: 20}}
eval: {{every_kimg: 0.25, fid_samples: 32, final_fid_samples: 32, extractor: tiny-conv, grid_size: 2}}
parameters:
  variant: {{values: [dcgan, use-gan]}}
  lr_d: {space}
  seed: {{values: [0, 1, 2]}}
"""


def sweep_file(tmp_path, method="grid", n=1):
    space = "{values: [1.0e-4, 4.0e-4]}"
    if method != "grid":
        space = "{distribution: log_uniform, min: 1.0e-4, max: 8.0e-4}"
    path = tmp_path / f"{method}.yaml"
    path.write_text(SWEEP.format(method=method, n=n, space=space))
    return load_sweep(path)


@pytest.mark.parametrize(("method", "n", "total"), [("grid", 1, 12), ("random", 5, 5),
                                                      ("optuna", 4, 12)])
def test_the_plan_holds_what_the_sweep_file_expands_to(tmp_path, method, n, total):
    sweep = sweep_file(tmp_path, method, n)
    plan = plan_sweep(sweep)
    assert plan.total == sweep.trial_count() == total
    assert plan.trials == (None if method == "optuna" else sweep.trials())
    assert plan.swept == sweep.swept_names() and plan.seeds == [0, 1, 2]
    assert plan.data == sweep.trial_config({}).data and plan.name == "plan"


@pytest.fixture
def tune_fails(monkeypatch):
    """Ray 'starts', every node can use the storage, and building the tuner fails (a broken Tune state)."""
    from orchestrator.run import ray_start, tuner

    def broken(*args, **kwargs):
        raise RuntimeError("Tune failed to start")

    monkeypatch.setattr(ray_start, "start_ray", lambda address: None)
    monkeypatch.setattr(sweep_workflow, "preflight", lambda *args, **kwargs: None)
    monkeypatch.setattr(tuner, "build_tuner", broken)


def test_a_resume_whose_tune_fails_keeps_its_unfinished_trials_listed(tmp_path, tune_fails):
    """--resume drops the placeholder rows before Tune runs (Tune adds those trials under their real ids): when
    Tune then fails, the placeholders come back, so the trials table still lists every trial of the sweep."""
    sweep = sweep_file(tmp_path)
    claimed = SweepDir.claim(sweep, tmp_path / "results", resume=False)
    claimed.tune_path.mkdir()  # the state an interrupted sweep leaves: Tune's state, no trial created yet
    claimed.release()

    with pytest.raises(RuntimeError, match="Tune failed to start"):
        sweep_workflow.run_sweep(sweep, tmp_path / "results", address=None, resume=True, console=Console(quiet=True))
    trials = read_rows(claimed.path, "trials")  # every row, compacted and in parts alike
    assert len(trials) == 12 and {t["status"] for t in trials} == {"pending"}
    assert sorted((t["variant"], t["lr_d"], t["seed"]) for t in trials) == sorted(
        (t["variant"], t["lr_d"], t["seed"]) for t in sweep.trials()
    )
    assert not list(claimed.path.glob(".parts/*"))  # compacted: nothing left in part files

    # Resumed again, the tables hold the same trials once each (nothing is duplicated by the failed run).
    with pytest.raises(RuntimeError, match="Tune failed to start"):
        sweep_workflow.run_sweep(sweep, tmp_path / "results", address=None, resume=True, console=Console(quiet=True))
    assert len(read_rows(claimed.path, "trials")) == 12


def test_a_fresh_sweep_whose_tune_fails_can_start_again(tmp_path, tune_fails):
    sweep = sweep_file(tmp_path)
    with pytest.raises(RuntimeError, match="Tune failed to start"):
        sweep_workflow.run_sweep(sweep, tmp_path / "results", address=None, resume=False, console=Console(quiet=True))
    sweep_dir = tmp_path / "results" / "plan"
    assert not (sweep_dir / "tune").exists() and read_rows(sweep_dir, "trials") == []
    # Never ran (no Tune state): a plain start takes the directory over instead of asking for --resume.
    SweepDir.claim(sweep, tmp_path / "results", resume=False).release()
