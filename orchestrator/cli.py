"""`orchestrator`: prepare data, run sweeps, rank results, write reports.

A thin layer: each command parses flags, calls one function and turns the
project's own errors into one line on stderr and exit code 2.
"""
from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from gan.config import DataConfig
from gan.data import DataError, prepare_dataset
from orchestrator.store.reader import ResultsError, find_sweep, load_trials
from orchestrator.sweepfile.errors import SweepError
from orchestrator.sweepfile.loading import load_sweep
from orchestrator.workflow.commands import DEFAULT_RESULTS

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Sweeps of GAN architectures on Ray Tune: ASHA on FID, results in Parquet.")
data_app = typer.Typer(no_args_is_help=True, help="Prepare and inspect datasets.")
app.add_typer(data_app, name="data")
console = Console()
if not console.is_terminal:  # pipes and CI: wide enough that tables are not truncated
    console = Console(width=200)


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2) from None


def user_errors():
    """The exception types whose message is a complete, user-facing sentence."""
    from orchestrator.run.storage import StorageError
    from orchestrator.store.sweep_dir import SweepDirError

    # ResultsError: leaderboard's and confirm's too
    errors = (SweepError, SweepDirError, DataError, ResultsError, StorageError)
    # Importing gan.metrics costs seconds (torchvision, torch-fidelity); it can only have raised if imported.
    metrics = sys.modules.get("gan.metrics")
    return errors + (metrics.ExtractorUnavailable,) if metrics is not None else errors


@data_app.command("prepare")
def data_prepare(
    path: Path = typer.Argument(..., help="Folder of images (searched recursively)."),
    size: int = typer.Option(64, "--size", help="Output side in pixels (centre crop, then resize)."),
    min_side: int | None = typer.Option(None, "--min-side", help="Drop images smaller than this (default: --size)."),
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
    data: str | None = typer.Option(None, "--data", help="Image folder; overrides the sweep's data.path."),
    results: Path = typer.Option(DEFAULT_RESULTS, "--results", help=(
        "Results root; the sweep writes <results>/<name>/."
    )),
    address: str | None = typer.Option(None, "--address", help=(
        "Ray cluster to join ('auto': the running one). Default: start a local Ray."
    )),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted sweep of the same name and content."),
    storage: str | None = typer.Option(None, "--storage", help=(
        "Where Ray Tune keeps checkpoints and state: s3://..., gs://... or a path every node mounts. Default: "
        "<results>/<name>/tune."
    )),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the expanded trials; start nothing."),
    estimate: bool = typer.Option(False, "--estimate", help=(
        "With --dry-run: time each distinct model here and print the images, device-hours (and ASHA's best "
        "case) and peak memory of the sweep."
    )),
) -> None:
    """Run a sweep on Ray Tune (local by default)."""
    from orchestrator.workflow.commands import rerun_command
    from orchestrator.workflow.confirm import run_stages
    from orchestrator.workflow.sweep import (  # Ray only once the sweep runs
        SweepErrors,
        SweepHalted,
        SweepInterrupted,
        run_sweep,
    )
    from orchestrator.workflow.trials_table import print_trials

    if estimate and not dry_run:  # explicit: `--estimate` alone must never be mistaken for a run
        fail(
            "--estimate needs --dry-run: `orchestrator sweep FILE --dry-run --estimate` times the models and runs "
            "nothing"
        )
    try:
        spec = load_sweep(file, data_override=data)
        for note in spec.warnings():
            typer.echo(f"warning: {note}", err=True)
        if dry_run:
            print_trials(spec, console)
            if estimate:
                from orchestrator.workflow.estimate import (
                    EstimateError,  # torch: only when estimating
                )
                from orchestrator.workflow.estimate_report import print_estimate

                try:
                    print_estimate(spec, console)
                except EstimateError as exc:
                    fail(str(exc))
            return
        run = run_stages if spec.confirm is not None else run_sweep  # explore, then confirm on fresh seeds
        run(spec, results, address=address, resume=resume, console=console, storage=storage)
    except SweepHalted as halted:  # a trial's node could not use the storage: exit 2, resumable once fixed
        again = rerun_command(file, data=data, results=results, address=address, storage=storage, resume=True)
        fail(f"{halted}; fix that, then continue with: {again}")
    except user_errors() as exc:
        fail(str(exc))
    except SweepErrors:  # its closing lines named each errored trial: infrastructure failed, not a result
        raise typer.Exit(1) from None
    except SweepInterrupted as stop:
        again = rerun_command(file, data=data, results=results, address=address, storage=storage, resume=stop.resumable)
        typer.echo(
            f"interrupted: {stop.unfinished} of {stop.total} trials unfinished; "
            f"{'continue' if stop.resumable else 'start it again'} with: {again}",
            err=True,
        )
        raise typer.Exit(128 + stop.signum if stop.signum else 1) from None
    except KeyboardInterrupt:  # before the sweep's own signal handling was in place
        typer.echo("interrupted: nothing ran", err=True)
        raise typer.Exit(130) from None
    except ConnectionError as exc:
        if address is None:
            raise
        from orchestrator.run.ray_start import RayUnreachable

        auth = (
            ""
            if isinstance(exc, RayUnreachable)
            else (
                "; if it uses token authentication, export RAY_AUTH_MODE=token (Ray reads the token from "
                "~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)"
            )
        )
        fail(f"cannot join the Ray cluster at {address}: {exc}{auth}")


@app.command()
def train(
    file: Path = typer.Argument(..., help="Sweep file (YAML)."),
    trial: int = typer.Option(..., "--trial", help="Which trial: its # in `orchestrator sweep FILE --dry-run`."),
    data: str | None = typer.Option(None, "--data", help="Image folder; overrides the sweep's data.path."),
    sets: list[str] | None = typer.Option(
        None,
        "--set",
        help=("SECTION.KEY=VALUE (a YAML value), repeatable: override a fixed setting, e.g. train.kimg=2."),
    ),
    out: Path | None = typer.Option(None, "--out", help="Run directory (default runs/<sweep name>/trial-<N>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from <out>/checkpoint."),
    device: str | None = typer.Option(
        None, "--device", help=("auto | cpu | cuda | cuda:N (default: the sweep's train.device).")
    ),
) -> None:
    """Run one trial of a sweep in this process, without Ray."""
    from orchestrator.workflow.train import (  # torch: only when training
        TrainError,
        TrainInterrupted,
        train_one,
    )

    try:
        outcome = train_one(
            file, trial, data=data, sets=sets or [], out=out, resume=resume, device=device, console=console
        )
    except (TrainError, *user_errors()) as exc:
        fail(str(exc))
    except TrainInterrupted as stop:
        typer.echo(f"interrupted {stop}", err=True)
        raise typer.Exit(130) from None
    except KeyboardInterrupt:  # while the file and run directory were checked
        typer.echo("interrupted: nothing ran", err=True)
        raise typer.Exit(130) from None
    typer.echo(outcome.summary())
    if outcome.status != "completed":
        raise typer.Exit(1)  # diverged: the trial has no final FID


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
    markdown = "markdown"
    latex = "latex"


class Failures(str, Enum):
    include = "include"
    exclude = "exclude"


class Interval(str, Enum):  # --ci: interval of a group's mean
    t = "t"
    bootstrap = "bootstrap"


def split_columns(text: str | None) -> list[str] | None:
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


@app.command()
def leaderboard(
    results: Path = typer.Option(DEFAULT_RESULTS, "--results", help="Results root."),
    sweep_name: str | None = typer.Option(None, "--sweep", help="Sweep name (needed when the root holds several)."),
    group_by: str | None = typer.Option(
        None, "--group-by", help=("Comma-separated parameters, e.g. 'variant' or 'variant,g_widths'.")
    ),
    top: int | None = typer.Option(
        None, "--top", min=1, help=("Show the best N rows (per block of comparable numbers).")
    ),
    at_kimg: float | None = typer.Option(
        None,
        "--at-kimg",
        help=(
            "Compare every trial on its first evaluation at or past this kimg (default: the final FID)."
        ),
    ),
    baseline: str | None = typer.Option(
        None,
        "--baseline",
        help=("KEY=VALUE: with --group-by, each group's FID difference to this group, 95% CI and p-value."),
    ),
    fmt: Format = typer.Option(Format.table, "--format", help="table | json | csv | markdown | latex"),
    failures: Failures = typer.Option(
        Failures.include,
        "--failures",
        help=(
            "include: groups rank on the median over completed and diverged trials (a diverged trial counts as "
            "the worst); exclude: on completed trials only."
        ),
    ),
    ci: Interval = typer.Option(
        Interval.t, "--ci", help=(
            "Interval of a group's mean: t (Student t, symmetric) or bootstrap (seeded percentile bootstrap, "
            "10,000 resamples; final_fid_ci95_low/high)."
        ),
    ),
    pool: bool = typer.Option(False, "--pool", help=(
        "Let a group average over configurations that differ in a parameter outside --group-by (refused "
        "otherwise)."
    )),
    save: Path | None = typer.Option(None, "--save", help=(
        "Also write the table in every format and analysis.json (command, flags, captions, versions, the "
        "sweep's fingerprint) into this directory."
    )),
) -> None:
    """Trials ranked by final FID (or at --at-kimg), or groups with mean ± 95% CI over seeds."""
    import shlex

    from orchestrator.analysis.formats import (
        as_csv,
        as_json,
        as_latex,
        as_markdown,
        sections,
    )
    from orchestrator.analysis.leaderboard import build_board
    from orchestrator.analysis.saved import save_board
    from orchestrator.store.reader import parameter_names

    try:
        sweep_dir = find_sweep(results, sweep_name)
        say_stage(results, sweep_name, sweep_dir)
        by = split_columns(group_by)
        board = build_board(
            sweep_dir, group_by=by, top=top, at_kimg=at_kimg, baseline=baseline, failures=failures.value,
            ci=ci.value, pool=pool,
        )
        params = parameter_names(load_trials(sweep_dir))
        secs = sections(board, by, params)
        if save is not None:
            flags = {"results": str(results), "sweep": sweep_name, "group_by": by, "top": top, "at_kimg": at_kimg,
                     "baseline": baseline, "failures": failures.value, "ci": ci.value, "pool": pool,
                     "format": fmt.value, "save": str(save)}
            command = shlex.join(["orchestrator", *sys.argv[1:]])
            save_board(save, board, secs, sweep_dir=sweep_dir, command=command, flags=flags)
    except user_errors() as exc:
        fail(str(exc))
    note = board.partial_note
    if fmt in (Format.json, Format.csv):
        sys.stdout.write(as_json(board) if fmt is Format.json else as_csv(board))
        for warning in board.warnings:  # stdout stays machine-readable
            typer.echo(f"warning: {warning}", err=True)
        if save is not None:
            typer.echo(f"saved: {save}", err=True)
        return
    if fmt is Format.markdown:
        sys.stdout.write(as_markdown(secs, note))
    elif fmt is Format.latex:
        sys.stdout.write(as_latex(secs, note))
    else:
        for sec in secs:
            table = Table(title=sec.title, title_justify="left")
            for h in sec.headers:
                table.add_column(h)
            for row in sec.rows:
                table.add_row(*row)
            console.print(table)
        if note:
            console.print(f"[yellow]{note}[/]")
    if save is not None:
        typer.echo(f"saved: {save}", err=True)


@app.command()
def report(
    results: Path = typer.Option(DEFAULT_RESULTS, "--results", help="Results root."),
    sweep_name: str | None = typer.Option(None, "--sweep", help="Sweep name (needed when the root holds several)."),
    out: Path | None = typer.Option(None, "--out", help="HTML file to write (default <results>/<name>/report.html)."),
    group_by: str | None = typer.Option(
        None, "--group-by", help=(
            "Comma-separated parameters to group the leaderboard by (default: every swept parameter that "
            "varies, other than seed and repeat)."
        )
    ),
    top: int = typer.Option(4, "--top", min=1, help="Show the sample grids of the best N trials."),
    at_kimg: float | None = typer.Option(
        None, "--at-kimg", help=("Compare trials on their first evaluation at or past this kimg, not the final FID.")
    ),
    baseline: str | None = typer.Option(
        None, "--baseline", help=("KEY=VALUE: differences to this group (with --group-by or the default grouping).")
    ),
    failures: Failures = typer.Option(
        Failures.include,
        "--failures",
        help=("include | exclude: whether diverged trials enter the groups' ranking key (see leaderboard)."),
    ),
    ci: Interval = typer.Option(
        Interval.t, "--ci", help="t | bootstrap: interval of a group's mean (see leaderboard)."
    ),
    pool: bool = typer.Option(False, "--pool", help="Let a group average over several configurations."),
) -> None:
    """Write one self-contained HTML report: leaderboard, FID curves, sample grids, the sweep file."""
    from orchestrator.analysis.report import (
        write_report,  # matplotlib: only when asked for
    )

    try:
        sweep_dir = find_sweep(results, sweep_name)
        say_stage(results, sweep_name, sweep_dir)
        path = write_report(
            sweep_dir,
            out,
            group_by=split_columns(group_by),
            top=top,
            at_kimg=at_kimg,
            baseline=baseline,
            failures=failures.value,
            ci=ci.value,
            pool=pool,
        )
    except user_errors() as exc:
        fail(str(exc))
    console.print(f"report: {path}")



def say_stage(results: Path, sweep_name: str | None, sweep_dir: Path) -> None:
    """Without --sweep, a root of a sweep and its confirm stage shows the confirm stage: say so (stderr)."""
    from orchestrator.store.reader import stage_note

    note = stage_note(results, sweep_dir) if sweep_name is None else None
    if note:
        typer.echo(note, err=True)


@app.command()
def confirm(
    results: Path = typer.Option(DEFAULT_RESULTS, "--results", help="Results root."),
    sweep_name: str | None = typer.Option(None, "--sweep", help="The finished sweep to confirm (needed when the "
                                                                 "root holds several)."),
    top: int | None = typer.Option(None, "--top", help="Confirm the best K configurations (default: the sweep's "
                                                         "confirm.top, else 1)."),
    include: list[str] | None = typer.Option(None, "--include", help=(
        "KEY=VALUE[,KEY=VALUE]: also confirm every configuration matching it (a baseline), repeatable."
    )),
    seeds: str | None = typer.Option(None, "--seeds", help=(
        "N fresh seeds after the largest one used, or a comma-separated list of unused seeds (default: the "
        "sweep's confirm.seeds, else 5)."
    )),
    allow_partial: bool = typer.Option(False, "--allow-partial", help=(
        "Confirm an unfinished sweep from what it measured (recorded in selection.json)."
    )),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the selection and the confirm trials; run nothing."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted confirm stage."),
    address: str | None = typer.Option(None, "--address", help="Ray cluster to join (default: a local Ray)."),
) -> None:
    """Run a finished sweep's best configurations (and baselines) again on fresh seeds, as <sweep>-confirm."""
    from orchestrator.workflow.confirm import parse_include, parse_seeds, plan_confirm, print_selection

    try:
        if sweep_name is None:  # the one sweep of the root; of a sweep and its confirm stage, the first
            from orchestrator.store.stages import first_stage_of

            found = find_sweep(results, None)
            sweep_name = (first_stage_of(found) or found).name
        name = sweep_name
        plan = plan_confirm(results, name, top=top, include=parse_include(include), seeds=parse_seeds(seeds),
                            allow_partial=allow_partial)
        print_selection(plan, console)
        if dry_run:
            from orchestrator.workflow.trials_table import print_trials

            print_trials(plan.sweep, console)
            console.print("dry run: nothing written")
            return
        from orchestrator.workflow.confirm import print_leaderboards, run_confirm
        from orchestrator.workflow.sweep import SweepErrors, SweepInterrupted

        try:
            run_confirm(plan, results, address=address, resume=resume, console=console)
        except SweepErrors:
            print_leaderboards(plan, results, console)
            raise
        print_leaderboards(plan, results, console)
    except user_errors() as exc:
        fail(str(exc))
    except SweepErrors:
        raise typer.Exit(1) from None
    except SweepInterrupted as stop:
        import shlex

        again = ["orchestrator", *sys.argv[1:]] + ([] if resume else ["--resume"])  # the same flags: the same selection
        typer.echo(f"interrupted: {stop.unfinished} of {stop.total} trials unfinished; continue with: "
                   f"{shlex.join(again)}", err=True)
        raise typer.Exit(128 + stop.signum if stop.signum else 1) from None


class TableName(str, Enum):
    evaluations = "evaluations"
    trials = "trials"


class ExportFormat(str, Enum):
    parquet = "parquet"
    csv = "csv"


@app.command("results")
def results_command(
    results: Path = typer.Option(DEFAULT_RESULTS, "--results", help="Results root."),
    sweep_name: str | None = typer.Option(None, "--sweep", help="Sweep name (needed when the root holds several)."),
    table: TableName = typer.Option(..., "--table", help="evaluations | trials"),
    fmt: ExportFormat = typer.Option(ExportFormat.parquet, "--format", help="parquet | csv"),
    out: Path = typer.Option(..., "--out", help="File to write (replaced atomically)."),
) -> None:
    """Export one of a sweep's tables as it stands now, also while the sweep runs (its part files included)."""
    from orchestrator.store.tables import ResultsFormatError, export_table

    try:
        sweep_dir = find_sweep(results, sweep_name)
        say_stage(results, sweep_name, sweep_dir)
        rows = export_table(sweep_dir, table.value, fmt.value, out)
    except (ResultsError, ResultsFormatError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{out}: cannot write ({exc.strerror or exc})")
    console.print(f"{table.value}: {rows} rows -> {out}")


if __name__ == "__main__":
    app()
