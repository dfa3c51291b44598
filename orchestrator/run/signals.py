"""SIGINT and SIGTERM while a sweep runs: a graceful stop through Tune, and Tune's noise kept off the terminal.

A first signal stops Tune gracefully (its state is saved for --resume); a second one ends the driver at once.
"""
from __future__ import annotations

import logging
import os
import signal

# SIGHUP too: a closed terminal or a lost ssh session stops the sweep as gracefully as Ctrl-C.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# What Tune logs when it stops on a signal, ending with advice (Tuner.restore) that is wrong for this CLI;
# the `interrupted:` line says it all.
TUNE_STOP_MESSAGES = ("Stop signal received", "Experiment has been interrupted", "Trials did not complete")
# Tune's complaint, at the end and on --resume, about trials that never started: the tables list them.
TUNE_NOISE = ("Failed to fetch metrics",)
TUNE_LOGGERS = ("ray.tune.tune", "ray.tune.analysis.experiment_analysis")


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

    def __enter__(self) -> StopSignals:
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
            # Stopped by a signal: the sweep is over and the process only says so and exits; a late second
            # signal must not print a traceback from Ray's shutdown at exit.
            signal.signal(s, signal.SIG_IGN if self.signum is not None else handler)
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
