"""Optuna with seed replicates (orchestrator.run.seed_search): each proposal runs on every seed, Optuna is told
one value per configuration (the seed mean under the failure policy), and the state survives a restore.

The searcher is driven as Tune drives it (suggest, on_trial_result, on_trial_complete) with fake results and a
real Optuna study; one tiny real Tune run on local Ray checks the whole path with a mock trainable.
"""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.search_generator import SearchGenerator

from orchestrator.run.schedulers import ConfigASHA, config_key
from orchestrator.run.seed_search import SeedlessSpace, SeedReplicateSearch, optuna_with_seeds
from orchestrator.run.tune_config import trial_params
from orchestrator.store.failures import DIVERGED_SENTINEL, RETRY_KEY
from orchestrator.sweepfile.errors import SweepError
from orchestrator.sweepfile.loading import load_sweep
from orchestrator.sweepfile.plan import plan_sweep

State = optuna.trial.TrialState
optuna.logging.set_verbosity(optuna.logging.WARNING)

SWEEP = """
name: optseeds
method: optuna
num_samples: {n}
data: {{synthetic_count: 300}}
model: {{g_widths: [16, 8, 8, 8], d_widths: [8, 8, 16, 16]}}
train: {{kimg: 1.0, batch_size: 32}}
eval: {{every_kimg: 0.25, fid_samples: 64, final_fid_samples: 96, extractor: tiny-conv, grid_size: 2}}
parameters:
  lr_d: {{distribution: log_uniform, min: 1.0e-4, max: 8.0e-4}}
  g_widths: {{values: [[16, 8, 8, 8], [32, 16, 8, 8]]}}
  seed: {{values: {seeds}}}
scheduler: {{type: asha, grace_period: 0.25, reduction_factor: 2}}
"""


def seeded_search(sweep):
    """The searcher `orchestrator sweep` builds for an Optuna sweep that sweeps seed."""
    return optuna_with_seeds(sweep, sweep.seed_values())


def sweep_of(tmp_path: Path, n: int = 3, seeds=(0, 1, 2), extra: str = ""):
    """`extra`: more lines under `parameters:`."""
    path = tmp_path / "optseeds.yaml"
    text = SWEEP.format(n=n, seeds=list(seeds))
    path.write_text(text.replace("scheduler:", extra + "scheduler:"))
    return load_sweep(path)


def hand_out(search: Searcher, count: int, start: int = 0) -> list[tuple[str, dict]]:
    """`count` trials as Tune creates them: (trial id, config)."""
    out = []
    for i in range(start, start + count):
        config = search.suggest(f"t{i}")
        assert isinstance(config, dict), config
        out.append((f"t{i}", config))
    return out


def told(search: SeedReplicateSearch) -> list[tuple]:
    return [(t.state, t.value) for t in search.searcher._ot_study.trials]


def finish(search: Searcher, tid: str, fid: float, **extra) -> None:
    result = {"kimg": 1.0, "fid": fid, "training_iteration": 4, **extra}
    search.on_trial_result(tid, result)
    search.on_trial_complete(tid, result)


# --- handing out trials ---------------------------------------------------------------------------


def test_every_proposal_runs_on_every_seed_then_finished(tmp_path):
    sweep = sweep_of(tmp_path, n=3)
    assert sweep.trial_count() == 9
    search = seeded_search(sweep)
    trials = hand_out(search, 9)
    assert search.suggest("t9") == Searcher.FINISHED
    groups = [trials[i:i + 3] for i in range(0, 9, 3)]
    for group in groups:
        configs = [c for _, c in group]
        assert [c["seed"] for c in configs] == [0, 1, 2]
        assert len({config_key(trial_params(c)) for c in configs}) == 1  # one configuration for ConfigASHA
        for c in configs:  # what the trainable builds its TrialConfig from
            cfg = sweep.trial_config(trial_params(c))
            assert cfg.train.seed == c["seed"] and cfg.train.lr_d == c["lr_d"]
            assert cfg.model.g_widths == tuple(c["g_widths"])
    assert len({config_key(trial_params(g[0][1])) for g in groups}) == 3
    study = search.searcher._ot_study
    assert len(study.trials) == 3 and all("seed" not in t.params for t in study.trials)
    assert all(t.state == State.RUNNING for t in study.trials)


def test_the_space_never_offers_seed_to_optuna(tmp_path):
    sweep = sweep_of(tmp_path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    params = SeedlessSpace(sweep)(trial)
    assert set(params) == {"lr_d", "g_widths"} and set(trial.params) == {"lr_d", "g_widths"}
    assert "seed" in sweep.parameters  # the sweep itself is untouched


# --- what Optuna is told -------------------------------------------------------------------------


def test_optuna_is_told_the_seed_mean_once_per_configuration(tmp_path):
    search = seeded_search(sweep_of(tmp_path, n=4))
    trials = [tid for tid, _ in hand_out(search, 12)]
    a, b, c, d = (trials[i:i + 3] for i in range(0, 12, 3))
    # a: three real values; the last report counts, a retry is not a measurement
    search.on_trial_result(a[0], {"kimg": 0.5, "fid": 80.0, "training_iteration": 2})
    finish(search, a[0], 10.0)
    finish(search, a[1], 20.0)
    assert told(search)[0] == (State.RUNNING, None)  # a seed is still running: nothing told yet
    search.on_trial_result(a[2], {"kimg": 0.0, "fid": 1e6, RETRY_KEY: "out of memory", "training_iteration": 1})
    finish(search, a[2], 30.0)
    # b: a diverged seed enters the mean at the sentinel; an errored one (Tune's error=True) is left out
    finish(search, b[0], 10.0)
    finish(search, b[1], DIVERGED_SENTINEL, diverged=True, last_good_fid=5.0)
    search.on_trial_result(b[2], {"kimg": 0.5, "fid": 40.0, "training_iteration": 2})
    search.on_trial_complete(b[2], error=True)
    # c: every seed errored (a reported error, or Tune's error=True): FAIL, never a number
    finish(search, c[0], DIVERGED_SENTINEL, error="no usable CUDA")
    search.on_trial_complete(c[1], error=True)
    search.on_trial_complete(c[2], {"kimg": 0.0, "fid": DIVERGED_SENTINEL, "error": "out of memory"})
    # d: a non-finite metric is a divergence (the sentinel), never NaN; an error after divergence stays diverged
    finish(search, d[0], float("nan"))
    search.on_trial_result(d[1], {"kimg": 0.5, "fid": 1e6, "diverged": True, "training_iteration": 2})
    search.on_trial_complete(d[1], error=True)
    finish(search, d[2], 12.0)
    assert told(search) == [
        (State.COMPLETE, 20.0),
        (State.COMPLETE, (10.0 + DIVERGED_SENTINEL) / 2),
        (State.FAIL, None),
        (State.COMPLETE, (2 * DIVERGED_SENTINEL + 12.0) / 3),
    ]
    assert search.suggest("t12") == Searcher.FINISHED
    finish(search, a[0], 99.0)  # a late completion (e.g. after a resume) is never told twice
    assert told(search)[0] == (State.COMPLETE, 20.0)


def test_a_pending_seed_stopped_with_its_culled_configuration_is_left_out(tmp_path):
    """ConfigASHA stops a culled configuration's pending seeds: Tune completes them without a result."""
    search = seeded_search(sweep_of(tmp_path, n=1))
    (t0, _), (t1, _), (t2, _) = hand_out(search, 3)
    search.on_trial_complete(t0, {"kimg": 0.25, "fid": 50.0})
    search.on_trial_complete(t1, {"kimg": 0.25, "fid": 70.0})
    search.on_trial_complete(t2)
    assert told(search) == [(State.COMPLETE, 60.0)]


def test_an_errored_seed_that_tune_requeues_counts_again(tmp_path):
    search = seeded_search(sweep_of(tmp_path, n=1, seeds=[0, 1]))
    (t0, _), (t1, _) = hand_out(search, 2)
    search.on_trial_complete(t0, error=True)  # e.g. resumed with resume_errored
    search.on_trial_result(t0, {"kimg": 1.0, "fid": 30.0, "training_iteration": 1})
    finish(search, t1, 10.0)
    assert told(search) == [(State.RUNNING, None)]  # t0 runs again: its configuration waits for it
    search.on_trial_complete(t0, {"kimg": 1.0, "fid": 30.0})
    assert told(search) == [(State.COMPLETE, 20.0)]


def test_a_configuration_waits_for_seeds_not_handed_out_yet(tmp_path):
    """max_concurrent 1: seed 0 may end before Tune asks for seed 1."""
    search = seeded_search(sweep_of(tmp_path, n=2, seeds=[0, 1]))
    (t0, c0), = hand_out(search, 1)
    finish(search, t0, 10.0)
    assert told(search) == [(State.RUNNING, None)]
    (t1, c1), = hand_out(search, 1, start=1)
    assert c1 == {**c0, "seed": 1}
    finish(search, t1, 20.0)
    assert told(search) == [(State.COMPLETE, 15.0)]


# --- --resume ------------------------------------------------------------------------------------


def _drive(search: Searcher, steps: range, log: list) -> None:
    """Step i: hand out trial t<i>; every second step also complete the oldest open trial."""
    for i in steps:
        config = search.suggest(f"t{i}")
        if config == Searcher.FINISHED:
            log.append(("finished", i))
            continue
        log.append(("config", i, config))
        open_ = [entry for entry in log if entry[0] == "config" and ("done", entry[1]) not in log]
        if i % 2 and open_:
            oldest = open_[0]
            seed_value = 10.0 * (oldest[1] + 1) + 1000 * oldest[2]["lr_d"]
            finish(search, f"t{oldest[1]}", seed_value)
            log.append(("done", oldest[1]))


def _finish_all(search: Searcher, log: list) -> None:
    for entry in [e for e in log if e[0] == "config" and ("done", e[1]) not in log]:
        finish(search, f"t{entry[1]}", 10.0 * (entry[1] + 1) + 1000 * entry[2]["lr_d"])
        log.append(("done", entry[1]))


@pytest.mark.parametrize("path", ["save_restore", "tune_search_generator"])
def test_a_restore_mid_way_continues_as_an_uninterrupted_run(tmp_path, path):
    """Stopped after 5 of 9 trials (the second configuration has a seed not handed out, and seeds of both
    configurations have ended): a fresh searcher restored from the saved state hands out the same trials
    and tells Optuna the same seed means as an uninterrupted run."""
    sweep = sweep_of(tmp_path, n=3)

    def fresh():
        search = seeded_search(sweep)
        # what Tune wraps a Searcher in (max_concurrent_trials), and the object that saves the state
        return search, SearchGenerator(ConcurrencyLimiter(search, max_concurrent=9))

    whole, _ = fresh()
    log_whole: list = []
    _drive(whole, range(10), log_whole)
    _finish_all(whole, log_whole)

    first, first_gen = fresh()
    log: list = []
    _drive(first, range(5), log)
    assert first.pending and first.ended and told(first) == [(State.RUNNING, None), (State.RUNNING, None)]
    second, second_gen = fresh()
    if path == "save_restore":
        first.save(str(tmp_path / "searcher.pkl"))
        second.restore(str(tmp_path / "searcher.pkl"))
    else:  # Tune's own path: SearchGenerator saves wrappers' get_state() and the inner Optuna searcher's file
        first_gen.save_to_dir(str(tmp_path), session_str="s")
        second_gen.restore_from_dir(str(tmp_path))
    del first
    _drive(second, range(5, 10), log)
    _finish_all(second, log)
    assert log == log_whole
    assert told(second) == told(whole) and [s for s, _ in told(second)] == [State.COMPLETE] * 3


# --- per-configuration ASHA ----------------------------------------------------------------------


def test_config_asha_waits_for_every_seed_of_an_optuna_configuration(tmp_path):
    """Tune creates an Optuna configuration's seeds one by one: ConfigASHA's default count waits for all."""
    search = seeded_search(sweep_of(tmp_path, n=1))
    s = ConfigASHA(str(tmp_path / "scheduler.json"), time_attr="kimg", max_t=4.0, grace_period=1.0,
                   reduction_factor=2.0, trial_params=trial_params, default_seeds=3)
    s.set_search_properties("fid", "min")
    trials = [SimpleNamespace(trial_id=tid, config=config, status=Trial.RUNNING) for tid, config in hand_out(search, 3)]
    key = config_key(trial_params(trials[0].config))
    s.on_trial_add(None, trials[0])
    assert s.on_trial_result(None, trials[0], {"kimg": 1.0, "fid": 20.0}) == TrialScheduler.CONTINUE
    s.on_trial_add(None, trials[1])
    assert s.on_trial_result(None, trials[1], {"kimg": 1.0, "fid": 40.0}) == TrialScheduler.CONTINUE
    assert key not in s.means["1.0"]  # the third seed has not been created yet
    s.on_trial_add(None, trials[2])
    s.on_trial_result(None, trials[2], {"kimg": 1.0, "fid": 60.0})
    assert s.means["1.0"][key] == -40.0
    assert s.decisions[key]["1.0"]["seeds"] == sorted(t.trial_id for t in trials)


def test_build_scheduler_gives_config_asha_the_seed_count(tmp_path):
    from orchestrator.run.tuner import build_scheduler
    from orchestrator.store.sweep_dir import SweepDir

    sweep = sweep_of(tmp_path)
    scheduler = build_scheduler(sweep, plan_sweep(sweep), SweepDir(tmp_path))
    assert sweep.scheduler.unit == "config"
    assert isinstance(scheduler, ConfigASHA) and scheduler.default_seeds == 3 and scheduler.expected_seeds is None


def test_build_tuner_uses_the_seed_searcher_and_counts_configurations_times_seeds(tmp_path, monkeypatch):
    from ray import tune

    from orchestrator.run import tuner as tuner_module
    from orchestrator.store.sweep_dir import SweepDir

    monkeypatch.setattr(tuner_module.tune, "with_parameters", lambda fn, **kwargs: fn)  # no Ray object store
    sweep = sweep_of(tmp_path, n=5)
    built = tuner_module.build_tuner(sweep, plan_sweep(sweep), SweepDir(tmp_path / "optseeds"), None, resume=False)
    config: tune.TuneConfig = built._local_tuner._tune_config
    assert isinstance(config.search_alg, SeedReplicateSearch)
    assert config.num_samples == sweep.trial_count() == 15 and config.search_alg.num_configs == 5


# --- the sweep file ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed, key", [
    ("{distribution: int_uniform, min: 0, max: 9}", "parameters.seed.distribution"),
    ("{values: [0, 1], when: {g_widths: [[16, 8, 8, 8]]}}", "parameters.seed.when"),
])
def test_optuna_refuses_seeds_that_are_not_a_plain_list(tmp_path, seed, key):
    text = SWEEP.format(n=2, seeds="[0]").replace("seed: {values: [0]}", f"seed: {seed}")
    (tmp_path / "s.yaml").write_text(text)
    with pytest.raises(SweepError) as caught:
        load_sweep(tmp_path / "s.yaml")
    assert caught.value.key == key and "each listed seed" in str(caught.value)


def test_optuna_refuses_a_parameter_that_depends_on_the_seed(tmp_path):
    with pytest.raises(SweepError) as caught:
        sweep_of(tmp_path, extra="  nz: {values: [64], when: {seed: [0]}}\n")
    assert caught.value.key == "parameters.nz.when.seed"


def test_the_estimate_counts_every_seed_of_every_configuration(tmp_path):
    from gan.cost import EvalCost, IterationCost
    from orchestrator.workflow.estimate import measure_sweep

    sweep = sweep_of(tmp_path, n=4)
    est = measure_sweep(
        sweep,
        time_iterations=lambda cfg, threads: IterationCost(0.1, cfg.train.batch_size, None, "cpu", 3, 1),
        time_evaluation=lambda cfg, threads: EvalCost(None, None, 0, cfg.eval.extractor, None, note="none"),
    )
    assert len(est.trials) == sweep.trial_count() == 12
    assert [t["seed"] for t in est.trials] == [0, 1, 2] * 4
    assert "4 configurations x 3 seeds" in est.notes[0]


# --- a real Tune run -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_a_real_tune_run_tells_optuna_the_seed_means(tmp_path, local_ray):
    from ray import tune

    sweep = sweep_of(tmp_path, n=2, seeds=[0, 1])

    def trainable(config):
        sweep.trial_config(trial_params(config))  # the config is what the real trainable builds from
        for kimg in (1.0, 2.0):
            tune.report({"kimg": kimg, "fid": 1e4 * config["lr_d"] + 10 * config["seed"] + 5 / kimg})

    search = seeded_search(sweep)
    scheduler = ConfigASHA(str(tmp_path / "scheduler.json"), time_attr="kimg", max_t=2.0, grace_period=1.0,
                           reduction_factor=2.0, trial_params=trial_params, default_seeds=2)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric="fid", mode="min", search_alg=search, scheduler=scheduler,
                                    num_samples=sweep.trial_count(), max_concurrent_trials=2),
        run_config=tune.RunConfig(name="optseeds", storage_path=str(tmp_path / "tune"), verbose=0),
    )
    results = tuner.fit()
    assert len(results) == 4 and not results.errors
    by_config: dict[str, list[float]] = {}
    for r in results:
        assert r.config["seed"] in (0, 1)
        by_config.setdefault(config_key(trial_params(r.config)), []).append(r.metrics["fid"])
    assert sorted(len(v) for v in by_config.values()) == [2, 2]
    study = search.searcher._ot_study
    complete = [t for t in study.trials if t.state == State.COMPLETE]
    assert len(study.trials) == len(complete) == 2
    assert sorted(t.value for t in complete) == pytest.approx(sorted(np.mean(v) for v in by_config.values()))
    for key in by_config:  # ConfigASHA judged each configuration on both seeds together
        assert len(scheduler.decisions[key]["1.0"]["seeds"]) == 2
