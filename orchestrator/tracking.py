"""Experiment trackers, optionally: a sweep file's `tracking:` section turns on Ray Tune's own logger
callbacks for Weights & Biases and MLflow, one tracker run per trial.

    tracking:
      wandb: {project: gan-sweeps, group: ablation}                       # Ray's WandbLoggerCallback
      mlflow: {tracking_uri: "sqlite:///mlflow.db", experiment: ablation}  # Ray's MLflowLoggerCallback

The sweep-file models and the validation live here and stay light: `orchestrator.schema` imports this
module, and `--dry-run` imports none of Ray, wandb or mlflow (a missing extra is found with find_spec).
The callbacks, small subclasses of Ray's, are in `orchestrator.tracking_loggers`, imported when a sweep runs.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_FORBID = ConfigDict(extra="forbid")
TRACKERS = ("wandb", "mlflow")  # also the names of their pip extras and of the modules they need


class WandbTracking(BaseModel):
    """`tracking.wandb`: one W&B run per trial (id = the Tune trial id), grouped by sweep."""

    model_config = _FORBID
    project: str = "gan-sweeps"
    group: str | None = None  # None: the sweep's name
    entity: str | None = None  # None: your W&B default entity
    mode: Literal["online", "offline"] | None = None  # None: $WANDB_MODE, else W&B's default (online)
    tags: list[str] = Field(default_factory=list)


class MlflowTracking(BaseModel):
    """`tracking.mlflow`: one MLflow run per trial in one experiment."""

    model_config = _FORBID
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else MLflow's default
    experiment: str | None = None  # None: the sweep's name
    tags: dict[str, str] = Field(default_factory=dict)


class Tracking(BaseModel):
    """`tracking:`, either tracker or both; a bare `wandb:` or `mlflow:` turns it on with the defaults."""

    model_config = _FORBID
    wandb: WandbTracking | None = None
    mlflow: MlflowTracking | None = None

    @field_validator(*TRACKERS, mode="before")
    @classmethod
    def _bare_key_means_defaults(cls, value: Any) -> Any:
        return {} if value is None else value

    def enabled(self) -> list[str]:
        return [name for name in TRACKERS if getattr(self, name) is not None]


# For schema's one-line messages about unknown keys in these sections.
SECTIONS: dict[str, type[BaseModel]] = {"tracking": Tracking, "tracking.wandb": WandbTracking,
                                        "tracking.mlflow": MlflowTracking}


def tracking_problem(tracking: Tracking) -> tuple[str, str] | None:
    """(key, message) for a tracker whose extra is not installed, else None; imports neither tracker."""
    for name in tracking.enabled():
        try:
            missing = importlib.util.find_spec(name) is None
        except ValueError:  # imported already, without a spec: it is there
            missing = False
        if missing:
            return f"tracking.{name}", f'needs the {name} extra: pip install -e ".[{name}]"'
    return None


def logged_params(sweep, params: dict[str, Any]) -> dict[str, Any]:
    """A trial's settings as flat, readable tracker parameters: the sweep's name, the swept parameters
    (as in the Parquet tables: widths as labels like '512-256-128-64'), every other model and train
    setting by its own name, then `data.*` and `eval.*`."""
    from orchestrator.results import parameter_value  # run time only (pyarrow)

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
    from orchestrator.schedulers import RETRY_KEY  # run time only (Ray)

    if result.get(RETRY_KEY):
        return None
    if not (result.get("diverged") or result.get("error")):
        return dict(result)
    status = "diverged" if result.get("diverged") else "error"
    reason = str(result.get("reason") or result.get("error") or "")
    kept = {k: v for k, v in result.items() if k not in _TERMINAL_KEYS and not k.startswith("last_good_")}
    return {**kept, "status": status, "reason": reason}


def tracking_callbacks(sweep, sweep_dir: str | None = None) -> list:
    """Ray Tune logger callbacks for the sweep's `tracking:` section; none without it (imports nothing then).
    `sweep_dir`: the results directory of the sweep (W&B keeps its local files in <sweep_dir>/wandb)."""
    if sweep.tracking is None or not sweep.tracking.enabled():
        return []
    from orchestrator import tracking_loggers  # Ray and the trackers

    return [tracking_loggers.LOGGERS[name](sweep, getattr(sweep.tracking, name), sweep_dir)
            for name in sweep.tracking.enabled()]


def check_trackers(sweep) -> None:
    """Set each tracker up once in the driver before Ray starts and the results directory is claimed, so a
    missing W&B API key or an MLflow store that refuses its URI is one line, not a traceback from Tune."""
    from orchestrator.schema import SweepError

    for name, callback in zip(sweep.tracking.enabled() if sweep.tracking else [], tracking_callbacks(sweep)):
        try:
            callback.setup()
        except Exception as exc:  # whatever the tracker raises, said in one line
            message = str(exc).strip() or type(exc).__name__
            if name == "wandb" and "API key" in message:
                message = ("no W&B API key: run `wandb login` or set WANDB_API_KEY (or log offline: mode: offline "
                           "in the file, or WANDB_MODE=offline)")
            raise SweepError(sweep.source_path, f"tracking.{name}", message) from None
