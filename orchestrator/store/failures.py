"""The failure policy: what a diverged, errored or unfinished trial means, in one place.

Every part of the sweep that compares a metric applies this module, so a failure means the same to
per-configuration ASHA, per-trial ASHA, Optuna, the leaderboard and the report:

- **diverged** (a non-finite loss or metric, a collapsed generator): a result, the worst one. ASHA and
  Optuna see `DIVERGED_SENTINEL` (finite: NaN and inf break percentiles and Optuna), worse than any real
  value; the leaderboard's ranking key counts it as +inf.
- **error** (infrastructure: a crash, a lost node, no usable CUDA, out of memory on a whole GPU): no
  number at all. Left out of every mean and key, and counted (`n_error`); `orchestrator sweep` exits 1.
- **stopped_early** and unfinished (pending, running, interrupted): not a final result; counted, shown,
  never ranked on a final FID.

Ray-free: the leaderboard imports it without Ray.
"""
from __future__ import annotations

import math
from typing import Any

# Finite, and worse than any real FID (or, negated, any real score of a metric to maximise).
DIVERGED_SENTINEL = 1.0e6
# A diverged report's last good metric goes under this key, never under the metric itself (stale credit).
LAST_GOOD_PREFIX = "last_good_"
# In a trial's result: it ran out of memory on a shared GPU and asks to restart on a whole one
# (orchestrator.run.trainable.WholeGpuAfterOom). Not a measurement: no scheduler or search judges it.
RETRY_KEY = "retry_on_whole_gpu"

COMPLETED, STOPPED_EARLY, DIVERGED, ERROR = "completed", "stopped_early", "diverged", "error"
UNFINISHED = ("pending", "running", "interrupted")
ENDED = (COMPLETED, STOPPED_EARLY, DIVERGED, ERROR)


def sentinel(mode: str) -> float:
    """The diverged value in the metric's own units: +1e6 when lower is better, -1e6 when higher is."""
    return DIVERGED_SENTINEL if mode == "min" else -DIVERGED_SENTINEL


def finite(value: Any) -> bool:
    """A real number that is neither NaN nor infinite (None, strings and bools are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def finite_or_none(value: Any) -> float | None:
    """Non-finite numbers are stored as null (the status says why), never as NaN or Infinity."""
    if hasattr(value, "item") and not isinstance(value, (list, tuple)):
        value = value.item()
    return float(value) if finite(value) else None
