"""pydantic's validation errors of a sweep file, said as one line naming the file, the key and the value."""
from __future__ import annotations

import difflib

from pydantic import BaseModel, ValidationError

from orchestrator.sweepfile.errors import SweepError, show
from orchestrator.sweepfile.sections import (
    Confirm,
    DataSection,
    EvalSection,
    Metric,
    ModelSection,
    Parameter,
    Resources,
    Scheduler,
    Sweep,
    TrainSection,
)
from orchestrator.sweepfile.tracking import SECTIONS as TRACKING_SECTIONS

SECTIONS: dict[str, type[BaseModel]] = {
    "data": DataSection, "model": ModelSection, "train": TrainSection, "eval": EvalSection,
    "metric": Metric, "scheduler": Scheduler, "resources": Resources, "confirm": Confirm,
    **TRACKING_SECTIONS,
}
EXPECTED = {
    "float": "a number", "int": "an integer", "bool": "true or false", "string": "a string",
    "list": "a list", "tuple": "a list", "dict": "a mapping", "model": "a mapping", "dataclass": "a mapping",
}


def from_validation_error(file: str, error: ValidationError) -> SweepError:
    e = error.errors()[0]
    loc, kind, value, ctx = e["loc"], e["type"], e.get("input"), e.get("ctx") or {}
    key = _dotted(loc)
    if kind == "extra_forbidden":
        return SweepError(file, key, _unknown_key(loc))
    if kind == "missing":
        return SweepError(file, key, "required key is missing")
    if len(loc) == 2 and loc[0] == "parameters" and kind == "model_type":
        return SweepError(file, key, f"expected a mapping like {{values: [...]}} or {{value: x}}, got {show(value)}")
    if kind == "literal_error":
        return SweepError(file, key, f"unknown value {show(value)} (expected {ctx['expected']})")
    if kind == "string_pattern_mismatch" and loc == ("name",):
        return SweepError(file, key, f"{show(value)} must start with a letter or digit and contain only "
                                     "letters, digits, '_', '.' and '-'")
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return SweepError(file, key, f"must be {bounds[kind]} {limit}, got {show(value)}")
    if kind == "int_from_float":
        return SweepError(file, key, f"expected an integer, got {show(value)}")
    if kind in ("too_short", "too_long"):
        return SweepError(file, key, f"expected {ctx.get('max_length', ctx.get('min_length'))} items, "
                                     f"got {ctx.get('actual_length')}: {show(value)}")
    expected = EXPECTED.get(kind.split("_")[0])
    if expected and kind.endswith(("_type", "_parsing")):
        return SweepError(file, key, f"expected {expected}, got {show(value)}")
    return SweepError(file, key, f"{e['msg']}, got {show(value)}")


def _unknown_key(loc: tuple) -> str:
    parent, word = loc[:-1], str(loc[-1])
    if not parent:
        valid = list(Sweep.model_fields)
    elif parent[0] == "parameters":
        valid = list(Parameter.model_fields)
    else:
        valid = list(SECTIONS[".".join(str(p) for p in parent)].model_fields)
    message = f"unknown key {word!r}"
    if parent in (("model",), ("train",)):
        other = "train" if parent == ("model",) else "model"
        if word in SECTIONS[other].model_fields:
            return f"{message} (it belongs in {other})"
    close = difflib.get_close_matches(word, valid, n=1)
    return f"{message} (did you mean {close[0]!r}?)" if close else f"{message} (valid: {', '.join(valid)})"


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
