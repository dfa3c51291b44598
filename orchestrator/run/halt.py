"""Stopping the whole sweep from inside Ray Tune, the way a first Ctrl-C does.

A driver-side callback that finds a reason the sweep cannot go on (a node that cannot use the sweep's
storage) calls `request`: Tune stops gracefully through its own SIGUSR1 handler, saves its experiment state
with the unfinished trials still unfinished (so `--resume` continues them once the cause is fixed), and
`orchestrator sweep` then prints the reason in one line and exits 2. The state lives in this module: Tune
unpickles its callbacks on --resume, so they cannot hold a reference to the driver's own objects.
"""
from __future__ import annotations

import logging
import signal

from orchestrator.run.signals import TUNE_LOGGERS, TUNE_STOP_MESSAGES

_reason: str | None = None


class _Quiet(logging.Filter):
    """Tune's messages about a stop signal (and its Tuner.restore advice) are wrong for a halt: drop them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(TUNE_STOP_MESSAGES)


_QUIET = _Quiet()


def reason() -> str | None:
    """Why the sweep was halted in this driver, or None."""
    return _reason


def reset() -> None:
    global _reason
    _reason = None
    for name in TUNE_LOGGERS:
        logging.getLogger(name).removeFilter(_QUIET)


def request(why: str) -> None:
    """Stop the sweep (the first reason wins). Called by callbacks, in the driver's main thread."""
    global _reason
    if _reason is not None:
        return
    _reason = why
    for name in TUNE_LOGGERS:
        logging.getLogger(name).addFilter(_QUIET)
    tune_stop = signal.getsignal(signal.SIGUSR1)
    if callable(tune_stop):  # Tune's handler while it runs: it ends the run after this step
        tune_stop(signal.SIGUSR1, None)
