"""ASHA for sweeps with seed replicates, and ASHA whose rungs survive a crashed driver.

Ray Tune does not save a scheduler's state with the experiment, so after `--resume` its ASHA
starts with empty rungs and culls more loosely than an uninterrupted run would. Both schedulers
here journal every change of their state (rungs, decisions) in the sweep directory (see
orchestrator.run.scheduler_state) and read it back on the first call after a restore, so a resumed
sweep makes the same decisions.

- `TrialASHA` (`scheduler.unit: trial`): Tune's own ASHA, judged per trial.
- `ConfigASHA` (`scheduler.unit: config`): successive halving over configurations (trials that
  differ only in `seed`), judged on the mean of their seeds' metric at each rung, with ASHA's
  asynchronous rule applied to those means. Seeds of one configuration are stopped together.

Both apply the failure policy (orchestrator.store.failures): a diverged seed is the worst value, an errored
one is missing, and a non-finite metric counts as diverged.
"""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from orchestrator.run.rungs import rung_milestones
from orchestrator.run.scheduler_state import SavedState
from orchestrator.store.failures import DIVERGED_SENTINEL as DIVERGED_SENTINEL_ABS
from orchestrator.store.failures import RETRY_KEY, finite, sentinel
from orchestrator.sweepfile.params import REPLICATE_PARAMS

STATE_FILE = "scheduler.json"


def config_key(params: dict[str, Any]) -> str:
    """Trials with the same key are seed replicates of one configuration."""
    return json.dumps({k: v for k, v in params.items() if k not in REPLICATE_PARAMS}, sort_keys=True)


def _diverged(result: dict, metric: str | None) -> bool:
    """A diverged report, or one whose metric is not a finite number (NaN < cutoff is never true)."""
    return bool(result.get("diverged")) or (metric is not None and metric in result and not finite(result[metric]))


class TrialASHA(SavedState, ASHAScheduler):
    """Tune's ASHA (one bracket) with its rungs and stop decisions saved to the sweep directory."""

    def __init__(self, state_file: str, **kwargs):
        super().__init__(**kwargs)
        self.state_file = state_file
        self.stopped: dict[str, tuple[float, float]] = {}  # trial_id -> (rung kimg, its metric there)
        self._loaded = False

    def _restore(self, snapshot: dict) -> None:
        rungs = {round(m, 9): recorded for m, recorded in snapshot["rungs"]}
        for milestone, recorded in self._brackets[0]._rungs:
            recorded.update(rungs.get(round(milestone, 9), {}))
        self.stopped = {t: tuple(v) for t, v in snapshot["stopped"].items()}

    def _state(self) -> dict:
        rungs = [[m, recorded] for m, recorded in self._brackets[0]._rungs]
        return {"unit": "trial", "rungs": rungs, "stopped": self.stopped}

    def _set(self, kind: str, *args: Any, log: bool = True) -> None:
        """rung (milestone, trial, signed value) | stopped (trial, rung, metric)."""
        if kind == "rung":
            milestone, tid, value = args
            next(r for m, r in self._brackets[0]._rungs if round(m, 9) == round(milestone, 9))[tid] = value
        else:
            tid, rung, value = args
            self.stopped[tid] = (rung, value)
        if log:
            self._log(kind, *args)


    def on_trial_add(self, tune_controller, trial: Trial):
        self._load()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        self._load()
        if trial.trial_id in self.stopped:  # decided before a crash: the same decision again
            return TrialScheduler.STOP
        if result.get(RETRY_KEY) or result.get("error"):  # no measurement: an error is missing, never a value
            return TrialScheduler.CONTINUE
        if _diverged(result, self._metric):  # the worst value, never the last good one or NaN
            result = {**result, self._metric: sentinel(self._mode)}
        before = {(m, t) for m, r in self._brackets[0]._rungs for t in r if t == trial.trial_id}
        action = super().on_trial_result(tune_controller, trial, result)
        # The rung this result was recorded at, if any, and the (signed) value recorded there.
        new = [(m, r[trial.trial_id]) for m, r in self._brackets[0]._rungs
               if trial.trial_id in r and (m, trial.trial_id) not in before]
        for m, value in new:
            self._log("rung", m, trial.trial_id, value)
        if action == TrialScheduler.STOP and new:
            rung, value = new[0]
            self._set("stopped", trial.trial_id, rung, self._metric_op * value)
        return action

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict):
        self._load()
        if trial.trial_id in self._trial_info:
            before = {(m, t) for m, r in self._brackets[0]._rungs for t in r if t == trial.trial_id}
            super().on_trial_complete(tune_controller, trial, result)
            for m, recorded in self._brackets[0]._rungs:
                if trial.trial_id in recorded and (m, trial.trial_id) not in before:
                    self._log("rung", m, trial.trial_id, recorded[trial.trial_id])

    def on_trial_remove(self, tune_controller, trial: Trial):
        self._trial_info.pop(trial.trial_id, None)

    def stop_info(self, trial_id: str) -> tuple[float, float] | None:
        """(rung kimg, the metric ASHA judged there) for a trial this scheduler stopped."""
        self._load()
        return self.stopped.get(trial_id)


class ConfigASHA(SavedState, FIFOScheduler):
    """Successive halving over configurations, judged on the mean over their seeds.

    At each rung, a configuration is judged once every one of its **expected** seeds (from the sweep's
    expansion, before Tune creates them) has reported an evaluation there or ended: it continues if its
    mean is within the best 1/reduction_factor of the configuration means recorded at that rung so far
    (Ray ASHA's percentile rule), else all its trials stop.

    The failure policy (orchestrator.store.failures) decides what a seed contributes at a rung:
    - its recorded value;
    - a seed that diverged before the rung: the sentinel, worse than any real value. A configuration
      whose mean carries one is stopped there, so it is never kept over one without;
    - a seed that ended in error: nothing (left out of the mean; the decision's record names it). When Tune
      requeues it (on_trial_error, then on_trial_add), it counts again once it reports.

    A seed that is ahead of an open decision keeps training (it never holds a slot idle, and Tune's
    max_concurrent counts paused trials as live, so pausing could starve its own siblings); when its
    configuration is stopped it stops at its next report, and if it had already finished, `stop_info`
    still names the rung, so the results record it as stopped with its siblings. Pending seeds of a
    configuration with an open decision are started first.
    """

    # A class default, so that a scheduler pickled before this setting existed unpickles (--resume).
    default_seeds: int | None = None

    def __init__(self, state_file: str, *, time_attr: str, max_t: float, grace_period: float,
                 reduction_factor: float, trial_params, expected_seeds: dict[str, int] | None = None,
                 default_seeds: int | None = None):
        super().__init__()
        self.state_file = state_file
        self.time_attr = time_attr
        self.max_t = max_t
        self.reduction_factor = reduction_factor
        self.milestones = rung_milestones(grace_period, max_t, reduction_factor)
        self.trial_params = trial_params  # Tune trial config -> the sweep's parameters
        # config key -> how many seeds the sweep's expansion gives it (None: Optuna, whose configurations
        # are proposed at run time). default_seeds: the count for a configuration not in that map (Optuna with
        # swept seeds runs every proposal on each of them); None: the seeds created so far are all there is.
        self.expected_seeds = dict(expected_seeds) if expected_seeds is not None else None
        self.default_seeds = default_seeds
        self._metric: str | None = None
        self.sign = 1.0  # metric * sign: larger is better
        self._trials: dict[str, Trial] = {}
        self._reset_state()
        self._loaded = False

    def _reset_state(self) -> None:
        ms = [str(m) for m in self.milestones]
        self.records: dict[str, dict[str, dict[str, float]]] = {m: {} for m in ms}  # rung -> config -> trial -> value
        self.means: dict[str, dict[str, float]] = {m: {} for m in ms}  # rung -> config -> signed mean
        self.decided: dict[str, dict[str, str]] = {}  # config -> rung -> continue | stop | none
        self.decisions: dict[str, dict[str, dict]] = {}  # config -> rung -> what the decision rested on
        self.stopped: dict[str, tuple[float, float]] = {}  # config -> (rung kimg, mean metric there)
        self.ended: set[str] = set()
        self.finished: set[str] = set()  # trials that reported their last evaluation (max_t)
        self.diverged: set[str] = set()
        self.errored: set[str] = set()
        self.config_of: dict[str, str] = {}
        self.members: dict[str, list[str]] = {}  # config -> its trials (an index of config_of)

    # --- persistence ---------------------------------------------------------------------------
    FLAGS = ("ended", "finished", "diverged", "errored")

    def _restore(self, snapshot: dict) -> None:
        self.records.update(snapshot["records"])
        self.means.update(snapshot["means"])
        self.decided = snapshot["decided"]
        self.decisions = snapshot.get("decisions", {})
        self.stopped = {c: tuple(v) for c, v in snapshot["stopped"].items()}
        for name in self.FLAGS:
            setattr(self, name, set(snapshot.get(name, [])))
        for tid, config in snapshot.get("config_of", {}).items():
            self._set("config_of", tid, config, log=False)

    def _state(self) -> dict:
        return {"unit": "config", "records": self.records, "means": self.means, "decided": self.decided,
                "decisions": self.decisions, "stopped": self.stopped, "config_of": self.config_of,
                **{name: sorted(getattr(self, name)) for name in self.FLAGS}}

    def _set(self, kind: str, *args: Any, log: bool = True) -> None:
        """Every change of the state goes through here, and into the journal (see SavedState)."""
        if kind == "config_of":
            tid, config = args
            previous = self.config_of.get(tid)
            if previous == config:
                return
            if previous is not None:
                self.members[previous].remove(tid)
            self.config_of[tid] = config
            self.members.setdefault(config, []).append(tid)
        elif kind == "record":
            rung, config, tid, value = args
            self.records[rung].setdefault(config, {})[tid] = value
        elif kind == "mean":
            rung, config, signed = args
            self.means[rung][config] = signed
        elif kind == "decide":
            config, rung, decision, record = args
            self.decided.setdefault(config, {})[rung] = decision
            self.decisions.setdefault(config, {})[rung] = record
        elif kind == "stop":
            config, m, mean = args
            self.stopped[config] = (m, mean)
        elif kind == "flag":
            name, tid, present = args
            (getattr(self, name).add if present else getattr(self, name).discard)(tid)
        else:
            raise ValueError(f"unknown scheduler state event {kind!r}")
        if log:
            self._log(kind, *args)

    # --- Tune hooks ----------------------------------------------------------------------------
    def set_search_properties(self, metric, mode, **spec) -> bool:
        if metric:
            self._metric = metric
        if mode:
            self.sign = -1.0 if mode == "min" else 1.0
        return True

    def on_trial_add(self, tune_controller, trial: Trial):
        self._load()
        tid = trial.trial_id
        self._trials[tid] = trial
        self._set("config_of", tid, config_key(self.trial_params(trial.config)))
        if tid in self.errored:  # requeued after an error (or resumed): it counts again once it reports
            self._set("flag", "errored", tid, False)
            self._set("flag", "ended", tid, False)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        self._load()
        tid = trial.trial_id
        config = self.config_of[tid]
        if self.time_attr not in result or self._metric not in result or result.get(RETRY_KEY):
            return TrialScheduler.CONTINUE
        if config in self.stopped:
            return TrialScheduler.STOP
        if result.get("error"):  # it ends by itself, as missing; its siblings need not wait for it
            self._mark_ended(tid, errored=True)
        elif _diverged(result, self._metric):  # it ends by itself, as the worst value at every later rung
            self._set("flag", "diverged", tid, True)
            self._mark_ended(tid)
        else:
            t = float(result[self.time_attr])
            self._record(tid, config, t, float(result[self._metric]))
            if t >= self.max_t:
                self._set("flag", "finished", tid, True)
        action = self._decide(tune_controller, config, current=tid)
        if action == TrialScheduler.CONTINUE and tid in self.finished:
            action = TrialScheduler.STOP  # the budget is spent, as Tune's ASHA does at max_t
        return action

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict):
        self._end(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial: Trial):
        if trial.status == Trial.RUNNING and getattr(trial, "should_recover", lambda: False)():
            # Tune requeues it (on_trial_add follows): a restart, not an end; no decision rests on its absence.
            return
        self._end(tune_controller, trial, errored=True)

    def on_trial_remove(self, tune_controller, trial: Trial):
        self._end(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        """Pending trials in sweep order (the seeds of a configuration sit together), those not ahead of an
        open decision first, so a configuration's laggards start before its leaders resume after a restore."""
        trials = tune_controller.get_trials()
        order = ((Trial.PENDING, False), (Trial.PENDING, True), (Trial.PAUSED, False), (Trial.PAUSED, True))
        for wanted, ahead in order:
            for trial in trials:
                if trial.status == wanted and self._waiting(trial.trial_id) == ahead:
                    return trial
        return None

    def debug_string(self) -> str:
        return f"ConfigASHA: {len(self.stopped)} configurations stopped"

    def stop_info(self, trial_id: str) -> tuple[float, float] | None:
        """(rung kimg, mean metric of its configuration there) for a trial whose configuration was stopped."""
        self._load()
        return self.stopped.get(self.config_of.get(trial_id, ""))

    # --- the rule ------------------------------------------------------------------------------
    def _mark_ended(self, tid: str, errored: bool = False) -> None:
        self._set("flag", "ended", tid, True)
        if errored:
            self._set("flag", "errored", tid, True)

    def _end(self, tune_controller, trial: Trial, errored: bool = False) -> None:
        self._load()
        tid = trial.trial_id
        if tid in self.ended and not errored:
            return  # already ended (a diverged or errored report, then Tune's completion)
        self._mark_ended(tid, errored=errored and tid not in self.diverged)
        config = self.config_of.get(tid)
        if config is not None and config not in self.stopped:
            self._decide(tune_controller, config, current=tid)

    def _siblings(self, config: str) -> list[str]:
        return list(self.members.get(config, []))

    def _all_seeds_exist(self, config: str) -> bool:
        """Every seed the sweep expands this configuration into has been created by Tune."""
        expected = (self.expected_seeds or {}).get(config, self.default_seeds)
        return expected is None or len(self._siblings(config)) >= expected

    def _highest_recorded(self, tid: str) -> float:
        config = self.config_of[tid]
        return max((float(m) for m in self.records if tid in self.records[m].get(config, {})), default=-math.inf)

    def _record(self, tid: str, config: str, t: float, value: float) -> None:
        """Like Ray's bracket: the value lands in the highest rung reached that it has not passed yet."""
        for m in reversed(self.milestones):
            if t >= m:
                if self._highest_recorded(tid) < m:
                    self._set("record", str(m), config, tid, value)
                return

    def _arrived(self, tid: str, m: float) -> bool:
        return tid in self.ended or tid in self.finished or self._highest_recorded(tid) >= m

    def _waiting(self, tid: str) -> bool:
        """Ahead of an open decision: it recorded at a rung above an undecided one (or finished)."""
        config = self.config_of.get(tid)
        if config is None or config in self.stopped or tid in self.ended:
            return False
        decided = self.decided.get(config, {})
        reached = math.inf if tid in self.finished else self._highest_recorded(tid)
        return any(str(m) not in decided for m in self.milestones if m < reached)

    def rung_values(self, config: str, m: float) -> tuple[dict[str, float], list[str], list[str]]:
        """What each seed contributes at rung m: ({trial: value}, diverged trials, errored trials left out)."""
        recorded = self.records[str(m)].get(config, {})
        values, diverged, errored = {}, [], []
        worst = -self.sign * DIVERGED_SENTINEL_ABS
        for tid in self._siblings(config):
            if tid in recorded:
                values[tid] = recorded[tid]
            elif tid in self.diverged:
                values[tid] = worst
                diverged.append(tid)
            elif tid in self.errored:
                errored.append(tid)
        return values, sorted(diverged), sorted(errored)

    def _decide(self, tune_controller, config: str, current: str) -> str:
        """Take every decision of `config` that its seeds allow, lowest rung first."""
        if not self._all_seeds_exist(config):
            return TrialScheduler.CONTINUE  # a seed Tune has not created yet cannot have arrived
        decided = self.decided.get(config, {})
        for m in self.milestones:
            key = str(m)
            if key in decided:
                if decided[key] == "stop":
                    return TrialScheduler.STOP
                continue
            if not all(self._arrived(t, m) for t in self._siblings(config)):
                break
            values, diverged, errored = self.rung_values(config, m)
            record = {"seeds": sorted(values), "diverged": diverged, "errored": errored}
            if not values:  # every seed ended (or errored) before this rung
                self._set("decide", config, key, "none", {**record, "decision": "none"})
                continue
            mean = float(np.mean(list(values.values())))
            signed = self.sign * mean
            previous = list(self.means[key].values())
            cutoff = np.nanpercentile(previous, (1 - 1 / self.reduction_factor) * 100) if previous else None
            self._set("mean", key, config, signed)
            decision = "stop" if diverged or (cutoff is not None and signed < cutoff) else "continue"
            self._set("decide", config, key, decision, {**record, "mean": mean, "decision": decision})
            if decision == "stop":
                self._set("stop", config, m, mean)
                self._stop_siblings(tune_controller, config, current)
                return TrialScheduler.STOP
            decided = self.decided[config]
        return TrialScheduler.CONTINUE

    def stopped_configs(self) -> list[str]:
        """Configurations stopped so far, in the order they were stopped (the results callback reads the new
        ones: their seeds that had already finished are recorded as stopped with their siblings)."""
        self._load()
        return list(self.stopped)

    def _stop_siblings(self, tune_controller, config: str, current: str) -> None:
        """Paused and pending seeds stop now; running ones at their next report."""
        if tune_controller is None:
            return
        for tid in self._siblings(config):
            trial = self._trials.get(tid)
            if tid != current and trial is not None and trial.status in (Trial.PAUSED, Trial.PENDING):
                tune_controller.stop_trial(trial)


def expected_seeds(trials: list[dict[str, Any]]) -> dict[str, int]:
    """How many seed replicates each configuration of a grid or random sweep has (config key -> count)."""
    counts: dict[str, int] = {}
    for params in trials:
        key = config_key(params)
        counts[key] = counts.get(key, 0) + 1
    return counts
