"""`orchestrator sweep`: prepare data once, claim the results directory, run Tune, say how it ended.

A first SIGINT (Ctrl-C) or SIGTERM stops Tune gracefully (its state is saved for --resume); the trials
table then lists every trial of the sweep, the unfinished ones as `interrupted` (started) or `pending`.
A second signal ends the driver at once.
"""
from __future__ import annotations

import logging
import os
import signal
from collections import Counter
from pathlib import Path

from rich.console import Console

from gan.data import prepare_dataset
from orchestrator.failures import DIVERGED, ENDED, ERROR  # every status not in ENDED is unfinished
from orchestrator.live import LiveView
from orchestrator.results import ResultsWriter
from orchestrator.schema import Sweep
from orchestrator.storage import normalise as storage_uri, preflight, record as record_storage, resolve as storage_for_run
from orchestrator.sweep_dir import SweepDir
from orchestrator.tracking import check_trackers

# trial_id of a row that stands for a grid trial Tune had not created when the sweep was interrupted.
PLACEHOLDER_PREFIX = "pending-"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# What Tune logs when it stops on a signal, ending with advice (Tuner.restore) that is wrong for this CLI;
# the `interrupted:` line says it all.
TUNE_STOP_MESSAGES = ("Stop signal received", "Experiment has been interrupted", "Trials did not complete")
# Tune's complaint, at the end and on --resume, about trials that never started: the tables list them.
TUNE_NOISE = ("Failed to fetch metrics",)
TUNE_LOGGERS = ("ray.tune.tune", "ray.tune.analysis.experiment_analysis")


class SweepErrors(Exception):
    """The sweep ended, and some of its trials ended in `error` (infrastructure: they measured nothing)."""

    def __init__(self, errored: int, total: int):
        super().__init__(f"{errored} of {total} trials ended in error")
        self.errored, self.total = errored, total


class SweepInterrupted(Exception):
    """The sweep ended before all of its trials did."""

    def __init__(self, signum: int | None, unfinished: int, total: int, resumable: bool):
        super().__init__(f"{unfinished} of {total} trials unfinished")
        self.signum, self.unfinished, self.total, self.resumable = signum, unfinished, total, resumable


class StopSignals(logging.Filter):
    """SIGINT and SIGTERM while a sweep runs.

    Tune's own SIGINT handler is turned off: it ignores SIGTERM and advises Tuner.restore. Ours stops
    Tune the same graceful way, through the SIGUSR1 handler Tune installs while it runs (final
    experiment-state checkpoint, trials stopped); before Tune runs, and on a second signal, it raises
    KeyboardInterrupt at once.
    """

    def __init__(self):
        super().__init__()
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._env: str | None = None

    def __enter__(self) -> "StopSignals":
        self._env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        self._previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
        self.install()
        for name in TUNE_LOGGERS:
            logging.getLogger(name).addFilter(self)
        return self

    def install(self) -> None:
        for s in STOP_SIGNALS:
            signal.signal(s, self._handle)

    def __exit__(self, *exc_info) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        if self._env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self._env
        for name in TUNE_LOGGERS:
            logging.getLogger(name).removeFilter(self)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        tune_stop = signal.getsignal(signal.SIGUSR1)
        if not callable(tune_stop):  # Tune is not running (yet)
            raise KeyboardInterrupt
        tune_stop(signum, frame)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(TUNE_NOISE):
            return False
        # Errored trials: the closing lines name each one and its error file, without Tune's traceback.
        if message.startswith("Trials did not complete"):
            return False
        return self.signum is None or not message.startswith(TUNE_STOP_MESSAGES)


def total_trials(sweep: Sweep) -> int:
    return sweep.num_samples if sweep.method == "optuna" else len(sweep.trials())


def run_sweep(sweep: Sweep, results: Path, *, address: str | None, resume: bool, console: Console,
              storage: str | None = None) -> Path:
    """Run the sweep to its end and print `done:`; raise SweepInterrupted if any trial is unfinished."""
    storage = storage_uri(storage) if storage is not None else None  # a bad --storage creates nothing
    with StopSignals() as stop:
        try:
            # Built once per sweep (trials receive it through Ray's object store), and before the results
            # directory is claimed: a folder without usable images leaves no half-made sweep behind.
            check_trackers(sweep)  # tracking: W&B's API key, MLflow's store (one line if refused)
            dataset = prepare_dataset(sweep.trial_config({}).data)
            sweep_dir = SweepDir.claim(sweep, results, resume=resume)
        except KeyboardInterrupt:
            raise SweepInterrupted(stop.signum or signal.SIGINT, total_trials(sweep), total_trials(sweep), resume) from None
        try:
            return _run(sweep, sweep_dir, dataset, results, address=address, resume=resume, console=console, stop=stop,
                        storage=storage)
        finally:
            sweep_dir.release()


def _run(sweep: Sweep, sweep_dir: SweepDir, dataset, results: Path, *, address: str | None, resume: bool, console: Console,
         stop: StopSignals, storage: str | None = None) -> Path:
    from orchestrator.runner import build_tuner, check_resume_settings, parameter_columns, start_ray  # Ray: once the directory is ours

    if resume:
        check_resume_settings(sweep, sweep_dir)
    storage = storage_for_run(storage, sweep_dir.tune_path, resume)

    summary = dataset.summary()
    if dataset.source == "synthetic":
        console.print(
            f"[yellow]data:[/] no dataset given: using {summary['images_kept']} procedurally generated "
            "faces (pass --data DIR for real images)"
        )
    else:
        console.print(f"data: {dataset.source}: {summary}")
    live = None
    try:
        dashboard = start_ray(address)
        stop.install()  # ray.init replaced our SIGTERM handler with its own (sys.exit)
        console.print(f"Ray dashboard: {dashboard}" if dashboard else "Ray dashboard: not available")
        console.print(f"results: {sweep_dir.path}")
        shared = preflight(sweep_dir.path, storage, sweep.name)  # every node sees the storage, before any trial
        if storage is not None and not resume:
            record_storage(storage, sweep_dir.tune_path)
        if resume:
            forget_placeholders(sweep, sweep_dir)  # Tune adds those trials under their real ids
        live = LiveView(f"sweep {sweep.name}", [c for c in parameter_columns(sweep) if c != "g_widths"] + ["g_widths"])
        tuner = build_tuner(sweep, sweep_dir, dataset, resume=resume, live=live, storage=storage, shared=shared)
        tuner.fit()
    except KeyboardInterrupt:  # a second signal, or the first one before Tune ran
        stop.signum = stop.signum or signal.SIGINT
    finally:
        if live is not None:
            live.stop()
    console.print()  # the live table's last line has no newline; the closing line starts its own
    resumable = sweep_dir.tune_path.exists()
    if resumable:
        unfinished, total = record_unfinished(sweep, sweep_dir)
    else:
        unfinished = total = total_trials(sweep)
    if unfinished:
        raise SweepInterrupted(stop.signum, unfinished, total, resumable)
    rows = list(_writer(sweep, sweep_dir).trials.values())
    errored = sorted((r for r in rows if r.get("status") == ERROR), key=lambda r: r["trial_id"])
    diverged = sum(r.get("status") == DIVERGED for r in rows)
    counts = f"{total} trials" + (f", {diverged} diverged" if diverged else "")
    rank = f"rank with `orchestrator leaderboard --results {results} --sweep {sweep.name}`"
    if not errored:
        console.print(f"done: {counts}: {sweep_dir.path / 'trials.parquet'}; {rank}")
        return sweep_dir.path
    console.print(f"done with errors: {len(errored)} of {total} trials ended in error"
                  + (f" ({diverged} diverged)" if diverged else "") + f": {sweep_dir.path / 'trials.parquet'}")
    from orchestrator.runner import ERROR_FILE, parameter_columns

    for row in errored:
        params = " ".join(f"{c}={row.get(c)}" for c in parameter_columns(sweep) if row.get(c) is not None)
        reason = (row.get("reason") or "").strip().splitlines()
        error_file = sweep_dir.path / "trials" / row["trial_id"] / ERROR_FILE
        console.print(f"  {row['trial_id']} {params}: {reason[-1] if reason else 'no reason recorded'} ({error_file})",
                      markup=False, highlight=False)
    raise SweepErrors(len(errored), total)


def _writer(sweep: Sweep, sweep_dir: SweepDir) -> ResultsWriter:
    from orchestrator.runner import parameter_columns

    return ResultsWriter(sweep_dir.path, sweep.name, parameter_columns(sweep))


def record_unfinished(sweep: Sweep, sweep_dir: SweepDir) -> tuple[int, int]:
    """After Tune returned: trials it left running become `interrupted`, and every grid/random trial
    without a row gets a `pending` placeholder row (Optuna trials never proposed do not exist).
    Returns (unfinished trials, trials of the sweep)."""
    from orchestrator.runner import parameter_columns, parameter_row

    writer = _writer(sweep, sweep_dir)
    for trial_id, row in list(writer.trials.items()):
        if row.get("status") == "running":
            writer.update_trial(trial_id, status="interrupted")
    if sweep.method != "optuna":
        columns = parameter_columns(sweep)
        listed = Counter(tuple(row.get(c) for c in columns) for row in writer.trials.values())
        for index, params in enumerate(sweep.trials()):
            row = parameter_row(sweep, params)
            key = tuple(row[c] for c in columns)
            if listed[key] > 0:  # a multiset: repeats of one configuration have equal parameter columns
                listed[key] -= 1
                continue
            writer.update_trial(
                f"{PLACEHOLDER_PREFIX}{index:04d}", **row, status="pending", kimg=0.0, evaluations=0,
                kimg_budget=float(sweep.train.kimg),
            )
    ended = sum(row.get("status") in ENDED for row in writer.trials.values())
    total = total_trials(sweep)
    return max(total - ended, 0), total


def forget_placeholders(sweep: Sweep, sweep_dir: SweepDir) -> None:
    writer = _writer(sweep, sweep_dir)
    writer.drop_trials([t for t in writer.trials if t.startswith(PLACEHOLDER_PREFIX)])
