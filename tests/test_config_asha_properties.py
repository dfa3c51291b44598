"""Property-based tests of per-configuration ASHA under the failure policy.

A small Tune-like controller drives `ConfigASHA` the way Ray Tune 2.60 does: trials created lazily under
max_concurrent (seeds innermost, as the sweep expands them), started by the scheduler's
choose_trial_to_run, reporting in an order hypothesis picks, diverging at random evaluations, erroring
(with Tune's requeue sequence on_trial_error -> on_trial_add while retries remain), and a driver crash with
--resume at any point (the scheduler unpickled as Tune's saved state holds it, every trial re-added).

Checked on every run: each decision rests on every expected seed of its configuration, each with the value
the failure policy gives it (its first evaluation at or past the rung; the sentinel if it diverged before;
left out and named if it errored); a configuration with a seed diverged before a rung is never kept there;
and every trial ends.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from orchestrator.run.schedulers import ConfigASHA, config_key, expected_seeds
from orchestrator.store.failures import DIVERGED_SENTINEL

STOP = TrialScheduler.STOP
EVERY = 0.5  # kimg between evaluations


@dataclass
class Plan:
    """What one trial would do if nothing stopped it."""

    params: dict
    values: list[float]  # the metric at kimg EVERY, 2*EVERY, ...
    diverge_at: int | None  # index of the evaluation that diverges (non-finite or flagged), if any
    error_at: int | None  # index of the report at which the trial's process crashes, if any
    next_eval: int = 0
    failures: int = 0
    reported: list[float] = field(default_factory=list)


class Controller:
    """The parts of Ray Tune's controller that ConfigASHA sees."""

    def __init__(self, scheduler, plans: list[Plan], max_concurrent: int | None, slots: int, max_failures: int):
        self.scheduler, self.plans = scheduler, plans
        self.max_concurrent, self.slots, self.max_failures = max_concurrent, slots, max_failures
        self.trials: list = []
        self.plan_of: dict[str, Plan] = {}

    # Tune's API, as the scheduler calls it
    def get_trials(self):
        return self.trials

    def stop_trial(self, trial):
        if trial.status in (Trial.PENDING, Trial.PAUSED):
            self.scheduler.on_trial_remove(self, trial)
        trial.status = Trial.TERMINATED

    # the simulation
    def live(self):
        return [t for t in self.trials if t.status not in (Trial.TERMINATED, Trial.ERROR)]

    def create_trials(self):
        """BasicVariantGenerator under max_concurrent: a new trial only while fewer are live."""
        while len(self.trials) < len(self.plans) and (
                self.max_concurrent is None or len(self.live()) < self.max_concurrent):
            i = len(self.trials)
            trial = SimpleNamespace(trial_id=f"t{i:02d}", config={"params": self.plans[i].params},
                                    status=Trial.PENDING, should_recover=None)
            trial.should_recover = (lambda t=trial: self.plan_of[t.trial_id].failures <= self.max_failures)
            self.trials.append(trial)
            self.plan_of[trial.trial_id] = self.plans[i]
            self.scheduler.on_trial_add(self, trial)

    def start_trials(self):
        while sum(t.status == Trial.RUNNING for t in self.trials) < self.slots:
            trial = self.scheduler.choose_trial_to_run(self)
            if trial is None:
                return
            trial.status = Trial.RUNNING

    def step(self, trial) -> None:
        """The running `trial` reports its next evaluation (or diverges, errors, finishes)."""
        plan = self.plan_of[trial.trial_id]
        i = plan.next_eval
        if plan.error_at == i and plan.failures <= self.max_failures:
            plan.failures += 1
            plan.error_at = None if plan.failures <= self.max_failures else plan.error_at
            if trial.should_recover():  # Tune's _requeue_trial: on_trial_error, then on_trial_add
                self.scheduler.on_trial_error(self, trial)
                trial.status = Trial.PENDING
                self.scheduler.on_trial_add(self, trial)
            else:
                self.scheduler.on_trial_error(self, trial)
                trial.status = Trial.ERROR
            return
        kimg = (i + 1) * EVERY
        if plan.diverge_at == i:
            result = {"kimg": kimg, "fid": DIVERGED_SENTINEL, "diverged": True}
            self.scheduler.on_trial_result(self, trial, result)
            trial.status = Trial.TERMINATED
            self.scheduler.on_trial_complete(self, trial, result)
            return
        result = {"kimg": kimg, "fid": plan.values[i]}
        plan.next_eval += 1
        action = self.scheduler.on_trial_result(self, trial, result)
        if action == STOP or plan.next_eval >= len(plan.values):
            trial.status = Trial.TERMINATED
            self.scheduler.on_trial_complete(self, trial, result)

    def crash_and_resume(self, pristine: bytes):
        """A killed driver, then --resume: Tune unpickles the scheduler it saved at the start and re-adds
        every trial; unfinished and errored ones (resume_errored=True) restart from their checkpoint."""
        self.scheduler = pickle.loads(pristine)
        for trial in self.trials:
            if trial.status in (Trial.RUNNING, Trial.PAUSED, Trial.ERROR):
                trial.status = Trial.PENDING
            self.scheduler.on_trial_add(self, trial)


def params_of(config):
    return dict(config["params"])


@st.composite
def sweeps(draw):
    n_configs = draw(st.integers(2, 4))
    n_seeds = draw(st.integers(1, 3))
    max_t = draw(st.sampled_from([4.0, 8.0]))
    n_evals = int(max_t / EVERY)
    plans = []
    for c in range(n_configs):
        for s in range(n_seeds):  # seeds innermost, as Sweep.trials() expands them
            values = draw(st.lists(st.floats(10, 100, allow_nan=False), min_size=n_evals, max_size=n_evals))
            diverge = draw(st.one_of(st.none(), st.integers(0, n_evals - 1)))
            error = draw(st.one_of(st.none(), st.integers(0, n_evals - 1)))
            plans.append(Plan({"lr": c, "seed": s}, values, diverge, error))
    return plans, max_t


@settings(max_examples=150)
@given(sweep=sweeps(), max_concurrent=st.sampled_from([None, 1, 2]), max_failures=st.sampled_from([0, 1]),
       crash=st.one_of(st.none(), st.integers(0, 200)), data=st.data())
def test_config_asha_decides_on_every_seed_never_keeps_a_divergence_and_ends_every_trial(
        tmp_path_factory, sweep, max_concurrent, max_failures, crash, data):
    plans, max_t = sweep
    state = tmp_path_factory.mktemp("asha") / "scheduler.json"
    expected = expected_seeds([p.params for p in plans])
    scheduler = ConfigASHA(str(state), time_attr="kimg", max_t=max_t, grace_period=1.0, reduction_factor=2.0,
                           trial_params=params_of, expected_seeds=expected)
    scheduler.set_search_properties("fid", "min")
    pristine = pickle.dumps(scheduler)
    c = Controller(scheduler, plans, max_concurrent, slots=2, max_failures=max_failures)
    for step in range(2000):
        if crash == step:
            c.crash_and_resume(pristine)
        c.create_trials()
        c.start_trials()
        running = [t for t in c.trials if t.status == Trial.RUNNING]
        if not running:
            break
        c.step(data.draw(st.sampled_from(running), label="reports next"))
    # Every trial was created and ended: nothing deadlocks, whatever max_concurrent.
    assert len(c.trials) == len(plans)
    assert all(t.status in (Trial.TERMINATED, Trial.ERROR) for t in c.trials), [t.status for t in c.trials]

    s = c.scheduler
    by_config: dict[str, list[str]] = {}
    for t in c.trials:
        by_config.setdefault(config_key(t.config["params"]), []).append(t.trial_id)
    for config, rungs in s.decisions.items():
        siblings = sorted(by_config[config])
        for rung, record in rungs.items():
            m = float(rung)
            # Every expected seed is accounted for: measured, diverged (the sentinel) or errored (left out).
            assert len(siblings) == expected[config]
            assert sorted(record["seeds"] + record["errored"]) == siblings, (rung, record)
            for tid in record["seeds"]:
                plan = c.plan_of[tid]
                if tid in record["diverged"]:
                    assert plan.diverge_at is not None and (plan.diverge_at + 1) * EVERY <= m  # at or before the rung
                else:
                    assert s.records[rung][config][tid] == plan.values[int(round(m / EVERY)) - 1]
            if record["decision"] == "none":
                continue
            values = [DIVERGED_SENTINEL if tid in record["diverged"] else s.records[rung][config][tid]
                      for tid in record["seeds"]]
            assert record["mean"] == float(np.mean(values))
            if record["diverged"]:  # never kept over a configuration without a divergence
                assert record["decision"] == "stop"
