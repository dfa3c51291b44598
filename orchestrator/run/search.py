"""Optuna under the failure policy (orchestrator.store.failures).

Ray's OptunaSearch tells Optuna the last reported value of a trial. Under the policy:
- a trial that ended in **error** (no usable CUDA, out of memory on a whole GPU) is told as FAIL:
  missing, never a number, whatever its last report carried;
- a **diverged** trial is told its sentinel, the worst value (its last report carries it);
- a retry on a whole GPU is not a measurement, and a non-finite value is never told.
"""
from __future__ import annotations

from ray.tune.search.optuna import OptunaSearch

from orchestrator.store.failures import RETRY_KEY, finite


class PolicyOptunaSearch(OptunaSearch):
    """OptunaSearch that records errors as FAIL and never feeds Optuna a non-finite or non-measured value."""

    def on_trial_result(self, trial_id: str, result: dict):
        if result.get("error") or result.get(RETRY_KEY) or not finite(result.get(self.metric)):
            return
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if result is not None and (result.get("error") or not finite(result.get(self.metric))):
            result, error = None, True
        super().on_trial_complete(trial_id, result=result, error=error)
