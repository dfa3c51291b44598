"""The live terminal view of a running sweep (a rich table redrawn as results arrive)."""
from __future__ import annotations

from rich.console import Console
from rich.live import Live
from rich.table import Table

from orchestrator.results import ResultsWriter

STATUS_STYLE = {
    "running": "cyan", "completed": "green", "stopped_early": "yellow", "diverged": "magenta", "error": "red",
}


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

    def __getstate__(self):  # Tune pickles its callbacks; a running Live holds a thread
        return {"title": self.title, "columns": self.columns, "_live": None, "_writer": None}

    def table(self) -> Table:
        table = Table(title=self.title, title_justify="left")
        for name in ["trial", *self.columns, "status", "kimg", "fid", "best fid"]:
            table.add_column(name, justify="right" if name in ("kimg", "fid", "best fid") else "left")
        for row in sorted(self._writer.trials.values(), key=lambda r: r["trial_id"]):
            evals = self._writer.trial_evaluations(row["trial_id"])
            latest = evals[-1]["fid"] if evals else None
            status = row.get("status", "pending")
            table.add_row(
                row["trial_id"],
                *[_param(row.get(c)) for c in self.columns],
                f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]",
                _fmt(row.get("kimg"), ".1f"),
                _fmt(latest),
                _fmt(row.get("best_fid")),
            )
        return table

    def start(self, writer: ResultsWriter) -> None:
        self._writer = writer
        console = Console()
        if not console.is_terminal:
            console = Console(width=200)
        # Redraw in place on a terminal; elsewhere (CI, pipes) print once at the end.
        self._live = Live(self.table(), console=console, refresh_per_second=2, transient=False,
                          auto_refresh=console.is_terminal)
        self._live.start()

    def refresh(self) -> None:
        if self._live is not None and self._live.console.is_terminal:
            self._live.update(self.table())

    def stop(self) -> None:
        if self._live is not None:
            self._live.update(self.table())
            self._live.stop()
            self._live = None
