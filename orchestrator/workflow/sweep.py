"""`orchestrator sweep`: prepare data once, claim the results directory, run Tune, say how it ended.

A first SIGINT (Ctrl-C) or SIGTERM stops Tune gracefully (its state is saved for --resume); the trials
table then lists every trial of the sweep, the unfinished ones as `interrupted` (started) or `pending`.
A second signal ends the driver at once.
"""
from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from gan.data import prepare_dataset
from orchestrator.run import halt
from orchestrator.run.live import LiveView
from orchestrator.run.signals import StopSignals
from orchestrator.run.storage import StorageError, check_results, preflight
from orchestrator.run.storage import normalise as storage_uri
from orchestrator.run.storage import record as record_storage
from orchestrator.run.storage import resolve as storage_for_run
from orchestrator.run.tracking import check_trackers
from orchestrator.run.tune_config import FIXED_ON_RESUME
from orchestrator.store.failures import DIVERGED, ERROR
from orchestrator.store.provenance import record_provenance
from orchestrator.store.sweep_dir import ERROR_FILE, SweepDir, delete_checkpoints
from orchestrator.store.tables import compact, parameter_columns
from orchestrator.store.unfinished import open_writer, ready_to_resume, record_unfinished
from orchestrator.sweepfile.plan import plan_sweep
from orchestrator.sweepfile.sections import Sweep


class SweepErrors(Exception):
    """The sweep ended, and some of its trials ended in `error` (infrastructure: they measured nothing)."""

    def __init__(self, errored: int, total: int):
        super().__init__(f"{errored} of {total} trials ended in error")
        self.errored, self.total = errored, total


class SweepHalted(StorageError):
    """A trial's node could not use the sweep's storage: the sweep stopped, resumable once that is fixed."""

    def __init__(self, reason: str, unfinished: int, total: int):
        super().__init__(f"{reason} (the sweep stopped: {unfinished} of {total} trials unfinished)")
        self.unfinished, self.total = unfinished, total


class SweepInterrupted(Exception):
    """The sweep ended before all of its trials did."""

    def __init__(self, signum: int | None, unfinished: int, total: int, resumable: bool):
        super().__init__(f"{unfinished} of {total} trials unfinished")
        self.signum, self.unfinished, self.total, self.resumable = signum, unfinished, total, resumable


def run_sweep(sweep: Sweep, results: Path, *, address: str | None, resume: bool, console: Console,
              storage: str | None = None, on_claimed: Callable[[Path], None] | None = None) -> Path:
    """Run the sweep to its end and print `done:`; raise SweepInterrupted if any trial is unfinished, and
    StorageError if a node could not use the storage (before any trial; SweepHalted in a trial: resumable).
    `on_claimed(directory)` runs once the sweep's directory is this driver's (a confirm stage's selection).

    The steps go down the layers once: the trackers (run), the sweep's expansion (sweepfile), the data (gan),
    the directory and its tables (store), Tune (run), then the tables again: compacted, unfinished trials marked.
    """
    check_results(results, address)  # a --results that vanishes with the driver's node: refused before anything
    storage = storage_uri(storage) if storage is not None else None  # a bad --storage creates nothing
    with StopSignals() as stop:
        try:
            # Built once per sweep (trials receive it through Ray's object store), and before the results
            # directory is claimed: a folder without usable images leaves no half-made sweep behind.
            check_trackers(sweep)  # tracking: W&B's API key, MLflow's store (one line if refused)
            plan = plan_sweep(sweep)
            dataset = prepare_dataset(plan.data)
            sweep_dir = SweepDir.claim(sweep, results, resume=resume, fixed_on_resume=FIXED_ON_RESUME)
        except KeyboardInterrupt:
            total = sweep.trial_count()
            raise SweepInterrupted(stop.signum or signal.SIGINT, total, total, resume) from None
        try:
            if on_claimed is not None:
                on_claimed(sweep_dir.path)
            # A --resume keeps the storage its sweep started with (refused here if another is given).
            storage = storage_for_run(storage, sweep_dir.tune_path, resume)
            # Then the tables: after a killed driver, repaired and rid of the placeholders of never-created trials
            # (they come back below if this run stops before Tune creates them); the run's provenance recorded.
            columns = parameter_columns(plan.swept)
            if resume:
                ready_to_resume(plan, sweep_dir.path)
            for line in record_provenance(sweep, sweep_dir.path, dataset, resume=resume):
                console.print(f"[yellow]warning:[/] {line}")
            summary = dataset.summary()
            if dataset.source == "synthetic":
                console.print(
                    f"[yellow]data:[/] no dataset given: using {summary['images_kept']} procedurally generated "
                    "faces (pass --data DIR for real images)"
                )
            else:
                console.print(f"data: {dataset.source}: {summary}")

            from orchestrator.run.ray_start import start_ray  # Ray: once the directory is ours
            from orchestrator.run.tuner import build_tuner

            live = None
            failed: Exception | None = None
            halt.reset()
            try:
                dashboard = start_ray(address)
                stop.install()  # ray.init replaced our SIGTERM handler with its own (sys.exit)
                console.print(f"Ray dashboard: {dashboard}" if dashboard else "Ray dashboard: not available")
                console.print(f"results: {sweep_dir.path}")
                # Every node that can run a trial can use the storage, before any trial (waiting for one if none
                # can yet).
                shared = preflight(sweep_dir.path, storage, sweep.name, cpu=sweep.resources.cpu,
                                   gpu=sweep.resources.gpu, joined=address is not None,
                                   note=lambda line: console.print(line, highlight=False))
                if storage is not None and not resume:
                    record_storage(storage, sweep_dir.tune_path)
                live = LiveView(f"sweep {sweep.name}", [c for c in columns if c != "g_widths"] + ["g_widths"])
                tuner = build_tuner(sweep, plan, sweep_dir, dataset, resume=resume, live=live, storage=storage,
                                    shared=shared)
                tuner.fit()
            except KeyboardInterrupt:  # a second signal, or the first one before Tune ran
                stop.signum = stop.signum or signal.SIGINT
            except Exception as exc:  # refused storage, Tune failing to start: the tables are finished first
                failed = exc
            finally:
                if live is not None:
                    live.stop()
                compact(sweep_dir.path)  # on every exit the driver survives: the documented tables, whole
            console.print()  # the live table's last line has no newline; the closing line starts its own

            resumable = sweep_dir.tune_path.exists()
            writer = open_writer(plan, sweep_dir.path)
            unfinished = record_unfinished(sweep, plan, writer) if resumable else plan.total
            if not unfinished:  # the sweep has ended: keep_checkpoints decides which checkpoints stay
                for trial_id in delete_checkpoints(list(writer.trials.values()), sweep.keep_checkpoints):
                    writer.update_trial(trial_id, checkpoint_path=None)
            writer.close()
            if failed is not None:
                raise failed
            if halt.reason() and resumable:  # a node could not use the storage: stopped, never retried as a crash
                raise SweepHalted(halt.reason(), unfinished, plan.total)
            if unfinished:
                raise SweepInterrupted(stop.signum, unfinished, plan.total, resumable)
            errored = say_how_it_ended(console, list(writer.trials.values()), columns, sweep_dir.path, plan.total,
                                       f"orchestrator leaderboard --results {results} --sweep {sweep.name}")
            if errored:
                raise SweepErrors(errored, plan.total)
            return sweep_dir.path
        finally:
            sweep_dir.release()


def say_how_it_ended(console: Console, rows: list[dict], columns: list[str], sweep_dir: Path, total: int,
                     rank: str) -> int:
    """The closing line of a sweep whose trials all ended (`done:`), and one line per trial that ended in error,
    with its parameters, the last line of its reason and where the whole reason is. Returns how many errored."""
    errored = sorted((r for r in rows if r.get("status") == ERROR), key=lambda r: r["trial_id"])
    diverged = sum(r.get("status") == DIVERGED for r in rows)
    if not errored:
        counts = f"{total} trials" + (f", {diverged} diverged" if diverged else "")
        console.print(f"done: {counts}: {sweep_dir / 'trials.parquet'}; rank with `{rank}`")
        return 0
    console.print(
        f"done with errors: {len(errored)} of {total} trials ended in error"
        + (f" ({diverged} diverged)" if diverged else "")
        + f": {sweep_dir / 'trials.parquet'}"
    )
    for row in errored:
        params = " ".join(f"{c}={row.get(c)}" for c in columns if row.get(c) is not None)
        reason = (row.get("reason") or "").strip().splitlines()
        error_file = sweep_dir / "trials" / row["trial_id"] / ERROR_FILE
        console.print(
            f"  {row['trial_id']} {params}: {reason[-1] if reason else 'no reason recorded'} ({error_file})",
            markup=False,
            highlight=False,
            soft_wrap=True,  # one line per trial, however long its reason
        )
    return len(errored)
