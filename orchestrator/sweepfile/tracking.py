"""Experiment trackers, optionally: a sweep file's `tracking:` section turns on Ray Tune's own logger
callbacks for Weights & Biases and MLflow, one tracker run per trial.

    tracking:
      wandb: {project: gan-sweeps, group: ablation}                       # Ray's WandbLoggerCallback
      mlflow: {tracking_uri: "sqlite:///mlflow.db", experiment: ablation}  # Ray's MLflowLoggerCallback

The sweep-file models and the validation live here and stay light: `--dry-run` imports none of Ray, wandb
or mlflow (a missing extra is found with find_spec). The callbacks, small subclasses of Ray's, are in
`orchestrator.run.tracking_loggers`, built by `orchestrator.run.tracking` when a sweep runs.
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


# For the one-line messages about unknown keys in these sections (orchestrator.sweepfile.messages).
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
