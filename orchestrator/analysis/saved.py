"""`orchestrator leaderboard --save DIR`: the table in every format, plus `analysis.json`, which says how it was
made (command line, flags, captions, family sizes, versions, the sweep's fingerprint), so that a paper's table
can be regenerated and checked.
"""
from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from orchestrator.analysis.formats import (
    Section,
    as_csv,
    as_json,
    as_latex,
    as_markdown,
    as_text,
    family_sizes,
)
from orchestrator.analysis.groups import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED
from orchestrator.analysis.leaderboard import Board, LeaderboardError
from orchestrator.analysis.plan import read_fingerprint
from orchestrator.analysis.statistics import BOOTSTRAP_MIN_N

ANALYSIS_FILE = "analysis.json"
TABLE_FILES = {"table": "leaderboard.txt", "json": "leaderboard.json", "csv": "leaderboard.csv",
               "markdown": "leaderboard.md", "latex": "leaderboard.tex"}
# Distributions whose versions decide the numbers: this project, the statistics, the FID implementation.
VERSIONED = ("gan-sweeps", "scipy", "numpy", "pandas", "torch-fidelity")


def versions() -> dict[str, str | None]:
    """Installed versions (importlib.metadata: nothing is imported, torch least of all); None if absent."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def analysis_record(board: Board, secs: list[Section], *, sweep_dir: Path, command: str,
                    flags: dict[str, Any]) -> dict[str, Any]:
    return {
        "command": command,
        "flags": flags,
        "sweep": {"name": Path(sweep_dir).name, "directory": str(Path(sweep_dir).resolve()),
                  "fingerprint": read_fingerprint(sweep_dir), "trials": board.n_trials,
                  "unfinished": board.n_unfinished},
        "compared": board.label if board.at_kimg is None else
        f"{board.label} at the first evaluation at or past {board.at_kimg:g} kimg",
        "captions": [s.title for s in secs],
        "families": family_sizes(board),
        "statistics": {
            "mean_interval": "percentile bootstrap" if board.ci == "bootstrap" else "Student t",
            "confidence": 0.95,
            "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "min_n": BOOTSTRAP_MIN_N},
            "multiple_comparisons": "Holm-Bonferroni within each block",
            "tests": "paired t (scipy ttest_rel) on matched seeds, else Welch t (ttest_ind, equal_var=False)",
            "prob_improvement": "P(lower FID) + 0.5 P(tie), over seed pairs when paired; percentile bootstrap CI",
            "effect_size": "Hedges' g (paired: d_z), negative = better than the baseline",
        },
        "warnings": board.warnings,
        "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": [*TABLE_FILES.values(), ANALYSIS_FILE],
    }


def save_board(out_dir: Path, board: Board, secs: list[Section], *, sweep_dir: Path, command: str,
               flags: dict[str, Any]) -> list[Path]:
    """Write the table in every format and analysis.json into `out_dir` (created); return the paths written."""
    out_dir = Path(out_dir)
    note = board.partial_note
    texts = {"table": as_text(secs, note), "json": as_json(board), "csv": as_csv(board),
             "markdown": as_markdown(secs, note), "latex": as_latex(secs, note)}
    record = analysis_record(board, secs, sweep_dir=sweep_dir, command=command, flags=flags)
    written = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for fmt, name in TABLE_FILES.items():
            (out_dir / name).write_text(texts[fmt], encoding="utf-8")
            written.append(out_dir / name)
        (out_dir / ANALYSIS_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:  # under a regular file, a read-only disk
        reason = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else (exc.strerror or str(exc))
        raise LeaderboardError(f"--save {out_dir}: cannot write ({reason})") from None
    return [*written, out_dir / ANALYSIS_FILE]
