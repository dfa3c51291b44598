"""What the experiment trackers log of a trial: its settings as flat parameters, and each Tune result."""
from __future__ import annotations

from typing import Any

from orchestrator.store.failures import RETRY_KEY
from orchestrator.store.tables import parameter_value


def logged_params(sweep, params: dict[str, Any]) -> dict[str, Any]:
    """A trial's settings as flat, readable tracker parameters: the sweep's name, the swept parameters
    (as in the Parquet tables: widths as labels like '512-256-128-64'), every other model and train
    setting by its own name, then `data.*` and `eval.*`."""
    cfg = sweep.trial_config(params).to_dict()
    flat: dict[str, Any] = {"sweep": sweep.name, **params}
    for section in ("model", "train"):
        for name, value in cfg[section].items():
            if name != "image_size":  # data.image_size
                flat.setdefault(name, value)
    for section in ("data", "eval"):
        flat.update({f"{section}.{name}": value for name, value in cfg[section].items()})
    return {name: parameter_value(value) for name, value in flat.items()}


# What train_trial reports besides an evaluation: its last word on a trial that diverged or ran out of memory.
# Its metric (whichever the sweep ranks by) is the failure policy's sentinel, and its last good value is not news.
_TERMINAL_KEYS = ("kimg", "fid", "is_mean", "kid_mean", "diverged", "error", "reason")


def tracked_result(result: dict[str, Any]) -> dict[str, Any] | None:
    """What the trackers log of one Tune result. An evaluation as it is; the closing report of a trial that
    diverged or failed (its fid a placeholder, or a repeat of its last evaluation's) as `status` and `reason`
    only, beside Tune's own counters; nothing of a request to restart the trial on a whole GPU."""
    if result.get(RETRY_KEY):
        return None
    result = {k: v for k, v in result.items() if k != "node_versions"}  # provenance.jsonl keeps them
    if not (result.get("diverged") or result.get("error")):
        return result
    status = "diverged" if result.get("diverged") else "error"
    reason = str(result.get("reason") or result.get("error") or "")
    kept = {k: v for k, v in result.items() if k not in _TERMINAL_KEYS and not k.startswith("last_good_")}
    return {**kept, "status": status, "reason": reason}
