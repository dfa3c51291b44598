"""The live view of a running sweep.

On a terminal: a rich table redrawn as results arrive, one row per trial for small sweeps and, past
`MAX_ROWS` trials, a summary (counts per status, the best so far, the last changes) so that a
10,000-trial sweep stays readable and cheap to redraw. Without a terminal (CI, `ray job submit`, a pipe):
a one-line progress report every `PROGRESS_EVERY_S` seconds, and the final view once at the end.
"""
from __future__ import annotations

import time
from collections import Counter, deque

from rich.console import Console
from rich.live import Live
from rich.table import Table

from orchestrator.store.tables import ResultsWriter

STATUS_STYLE = {
    "running": "cyan", "completed": "green", "stopped_early": "yellow", "diverged": "magenta", "error": "red",
}
STATUS_ORDER = ("pending", "running", "interrupted", "completed", "stopped_early", "diverged", "error")
MAX_ROWS = 40  # past this many trials, the view is a summary
RECENT = 10  # trials listed in the summary's last changes
REDRAW_EVERY_S = 0.5  # a redraw walks every trial: at most this often, however fast results arrive
PROGRESS_EVERY_S = 30.0


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _param(value) -> str:
    if value is None:
        return "-"
    return format(value, ".3g") if isinstance(value, float) else str(value)


class LiveView:
    def __init__(self, title: str, columns: list[str]):
        self.title = title
        self.columns = columns  # parameter columns shown beside each trial
        self._live: Live | None = None
        self._writer: ResultsWriter | None = None
        self._recent: deque[str] = deque(maxlen=RECENT)
        self._last_draw = self._last_progress = 0.0

    def __getstate__(self):  # Tune pickles its callbacks; a running Live holds a thread
        return {"title": self.title, "columns": self.columns, "_live": None, "_writer": None,
                "_recent": deque(maxlen=RECENT), "_last_draw": 0.0, "_last_progress": 0.0}

    # --- what is shown -------------------------------------------------------------------------
    def table(self) -> Table:
        if len(self._writer.trials) > MAX_ROWS:
            return self.summary()
        table = Table(title=self.title, title_justify="left")
        for name in ["trial", *self.columns, "status", "kimg", "fid", "best fid"]:
            table.add_column(name, justify="right" if name in ("kimg", "fid", "best fid") else "left")
        for row in sorted(self._writer.trials.values(), key=lambda r: r["trial_id"]):
            table.add_row(*self._cells(row))
        return table

    def _cells(self, row: dict) -> list[str]:
        last = self._writer.summary(row["trial_id"])["last"]
        status = row.get("status", "pending")
        return [row["trial_id"], *[_param(row.get(c)) for c in self.columns],
                f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]", _fmt(row.get("kimg"), ".1f"),
                _fmt(last["fid"] if last else None), _fmt(row.get("best_fid"))]

    def counts(self) -> Counter:
        return Counter(row.get("status", "pending") for row in self._writer.trials.values())

    def best(self) -> dict | None:
        scored = [row for row in self._writer.trials.values() if row.get("best_fid") is not None]
        return min(scored, key=lambda r: r["best_fid"], default=None)

    def summary(self) -> Table:
        counts, best = self.counts(), self.best()
        line = ", ".join(f"{s} {counts[s]}" for s in STATUS_ORDER if counts[s])
        title = f"{self.title}: {len(self._writer.trials)} trials ({line})"
        if best is not None:
            title += f"; best FID so far {best['best_fid']:.2f} ({best['trial_id']})"
        table = Table(title=title + f"; the last {RECENT} changes:", title_justify="left")
        for name in ["trial", *self.columns, "status", "kimg", "fid", "best fid"]:
            table.add_column(name, justify="right" if name in ("kimg", "fid", "best fid") else "left")
        for trial_id in reversed(self._recent):
            if trial_id in self._writer.trials:
                table.add_row(*self._cells(self._writer.trials[trial_id]))
        return table

    def progress_line(self) -> str:
        counts, best = self.counts(), self.best()
        ended = sum(counts[s] for s in ("completed", "stopped_early", "diverged", "error"))
        parts = ", ".join(f"{s} {counts[s]}" for s in STATUS_ORDER if counts[s])
        text = f"progress: {ended} of {len(self._writer.trials)} trials ended ({parts})"
        return text + (f"; best FID so far {best['best_fid']:.2f} ({best['trial_id']})" if best else "")

    # --- life cycle ------------------------------------------------------------------------------
    def start(self, writer: ResultsWriter) -> None:
        self._writer = writer
        console = Console()
        if not console.is_terminal:
            console = Console(width=200)
        # Redraw in place on a terminal; elsewhere (CI, pipes, job logs) progress lines, and the view at the end.
        self._live = Live(self.table(), console=console, refresh_per_second=2, transient=False,
                          auto_refresh=console.is_terminal)
        self._live.start()
        self._last_progress = time.monotonic()

    def refresh(self, trial_id: str | None = None) -> None:
        if trial_id is not None and (not self._recent or self._recent[-1] != trial_id):
            self._recent.append(trial_id)
        if self._live is None:
            return
        now = time.monotonic()
        if self._live.console.is_terminal:
            if now - self._last_draw >= REDRAW_EVERY_S:
                self._last_draw = now
                self._live.update(self.table())
        elif now - self._last_progress >= PROGRESS_EVERY_S:
            self._last_progress = now
            self._live.console.print(self.progress_line(), markup=False, highlight=False)

    def stop(self) -> None:
        if self._live is not None:
            self._live.update(self.table())
            self._live.stop()
            self._live = None
