"""The one reader of a sweep's results: find a sweep directory, read its two tables as pandas frames (the
compacted Parquet files and, while a sweep runs, its part files, as one table).

Raises `ResultsError`, whose text is one line, when there is nothing to read.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from orchestrator.store.stages import confirm_pair, first_stage_name, read_selection
from orchestrator.store.tables import TRIAL_COLUMNS, ResultsFormatError, read_table

DEFAULT_EVERY_KIMG = 20.0  # gan.config.EvalConfig.every_kimg, for a sweep.yaml that leaves it out


class ResultsError(RuntimeError):
    """One-line, user-facing reason why there are no results to read."""


def find_sweep(results: Path, sweep: str | None) -> Path:
    if not results.is_dir():
        raise ResultsError(f"{results}: no results directory (run `orchestrator sweep FILE` first)")
    if sweep is not None:
        path = results / sweep
        if not path.is_dir():
            names = sorted(p.name for p in results.iterdir() if p.is_dir())
            raise ResultsError(f"{results}: no sweep named '{sweep}' (found: {', '.join(names) or 'none'})")
        return path
    sweeps = _sweeps(results)
    if not sweeps:
        raise ResultsError(f"{results}: no sweeps here yet")
    # A first stage and its confirm stage: the confirm stage holds the numbers to report (fresh seeds, full
    # budget); stage_note says so and how to get the exploration.
    confirm = confirm_pair(sweeps)
    if confirm is not None:
        return confirm
    if len(sweeps) > 1:
        raise ResultsError(f"{results}: several sweeps, pick one with --sweep: {', '.join(p.name for p in sweeps)}")
    return sweeps[0]


def _sweeps(results: Path) -> list[Path]:
    return sorted(p for p in results.iterdir() if (p / "fingerprint").exists())


def stage_note(results: Path, sweep_dir: Path) -> str | None:
    """The line to print (to stderr) when `find_sweep(results, None)` chose the confirm stage over its first
    stage; None otherwise. Call it only when no --sweep was given."""
    if not results.is_dir():
        return None
    confirm = confirm_pair(_sweeps(results))
    if confirm is None or confirm.resolve() != Path(sweep_dir).resolve():
        return None
    first = first_stage_name(read_selection(confirm))
    return (f"showing the confirm stage {confirm.name} (configurations selected on sweep {first}, fresh seeds); "
            f"the exploration: --sweep {first}")


def _read(sweep_dir: Path, name: str) -> pd.DataFrame | None:
    """The merged table (compacted rows and a running sweep's part files) as a frame; None when absent."""
    try:
        table = read_table(sweep_dir, name)
    except ResultsFormatError as exc:
        raise ResultsError(str(exc)) from None
    except Exception as exc:  # a file not written by us; ours are written atomically
        raise ResultsError(f"{sweep_dir}: unreadable {name} table ({exc.__class__.__name__}: {exc})") from None
    return None if table is None else table.to_pandas(integer_object_nulls=True)  # heads stays 2, not 2.0


def load_trials(sweep_dir: Path) -> pd.DataFrame:
    """Every trial of the sweep (all statuses); raises when none has an evaluation yet."""
    df = _read(sweep_dir, "trials")
    if df is None:
        raise ResultsError(f"{sweep_dir}: no trials recorded yet (the sweep has not reported an evaluation)")
    for column, _kind in TRIAL_COLUMNS.items():  # tables written before a column existed
        if column not in df.columns:
            df[column] = None
    if df["evaluations"].fillna(0).astype(int).sum() == 0 and df["best_fid"].isna().all():
        raise ResultsError(f"{sweep_dir}: no trial has an evaluation yet")
    return df


def load_evaluations(sweep_dir: Path) -> pd.DataFrame:
    df = _read(sweep_dir, "evaluations")
    return df if df is not None else pd.DataFrame(columns=["trial_id", "kimg", "fid"])


def every_kimg(sweep_dir: Path) -> float:
    """The sweep's evaluation interval, from the sweep file it was started with."""
    try:
        spec = yaml.safe_load((sweep_dir / "sweep.yaml").read_text()) or {}
        return float((spec.get("eval") or {}).get("every_kimg", DEFAULT_EVERY_KIMG))
    except (OSError, yaml.YAMLError, TypeError, ValueError, AttributeError):
        return DEFAULT_EVERY_KIMG


def parameter_names(df: pd.DataFrame) -> list[str]:
    fixed = set(TRIAL_COLUMNS) | {"sweep", "trial_id"}
    return [c for c in df.columns if c not in fixed]
