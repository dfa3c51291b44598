"""Reading a sweep file: YAML (a repeated key is an error), pydantic, then the cross-field rules.

`load_sweep` turns a file into a validated `Sweep`, or raises a `SweepError` whose text is one line:
`<file>: <key>: <problem>`. It has no side effects.
"""
from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from orchestrator.sweepfile.errors import SweepError, kind_of
from orchestrator.sweepfile.messages import from_validation_error
from orchestrator.sweepfile.overrides import apply_overrides
from orchestrator.sweepfile.rules import check_sweep
from orchestrator.sweepfile.sections import Sweep
from orchestrator.sweepfile.stages import check_stages
from orchestrator.sweepfile.tracking import tracking_problem


def load_sweep(path: str | Path, *, data_override: str | None = None,
               overrides: dict[str, Any] | None = None) -> Sweep:
    """Read and validate a sweep file; `data_override` replaces data.path. No side effects.

    `overrides` ({"train.kimg": 2, ...}: `--set`, see orchestrator.sweepfile.overrides) edit the file's mapping
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
                                     f"{kind_of(raw)}")
    if overrides:
        raw = apply_overrides(file, raw, overrides)
    try:
        sweep = Sweep.model_validate(raw)
    except ValidationError as e:
        raise from_validation_error(file, e) from None
    if data_override is not None:
        sweep.data.path = data_override
    check_sweep(file, sweep, overridden=data_override is not None)
    check_stages(file, sweep)
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
