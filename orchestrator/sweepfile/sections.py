"""The sections of a sweep file (pydantic) and the validated `Sweep` they make.

`data`, `model`, `train` and `eval` mirror `gan.config`'s dataclasses field for field (generated, so they
never go stale); `parameters` sweeps fields of `model` and `train`. Build a `Sweep` with
`orchestrator.sweepfile.loading.load_sweep`, which also applies the cross-field rules (`orchestrator.sweepfile.rules`).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import typing
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, create_model

from gan.config import DataConfig, EvalConfig, ModelConfig, TrainConfig, TrialConfig
from orchestrator.sweepfile.expansion import (
    dependency_order,
    expand,
    holds,
    replicates_last,
    sample,
)
from orchestrator.sweepfile.params import PARAM_SECTION, coerce, optuna_choice
from orchestrator.sweepfile.tracking import Tracking

METRIC_GOALS = {"fid": "minimize", "kid_mean": "minimize", "is_mean": "maximize"}
_FORBID = ConfigDict(extra="forbid")


def _section(cls: type, **overrides: Any) -> type[BaseModel]:
    """A pydantic mirror of a gan.config dataclass that rejects unknown keys; generated, so never stale."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {f.name: (hints[f.name], f.default) for f in dataclasses.fields(cls)}
    fields.update(overrides)
    # Named like the module attribute it is bound to, so plain pickle finds it (Optuna's searcher
    # pickles its search space, this Sweep included, when Tune saves the experiment state).
    name = f"{cls.__name__.removesuffix('Config')}Section"
    return create_model(name, __config__=_FORBID, __module__=__name__, **fields)


DataSection = _section(DataConfig)
# image_size lives in data.image_size; model.image_size may only repeat it.
ModelSection = _section(ModelConfig, image_size=(int | None, None))
# cuda_graph: YAML reads an unquoted on/off as a boolean; both spellings are accepted.
TrainSection = _section(TrainConfig, cuda_graph=(str | bool, "auto"))
EvalSection = _section(EvalConfig)


class Metric(BaseModel):
    model_config = _FORBID
    name: Literal["fid", "is_mean", "kid_mean"] = "fid"
    goal: Literal["minimize", "maximize"] | None = None  # None: the only sensible one for `name`

    @property
    def mode(self) -> str:
        """Ray Tune's name for the goal: "min" or "max"."""
        return "max" if (self.goal or METRIC_GOALS[self.name]) == "maximize" else "min"


class Parameter(BaseModel):
    """One swept field: exactly one of `value`, `values` or `distribution` (+ `min`, `max`)."""

    model_config = _FORBID
    value: Any = None
    values: list[Any] | None = None
    distribution: Literal["uniform", "log_uniform", "int_uniform"] | None = None
    min: float | None = None
    max: float | None = None
    when: dict[str, list[Any]] | None = None  # parameter name -> values for which this one is set

    @property
    def categorical(self) -> bool:
        return self.distribution is None

    @property
    def choices(self) -> list[Any]:
        return [self.value] if "value" in self.model_fields_set else list(self.values or [])


class Scheduler(BaseModel):
    model_config = _FORBID
    type: Literal["asha", "fifo"] = "fifo"
    # What ASHA culls: single trials, or configurations judged on the mean over their seeds.
    # None: "config" when seeds are replicated (seed swept, or grid repeats), else "trial".
    unit: Literal["trial", "config"] | None = None
    time_attr: Literal["kimg"] = "kimg"
    grace_period: float | None = None  # None: eval.every_kimg (the first FID)
    reduction_factor: float = 3.0
    max_t: float | None = None  # None: train.kimg


class Confirm(BaseModel):
    """`confirm:`: after the sweep, run the best configurations (and declared baselines) again on fresh seeds
    at the full budget, as the sweep `<name>-confirm` (orchestrator.workflow.confirm)."""

    model_config = _FORBID
    top: int = Field(1, strict=True)  # best configurations on metric.name (the selection rule's ranking)
    include: list[dict[str, Any]] = Field(default_factory=list)  # always confirmed: every configuration matching
    # A count (fresh seeds after the largest one used) or a list of unused seeds; checked in sweepfile.stages.
    seeds: Any = 5
    kimg: float | None = None  # budget; None = train.kimg
    fid_split: str | None = None  # real images of the confirm FIDs; None = eval.fid_split


class Resources(BaseModel):
    model_config = _FORBID
    cpu: float = 1.0
    gpu: float = 0.0


# Not part of fingerprint(): they change how trials are scheduled, not what they compute.
# `confirm` decides what runs after the sweep, as a sweep of its own with its own fingerprint.
_NOT_FINGERPRINTED = {"description", "resources", "max_concurrent", "max_failures", "keep_checkpoints",
                      "hang_timeout_min", "confirm"}
# A trial that reports nothing for this long ends as `error` (its first report may take twice as long).
DEFAULT_HANG_TIMEOUT_MIN = 60.0


class Sweep(BaseModel):
    """A validated sweep; build it with `load_sweep` (which also runs the cross-field checks)."""

    model_config = _FORBID
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    method: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int | None = Field(None, ge=1)  # grid: repeats (None = 1); random/optuna: trials
    search_seed: int = Field(0, ge=0)
    metric: Metric = Field(default_factory=Metric)
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ModelSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    parameters: dict[str, Parameter] = Field(default_factory=dict)
    # Method grid: explicit configurations (name -> value), each run on every combination of `parameters`
    # (typically seeds). A confirm stage lists the configurations it selected this way.
    configurations: list[dict[str, Any]] | None = None
    scheduler: Scheduler = Field(default_factory=Scheduler)
    resources: Resources = Field(default_factory=Resources)
    max_concurrent: int | None = Field(None, ge=1)
    max_failures: int = Field(2, ge=0)
    # Which trials' checkpoints stay when the sweep ends: all, completed ones only (stopped, diverged and errored
    # trials' are deleted), or none.
    keep_checkpoints: Literal["all", "completed", "none"] = "completed"
    # Minutes without a report before a trial is stopped as `error` (orchestrator.run.watchdog).
    hang_timeout_min: float = Field(DEFAULT_HANG_TIMEOUT_MIN, strict=True)
    tracking: Tracking | None = None  # W&B / MLflow loggers (orchestrator.sweepfile.tracking)
    confirm: Confirm | None = None  # explore, then confirm on fresh seeds (orchestrator.workflow.confirm)

    _source_path: str = PrivateAttr("")
    _source_text: str = PrivateAttr("")

    @property
    def source_path(self) -> str:
        return self._source_path

    @property
    def source_text(self) -> str:
        """The sweep file exactly as it was read (for reports)."""
        return self._source_text

    def trials(self) -> list[dict[str, Any]]:
        """Every trial's parameters for method grid or random, in a deterministic order.

        grid: the cartesian product of the parameters' values, where a conditional parameter
        (`when`) only multiplies the combinations its condition holds for, repeated num_samples
        times (key `repeat` added when num_samples > 1). random: num_samples draws seeded by
        search_seed. optuna proposes trials while the sweep runs: use optuna_space().
        """
        if self.method == "optuna":
            raise ValueError("method optuna proposes trials at run time; use Sweep.optuna_space")
        order = dependency_order(self.parameters)
        n = self.num_samples or 1
        if self.method == "random":
            rng = np.random.default_rng(self.search_seed)
            return [self._in_file_order(sample(self.parameters, order, rng)) for _ in range(n)]
        grid = [self._in_file_order(t) for t in expand(self.parameters, replicates_last(order, self.parameters))]
        if self.configurations is not None:  # each listed configuration on every combination (its seeds)
            grid = [{**copy.deepcopy(c), **t} for c in self.configurations for t in grid]
        if n == 1:
            return grid
        # Repeats are seed replicates: each gets its own seed (train.seed + repeat), never a copy; innermost,
        # so that a configuration's seeds run side by side.
        return [{**t, "seed": self.train.seed + r, "repeat": r} for t in grid for r in range(n)]

    def swept_names(self) -> list[str]:
        """Every parameter a trial may set: the keys of `configurations` (in order), then `parameters`."""
        names = [k for c in self.configurations or [] for k in c]
        return list(dict.fromkeys([*names, *self.parameters]))

    def seed_values(self) -> list[int] | None:
        """The swept seed values when seed is a listed parameter, else None."""
        spec = self.parameters.get("seed")
        return [int(v) for v in spec.choices] if spec is not None and spec.categorical else None

    def trial_count(self) -> int:
        """How many trials the sweep runs: grid and random expand; an Optuna sweep proposes `num_samples`
        configurations, each run on every swept seed."""
        if self.method == "optuna":
            return (self.num_samples or 0) * len(self.seed_values() or [None])
        return len(self.trials())

    def replicates_seeds(self) -> bool:
        """Whether trials come in seed replicates of one configuration (seed swept, or grid repeats)."""
        return "seed" in self.parameters or (self.method == "grid" and (self.num_samples or 1) > 1)

    def warnings(self) -> list[str]:
        """One-line notes about choices that are valid but bias a comparison."""
        notes = []
        if self.scheduler.type == "asha" and self.scheduler.unit == "trial" and self.replicates_seeds():
            notes.append(
                "scheduler.unit: trial with seed replicates: ASHA may stop some seeds of a configuration and keep "
                "others, so means over seeds are survivor-biased; use unit: config (the default) or type: fifo"
            )
        return notes

    def optuna_space(self, trial: Any) -> dict[str, Any]:
        """Define-by-run search space for ray.tune.search.optuna.OptunaSearch(space=...).

        List values (channel widths) are offered to Optuna as strings like "512-256-128-64";
        the returned dict holds the decoded values and overrides those strings in Ray's config.
        """
        chosen: dict[str, Any] = {}
        for name in dependency_order(self.parameters):
            spec = self.parameters[name]
            if not holds(spec.when, chosen):
                continue
            if spec.distribution == "int_uniform":
                chosen[name] = coerce(name, trial.suggest_int(name, int(spec.min), int(spec.max)))
            elif spec.distribution is not None:
                log = spec.distribution == "log_uniform"
                chosen[name] = coerce(name, trial.suggest_float(name, spec.min, spec.max, log=log))
            elif "value" in spec.model_fields_set:
                chosen[name] = copy.deepcopy(spec.value)
            else:
                decoded = {optuna_choice(v): v for v in spec.values or []}
                picked = trial.suggest_categorical(name, list(decoded))
                chosen[name] = copy.deepcopy(decoded[picked])
        return self._in_file_order(chosen)

    def trial_config(self, params: dict[str, Any]) -> TrialConfig:
        """The sweep's fixed settings with one trial's parameters applied (`repeat` is ignored)."""
        sections = {
            "data": self.data.model_dump(),
            "model": self.model.model_dump(),
            "train": self.train.model_dump(),
            "eval": self.eval.model_dump(),
        }
        for name, value in params.items():
            if name == "repeat":
                continue
            if name not in PARAM_SECTION:
                raise ValueError(f"unknown parameter {name!r} (not a ModelConfig/TrainConfig field)")
            sections[PARAM_SECTION[name]][name] = copy.deepcopy(value)
        return TrialConfig.from_dict(sections)

    def fingerprint(self) -> str:
        """sha256 of everything that decides which trials run and what they compute."""
        # Without `tracking:`, the fingerprint is the one sweeps had before the section existed.
        untracked = {"tracking"} if self.tracking is None else set()
        untracked |= {"configurations"} if self.configurations is None else set()
        canonical = self.model_dump(mode="json", exclude=_NOT_FINGERPRINTED | untracked)
        canonical["parameters"] = [[k, v] for k, v in canonical["parameters"].items()]  # order matters
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


    def _in_file_order(self, chosen: dict[str, Any]) -> dict[str, Any]:
        return {name: chosen[name] for name in self.parameters if name in chosen}
