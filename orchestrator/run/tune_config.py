"""What Tune's configuration fixes: how a trial's config carries the sweep's parameters, and which settings a
--resume cannot change."""
from __future__ import annotations

from typing import Any


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """Grid/random trials carry their parameters under 'params'; Optuna's are the config itself."""
    return dict(config["params"]) if "params" in config else dict(config)


# Tuner.restore reuses the TuneConfig and RunConfig saved when the sweep started: edits of these on
# --resume would be silently ignored, so they are refused instead (SweepDir.claim).
FIXED_ON_RESUME = ("max_concurrent", "max_failures")
