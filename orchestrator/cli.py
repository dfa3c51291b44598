"""`orchestrator`: prepare data, run sweeps, rank results, write reports.

A thin layer: each command parses flags, calls one function and turns the
project's own errors into one line on stderr and exit code 2.
"""
from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from gan.config import DataConfig
from gan.data import DataError, prepare_dataset
from orchestrator.leaderboard import LeaderboardError, find_sweep, group_trials, load_trials, rank_trials
from orchestrator.schema import SweepError, load_sweep

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Sweeps of GAN architectures on Ray Tune: ASHA on FID, results in Parquet.")
data_app = typer.Typer(no_args_is_help=True, help="Prepare and inspect datasets.")
app.add_typer(data_app, name="data")
console = Console()
if not console.is_terminal:  # pipes and CI: wide enough that tables are not truncated
    console = Console(width=200)
DEFAULT_RESULTS = Path("results")


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def user_errors():
    """The exception types whose message is a complete, user-facing sentence."""
    from orchestrator.sweep_dir import SweepDirError

    errors = (SweepError, SweepDirError, DataError, LeaderboardError)
    # Importing gan.metrics costs seconds (torchvision, torch-fidelity); it can only have raised if imported.
    metrics = sys.modules.get("gan.metrics")
    return errors + (metrics.ExtractorUnavailable,) if metrics is not None else errors


@data_app.command("prepare")
def data_prepare(
    path: Path = typer.Argument(..., help="Folder of images (searched recursively)."),
    size: int = typer.Option(64, "--size", help="Output side in pixels (centre crop, then resize)."),
    min_side: Optional[int] = typer.Option(None, "--min-side", help="Drop images smaller than this (default: --size)."),
    split_seed: int = typer.Option(0, "--split-seed", help="Seed of the train/val/test split."),
) -> None:
    """Decode, deduplicate, filter and cache a folder of images; print what was found."""
    try:
        ds = prepare_dataset(DataConfig(path=str(path), image_size=size, min_side=min_side, split_seed=split_seed))
    except user_errors() as exc:
        fail(str(exc))
    table = Table(title=f"{ds.source}", show_header=False, title_justify="left")
    for key, value in ds.summary().items():
        table.add_row(key, str(value))
    console.print(table)


@app.command()
def sweep(
    file: Path = typer.Argument(..., help="Sweep file (YAML)."),
    data: Optional[str] = typer.Option(None, "--data", help="Image folder; overrides the sweep's data.path."),
    results: Path = typer.Option(DEFAULT_RESULTS, "--results", help="Results root; the sweep writes <results>/<name>/."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to join ('auto': the running one). Default: start a local Ray."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted sweep of the same name and content."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the expanded trials; start nothing."),
) -> None:
    """Run a sweep on Ray Tune (local by default)."""
    try:
        spec = load_sweep(file, data_override=data)
        if dry_run:
            print_trials(spec)
            return
        from orchestrator.sweep_run import run_sweep  # imports Ray

        run_sweep(spec, results, address=address, resume=resume, console=console)
    except user_errors() as exc:
        fail(str(exc))
    except ConnectionError as exc:
        if address is None:
            raise
        fail(
            f"cannot join the Ray cluster at {address}: {exc}; if it uses token authentication, export "
            "RAY_AUTH_MODE=token (Ray reads the token from ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)"
        )


def print_trials(spec) -> None:
    if spec.method == "optuna":
        console.print(f"{spec.name}: method optuna proposes {spec.num_samples} trials at run time from:")
        for name, param in spec.parameters.items():
            console.print(f"  {name}: {param.model_dump(exclude_none=True)}")
        return
    trials = spec.trials()
    names = sorted({k for t in trials for k in t})
    table = Table(title=f"{spec.name}: {len(trials)} trials ({spec.method})", title_justify="left")
    table.add_column("#", justify="right")
    for name in names:
        table.add_column(name)
    for i, t in enumerate(trials):
        table.add_row(str(i), *[("-" if name not in t else str(t[name])) for name in names])
    console.print(table)


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


@app.command()
def leaderboard(
    results: Path = typer.Option(DEFAULT_RESULTS, "--results", help="Results root."),
    sweep_name: Optional[str] = typer.Option(None, "--sweep", help="Sweep name (needed when the root holds several)."),
    group_by: Optional[str] = typer.Option(None, "--group-by", help="Comma-separated parameters, e.g. 'variant' or 'variant,g_widths'."),
    top: Optional[int] = typer.Option(None, "--top", min=1, help="Show the best N rows (per extractor)."),
    fmt: Format = typer.Option(Format.table, "--format", help="table | json | csv"),
) -> None:
    """Trials ranked by best FID, or groups with mean ± 95% CI over seeds."""
    try:
        df = load_trials(find_sweep(results, sweep_name))
        by = [c.strip() for c in group_by.split(",") if c.strip()] if group_by else None
        rows = group_trials(df, by, top) if by else rank_trials(df, top)
    except user_errors() as exc:
        fail(str(exc))
    if fmt is Format.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    elif fmt is Format.csv:
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    else:
        for table in leaderboard_tables(rows, grouped=bool(by)):
            console.print(table)


@app.command()
def report(
    results: Path = typer.Option(DEFAULT_RESULTS, "--results", help="Results root."),
    sweep_name: Optional[str] = typer.Option(None, "--sweep", help="Sweep name (needed when the root holds several)."),
    out: Optional[Path] = typer.Option(None, "--out", help="HTML file to write (default <results>/<name>/report.html)."),
    group_by: Optional[str] = typer.Option(None, "--group-by", help="Comma-separated parameters to group the leaderboard by."),
    top: int = typer.Option(4, "--top", min=1, help="Show the sample grids of the best N trials."),
) -> None:
    """Write one self-contained HTML report: leaderboard, FID curves, sample grids, the sweep file."""
    from orchestrator.report import write_report  # matplotlib: only when asked for

    try:
        by = [c.strip() for c in group_by.split(",") if c.strip()] if group_by else None
        path = write_report(find_sweep(results, sweep_name), out, group_by=by, top=top)
    except user_errors() as exc:
        fail(str(exc))
    console.print(f"report: {path}")


def leaderboard_tables(rows: list[dict], grouped: bool) -> list[Table]:
    """One table per feature extractor: their FIDs are not comparable."""
    extractors = sorted({r["extractor"] for r in rows})
    return [leaderboard_table([r for r in rows if r["extractor"] == e], grouped, e) for e in extractors]


def leaderboard_table(rows: list[dict], grouped: bool, extractor: str) -> Table:
    title = f"extractor {extractor}: lower FID is better" + (" (mean ± 95% CI over trials)" if grouped else "")
    table = Table(title=title, title_justify="left")
    hidden = {"best_fid_ci95", "best_is_ci95", "extractor"}
    columns = [c for c in rows[0] if c not in hidden]
    for c in columns:
        table.add_column(c)
    for r in rows:
        cells = []
        for c in columns:
            value = r[c]
            if grouped and c in ("best_fid_mean", "best_is_mean") and value is not None:
                ci = r[c.replace("_mean", "_ci95")]
                cells.append(f"{value:.2f} ± {ci:.2f}" if ci is not None else f"{value:.2f}")
            elif isinstance(value, float):
                cells.append(f"{value:.3g}" if abs(value) < 0.01 else f"{value:.2f}")
            else:
                cells.append("-" if value is None else str(value))
        table.add_row(*cells)
    return table


if __name__ == "__main__":
    app()
