"""ASHA's rungs: where Ray Tune's ASHA (one bracket) records a trial's metric and may stop it.

Ray-free, so that `--dry-run --estimate`, the schedulers and the confirm stage's selection share one rule.
"""
from __future__ import annotations

import numpy as np


def rung_milestones(grace_period: float, max_t: float, reduction_factor: float) -> list[float]:
    """Ray's ASHA rungs (one bracket), ascending: grace_period x reduction_factor^k. A rung at max_t never
    records (the trial ends there). np.log, as Ray computes the rung count: the same rounding."""
    count = int(np.log(max_t / grace_period) / np.log(reduction_factor) + 1)
    return [m for m in (grace_period * reduction_factor**k for k in range(count)) if m < max_t]
