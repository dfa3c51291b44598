"""Optuna with seed replicates: every configuration Optuna proposes runs on every swept seed.

`SeedReplicateSearch` wraps the Optuna searcher (`PolicyOptunaSearch`). It asks Optuna for a configuration
(a search space without `seed`), hands out one Tune trial per seed with that configuration plus `seed`, and
tells Optuna one value per configuration once every seed has ended: the mean over its seeds of the last value
each reported, under the failure policy (orchestrator.store.failures):

- a **diverged** seed contributes the sentinel (the worst value), which enters the mean;
- an **errored** seed (a result with `error`, or a trial Tune ends with error=True) is left out;
- if no seed of a configuration has a value (all errored), Optuna is told FAIL;
- a result carrying RETRY_KEY is not a measurement, and a non-finite metric counts as diverged.

`num_configs` counts configurations: the sweep runs num_configs x len(seeds) trials, then FINISHED.

Not Ray's `Repeater`: it averages with nanmean (a failed seed silently drops out, and an all-failed
configuration is told NaN), counts trials rather than configurations, and numbers its copies instead of
giving them the sweep's seeds.

State (for `--resume`): the seed copies not handed out yet, which trial runs which seed of which proposal,
and each seed's last value and final contribution. Under Tune, `SearchGenerator.save_to_dir` stores
`get_state()` next to the inner searcher's own file; `save`/`restore` keep both in one file.
"""
from __future__ import annotations

import copy
import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune.search import Searcher

from orchestrator.store.failures import RETRY_KEY, finite, sentinel
from orchestrator.sweepfile.params import REPLICATE_PARAMS
from orchestrator.sweepfile.sections import Sweep

logger = logging.getLogger(__name__)

ERRORED = "error"  # a seed's outcome when it ended in error: no number, left out of the mean


class SeedlessSpace:
    """`Sweep.optuna_space` without `seed` (and `repeat`): Optuna searches configurations, never seeds.

    A class rather than a closure so that OptunaSearch's plain-pickle save can store it."""

    def __init__(self, sweep: Sweep):
        kept = {k: v for k, v in sweep.parameters.items() if k not in REPLICATE_PARAMS}
        self.sweep = sweep.model_copy(update={"parameters": kept})

    def __call__(self, trial: Any) -> dict[str, Any]:
        return self.sweep.optuna_space(trial)


def optuna_with_seeds(sweep: Sweep, seeds: list[int], sampler: Any = None) -> SeedReplicateSearch:
    """The searcher of an Optuna sweep that sweeps `seed` (`seeds`: its values): TPE (seeded by search_seed)
    over the space without seed, each proposal run on every seed; `num_samples` counts configurations."""
    from optuna.samplers import TPESampler

    from orchestrator.run.search import PolicyOptunaSearch

    inner = PolicyOptunaSearch(space=SeedlessSpace(sweep), metric=sweep.metric.name, mode=sweep.metric.mode,
                               sampler=sampler or TPESampler(seed=sweep.search_seed))
    return SeedReplicateSearch(inner, seeds=seeds, num_configs=sweep.num_samples or 1)


class SeedReplicateSearch(Searcher):
    """Run each configuration of `searcher` on every seed; tell it the seed mean under the failure policy."""

    def __init__(self, searcher: Searcher, *, seeds: list[int], num_configs: int, seed_key: str = "seed"):
        if not seeds:
            raise ValueError("SeedReplicateSearch needs at least one seed")
        # `searcher` by that name: Tune's SearchGenerator saves wrappers' get_state() along this chain.
        self.searcher = searcher
        self.seeds = [int(s) for s in seeds]
        self.num_configs = int(num_configs)
        self.seed_key = seed_key
        self._reset()
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def _reset(self) -> None:
        self.proposed = 0  # configurations asked of the inner searcher
        self.configs: dict[str, dict] = {}  # proposal -> its configuration (until Optuna is told)
        self.pending: list[tuple[str, int]] = []  # (proposal, seed) copies not handed out yet
        self.trials: dict[str, tuple[str, int]] = {}  # Tune trial id -> (proposal, seed)
        self.last: dict[str, float] = {}  # trial -> last measured value (the sentinel once diverged)
        self.diverged: set[str] = set()  # frozen at the sentinel: a later error does not undo a divergence
        self.ended: dict[str, float | str | None] = {}  # trial -> value, ERRORED, or None (nothing measured)
        self.told: dict[str, float | None] = {}  # proposal -> what Optuna was told (None: FAIL)

    # metric and mode are the inner searcher's (Tune may set them late, through set_search_properties).
    @property
    def metric(self) -> str:
        return self.searcher.metric

    @property
    def mode(self) -> str:
        return self.searcher.mode

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    # --- handing out trials ----------------------------------------------------------------------
    def suggest(self, trial_id: str) -> dict | str | None:
        if not self.pending:
            if self.proposed >= self.num_configs:
                return Searcher.FINISHED
            # A counter, not the first copy's trial id: a retried ask (None) reuses Optuna's asked trial.
            proposal = f"config_{self.proposed:05d}"
            config = self.searcher.suggest(proposal)
            if config is None or config == Searcher.FINISHED:
                return config
            self.proposed += 1
            self.configs[proposal] = copy.deepcopy(config)
            self.pending = [(proposal, s) for s in self.seeds]
        proposal, seed = self.pending.pop(0)
        self.trials[trial_id] = (proposal, seed)
        config = copy.deepcopy(self.configs[proposal])
        config[self.seed_key] = seed
        if not any(p == proposal for p, _ in self.pending):
            del self.configs[proposal]  # every copy handed out
        return config

    # --- results ---------------------------------------------------------------------------------
    def _measure(self, result: dict | None) -> float | str | None:
        """What one result says under the failure policy: a value, the sentinel, ERRORED, or None (no measurement)."""
        if not result or result.get(RETRY_KEY):
            return None
        if result.get("error"):
            return ERRORED
        if self._diverged(result):
            return sentinel(self.mode)
        value = result.get(self.metric)
        return float(value) if finite(value) else None

    def _diverged(self, result: dict) -> bool:
        return bool(result.get("diverged")) or (self.metric in result and not finite(result[self.metric]))

    def _open(self, trial_id: str) -> str | None:
        """The proposal of a trial whose configuration Optuna has not been told yet (else None)."""
        proposal, _ = self.trials.get(trial_id, (None, None))
        return proposal if proposal is not None and proposal not in self.told else None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self._open(trial_id) is None or trial_id in self.diverged:
            return
        measured = self._measure(result)
        if measured is None or measured == ERRORED:
            return  # an error report is followed by the trial's completion, which records it
        if trial_id in self.ended:  # requeued after an error (or resumed): it counts again
            del self.ended[trial_id]
        self.last[trial_id] = measured
        if self._diverged(result):
            self.diverged.add(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        proposal = self._open(trial_id)
        if proposal is None:
            if trial_id not in self.trials:
                logger.warning("SeedReplicateSearch: completion of unknown trial %s ignored", trial_id)
            return
        measured = self._measure(result)
        if trial_id in self.diverged:
            outcome = sentinel(self.mode)
        elif error or measured == ERRORED:
            outcome = ERRORED
        elif measured is not None:
            outcome = measured
        else:  # stopped before it measured anything (a pending seed of a culled configuration)
            outcome = self.last.get(trial_id)
        self.ended[trial_id] = outcome
        self._tell_if_done(proposal)

    def _tell_if_done(self, proposal: str) -> None:
        if any(p == proposal for p, _ in self.pending):
            return  # a seed not handed out yet
        members = [t for t, (p, _) in self.trials.items() if p == proposal]
        if not all(t in self.ended for t in members):
            return
        values = [v for v in (self.ended[t] for t in members) if v is not None and v != ERRORED]
        if values:
            mean = float(np.mean(values))
            self.searcher.on_trial_complete(proposal, result={self.metric: mean})
            self.told[proposal] = mean
        else:  # every seed errored (or measured nothing): missing, never a number
            self.searcher.on_trial_complete(proposal, result=None, error=True)
            self.told[proposal] = None
        for t in members:  # the told configuration's per-seed records are no longer needed
            self.last.pop(t, None)
            self.ended.pop(t, None)
            self.diverged.discard(t)

    # --- state (--resume) ------------------------------------------------------------------------
    STATE = ("seeds", "num_configs", "seed_key", "proposed", "configs", "pending", "trials", "last",
             "diverged", "ended", "told")

    def get_state(self) -> dict:
        """This wrapper's state without the inner searcher (Tune saves that one itself)."""
        return copy.deepcopy({name: getattr(self, name) for name in self.STATE})

    def set_state(self, state: dict) -> None:
        for name in self.STATE:
            setattr(self, name, copy.deepcopy(state[name]))
        self.pending = [tuple(p) for p in self.pending]
        self.trials = {t: tuple(v) for t, v in self.trials.items()}

    def save(self, checkpoint_path: str) -> None:
        """Both states in one file (Tune's own path goes through get_state and the inner searcher's save)."""
        with tempfile.TemporaryDirectory() as tmp:
            inner = os.path.join(tmp, "searcher.pkl")
            self.searcher.save(inner)
            blob = Path(inner).read_bytes()
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"state": self.get_state(), "searcher": blob}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            saved = pickle.load(f)  # noqa: S301 - the sweep's own experiment state, as OptunaSearch does
        self.set_state(saved["state"])
        with tempfile.TemporaryDirectory() as tmp:
            inner = Path(tmp) / "searcher.pkl"
            inner.write_bytes(saved["searcher"])
            self.searcher.restore(str(inner))
