"""A sweep file problem as one line: `<file>: <key>: <problem>`, and the words used to show values in it."""
from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any


class SweepError(ValueError):
    """A sweep file problem; str() is one line `<file>: <key>: <problem>` (key omitted when none)."""

    def __init__(self, file: str | Path, key: str | None, message: str):
        self.file = str(file)
        self.key = key
        self.message = message.replace("\n", " ")
        super().__init__(str(self))

    def __str__(self) -> str:
        return ": ".join(part for part in (self.file, self.key, self.message) if part)



def show(value: Any) -> str:
    """A value as the user wrote it in YAML, kept short enough for a one-line message."""
    text = "null" if value is None else "true" if value is True else "false" if value is False else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def kind_of(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(value), type(value).__name__)


def unknown_value(what: str, value: Any, valid: typing.Sequence[str]) -> str:
    close = difflib.get_close_matches(str(value), valid, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown {what} {show(value)} ({hint}expected one of: {', '.join(valid)})"
