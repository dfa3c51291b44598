"""`orchestrator train`: one trial of a sweep, in this process, without Ray.

Trial N is the one `orchestrator sweep FILE --dry-run` numbers N, and it trains with exactly the config it
gets under Ray Tune (`Sweep.trial_config`), after the `--set` overrides edited the file. It writes the run
directory a Tune trial writes (options.json, stats.jsonl, grids/) plus the loop's own checkpoint/ (a Tune
trial's checkpoint goes to Tune's storage instead), and `--resume` continues from that checkpoint.

Nothing here imports Ray (nor orchestrator.run.tuner / orchestrator.workflow.sweep): the module runs where only
torch is.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch.optim.optimizer import register_optimizer_step_post_hook

from gan.config import TrialConfig, optimiser_settings
from gan.data import prepare_dataset
from gan.training import CHECKPOINT_FILE, training_loop
from orchestrator.sweepfile.errors import SweepError
from orchestrator.sweepfile.loading import load_sweep
from orchestrator.sweepfile.overrides import parse_sets

# What --set may change; a single trial runs no scheduler, and metric only steers the scheduler/search.
SETTABLE = ("data", "model", "train", "eval", "resources")
# What a run leaves in its directory before its first evaluation (a rerun may start over it).
BEFORE_FIRST_EVALUATION = ("options.json", "grids")
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
# Settings a resumed run may change: where it trains (the checkpoint loads onto any device).
RESUMABLE_CHANGES = {("train", "device")}


class TrainError(ValueError):
    """A problem with the run directory, --resume or --device; str() is one line."""


class TrainInterrupted(Exception):
    """Ctrl-C; str() says where the checkpoint is and the command that continues the run."""


@dataclass
class TrainOutcome:
    status: str  # completed | diverged
    kimg: float
    metrics: dict[str, Any]  # the last evaluation's (the last good one when diverged); {} if none
    run_dir: Path
    reason: str = ""
    already: bool = False  # --resume of a run that had reached its budget: nothing trained

    def summary(self) -> str:
        m = self.metrics
        if self.status == "completed":
            fid = (
                f"final FID {m['fid']:.4f} ({m.get('fid_samples')} samples, {m.get('extractor')})"
                if m.get("final")
                else "no final FID"
            )
            already = " (already: nothing left to train)" if self.already else ""
            return f"completed{already}: {self.kimg:g} kimg, {fid}; run dir {self.run_dir}"
        last = f"last FID {m['fid']:.4f} at {m['kimg']:g} kimg" if m else "no evaluation before it"
        return f"diverged ({self.reason}) at {self.kimg:g} kimg: no final FID, {last}; run dir {self.run_dir}"


def train_one(
    file: str | Path,
    trial: int,
    *,
    data: str | None = None,
    sets: Sequence[str] = (),
    out: str | Path | None = None,
    resume: bool = False,
    device: str | None = None,
    console: Console | None = None,
) -> TrainOutcome:
    """Train trial `trial` of the sweep `file` to its budget (or its divergence) in this process.

    Raises SweepError (the file, --trial, --set), TrainError (the run directory, --resume, --device),
    DataError, and TrainInterrupted on Ctrl-C.
    """
    console = console or Console()
    file = str(file)
    overrides = parse_sets(file, sets, SETTABLE)
    if device is not None and not DEVICE.fullmatch(device):
        raise TrainError(f"--device {device}: must be auto, cpu, cuda or cuda:N")
    as_given = load_sweep(file, data_override=data)  # the sweep as `orchestrator sweep` would run it
    if as_given.method == "optuna":
        raise SweepError(
            file,
            "--trial",
            "method optuna proposes its trials while the sweep runs, so there are no "
            "numbered trials to pick; use a grid or random sweep",
        )
    count = len(as_given.trials())
    if not 0 <= trial < count:
        raise SweepError(
            file,
            "--trial",
            f"{trial} is out of range: valid 0..{count - 1} ({count} trials, numbered "
            "as by `orchestrator sweep FILE --dry-run`)",
        )
    # The overrides; and FIFO, so that e.g. a smaller train.kimg needs no matching scheduler.max_t.
    sweep = load_sweep(file, data_override=data, overrides={**overrides, "scheduler": {"type": "fifo"}})
    params = sweep.trials()[trial]
    cfg: TrialConfig = sweep.trial_config(params)  # what runner.train_trial trains under Tune
    if device is not None:
        cfg.train.device = device
    check_device(cfg.train.device, "--device" if device is not None else "train.device")
    if cfg.train.device == "auto":  # recorded as it resolved (a sweep's trial records its device the same way)
        cfg.train.device = "cuda" if torch.cuda.is_available() else "cpu"

    run_dir = Path(out) if out is not None else Path("runs") / sweep.name / f"trial-{trial}"
    checkpoint = run_dir / "checkpoint"
    if resume:
        start: dict[str, Any] | None = resume_point(run_dir, cfg)
    else:
        check_fresh(run_dir)
        start = None
    budget = int(round(cfg.train.kimg * 1000))
    if start is not None and start["images_shown"] >= budget:
        return TrainOutcome("completed", start["images_shown"] / 1000, start["last_metrics"], run_dir, already=True)

    def again(resuming: bool) -> str:
        words = ["orchestrator", "train", file, "--trial", str(trial)]
        for flag, values in (("--data", [data]), ("--set", list(sets)), ("--out", [out]), ("--device", [device])):
            words += [w for v in values if v is not None for w in (flag, str(v))]
        return shlex.join(words + (["--resume"] if resuming else []))

    torch.set_num_threads(max(1, int(sweep.resources.cpu)))  # as train_trial does: same threads, same numbers
    shown = ", ".join(f"{k}={v}" for k, v in params.items())
    console.print(
        escape(
            f"trial {trial} of {sweep.name} ({shown or 'no swept parameters'}; seed {cfg.train.seed}, "
            f"{cfg.train.kimg:g} kimg, device {cfg.train.device}) -> {run_dir}"
        )
    )
    progress = TrialProgress(console, f"trial {trial}", cfg, start)
    try:
        dataset = prepare_dataset(cfg.data)
        if dataset.source == "synthetic":
            console.print(
                f"[yellow]data:[/] no dataset given: using {dataset.summary()['images_kept']} procedurally "
                "generated faces (pass --data DIR for real images)"
            )
        else:
            console.print(escape(f"data: {dataset.source}"))
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrainError(f"--out {run_dir}: cannot create it: {e.strerror or e}") from None
        if start is not None:
            console.print(escape(f"resuming from {checkpoint} at {start['images_shown'] / 1000:g} kimg"))
        with progress:
            result = training_loop(
                cfg,
                run_dir.resolve(),
                progress.report,
                resume_from=checkpoint if start is not None else None,
                dataset=dataset,
            )
    except KeyboardInterrupt:
        at = f"at {progress.images / 1000:g} kimg"
        if progress.checkpoint_kimg is None:
            raise TrainInterrupted(
                f"{at}, before the first evaluation (no checkpoint); start again with: {again(False)}"
            ) from None
        raise TrainInterrupted(
            f"{at}; checkpoint of {progress.checkpoint_kimg:g} kimg in {checkpoint}; continue with: {again(True)}"
        ) from None
    return TrainOutcome(result.status, result.kimg, result.metrics, run_dir, reason=result.reason)


def check_device(device: str, origin: str) -> None:
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise TrainError(f"{origin} {device}: CUDA is not available on this machine (use cpu or auto)")
    index, count = int(device.partition(":")[2] or 0), torch.cuda.device_count()
    if index >= count:
        raise TrainError(f"{origin} {device}: this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}")


def check_fresh(run_dir: Path) -> None:
    """Refuse a run directory that holds an earlier run (never overwrite it, nor append to its stats)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainError(f"--out {run_dir}: exists and is not a directory")
    if (run_dir / "checkpoint").exists():
        raise TrainError(
            f"{run_dir} holds the checkpoint of an earlier run: pass --resume to continue it, or choose another --out"
        )
    if run_dir.is_dir():
        left = sorted(
            p.name
            for p in run_dir.iterdir()
            if p.name not in BEFORE_FIRST_EVALUATION or (p.is_dir() and any(p.iterdir()))
        )
        if left:
            raise TrainError(f"{run_dir} is not empty ({', '.join(left)}): choose another --out, or delete it")


def resume_point(run_dir: Path, cfg: TrialConfig) -> dict[str, Any]:
    """The loop state saved in run_dir/checkpoint, after checking it belongs to this trial's config.
    stats.jsonl loses any row past the checkpoint (an evaluation interrupted while it was saved)."""
    file = run_dir / "checkpoint" / CHECKPOINT_FILE
    if not file.is_file():
        raise TrainError(
            f"--resume: no checkpoint in {run_dir / 'checkpoint'} (run without --resume to start "
            "the trial, or give the --out of the run to continue)"
        )
    payload = torch.load(file, map_location="cpu", weights_only=True)
    saved, now = json.loads(payload["config"]), json.loads(json.dumps(cfg.to_dict()))
    for section, values in now.items():
        for key, value in values.items():
            before = saved.get(section, {}).get(key)
            if before != value and (section, key) not in RESUMABLE_CHANGES:
                raise TrainError(
                    f"--resume: the checkpoint in {run_dir / 'checkpoint'} was trained with "
                    f"{section}.{key}={json.dumps(before)}, this run has {json.dumps(value)}: pass the "
                    "same --data and --set as the run it continues"
                )
    state = json.loads(payload["state"])
    stats = run_dir / "stats.jsonl"
    if stats.is_file():
        lines = stats.read_text().splitlines()
        kept = [line for line in lines if _row_kimg(line) * 1000 <= state["images_shown"] + 1e-6]
        if len(kept) != len(lines):
            tmp = stats.with_name(f".stats.jsonl.{os.getpid()}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, stats)
    return state


def _row_kimg(line: str) -> float:
    """The kimg of a stats.jsonl row; infinite for a row cut short while it was written."""
    try:
        return float(json.loads(line)["kimg"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


class TrialProgress:
    """A rich progress bar of one trial: kimg done/total, img/s, latest FID.

    Set from each evaluation's report. Between evaluations it follows the optimiser steps (torch's global
    step hook: each training iteration steps D d_steps times and G once, one batch per D step); that is
    display only (a CUDA-graph replay runs no Python step, so the bar then moves at evaluations alone)."""

    def __init__(self, console: Console, title: str, cfg: TrialConfig, start: dict[str, Any] | None):
        d_steps = optimiser_settings(cfg.model.variant, cfg.train)["d_steps"]
        self.images_per_step = cfg.train.batch_size * d_steps / (d_steps + 1)
        self.budget = int(round(cfg.train.kimg * 1000))
        self.base = start["images_shown"] if start else 0  # images at the last evaluation (or the resume)
        self.images = self.base
        self.checkpoint_kimg: float | None = self.base / 1000 if start else None
        last = (start or {}).get("last_metrics") or {}
        self.fid = f"{last['fid']:.2f} @ {last['kimg']:g}" if last else "-"
        self.steps = 0
        self.window = (time.perf_counter(), self.base)  # rate over the last seconds of training
        self.speed = "- img/s"
        self.last_update = 0.0
        self.console = console
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[kimg]} kimg"),
            TextColumn("{task.fields[speed]}"),
            TextColumn("FID {task.fields[fid]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self.task = self.bar.add_task(
            title, total=self.budget, completed=self.base, kimg=self.kimg_text(), speed=self.speed, fid=self.fid
        )
        self.hook = None

    def kimg_text(self) -> str:
        return f"{self.images / 1000:.3f}/{self.budget / 1000:g}"

    def __enter__(self) -> TrialProgress:
        self.bar.start()
        self.hook = register_optimizer_step_post_hook(self.on_step)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.hook is not None:
            self.hook.remove()
        self.bar.stop()

    def on_step(self, optimizer, args, kwargs) -> None:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return  # recording a CUDA graph trains nothing
        self.steps += 1
        self.images = self.base + int(self.steps * self.images_per_step)
        now = time.perf_counter()
        if now - self.window[0] >= 2.0:
            self.speed = f"{(self.images - self.window[1]) / (now - self.window[0]):,.0f} img/s"
            self.window = (now, self.images)
        if now - self.last_update >= 0.1:
            self.last_update = now
            self.bar.update(self.task, completed=min(self.images, self.budget), kimg=self.kimg_text(), speed=self.speed)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        """training_loop's callback, after each evaluation (its checkpoint already saved)."""
        self.base = self.images = int(round(metrics["kimg"] * 1000))
        self.steps = 0
        self.checkpoint_kimg = metrics["kimg"] if checkpoint_dir else self.checkpoint_kimg
        self.fid = f"{metrics['fid']:.2f} @ {metrics['kimg']:g}"
        self.speed = f"{metrics.get('images_per_s', 0):,.0f} img/s"
        self.window = (time.perf_counter(), self.images)  # the evaluation's time is not training speed
        self.bar.update(
            self.task, completed=min(self.images, self.budget), kimg=self.kimg_text(), speed=self.speed, fid=self.fid
        )
        final = "final " if metrics.get("final") else ""
        self.bar.console.print(
            f"kimg {metrics['kimg']:g}: {final}FID {metrics['fid']:.4f} "
            f"({metrics.get('fid_samples')} samples), {self.speed}"
        )
