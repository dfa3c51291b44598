"""Experiment trackers while a sweep runs: the logger callbacks of a sweep's
`tracking:` section (orchestrator.sweepfile.tracking), and a check of each tracker before Ray starts."""
from __future__ import annotations

from orchestrator.sweepfile.errors import SweepError


def tracking_callbacks(sweep, sweep_dir: str | None = None) -> list:
    """Ray Tune logger callbacks for the sweep's `tracking:` section; none without it (imports nothing then).
    `sweep_dir`: the results directory of the sweep (W&B keeps its local files in <sweep_dir>/wandb)."""
    if sweep.tracking is None or not sweep.tracking.enabled():
        return []
    from orchestrator.run import tracking_loggers  # the trackers

    return [tracking_loggers.LOGGERS[name](sweep, getattr(sweep.tracking, name), sweep_dir)
            for name in sweep.tracking.enabled()]


def check_trackers(sweep) -> None:
    """Set each tracker up once in the driver before Ray starts and the results directory is claimed, so a
    missing W&B API key or an MLflow store that refuses its URI is one line, not a traceback from Tune."""
    for name, callback in zip(
        sweep.tracking.enabled() if sweep.tracking else [], tracking_callbacks(sweep), strict=True
    ):
        try:
            callback.setup()
        except Exception as exc:  # whatever the tracker raises, said in one line
            message = str(exc).strip() or type(exc).__name__
            if name == "wandb" and "API key" in message:
                message = (
                    "no W&B API key: run `wandb login` or set WANDB_API_KEY (or log offline: mode: offline "
                    "in the file, or WANDB_MODE=offline)"
                )
            raise SweepError(sweep.source_path, f"tracking.{name}", message) from None
