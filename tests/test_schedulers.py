"""ASHA over configurations (seed-aware) and ASHA whose rungs survive a crashed driver.

The schedulers are driven here the way Tune's controller drives them (on_trial_add, on_trial_result,
stop_trial for paused/pending trials), with fake trials, so every decision can be checked exactly;
`tests/test_sweep_e2e.py` runs them for real in Ray Tune.
"""
from __future__ import annotations

import json
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from orchestrator.run.schedulers import (
    ConfigASHA,
    TrialASHA,
    config_key,
    rung_milestones,
)

CONTINUE, STOP, PAUSE = TrialScheduler.CONTINUE, TrialScheduler.STOP, TrialScheduler.PAUSE


class FakeController:
    """What a scheduler may call on Tune's controller: get_trials and stop_trial (as Ray does it)."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.trials: list = []

    def add(self, trial_id: str, **params):
        trial = SimpleNamespace(trial_id=trial_id, config={"params": params}, status=Trial.PENDING)
        self.trials.append(trial)
        self.scheduler.on_trial_add(self, trial)
        return trial

    def get_trials(self):
        return self.trials

    def stop_trial(self, trial):
        if trial.status in (Trial.PENDING, Trial.PAUSED):
            self.scheduler.on_trial_remove(self, trial)
        trial.status = Trial.TERMINATED

    def report(self, trial, kimg: float, fid: float, **extra) -> str:
        trial.status = Trial.RUNNING
        action = self.scheduler.on_trial_result(self, trial, {"kimg": kimg, "fid": fid, **extra})
        if action == STOP:
            trial.status = Trial.TERMINATED
            self.scheduler.on_trial_complete(self, trial, {"kimg": kimg, "fid": fid})
        elif action == PAUSE:
            trial.status = Trial.PAUSED
        return action


def params_of(config):
    return dict(config["params"])


def config_asha(tmp_path, **kw) -> ConfigASHA:
    s = ConfigASHA(str(tmp_path / "scheduler.json"), time_attr="kimg", trial_params=params_of,
                   max_t=kw.get("max_t", 4.0), grace_period=kw.get("grace_period", 1.0),
                   reduction_factor=kw.get("reduction_factor", 2.0), expected_seeds=kw.get("expected_seeds"))
    s.set_search_properties("fid", "min")
    return s


def test_rungs_are_rays_asha_rungs():
    bracket = ASHAScheduler(time_attr="kimg", max_t=320, grace_period=40, reduction_factor=3)._brackets[0]
    assert rung_milestones(40, 320, 3) == sorted(m for m, _ in bracket._rungs if m < 320) == [40, 120]
    assert rung_milestones(1, 4, 2) == [1, 2]  # a rung at max_t never records: the trial ends there


def test_config_key_ignores_only_seed_and_repeat():
    assert config_key({"variant": "dcgan", "seed": 1}) == config_key({"seed": 4, "variant": "dcgan"})
    assert config_key({"variant": "dcgan", "seed": 1, "repeat": 2}) == config_key({"variant": "dcgan"})
    assert config_key({"variant": "dcgan", "heads": 2}) != config_key({"variant": "dcgan", "heads": 4})


def test_a_configuration_is_judged_on_the_mean_of_its_seeds_and_stopped_whole(tmp_path):
    s = config_asha(tmp_path)
    c = FakeController(s)
    a0, a1 = c.add("a0", variant="a", seed=0), c.add("a1", variant="a", seed=1)
    b0, b1 = c.add("b0", variant="b", seed=0), c.add("b1", variant="b", seed=1)
    # a: seeds 10 and 30 (mean 20). The first seed waits for its sibling, training on.
    assert c.report(a0, 1.0, 10.0) == CONTINUE
    assert c.report(a1, 1.0, 30.0) == CONTINUE  # first configuration at the rung: nothing to compare with
    # b: seed 0 alone (15) would beat a's mean, but b's mean (15 + 35) / 2 = 25 is worse than 20:
    # per-trial ASHA would keep b0; per-configuration ASHA stops both seeds of b.
    assert c.report(b0, 1.0, 15.0) == CONTINUE
    assert c.report(b1, 1.0, 35.0) == STOP
    assert b0.status == Trial.RUNNING  # a running sibling stops at its next report...
    assert c.report(b0, 1.5, 14.0) == STOP
    assert s.stop_info("b0") == s.stop_info("b1") == (1.0, 25.0)  # ...at the same rung, with the same mean
    assert s.stop_info("a0") is None and s.stop_info("a1") is None


def test_the_rule_is_rays_percentile_rule_on_means(tmp_path):
    """ASHA's asynchronous rule: continue if at least the (1 - 1/rf) percentile of the means so far."""
    rf = 3.0
    s = config_asha(tmp_path, max_t=9.0, reduction_factor=rf)
    c = FakeController(s)
    means_so_far, rng = [], np.random.default_rng(0)
    for i in range(8):
        seeds = [c.add(f"t{i}_{k}", lr=i, seed=k) for k in range(3)]
        fids = rng.uniform(10, 50, size=3)
        actions = [c.report(t, 1.0, float(f)) for t, f in zip(seeds, fids, strict=False)]
        signed = -float(np.mean(fids))
        expected_stop = bool(means_so_far) and signed < np.nanpercentile(means_so_far, (1 - 1 / rf) * 100)
        assert (actions[-1] == STOP) == expected_stop, (i, means_so_far, signed)
        assert actions[:-1] == [CONTINUE, CONTINUE]
        means_so_far.append(signed)


def test_a_seed_ahead_of_an_open_decision_keeps_training_and_stops_with_its_configuration(tmp_path):
    """max_concurrent smaller than the seeds: the first seed never waits idle (Tune counts a paused trial
    as live, so pausing it could keep its own siblings from starting); it stops when its config does."""
    s = config_asha(tmp_path, max_t=8.0)  # rungs 1, 2, 4
    c = FakeController(s)
    a0, a1 = c.add("a0", variant="a", seed=0), c.add("a1", variant="a", seed=1)
    x0, x1 = c.add("x0", variant="x", seed=0), c.add("x1", variant="x", seed=1)
    c.report(a0, 1.0, 10.0), c.report(a1, 1.0, 10.0)
    assert c.report(x0, 1.0, 40.0) == CONTINUE
    assert c.report(x0, 2.0, 39.0) == CONTINUE  # rung 1 still open: keeps training
    assert s._waiting("x0") and s.choose_trial_to_run(c) is x1  # its laggard sibling starts first
    assert c.report(x0, 8.0, 35.0) == STOP  # its budget is spent: it finishes before the decision
    assert s.stop_info("x0") is None
    assert c.report(x1, 1.0, 44.0) == STOP  # x's mean 42 is cut at rung 1
    assert s.stop_info("x0") == s.stop_info("x1") == (1.0, 42.0)  # the finished seed is recorded as stopped too


def test_a_diverged_seed_is_not_waited_for_and_counts_as_the_worst_value(tmp_path):
    """No survivor bias: the configuration is judged on both seeds, the diverged one as the sentinel."""
    s = config_asha(tmp_path)
    c = FakeController(s)
    a0, a1 = c.add("a0", variant="a", seed=0), c.add("a1", variant="a", seed=1)
    assert c.report(a0, 1.0, 20.0) == CONTINUE
    c.report(a1, 0.5, 35.0, diverged=True)  # its last good FID is not credited
    s.on_trial_complete(c, a1, {})
    a = config_key({"variant": "a"})
    assert s.decided[a]["1.0"] == "stop"  # first at the rung, yet stopped: a diverged seed is never kept
    assert s.means["1.0"][a] == -(20.0 + 1e6) / 2
    assert s.decisions[a]["1.0"]["diverged"] == ["a1"]
    assert s.stop_info("a0") == (1.0, (20.0 + 1e6) / 2)


def test_a_nan_metric_counts_as_diverged(tmp_path):
    s = config_asha(tmp_path)
    c = FakeController(s)
    a0, a1 = c.add("a0", variant="a", seed=0), c.add("a1", variant="a", seed=1)
    c.report(a0, 1.0, 20.0)
    assert c.report(a1, 1.0, float("nan")) == STOP  # NaN < cutoff is never true: it must not slip through
    assert s.decisions[config_key({"variant": "a"})]["1.0"]["diverged"] == ["a1"]


def test_an_errored_seed_is_left_out_and_named(tmp_path):
    s = config_asha(tmp_path)
    c = FakeController(s)
    a0, a1 = c.add("a0", variant="a", seed=0), c.add("a1", variant="a", seed=1)
    c.report(a0, 1.0, 20.0)
    a1.status = Trial.RUNNING
    s.on_trial_error(c, a1)  # a crash Tune does not retry
    a = config_key({"variant": "a"})
    assert s.decided[a]["1.0"] == "continue"
    assert s.means["1.0"][a] == -20.0
    assert s.decisions[a]["1.0"] == {"seeds": ["a0"], "diverged": [], "errored": ["a1"], "mean": 20.0,
                                     "decision": "continue"}


def test_a_decision_waits_for_seeds_tune_has_not_created(tmp_path):
    """max_concurrent: Tune creates seeds lazily; the expansion says how many a configuration has."""
    s = config_asha(tmp_path, expected_seeds={config_key({"variant": "a"}): 2, config_key({"variant": "b"}): 2})
    c = FakeController(s)
    a0 = c.add("a0", variant="a", seed=0)
    assert c.report(a0, 1.0, 20.0) == CONTINUE
    assert c.report(a0, 4.0, 18.0) == STOP  # its budget: it finished; the decision has not been taken
    assert config_key({"variant": "a"}) not in s.means["1.0"]
    a1 = c.add("a1", variant="a", seed=1)
    assert c.report(a1, 1.0, 60.0) == CONTINUE  # now a is judged on both seeds: mean 40
    assert s.means["1.0"][config_key({"variant": "a"})] == -40.0


def test_paused_and_pending_seeds_of_a_culled_configuration_are_stopped(tmp_path):
    s = config_asha(tmp_path, max_t=8.0)
    c = FakeController(s)
    a0, a1 = c.add("a0", variant="a", seed=0), c.add("a1", variant="a", seed=1)
    b0, b1, b2 = (c.add(f"b{k}", variant="b", seed=k) for k in range(3))
    c.report(a0, 1.0, 10.0), c.report(a1, 1.0, 10.0)
    assert c.report(b0, 1.0, 50.0) == CONTINUE
    b0.status = Trial.PAUSED  # paused by Tune (e.g. a resource change): not by this scheduler
    assert c.report(b1, 1.0, 50.0) == CONTINUE
    assert s.choose_trial_to_run(c) is b2  # b's decision waits for b2: pending siblings run first
    c2 = c.add("c2", variant="c", seed=0)
    assert c.report(b2, 1.0, 50.0) == STOP
    assert b0.status == Trial.TERMINATED and c2.status == Trial.PENDING  # b's paused seed stopped with it
    assert c.report(b1, 1.5, 48.0) == STOP


def _replay(scheduler_factory, events, crash_after: int | None, tmp_path):
    """Run `events` through a scheduler; optionally 'crash' (pickle it as Tune's tuner.pkl holds it,
    before any result) and continue with the restored copy, as --resume does."""
    scheduler = scheduler_factory()
    pristine = pickle.dumps(scheduler)  # what Tuner.restore unpickles: the scheduler as it was at the start
    controller = FakeController(scheduler)
    trials = {tid: controller.add(tid, **params) for tid, params in events["trials"].items()}
    actions = []
    for i, (tid, kimg, fid) in enumerate(events["results"]):
        if crash_after is not None and i == crash_after:
            scheduler = pickle.loads(pristine)
            controller.scheduler = scheduler
            for trial in trials.values():
                scheduler.on_trial_add(controller, trial)
        if trials[tid].status == Trial.TERMINATED:
            continue
        actions.append((tid, kimg, controller.report(trials[tid], kimg, fid)))
    return actions


def _events(seeded: bool):
    rng = np.random.default_rng(1)
    trials = {f"t{i}": ({"lr": i // 2, "seed": i % 2} if seeded else {"lr": i}) for i in range(8)}
    results = []
    for kimg in (1.0, 1.5, 2.0, 2.5, 3.0):
        for tid in rng.permutation(list(trials)):
            results.append((str(tid), kimg, float(rng.uniform(10, 60))))
    return {"trials": trials, "results": results}


@pytest.mark.parametrize("unit", ["trial", "config"])
def test_resume_makes_the_decisions_an_uninterrupted_run_makes(tmp_path, unit):
    def factory(path):
        def make():
            if unit == "config":
                return config_asha(path)
            s = TrialASHA(str(path / "scheduler.json"), time_attr="kimg", max_t=4.0, grace_period=1.0,
                          reduction_factor=2.0)
            s.set_search_properties("fid", "min")
            return s
        return make

    events = _events(seeded=unit == "config")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    uninterrupted = _replay(factory(tmp_path / "a"), events, None, tmp_path / "a")
    for crash_after in range(1, len(events["results"])):  # a crash between any two results
        (tmp_path / "b" / "scheduler.json").unlink(missing_ok=True)
        (tmp_path / "b" / "scheduler.jsonl").unlink(missing_ok=True)  # the journal of the previous replay
        resumed = _replay(factory(tmp_path / "b"), events, crash_after, tmp_path / "b")
        assert resumed == uninterrupted, crash_after
    assert any(action == STOP for _, _, action in uninterrupted)
    if unit == "trial":
        # Tune's own ASHA, restored the same way, starts with empty rungs: it would decide otherwise.
        def rays_asha():
            s = ASHAScheduler(time_attr="kimg", max_t=4.0, grace_period=1.0, reduction_factor=2.0)
            s.set_search_properties("fid", "min")
            return s

        assert _replay(rays_asha, events, None, tmp_path) == uninterrupted
        assert any(_replay(rays_asha, events, crash, tmp_path) != uninterrupted
                   for crash in range(1, len(events["results"])))


def trial_asha(tmp_path) -> TrialASHA:
    s = TrialASHA(str(tmp_path / "scheduler.json"), time_attr="kimg", max_t=4.0, grace_period=1.0,
                  reduction_factor=2.0)
    s.set_search_properties("fid", "min")
    return s


def test_trial_asha_records_the_sentinel_for_a_divergence_and_nothing_for_an_error(tmp_path):
    """No stale credit: a diverged report's metric is the sentinel (its last good FID is under another key);
    a NaN is a divergence; an error is missing, never a value at a rung."""
    s = trial_asha(tmp_path)
    c = FakeController(s)
    good, nan, diverged, errored = (c.add(t, lr=i) for i, t in enumerate(("good", "nan", "diverged", "errored")))
    c.report(good, 1.0, 30.0)
    c.report(nan, 1.0, float("nan"))
    c.report(diverged, 1.0, 1e6, diverged=True, last_good_fid=10.0)
    c.report(errored, 1.0, 1e6, error="no usable CUDA")
    rung = dict(next(r for m, r in s._brackets[0]._rungs if m == 1.0))
    assert rung == {"good": -30.0, "nan": -1e6, "diverged": -1e6}


def test_optuna_is_told_errors_as_failed_and_divergence_as_the_sentinel():
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from orchestrator.run.search import PolicyOptunaSearch

    search = PolicyOptunaSearch(space={"lr": optuna.distributions.FloatDistribution(0.1, 1.0)}, metric="fid",
                                mode="min", sampler=optuna.samplers.RandomSampler(seed=0))
    assert isinstance(search, OptunaSearch)
    for tid in ("ok", "diverged", "error", "nan"):
        search.suggest(tid)
    search.on_trial_result("ok", {"fid": 30.0, "training_iteration": 1})
    search.on_trial_result("error", {"fid": 1e6, "error": "boom", "training_iteration": 1})  # not a value
    search.on_trial_complete("ok", {"fid": 30.0})
    search.on_trial_complete("diverged", {"fid": 1e6, "diverged": True, "last_good_fid": 5.0})
    search.on_trial_complete("error", {"fid": 1e6, "error": "no usable CUDA"})
    search.on_trial_complete("nan", {"fid": float("nan")})
    told = {t.number: (t.state, t.value, t.intermediate_values) for t in search._ot_study.trials}
    State = optuna.trial.TrialState
    assert told == {0: (State.COMPLETE, 30.0, {1: 30.0}), 1: (State.COMPLETE, 1e6, {}),
                    2: (State.FAIL, None, {}), 3: (State.FAIL, None, {})}


def test_saved_state_is_a_journal_of_changes_then_a_snapshot(tmp_path):
    """Each result appends a few lines (its cost does not grow with the sweep); the sweep's end writes
    scheduler.json; a copy unpickled as on --resume reads snapshot and journal back to the same state."""
    s = config_asha(tmp_path, max_t=8.0)
    c = FakeController(s)
    trials = [c.add(f"t{i}", lr=i // 2, seed=i % 2) for i in range(8)]
    journal = tmp_path / "scheduler.jsonl"
    sizes = []
    for kimg in (1.0, 2.0):
        for t in trials:
            if t.status != Trial.TERMINATED:
                before = len(journal.read_text().splitlines()) if journal.exists() else 0
                c.report(t, kimg, 10.0 + int(t.trial_id[1:]))
                sizes.append(len(journal.read_text().splitlines()) - before)
    assert max(sizes) <= 6
    state = s._state()
    restored = pickle.loads(pickle.dumps(s))
    restored._load()
    assert restored._state() == state
    s.snapshot()
    assert not journal.exists() and json.loads((tmp_path / "scheduler.json").read_text()) == json.loads(
        json.dumps(state))
    again = pickle.loads(pickle.dumps(s))
    again._load()
    assert again._state() == restored._state()
