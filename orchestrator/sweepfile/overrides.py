"""Overrides of a sweep file's fixed settings: `orchestrator train ... --set section.key=value`.

They edit the file's parsed YAML mapping before validation (`load_sweep(..., overrides=...)`), so every
check of a sweep file applies to them and their errors are the usual one line naming the key and value.
A swept parameter can't be overridden: a trial's value of it comes from `parameters` (pick the trial).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import yaml
from pydantic import BaseModel

from orchestrator.sweepfile.errors import SweepError
from orchestrator.sweepfile.sections import Sweep


def sections() -> list[str]:
    """The top-level keys that are mappings of settings (data, model, train, eval, scheduler, ...)."""
    return [name for name, field in Sweep.model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)]


def parse_sets(file: str, items: Iterable[str], allowed: Iterable[str] | None = None) -> dict[str, Any]:
    """`section.key=value` strings -> {"section.key": value}; each value is read as YAML (yaml.safe_load),
    so `2` is a number, `[32, 16, 8, 8]` a list and `null` (or nothing) null."""
    allowed = list(allowed) if allowed is not None else sections()
    out: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        section, dot, name = key.partition(".")
        where = f"--set {key or item}"
        if not eq or not dot or not section or not name or "." in name:
            raise SweepError(file, where, f"expected SECTION.KEY=VALUE (e.g. train.kimg=2), got {item!r}")
        if section == "parameters":
            raise SweepError(file, where, "swept parameters can't be set: pick the trial whose values you want "
                                          "(--trial; `orchestrator sweep FILE --dry-run` lists them)")
        if section not in allowed:
            raise SweepError(file, where, f"unknown or unsettable section {section!r} (settable: {', '.join(allowed)})")
        if key in out:
            raise SweepError(file, where, "given twice")
        try:
            out[key] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise SweepError(file, where, f"value {text!r} is not valid YAML: {problem}") from None
    return out


def apply_overrides(file: str, raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the file's mapping with the overrides applied: "section.key" sets one key of a section,
    a key without a dot replaces a whole top-level entry. Raises SweepError for a swept parameter."""
    raw = copy.deepcopy(raw)
    swept = raw.get("parameters") if isinstance(raw.get("parameters"), dict) else {}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if not name:
            raw[section] = copy.deepcopy(value)
            continue
        if section in ("model", "train") and name in swept:
            raise SweepError(file, f"--set {key}", f"{name!r} is swept (parameters.{name}), so each trial has its "
                                                   "own value: pick the trial with --trial instead")
        if raw.get(section) is None:
            raw[section] = {}
        if isinstance(raw[section], dict):  # else validation names the file's own problem with this section
            raw[section][name] = copy.deepcopy(value)
    return raw
