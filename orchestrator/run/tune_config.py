"""How a Tune trial's config carries the sweep's parameters."""
from __future__ import annotations

from typing import Any


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """Grid/random trials carry their parameters under 'params'; Optuna's are the config itself."""
    return dict(config["params"]) if "params" in config else dict(config)
