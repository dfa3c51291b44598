"""Command lines the CLI prints back to the user: how to continue or restart what just ended."""
from __future__ import annotations

from pathlib import Path

DEFAULT_RESULTS = Path("results")


def rerun_command(
    file: Path, *, data: str | None, results: Path, address: str | None, storage: str | None, resume: bool
) -> str:
    """The `orchestrator sweep` command line that continues (or restarts) this sweep with the same flags."""
    import shlex

    words = ["orchestrator", "sweep", str(file)] + (["--resume"] if resume else [])
    for flag, value in (
        ("--data", data),
        ("--results", results if results != DEFAULT_RESULTS else None),
        ("--address", address),
        ("--storage", storage),
    ):
        if value is not None:
            words += [flag, str(value)]
    return shlex.join(words)
