"""`orchestrator sweep`: prepare data once, claim the results directory, run Tune."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console

from gan.data import prepare_dataset
from orchestrator.live import LiveView
from orchestrator.schema import Sweep
from orchestrator.sweep_dir import SweepDir


def run_sweep(sweep: Sweep, results: Path, *, address: str | None, resume: bool, console: Console) -> Path:
    # Built once per sweep (trials receive it through Ray's object store), and before the results
    # directory is claimed: a folder without usable images leaves no half-made sweep behind.
    dataset = prepare_dataset(sweep.trial_config({}).data)
    sweep_dir = SweepDir.claim(sweep, results, resume=resume)
    try:
        from orchestrator.runner import build_tuner, parameter_columns, start_ray  # Ray: once the directory is ours

        summary = dataset.summary()
        if dataset.source == "synthetic":
            console.print(
                f"[yellow]data:[/] no dataset given: using {summary['images_kept']} procedurally generated "
                "faces (pass --data DIR for real images)"
            )
        else:
            console.print(f"data: {dataset.source}: {summary}")
        dashboard = start_ray(address)
        console.print(f"Ray dashboard: {dashboard}" if dashboard else "Ray dashboard: not available")
        console.print(f"results: {sweep_dir.path}")
        live = LiveView(f"sweep {sweep.name}", [c for c in parameter_columns(sweep) if c != "g_widths"] + ["g_widths"])
        tuner = build_tuner(sweep, sweep_dir, dataset, resume=resume, live=live)
        tuner.fit()
        console.print()
        console.print(
            f"done: {sweep_dir.path / 'trials.parquet'}; rank with "
            f"`orchestrator leaderboard --results {results} --sweep {sweep.name}`"
        )
        return sweep_dir.path
    finally:
        sweep_dir.release()
