"""Explore, then confirm: how a first stage `<results>/X/` and its confirm stage `<results>/X-confirm/` find
each other on disk.

The confirm stage is an ordinary sweep directory that also holds `selection.json` (written before it runs):
which configurations of the first stage were chosen, by which rule, on which fresh seeds. That file is the
link between the two; a directory merely named `X-confirm` is not a confirm stage of X.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.sweepfile.stages import CONFIRM_SUFFIX

SELECTION_FILE = "selection.json"


def read_selection(sweep_dir: Path) -> dict[str, Any] | None:
    """The confirm stage's selection.json; None when absent or unreadable (a report must not fail on it)."""
    try:
        data = json.loads((Path(sweep_dir) / SELECTION_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError covers JSONDecodeError and bad UTF-8
        return None
    return data if isinstance(data, dict) else None


def first_stage_name(selection: dict[str, Any] | None) -> str | None:
    """The first stage's sweep name from a selection, when it is a plain directory name (it is joined to
    the results root and put in links, so nothing like `../x` or `a/b`)."""
    name = (selection or {}).get("sweep")
    if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name:
        return None
    return name


def confirm_stage_of(sweep_dir: Path) -> Path | None:
    """The sibling `<name>-confirm` directory whose selection.json names this sweep; None when there is none."""
    sweep_dir = Path(sweep_dir)
    candidate = sweep_dir.parent / f"{sweep_dir.name}{CONFIRM_SUFFIX}"
    return candidate if first_stage_name(read_selection(candidate)) == sweep_dir.name else None


def first_stage_of(sweep_dir: Path) -> Path | None:
    """The first stage this confirm stage selected its configurations on (a sibling directory); None when
    `sweep_dir` is not a confirm stage."""
    name = first_stage_name(read_selection(sweep_dir))
    return None if name is None else Path(sweep_dir).parent / name


def confirm_pair(sweeps: list[Path]) -> Path | None:
    """The confirm stage, when `sweeps` is exactly a first stage and its confirm stage; else None."""
    if len(sweeps) != 2:
        return None
    first, second = sorted(sweeps, key=lambda p: len(p.name))  # X is shorter than X-confirm
    confirm = confirm_stage_of(first)
    return second if confirm is not None and confirm.name == second.name else None


@dataclass(frozen=True)
class Stage:
    """What a report needs to know of a sweep's place in explore-then-confirm, read in one go."""

    role: str  # "confirm": this sweep is a confirm stage; "first": this sweep has one
    selection: dict[str, Any]  # the confirm stage's selection.json
    other: str  # the other stage's name (a sibling directory)
    other_report: bool  # whether the other stage's report.html is written
    results: str  # the results root both stages live in


def stage_of(sweep_dir: Path, report_file: str = "report.html") -> Stage | None:
    """The sweep's stage, or None for a sweep that is neither a confirm stage nor has one."""
    sweep_dir = Path(sweep_dir)
    selection = read_selection(sweep_dir)
    first = first_stage_name(selection)
    if selection is not None and first is not None:
        return Stage("confirm", selection, first, (sweep_dir.parent / first / report_file).is_file(),
                     str(sweep_dir.parent))
    confirm = confirm_stage_of(sweep_dir)
    if confirm is None:
        return None
    return Stage("first", read_selection(confirm) or {}, confirm.name, (confirm / report_file).is_file(),
                 str(sweep_dir.parent))

