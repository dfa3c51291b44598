"""The hang watchdog of a trial: a trial that reports nothing for `hang_timeout_min` ends as `error`.

The trial's training runs in a thread of its own; the trial's function (Tune's thread) watches it. When no
report came for the timeout (for the first report: `FIRST_REPORT_FACTOR` times it, since data loading, model
compilation and the real images' statistics come first), the function reports `error` with the reason "no
progress for N min" and returns: Tune ends the trial like any other `error`, never retried as a crash, and
frees its resources, whatever the stuck thread is waiting for (a hard NFS mount, a wedged data loader).
Time a report spends waiting for the driver does not count. A stuck thread that wakes up later can report
nothing more (`Abandoned`); with actor reuse, it stays behind in the worker process that runs the next trial.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

FIRST_REPORT_FACTOR = 2.0
POLL_S = 30.0  # at most this long between two looks at the clock (shorter for short timeouts)


class Abandoned(Exception):
    """The watchdog gave up on this trial: its training thread must not report any more."""


class HangWatch:
    def __init__(self, timeout_min: float, clock: Callable[[], float] = time.monotonic):
        self.timeout_min = timeout_min
        self.clock = clock
        self.last = clock()
        self.reports = 0
        self.in_report = False
        self.abandoned = False
        self._lock = threading.Lock()

    @property
    def poll_s(self) -> float:
        return max(0.05, min(POLL_S, self.timeout_min * 60 / 10))

    def limit_min(self) -> float:
        return self.timeout_min * (FIRST_REPORT_FACTOR if self.reports == 0 else 1.0)

    @contextmanager
    def reporting(self) -> Iterator[None]:
        """Around each report of the training thread: refused once abandoned; the wait is not a hang."""
        with self._lock:
            if self.abandoned:
                raise Abandoned("the hang watchdog ended this trial")
            self.in_report = True
        try:
            yield
        finally:
            with self._lock:
                self.in_report = False
                self.last = self.clock()
                self.reports += 1

    def give_up_if_overdue(self) -> str | None:
        """The reason, once no report came in time (the trial is then abandoned); else None."""
        with self._lock:
            if self.abandoned or self.in_report:
                return None
            limit = self.limit_min()
            if self.clock() - self.last <= limit * 60:
                return None
            self.abandoned = True
        if self.reports == 0:
            return (f"no progress for {limit:g} min since the trial started (its first report may take "
                    f"{FIRST_REPORT_FACTOR:g} x hang_timeout_min)")
        return f"no progress for {limit:g} min since the trial's last report (hang_timeout_min)"


def run_watched(train: Callable[[], Any], watch: HangWatch) -> str | None:
    """Run `train` in a thread of its own and wait for it: None when it returned, its exception re-raised
    (SystemExit too: Tune stops a trial through one), or the reason the watchdog gave up on it."""
    outcome: dict[str, BaseException] = {}

    def target() -> None:
        try:
            train()
        except Abandoned:
            pass
        except BaseException as exc:  # handed to the trial's own thread, which raises it for Tune
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="gan-sweeps-training", daemon=True)
    thread.start()
    while True:
        thread.join(timeout=watch.poll_s)
        if not thread.is_alive():
            break
        reason = watch.give_up_if_overdue()
        if reason:
            return reason
    if "error" in outcome:
        raise outcome["error"]
    return None
