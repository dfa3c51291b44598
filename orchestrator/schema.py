"""Declarative sweep files: loading, validation and trial expansion.

A sweep file (YAML) fixes the settings shared by all trials (`data`, `model`, `train`, `eval`)
and lists the swept `parameters`, each named by one field of `gan.config.ModelConfig` or
`gan.config.TrainConfig`. `load_sweep` turns a file into a validated `Sweep`, or raises a
`SweepError` whose text is one line: `<file>: <key>: <problem>`.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import re
import typing
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError, create_model

from gan.config import (
    ATTENTION_VARIANTS,
    EXTRACTORS,
    SPLITS,
    USE_VARIANTS,
    VARIANTS,
    DataConfig,
    EvalConfig,
    ModelConfig,
    TrainConfig,
    TrialConfig,
)
from orchestrator.tracking import SECTIONS as _TRACKING_SECTIONS, Tracking, tracking_problem

# Parameters that make trials replicates of one configuration rather than different configurations.
REPLICATE_PARAMS = ("seed", "repeat")
METRIC_GOALS = {"fid": "minimize", "kid_mean": "minimize", "is_mean": "maximize"}
# Their valid values depend on the channel widths, so they are listed, never sampled.
NO_DISTRIBUTION = ("heads", "use_at", "cmhsa_at")


class SweepError(ValueError):
    """A sweep file problem; str() is one line `<file>: <key>: <problem>` (key omitted when none)."""

    def __init__(self, file: str | Path, key: str | None, message: str):
        self.file = str(file)
        self.key = key
        self.message = message.replace("\n", " ")
        super().__init__(str(self))

    def __str__(self) -> str:
        return ": ".join(part for part in (self.file, self.key, self.message) if part)


# --- the file format -----------------------------------------------------------------------------

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


class Resources(BaseModel):
    model_config = _FORBID
    cpu: float = 1.0
    gpu: float = 0.0


# Not part of fingerprint(): they change how trials are scheduled, not what they compute.
_NOT_FINGERPRINTED = {"description", "resources", "max_concurrent", "max_failures"}


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
    scheduler: Scheduler = Field(default_factory=Scheduler)
    resources: Resources = Field(default_factory=Resources)
    max_concurrent: int | None = Field(None, ge=1)
    max_failures: int = Field(2, ge=0)
    tracking: Tracking | None = None  # W&B / MLflow loggers (orchestrator.tracking)

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
        order = _dependency_order(self.parameters)
        n = self.num_samples or 1
        if self.method == "random":
            rng = np.random.default_rng(self.search_seed)
            return [self._in_file_order(self._sample(order, rng)) for _ in range(n)]
        grid = [self._in_file_order(t) for t in _expand(self.parameters, _replicates_last(order, self.parameters))]
        if n == 1:
            return grid
        # Repeats are seed replicates: each gets its own seed (train.seed + repeat), never a copy; innermost,
        # so that a configuration's seeds run side by side.
        return [{**t, "seed": self.train.seed + r, "repeat": r} for t in grid for r in range(n)]

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
        for name in _dependency_order(self.parameters):
            spec = self.parameters[name]
            if not _holds(spec.when, chosen):
                continue
            if spec.distribution == "int_uniform":
                chosen[name] = _coerce(name, trial.suggest_int(name, int(spec.min), int(spec.max)))
            elif spec.distribution is not None:
                log = spec.distribution == "log_uniform"
                chosen[name] = _coerce(name, trial.suggest_float(name, spec.min, spec.max, log=log))
            elif "value" in spec.model_fields_set:
                chosen[name] = copy.deepcopy(spec.value)
            else:
                decoded = {_optuna_choice(v): v for v in spec.values or []}
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
            if name not in _PARAM_SECTION:
                raise ValueError(f"unknown parameter {name!r} (not a ModelConfig/TrainConfig field)")
            sections[_PARAM_SECTION[name]][name] = copy.deepcopy(value)
        return TrialConfig.from_dict(sections)

    def fingerprint(self) -> str:
        """sha256 of everything that decides which trials run and what they compute."""
        # Without `tracking:`, the fingerprint is the one sweeps had before the section existed.
        untracked = {"tracking"} if self.tracking is None else set()
        canonical = self.model_dump(mode="json", exclude=_NOT_FINGERPRINTED | untracked)
        canonical["parameters"] = [[k, v] for k, v in canonical["parameters"].items()]  # order matters
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def _sample(self, order: list[str], rng: np.random.Generator) -> dict[str, Any]:
        chosen: dict[str, Any] = {}
        for name in order:
            spec = self.parameters[name]
            if not _holds(spec.when, chosen):
                continue
            if spec.distribution is None:
                choices = spec.choices
                chosen[name] = copy.deepcopy(choices[int(rng.integers(len(choices)))])
            elif spec.distribution == "int_uniform":
                chosen[name] = _coerce(name, int(rng.integers(int(spec.min), int(spec.max), endpoint=True)))
            elif spec.distribution == "log_uniform":
                x = math.exp(rng.uniform(math.log(spec.min), math.log(spec.max)))
                chosen[name] = _coerce(name, min(max(x, spec.min), spec.max))  # exp() may round past a bound
            else:
                chosen[name] = _coerce(name, float(rng.uniform(spec.min, spec.max)))
        return chosen

    def _in_file_order(self, chosen: dict[str, Any]) -> dict[str, Any]:
        return {name: chosen[name] for name in self.parameters if name in chosen}


# --- loading -------------------------------------------------------------------------------------


def load_sweep(path: str | Path, *, data_override: str | None = None,
               overrides: dict[str, Any] | None = None) -> Sweep:
    """Read and validate a sweep file; `data_override` replaces data.path. No side effects.

    `overrides` ({"train.kimg": 2, ...}: `--set`, see orchestrator.overrides) edit the file's mapping
    before validation, so every check applies to them as to the file.

    Relative paths in the file (data.path, data.cache_dir, eval.weights_path) are taken relative
    to the current working directory and stored absolute, so trials see the same files whatever
    directory Ray runs them in.
    """
    file = str(path)
    text = _read(file)
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SweepError(file, None, f"invalid YAML{where}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise SweepError(file, None, f"invalid YAML: {e}") from None
    if raw is None:
        raise SweepError(file, None, "file is empty")
    if not isinstance(raw, dict):
        raise SweepError(file, None, f"expected a mapping (key: value lines) at the top level, got a "
                                     f"{_kind(raw)}")
    if overrides:
        from orchestrator.overrides import apply_overrides  # it imports this module

        raw = apply_overrides(file, raw, overrides)
    try:
        sweep = Sweep.model_validate(raw)
    except ValidationError as e:
        raise _from_validation_error(file, e) from None
    if data_override is not None:
        sweep.data.path = data_override
    _Checker(file, sweep, overridden=data_override is not None).run()
    if sweep.tracking is not None and (problem := tracking_problem(sweep.tracking)):
        raise SweepError(file, *problem)
    sweep._source_path = file
    sweep._source_text = text
    return sweep


def _read(file: str) -> str:
    p = Path(file)
    if not p.exists():
        raise SweepError(file, None, "file not found")
    if p.is_dir():
        raise SweepError(file, None, "is a directory, expected a YAML file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SweepError(file, None, "not a UTF-8 text file") from None
    except OSError as e:
        raise SweepError(file, None, f"cannot read: {e.strerror}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key repeated in one mapping is an error, not a silent override."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key]})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


# --- pydantic errors as one human line -----------------------------------------------------------

_SECTIONS: dict[str, type[BaseModel]] = {
    "data": DataSection, "model": ModelSection, "train": TrainSection, "eval": EvalSection,
    "metric": Metric, "scheduler": Scheduler, "resources": Resources, **_TRACKING_SECTIONS,
}
_EXPECTED = {
    "float": "a number", "int": "an integer", "bool": "true or false", "string": "a string",
    "list": "a list", "tuple": "a list", "dict": "a mapping", "model": "a mapping", "dataclass": "a mapping",
}


def _from_validation_error(file: str, error: ValidationError) -> SweepError:
    e = error.errors()[0]
    loc, kind, value, ctx = e["loc"], e["type"], e.get("input"), e.get("ctx") or {}
    key = _dotted(loc)
    if kind == "extra_forbidden":
        return SweepError(file, key, _unknown_key(loc))
    if kind == "missing":
        return SweepError(file, key, "required key is missing")
    if len(loc) == 2 and loc[0] == "parameters" and kind == "model_type":
        return SweepError(file, key, f"expected a mapping like {{values: [...]}} or {{value: x}}, got {_show(value)}")
    if kind == "literal_error":
        return SweepError(file, key, f"unknown value {_show(value)} (expected {ctx['expected']})")
    if kind == "string_pattern_mismatch" and loc == ("name",):
        return SweepError(file, key, f"{_show(value)} must start with a letter or digit and contain only "
                                     "letters, digits, '_', '.' and '-'")
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return SweepError(file, key, f"must be {bounds[kind]} {limit}, got {_show(value)}")
    if kind == "int_from_float":
        return SweepError(file, key, f"expected an integer, got {_show(value)}")
    if kind in ("too_short", "too_long"):
        return SweepError(file, key, f"expected {ctx.get('max_length', ctx.get('min_length'))} items, "
                                     f"got {ctx.get('actual_length')}: {_show(value)}")
    expected = _EXPECTED.get(kind.split("_")[0])
    if expected and kind.endswith(("_type", "_parsing")):
        return SweepError(file, key, f"expected {expected}, got {_show(value)}")
    return SweepError(file, key, f"{e['msg']}, got {_show(value)}")


def _unknown_key(loc: tuple) -> str:
    parent, word = loc[:-1], str(loc[-1])
    if not parent:
        valid = list(Sweep.model_fields)
    elif parent[0] == "parameters":
        valid = list(Parameter.model_fields)
    else:
        valid = list(_SECTIONS[".".join(str(p) for p in parent)].model_fields)
    message = f"unknown key {word!r}"
    if parent in (("model",), ("train",)):
        other = "train" if parent == ("model",) else "model"
        if word in _SECTIONS[other].model_fields:
            return f"{message} (it belongs in {other})"
    close = difflib.get_close_matches(word, valid, n=1)
    return f"{message} (did you mean {close[0]!r}?)" if close else f"{message} (valid: {', '.join(valid)})"


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML, kept short enough for a one-line message."""
    text = "null" if value is None else "true" if value is True else "false" if value is False else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _kind(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(value), type(value).__name__)


# --- the flat parameter namespace ----------------------------------------------------------------

_MODEL_TYPES = {k: v for k, v in typing.get_type_hints(ModelConfig).items() if k != "image_size"}
_TRAIN_TYPES = typing.get_type_hints(TrainConfig)
_PARAM_TYPES: dict[str, Any] = {**_MODEL_TYPES, **_TRAIN_TYPES}
_PARAM_SECTION = {**{k: "model" for k in _MODEL_TYPES}, **{k: "train" for k in _TRAIN_TYPES}}
_ADAPTERS = {name: TypeAdapter(hint) for name, hint in _PARAM_TYPES.items()}


def _base_type(hint: Any) -> Any:
    """`float | None` -> float."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0] if len(args) == 1 else hint


def _coerce(name: str, value: Any) -> Any:
    """A value in the field's own type, with lists (not tuples) for widths: JSON- and Parquet-friendly."""
    return _plain(_ADAPTERS[name].validate_python(value))


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _optuna_choice(value: Any) -> Any:
    """Optuna categoricals must be None/bool/int/float/str: widths become '512-256-128-64'."""
    return "-".join(str(v) for v in value) if isinstance(value, list) else value


def _holds(when: dict[str, list[Any]] | None, chosen: dict[str, Any]) -> bool:
    return all(name in chosen and chosen[name] in allowed for name, allowed in (when or {}).items())


def _replicates_last(order: list[str], parameters: dict[str, Parameter]) -> list[str]:
    """Replicate keys (seed) expand innermost, wherever the file lists them, so that the seeds of one
    configuration are consecutive trials: they start together and per-configuration ASHA decides early.
    A seed that a condition refers to keeps its place (the condition needs it first)."""
    needed = {dep for p in parameters.values() for dep in (p.when or {})}
    last = [k for k in order if k in REPLICATE_PARAMS and k not in needed]
    return [k for k in order if k not in last] + last


def _dependency_order(parameters: dict[str, Parameter]) -> list[str]:
    """File order, except that a parameter comes after those its `when` refers to.

    Raises _Cycle(name) when conditions refer to each other in a loop.
    """
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise _Cycle(name)
        visiting.add(name)
        for dep in parameters[name].when or {}:
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in parameters:
        visit(name)
    return order


class _Cycle(Exception):
    pass


def _expand(parameters: dict[str, Parameter], order: list[str]) -> list[dict[str, Any]]:
    """Grid expansion of categorical parameters; a conditional one only multiplies where it holds."""
    combos: list[dict[str, Any]] = [{}]
    for name in order:
        spec = parameters[name]
        expanded = []
        for combo in combos:
            if _holds(spec.when, combo):
                expanded.extend({**combo, name: copy.deepcopy(v)} for v in spec.choices)
            else:
                expanded.append(combo)
        combos = expanded
    return combos


# --- cross-field checks --------------------------------------------------------------------------


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Rules for single values of model/train fields, applied to the fixed sections and to every
# swept value (and distribution bound).
_RULES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "nz": (lambda v: v >= 1, "must be >= 1"),
    "heads": (lambda v: v >= 1, "must be >= 1"),
    "attn_dropout": (lambda v: _finite(v) and 0 <= v < 1, "must be in [0, 1)"),
    "kimg": (lambda v: _finite(v) and v > 0, "must be a finite number > 0"),
    "batch_size": (lambda v: v >= 1, "must be >= 1"),
    "lr_d": (lambda v: v is None or (_finite(v) and v > 0), "must be a finite number > 0 or null"),
    "lr_g": (lambda v: v is None or (_finite(v) and v > 0), "must be a finite number > 0 or null"),
    "beta1": (lambda v: v is None or (_finite(v) and 0 <= v < 1), "must be in [0, 1) or null"),
    "beta2": (lambda v: v is None or (_finite(v) and 0 <= v < 1), "must be in [0, 1) or null"),
    "d_steps": (lambda v: v is None or v >= 1, "must be >= 1 or null"),
    "gp_weight": (lambda v: _finite(v) and v >= 0, "must be a finite number >= 0"),
    "recon_weight": (lambda v: _finite(v) and v >= 0, "must be a finite number >= 0"),
    "kl_weight": (lambda v: _finite(v) and v >= 0, "must be a finite number >= 0"),
    "seed": (lambda v: v >= 0, "must be >= 0"),
    "device": (lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None, "must be auto, cpu, cuda or cuda:N"),
    "cuda_graph": (lambda v: v in ("auto", "on", "off", True, False), "must be auto, on or off"),
}


class _Checker:
    """Cross-field checks of a pydantic-valid sweep; fills in effective defaults as it goes."""

    def __init__(self, file: str, sweep: Sweep, *, overridden: bool):
        self.file, self.sweep, self.overridden = file, sweep, overridden

    def fail(self, key: str, message: str) -> typing.NoReturn:
        raise SweepError(self.file, key, message)

    def run(self) -> None:
        self.check_data()
        self.check_fixed("model", self.sweep.model)
        self.check_fixed("train", self.sweep.train)
        self.check_eval()
        self.check_parameters()
        self.check_architectures()
        self.check_kimg_budget()
        self.check_compile()
        self.check_scheduler()
        self.check_run_settings()

    # data / eval ----------------------------------------------------------------------------
    def check_data(self) -> None:
        data = self.sweep.data
        if data.image_size not in (16, 32, 64, 128, 256):
            self.fail("data.image_size", f"must be a power of 2 from 16 to 256, got {_show(data.image_size)}")
        if data.min_side is not None and data.min_side < 1:
            self.fail("data.min_side", f"must be >= 1 or null, got {_show(data.min_side)}")
        if any(not _finite(s) or s < 0 for s in data.split) or not math.isclose(sum(data.split), 1.0):
            self.fail("data.split", f"must be 3 non-negative numbers (train, val, test) summing to 1, "
                                    f"got {_show(_plain(data.split))}")
        if data.split[0] == 0:
            self.fail("data.split", f"the train share must be > 0, got {_show(_plain(data.split))}")
        if data.synthetic_count < 1:
            self.fail("data.synthetic_count", f"must be >= 1, got {_show(data.synthetic_count)}")
        if data.path is not None:
            resolved = Path(data.path).expanduser().resolve()
            if not resolved.is_dir():
                problem = "not a directory" if resolved.exists() else "directory not found"
                origin = " (from the data override)" if self.overridden else ""
                if str(resolved) != data.path:
                    origin += f" (relative paths start from the current directory: {str(resolved)!r})"
                self.fail("data.path", f"{problem}: {_show(data.path)}{origin}")
            data.path = str(resolved)
        if data.cache_dir is not None:
            data.cache_dir = str(Path(data.cache_dir).expanduser().resolve())

    def check_eval(self) -> None:
        ev = self.sweep.eval
        if not (_finite(ev.every_kimg) and ev.every_kimg > 0):
            self.fail("eval.every_kimg", f"must be a finite number > 0, got {_show(ev.every_kimg)}")
        if ev.fid_samples < 2:
            self.fail("eval.fid_samples", f"must be >= 2, got {_show(ev.fid_samples)}")
        if ev.final_fid_samples < ev.fid_samples:
            self.fail("eval.final_fid_samples", f"must be >= eval.fid_samples ({ev.fid_samples}), "
                                                f"got {_show(ev.final_fid_samples)}")
        if ev.extractor not in EXTRACTORS:
            self.fail("eval.extractor", _unknown_value("extractor", ev.extractor, EXTRACTORS))
        if ev.fid_split not in SPLITS:
            self.fail("eval.fid_split", _unknown_value("split", ev.fid_split, SPLITS))
        if ev.fid_split != "all" and self.sweep.data.split[SPLITS.index(ev.fid_split)] == 0:
            self.fail("eval.fid_split", f"{_show(ev.fid_split)} is empty: its share in data.split is 0")
        if ev.grid_size < 1:
            self.fail("eval.grid_size", f"must be >= 1, got {_show(ev.grid_size)}")
        if ev.weights_path is not None:
            resolved = Path(ev.weights_path).expanduser().resolve()
            if not resolved.is_file():
                self.fail("eval.weights_path", f"file not found: {_show(ev.weights_path)} "
                                               f"(resolved from the current directory: {str(resolved)!r})")
            ev.weights_path = str(resolved)
        if self.sweep.metric.name == "kid_mean" and not ev.kid:
            self.fail("metric.name", "'kid_mean' needs eval.kid: true")

    # single values ---------------------------------------------------------------------------
    def value_problem(self, name: str, v: Any) -> str | None:
        size = self.sweep.data.image_size
        if name == "variant" and v not in VARIANTS:
            return _unknown_value("variant", v, VARIANTS)
        if name in ("g_widths", "d_widths"):
            depth = int(math.log2(size)) - 2
            if len(v) != depth or any(w < 1 for w in v):
                return (f"needs {depth} positive widths for {size}x{size} images (log2({size}) - 2), "
                        f"got {_show(_plain(v))}")
        if name in _RULES and not _RULES[name][0](v):
            return f"{_RULES[name][1]}, got {_show(v)}"
        return None

    def check_fixed(self, section: str, values: BaseModel) -> None:
        for name, v in values:
            if name == "image_size":
                if v is not None and v != self.sweep.data.image_size:
                    self.fail("model.image_size", f"{_show(v)} differs from data.image_size "
                                                  f"{self.sweep.data.image_size}; set it once, in data.image_size")
                self.sweep.model.image_size = self.sweep.data.image_size
                continue
            problem = self.value_problem(name, v)
            if problem:
                self.fail(f"{section}.{name}", problem)

    # parameters ------------------------------------------------------------------------------
    def check_parameters(self) -> None:
        params = self.sweep.parameters
        for name, spec in params.items():
            key = f"parameters.{name}"
            self.check_parameter_name(key, name)
            kinds = [k for k in ("value", "values", "distribution") if k in spec.model_fields_set]
            if len(kinds) != 1:
                self.fail(key, f"give exactly one of value, values, distribution; got {', '.join(kinds) or 'none'}")
            if spec.categorical:
                self.check_categorical(key, name, spec)
            else:
                self.check_distribution(key, name, spec)
        for name, spec in params.items():
            self.check_when(f"parameters.{name}.when", name, spec)
        try:
            _dependency_order(params)
        except _Cycle as cycle:
            self.fail(f"parameters.{cycle.args[0]}.when", "conditions refer to each other in a loop")

    def check_parameter_name(self, key: str, name: str) -> None:
        if name == "kimg":
            self.fail(key, "kimg can't be swept: trials are compared at one budget (train.kimg); run one sweep "
                           "per budget, or compare earlier evaluations with `orchestrator leaderboard --at-kimg`")
        if name in _PARAM_TYPES:
            return
        for section, cls in (("data", DataConfig), ("eval", EvalConfig)):
            if name in {f.name for f in dataclasses.fields(cls)}:
                self.fail(key, f"data and eval settings can't be swept: {name!r} is set once, in {section}.{name}")
        close = difflib.get_close_matches(name, list(_PARAM_TYPES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        self.fail(key, f"unknown parameter {name!r}{hint}; parameters are ModelConfig/TrainConfig fields: "
                       f"{', '.join(_PARAM_TYPES)}")

    def check_categorical(self, key: str, name: str, spec: Parameter) -> None:
        for field in ("min", "max"):
            if field in spec.model_fields_set:
                self.fail(f"{key}.{field}", "min/max only go with a distribution")
        single = "value" in spec.model_fields_set
        if not single and not spec.values:
            self.fail(f"{key}.values", "must list at least one value, got []")
        coerced = []
        for i, v in enumerate(spec.choices):
            vkey = f"{key}.value" if single else f"{key}.values[{i}]"
            c = self.coerce(vkey, name, v)
            problem = self.value_problem(name, c)
            if problem:
                self.fail(vkey, problem)
            if c in coerced:
                self.fail(vkey, f"duplicate value {_show(v)}")
            coerced.append(c)
        if single:
            spec.value = coerced[0]
        else:
            spec.values = coerced

    def check_distribution(self, key: str, name: str, spec: Parameter) -> None:
        if self.sweep.method == "grid":
            self.fail(f"{key}.distribution", f"{spec.distribution} can't be used with method grid "
                                             "(grid needs a finite list: use values)")
        base = _base_type(_PARAM_TYPES[name])
        if base not in (int, float) or name in NO_DISTRIBUTION:
            self.fail(f"{key}.distribution", f"{name!r} can't be sampled from a distribution; list it with values")
        if base is int and spec.distribution != "int_uniform":
            self.fail(f"{key}.distribution", f"{name!r} is an integer: use int_uniform, not {spec.distribution}")
        for field in ("min", "max"):
            bound = getattr(spec, field)
            if bound is None:
                self.fail(key, f"distribution {spec.distribution} needs min and max")
            if spec.distribution == "int_uniform" and not float(bound).is_integer():
                self.fail(f"{key}.{field}", f"int_uniform needs whole numbers, got {_show(bound)}")
            problem = self.value_problem(name, _coerce(name, int(bound) if base is int else bound))
            if problem:
                self.fail(f"{key}.{field}", problem)
        if not spec.min < spec.max:
            self.fail(f"{key}.max", f"must be greater than min ({_show(spec.min)}), got {_show(spec.max)}")
        if spec.distribution == "log_uniform" and spec.min <= 0:
            self.fail(f"{key}.min", f"log_uniform needs min > 0, got {_show(spec.min)}")

    def check_when(self, key: str, name: str, spec: Parameter) -> None:
        params = self.sweep.parameters
        for ref, allowed in (spec.when or {}).items():
            if ref == name:
                self.fail(f"{key}.{ref}", "a parameter can't depend on itself")
            if ref not in params:
                self.fail(f"{key}.{ref}", f"refers to {ref!r}, which is not a swept parameter "
                                          f"(swept: {', '.join(params)})")
            if not params[ref].categorical:
                self.fail(f"{key}.{ref}", f"refers to {ref!r}, which has a distribution; conditions may only "
                                          "refer to parameters with value/values")
            if not allowed:
                self.fail(f"{key}.{ref}", "must list at least one value, got []")
            coerced = [self.coerce(f"{key}.{ref}[{i}]", ref, v) for i, v in enumerate(allowed)]
            for i, c in enumerate(coerced):
                problem = self.value_problem(ref, c)
                if problem:
                    self.fail(f"{key}.{ref}[{i}]", problem)
            if not any(c in params[ref].choices for c in coerced):
                self.fail(f"{key}.{ref}", f"never holds: none of {_show(allowed)} is among the values of {ref!r} "
                                          f"{_show(params[ref].choices)}")
            spec.when[ref] = coerced

    def coerce(self, key: str, name: str, value: Any) -> Any:
        try:
            return _coerce(name, value)
        except ValidationError as e:
            raise SweepError(self.file, key, _from_validation_error(self.file, e).message) from None

    # combinations ----------------------------------------------------------------------------
    def check_architectures(self) -> None:
        """Every generator the sweep can produce: modules at existing resolutions, heads dividing channels."""
        params = self.sweep.parameters
        involved = [n for n in ("variant", "g_widths", "heads", "cmhsa_at", "use_at") if n in params]
        needed: set[str] = set()
        while involved:  # add what their conditions refer to, transitively
            n = involved.pop()
            if n not in needed:
                needed.add(n)
                involved.extend(params[n].when or {})
        subset = {n: params[n] for n in params if n in needed}
        model = self.sweep.model
        # resolutions of the generator's feature maps, 4x4 up to image_size / 2
        resolutions = [4 * 2**i for i in range(int(math.log2(self.sweep.data.image_size)) - 2)]
        for combo in _expand(subset, _dependency_order(subset)):
            variant = combo.get("variant", model.variant)
            use_at = combo.get("use_at", model.use_at)
            if variant in USE_VARIANTS and use_at not in resolutions[1:]:
                self.fail(self.swept_key(combo, ("use_at",), fallback="model.use_at"),
                          f"use_at={use_at} is not a resolution the generator upsamples to "
                          f"(one of {resolutions[1:]} for variant {variant})")
            if variant not in ATTENTION_VARIANTS:
                continue
            at = combo.get("cmhsa_at", model.cmhsa_at)
            if at not in resolutions:
                self.fail(self.swept_key(combo, ("cmhsa_at",), fallback="model.cmhsa_at"),
                          f"cmhsa_at={at} is not a generator feature-map resolution "
                          f"(one of {resolutions} for variant {variant})")
            widths = _plain(combo.get("g_widths", model.g_widths))
            heads = combo.get("heads", model.heads)
            channels = widths[resolutions.index(at)]
            if channels % heads:
                self.fail(self.swept_key(combo, ("heads", "g_widths", "cmhsa_at"), fallback="model.heads"),
                          f"heads={heads} does not divide the {channels} generator channels at cmhsa_at={at} "
                          f"(g_widths {widths}, variant {variant})")

    def swept_key(self, combo: dict[str, Any], names: tuple[str, ...], *, fallback: str) -> str:
        """The key of the first of `names` that this combination took from `parameters`."""
        for n in names:
            if n in combo:
                spec = self.sweep.parameters[n]
                if "value" in spec.model_fields_set:
                    return f"parameters.{n}.value"
                return f"parameters.{n}.values[{spec.choices.index(combo[n])}]"
        return fallback

    def possible(self, name: str) -> list[Any]:
        """Every value a model/train field takes in some trial: its swept values, else the fixed one."""
        spec = self.sweep.parameters.get(name)
        if spec is not None and spec.categorical:
            return spec.choices
        section = self.sweep.model if name in _MODEL_TYPES else self.sweep.train
        return [getattr(section, name)]

    def check_compile(self) -> None:
        # torch.compile's autograd does not support the double backward of WGAN-GP's gradient penalty.
        if self.sweep.method == "grid":  # exact: conditions (`when`) may keep the two apart
            clash = any(self.sweep.trial_config(t).train.compile and self.sweep.trial_config(t).model.variant == "wgan"
                        for t in _expand(self.sweep.parameters, _dependency_order(self.sweep.parameters)))
        else:
            clash = True in self.possible("compile") and "wgan" in self.possible("variant")
        if clash:
            key = "parameters.compile" if "compile" in self.sweep.parameters else "train.compile"
            self.fail(key, "compile: true can't train variant 'wgan' (torch.compile does not support the double "
                           "backward of its gradient penalty); set compile: false or sweep compile only for "
                           "the other variants")

    def check_kimg_budget(self) -> None:
        every, shortest = self.sweep.eval.every_kimg, self.sweep.train.kimg
        if every > shortest:
            self.fail("eval.every_kimg", f"{_show(every)} is more than the training budget of {_show(shortest)} "
                                         "kimg, so no evaluation would run")

    def check_scheduler(self) -> None:
        s = self.sweep.scheduler
        if s.type == "fifo":
            extra = sorted(s.model_fields_set - {"type"})
            s.unit = None
            if extra:
                self.fail(f"scheduler.{extra[0]}", "only used with type asha")
            return
        if s.unit is None:
            s.unit = "config" if self.sweep.replicates_seeds() else "trial"
        kimg, every = self.sweep.train.kimg, self.sweep.eval.every_kimg
        s.max_t = kimg if s.max_t is None else s.max_t
        s.grace_period = every if s.grace_period is None else s.grace_period
        if not (_finite(s.grace_period) and s.grace_period > 0):
            self.fail("scheduler.grace_period", f"must be a finite number > 0, got {_show(s.grace_period)}")
        if not (_finite(s.reduction_factor) and s.reduction_factor >= 2):
            self.fail("scheduler.reduction_factor", f"must be >= 2, got {_show(s.reduction_factor)}")
        if not (_finite(s.max_t) and s.max_t > 0):
            self.fail("scheduler.max_t", f"must be a finite number > 0, got {_show(s.max_t)}")
        if s.max_t > kimg:
            self.fail("scheduler.max_t", f"{_show(s.max_t)} is more than train.kimg {_show(kimg)}")
        if s.grace_period > s.max_t:
            self.fail("scheduler.grace_period", f"{_show(s.grace_period)} is more than scheduler.max_t "
                                                f"{_show(s.max_t)}")
        if s.grace_period < every:
            self.fail("scheduler.grace_period", f"{_show(s.grace_period)} is less than eval.every_kimg "
                                                f"{_show(every)}: ASHA would have no {self.sweep.metric.name} "
                                                "at its first rung")

    # run-level settings ----------------------------------------------------------------------
    def check_run_settings(self) -> None:
        sweep = self.sweep
        if sweep.method == "grid":
            sweep.num_samples = sweep.num_samples or 1
            if sweep.num_samples > 1 and "seed" in sweep.parameters:
                self.fail("num_samples", f"{sweep.num_samples} repeats give each repeat its own seed (train.seed + "
                                         "repeat), which would override the swept seeds: list more seeds in "
                                         "parameters.seed instead")
        elif sweep.num_samples is None:
            self.fail("num_samples", f"required for method {sweep.method}: the number of trials to run")
        right_goal = METRIC_GOALS[sweep.metric.name]
        if sweep.metric.goal not in (None, right_goal):
            better = "lower" if right_goal == "minimize" else "higher"
            self.fail("metric.goal", f"{_show(sweep.metric.goal)} is wrong for {sweep.metric.name} "
                                     f"({better} is better): use {right_goal}")
        sweep.metric.goal = right_goal
        cpu, gpu = sweep.resources.cpu, sweep.resources.gpu
        if not (_finite(cpu) and cpu > 0):
            self.fail("resources.cpu", f"must be > 0, got {_show(cpu)}")
        # A trial trains on one device: a second reserved GPU would idle while other trials wait for it.
        if not (_finite(gpu) and 0 <= gpu <= 1):
            self.fail("resources.gpu", f"must be in [0, 1] (a trial trains on one GPU; 0.5 packs two trials "
                                       f"per GPU), got {_show(gpu)}")


def _unknown_value(what: str, value: Any, valid: typing.Sequence[str]) -> str:
    close = difflib.get_close_matches(str(value), valid, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown {what} {_show(value)} ({hint}expected one of: {', '.join(valid)})"
