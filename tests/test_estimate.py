"""`orchestrator sweep FILE --dry-run --estimate`: the cost arithmetic checked by hand, and the command on
the smoke sweep (it times real iterations on the CPU in seconds and never imports Ray)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.sweepfile.loading import load_sweep
from orchestrator.workflow.estimate import (
    Asha,
    Budget,
    ModelCost,
    estimate,
    evaluation_points,
    kept_per_rung,
    measure_sweep,
    rung_milestones,
)

REPO = Path(__file__).resolve().parents[1]

# kimg 4, an evaluation every 1 kimg with 100 samples, the final one with 200
BUDGET = Budget(kimg=4, every_kimg=1, fid_samples=100, final_fid_samples=200)
# Every evaluation costs 0.1 s fixed + 0.001 s per sample: 0.2 s intermediate, 0.3 s final.
EVAL = dict(eval_seconds_per_sample=0.001, eval_seconds_fixed=0.1)
A = ModelCost(seconds_per_iteration=0.032, images_per_iteration=32, **EVAL)  # batch 32: 1 ms per image
B = ModelCost(seconds_per_iteration=0.064, images_per_iteration=32, **EVAL)  # batch 32: 2 ms per image
C = ModelCost(seconds_per_iteration=0.8, images_per_iteration=160, **EVAL)  # batch 32, d_steps 5: 5 ms per image
# 3 configurations x 2 seeds
COSTS = [A, A, B, B, C, C]
CONFIGS = ["a", "a", "b", "b", "c", "c"]
ASHA = Asha(grace_period=1, reduction_factor=2, max_t=4)


def test_full_budget_by_hand():
    # Evaluations at 1000, 2000, 3000 images (0.2 s each) and the final one at 4000 (0.3 s): 0.9 s.
    assert evaluation_points(BUDGET) == [1000, 2000, 3000, 4000]
    est = estimate(COSTS, CONFIGS, BUDGET, None)
    # A: 4000 / 32 = 125 iterations x 0.032 s = 4.0 s training, + 0.9 s evaluation = 4.9 s
    # B: 125 x 0.064 = 8.0 s + 0.9 = 8.9 s;  C: 4000 / 160 = 25 iterations x 0.8 = 20.0 s + 0.9 = 20.9 s
    a, b, c = est.trials[0].full, est.trials[2].full, est.trials[4].full
    assert (a.images, a.iterations, a.evaluations) == (4000, 125, 4)
    assert (c.images, c.iterations) == (4000, 25)
    assert a.train_seconds == pytest.approx(4.0) and a.eval_seconds == pytest.approx(0.9)
    assert b.seconds == pytest.approx(8.9) and c.seconds == pytest.approx(20.9)
    # 6 trials x 4000 images = 24,000 images; 2 x (4.9 + 8.9 + 20.9) = 69.4 s = 69.4 / 3600 device-hours
    assert est.images == 24_000
    assert est.full_seconds == pytest.approx(69.4)
    assert est.full_train_seconds == pytest.approx(64.0) and est.full_eval_seconds == pytest.approx(5.4)
    assert est.full_seconds / 3600 == pytest.approx(0.019277, abs=1e-6)
    assert est.asha_seconds is None  # FIFO: no early stopping to bound


def test_asha_best_case_per_configuration_by_hand():
    # Rungs grace 1 x 2^i below max_t 4: count = int(log(4 / 1) / log(2) + 1) = 3 -> 1, 2, 4 -> [1, 2].
    assert rung_milestones(1, 4, 2) == [1, 2]
    # 3 configurations: past rung 1 max(1, floor(3 / 2)) = 1, past rung 2 max(1, floor(3 / 4)) = 1.
    assert kept_per_rung(3, 2, 2) == [1, 1]
    est = estimate(COSTS, CONFIGS, BUDGET, ASHA)
    assert (est.rungs, est.kept, est.units) == ([1, 2], [1, 1], 3)
    # The cheapest configuration (A: 2 x 4.9 s to max_t) is kept and trains its whole budget: 9.8 s.
    # B and C stop (both seeds) at their first evaluation at or past rung 1 kimg, i.e. 1000 images:
    #   B: ceil(1000 / 32) = 32 iterations x 0.064 = 2.048 s + one evaluation 0.2 s = 2.248 s per seed
    #   C: ceil(1000 / 160) = 7 iterations x 0.8 = 5.6 s + 0.2 s = 5.8 s per seed
    # Total: 9.8 + 2 x 2.248 + 2 x 5.8 = 25.896 s (vs 69.4 s without stopping).
    assert [t.stopped_at for t in est.trials] == [None, None, 1, 1, 1, 1]
    assert [t.asha.images for t in est.trials] == [4000, 4000, 1000, 1000, 1000, 1000]
    assert [t.asha.iterations for t in est.trials] == [125, 125, 32, 32, 7, 7]
    assert est.trials[2].asha.seconds == pytest.approx(2.248)
    assert est.trials[4].asha.seconds == pytest.approx(5.8)
    assert est.asha_seconds == pytest.approx(25.896)
    assert est.full_seconds == pytest.approx(69.4)  # the no-stopping total is unchanged


def test_asha_best_case_per_trial_by_hand():
    # unit trial: 6 units; past rung 1 max(1, floor(6 / 2)) = 3, past rung 2 max(1, floor(6 / 4)) = 1.
    est = estimate(COSTS, list(range(6)), BUDGET, ASHA)
    assert est.kept == [3, 1]
    # Cheapest first: A0, A1 (4.9), B0, B1 (8.9), C0, C1 (20.9). Rank 0 kept to 4 kimg; ranks 1-2 stop at
    # rung 2 (2000 images), ranks 3-5 at rung 1 (1000 images).
    assert [t.stopped_at for t in est.trials] == [None, 2, 2, 1, 1, 1]
    #   A1 at 2000: ceil(2000 / 32) = 63 iterations x 0.032 = 2.016 s + 2 evaluations 0.4 s = 2.416 s
    #   B0 at 2000: 63 x 0.064 = 4.032 s + 0.4 s = 4.432 s;  B1 at 1000: 2.248 s;  C0, C1 at 1000: 5.8 s each
    # Total: 4.9 + 2.416 + 4.432 + 2.248 + 5.8 + 5.8 = 25.596 s
    assert est.trials[1].asha.seconds == pytest.approx(2.416)
    assert est.trials[2].asha.seconds == pytest.approx(4.432)
    assert est.asha_seconds == pytest.approx(25.596)


def test_unmeasured_evaluation_counts_training_only():
    no_eval = ModelCost(seconds_per_iteration=0.032, images_per_iteration=32)
    est = estimate([no_eval], ["a"], BUDGET, None)
    assert est.full_eval_seconds is None and est.full_seconds == pytest.approx(4.0)


def test_kept_never_drops_below_one():
    # ASHA's first arrival at a rung always continues; 27 configurations, rf 3: 9, 3, 1, then 1.
    assert kept_per_rung(27, 3, 4) == [9, 3, 1, 1]


@pytest.mark.parametrize("grace,max_t,rf", [(1, 4, 2), (40, 400, 3), (20, 320, 3), (1, 1000, 10), (5, 5, 2),
                                            (0.5, 4, 2.5)])
def test_rungs_match_ray_tunes_asha(grace, max_t, rf):
    """The rungs the estimate (and the sweep's schedulers) assume are those of Ray Tune's own ASHA."""
    from ray.tune.schedulers import ASHAScheduler

    bracket = ASHAScheduler(time_attr="kimg", metric="fid", mode="min", max_t=max_t, grace_period=grace,
                            reduction_factor=rf)._brackets[0]
    assert rung_milestones(grace, max_t, rf) == sorted(m for m, _ in bracket._rungs if m < max_t)


def test_optuna_is_costed_with_its_most_expensive_reachable_model():
    from gan.cost import EvalCost, IterationCost

    spec = load_sweep(REPO / "sweeps" / "lr_ratio.yaml", data_override=str(REPO))
    timed = []

    def fake_iterations(cfg, threads):
        timed.append(cfg.train.lr_d)
        return IterationCost(0.1, cfg.train.batch_size, None, "cpu (1 thread)", 3, 1)

    def fake_evaluation(cfg, threads):
        return EvalCost(None, None, 0, cfg.eval.extractor, None, note="no weights here")

    est = measure_sweep(spec, time_iterations=fake_iterations, time_evaluation=fake_evaluation)
    assert len(timed) == 1  # lr_d's two ends are the same computation: one model timed
    assert len(est.trials) == 20 and set(est.model_of) == {"M1"}
    assert "optuna" in est.notes[0]
    # 320 kimg / 100 images per iteration = 3200 iterations x 0.1 s per trial, evaluation not included
    assert est.result.full_seconds == pytest.approx(20 * 320.0)


def test_inception_without_weights_is_said_not_timed(tmp_path, monkeypatch):
    from gan.config import EvalConfig, TrialConfig
    from gan.cost import time_evaluation

    monkeypatch.setenv("GAN_INCEPTION_WEIGHTS", str(tmp_path / "missing.pth"))
    cost = time_evaluation(TrialConfig(eval=EvalConfig(extractor="inception-v3-compat")))
    assert not cost.measured and "does not exist" in cost.note


SCRIPT = (
    "import sys, time\n"
    "from typer.testing import CliRunner\n"
    "from orchestrator.cli import app\n"
    "start = time.perf_counter()\n"
    "r = CliRunner().invoke(app, ['sweep', 'sweeps/smoke.yaml', '--dry-run', '--estimate'])\n"
    "assert r.exit_code == 0, r.output\n"
    "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'the estimate imported ray'\n"
    "print(r.output)\n"
    "print(f'elapsed {time.perf_counter() - start:.1f}')\n"
)


def test_estimate_of_the_smoke_sweep_runs_on_cpu_in_seconds_without_ray(tmp_path):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "GAN_CACHE_DIR": str(tmp_path)})
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert elapsed < 60, f"the estimate took {elapsed:.0f} s"
    out = proc.stdout
    assert "measured on cpu (1 thread)" in out  # resources.cpu 1: timed with the trial's one thread
    assert "3 distinct model(s) timed" in out  # dcgan, use-cmhsa-gan, wgan: seeds cost the same
    assert "cost per trial (cpu-h" in out and out.count("│ M3 ") == 3  # wgan: its model row and its 2 seeds
    assert "total without early stopping: 6 trials, 24,000 images to train (24 kimg)" in out
    assert "ASHA best case (unit config): of 3 configurations" in out and "1 after 1 kimg, 1 after 2 kimg" in out
    assert "peak memory: n/a on cpu" in out and "resources.gpu is 0" in out
    assert "tiny-conv features timed on 256 samples" in out


def test_estimate_without_dry_run_is_one_line_error(orchestrator_cli):
    proc = orchestrator_cli("sweep", "sweeps/smoke.yaml", "--estimate", cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: --estimate needs --dry-run: `orchestrator sweep FILE --dry-run --estimate` "
                                   "times the models and runs nothing")
