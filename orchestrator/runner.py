"""Ray Tune glue: turn a validated Sweep into Tune trials that run `gan.training_loop`.

Only `orchestrator sweep` imports this module, so `--dry-run`, validation and the
leaderboard never import (let alone start) Ray.
"""
from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from gan.config import TrialConfig
from gan.data import PreparedDataset
from gan.training import training_loop
from orchestrator.results import ResultsWriter, parameter_value
from orchestrator.schema import Sweep
from orchestrator.sweep_dir import SweepDir

# What the scheduler and search see for a trial that diverged before its first evaluation:
# finite (Optuna and ASHA reject NaN) and worse than any real FID.
DIVERGED_BEFORE_FIRST_EVAL_FID = 1.0e6
EVAL_KEYS = (
    "kimg", "fid", "is_mean", "is_std", "kid_mean", "kid_std", "extractor", "fid_samples", "final",
    "loss_d", "loss_g", "images_per_s", "eval_seconds", "wall_s", "grid_path", "node", "node_ip", "data_source",
)


def now() -> datetime:
    return datetime.now(timezone.utc)


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """Grid/random trials carry their parameters under 'params'; Optuna's are the config itself."""
    return dict(config["params"]) if "params" in config else dict(config)


def parameter_columns(sweep: Sweep) -> list[str]:
    """Every swept parameter, plus the three every leaderboard needs, as Parquet columns."""
    return sorted(set(sweep.parameters) | {"variant", "g_widths", "seed"})


def parameter_row(sweep: Sweep, params: dict[str, Any]) -> dict[str, Any]:
    """A trial's parameter columns; a conditional parameter that does not apply is null."""
    cfg = sweep.trial_config(params)
    row = {}
    for name in parameter_columns(sweep):
        if name in sweep.parameters:
            value = params.get(name)
        else:
            value = getattr(cfg.model, name) if hasattr(cfg.model, name) else getattr(cfg.train, name)
        row[name] = parameter_value(value)
    return row


def train_trial(config: dict[str, Any], *, sweep: Sweep, dataset: PreparedDataset, sweep_dir: str) -> None:
    """The Tune trainable: one trial of the sweep, resumable from Tune's latest checkpoint."""
    params = trial_params(config)
    context = tune.get_context()
    run_dir = Path(sweep_dir) / "trials" / context.get_trial_id()
    cfg: TrialConfig = sweep.trial_config(params)
    torch.set_num_threads(max(1, int(sweep.resources.cpu)))
    node = {
        "node": ray.get_runtime_context().get_node_id()[:12],
        "node_ip": ray.util.get_node_ip_address(),
        "data_source": dataset.source,
    }

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report({**metrics, **node}, checkpoint=checkpoint)

    checkpoint = tune.get_checkpoint()
    try:
        if checkpoint is not None:
            with checkpoint.as_directory() as resume_dir:
                result = training_loop(cfg, run_dir, report, resume_from=resume_dir, dataset=dataset)
        else:
            result = training_loop(cfg, run_dir, report, dataset=dataset)
    except RuntimeError as exc:  # torch.OutOfMemoryError is one
        if not out_of_memory(exc):
            raise
        # Retrying the same config would run out again: end the trial as 'error' now.
        tune.report({"kimg": 0.0, "fid": DIVERGED_BEFORE_FIRST_EVAL_FID, "error": f"out of memory: {exc}"[:500]})
        return
    if result.status == "diverged":
        last_fid = result.metrics.get("fid", DIVERGED_BEFORE_FIRST_EVAL_FID)
        tune.report({"kimg": result.kimg, "fid": last_fid, "diverged": True, "reason": result.reason, **node})


def out_of_memory(exc: BaseException) -> bool:
    """A GPU out-of-memory error, or torch's CPU allocator failing (a plain RuntimeError)."""
    return isinstance(exc, torch.OutOfMemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(exc)


def error_reason(trial) -> str:
    """The last line of the trial's latest error (Tune keeps every failure's trace in its error.txt)."""
    try:
        lines = (trial.get_error() or "").strip().splitlines()
    except Exception:  # a callback that raises would end the whole sweep; the reason is not worth that
        lines = []
    return lines[-1][:500] if lines else "trial raised an error (see error.txt in its Tune directory)"


class ResultsCallback(tune.Callback):
    """Driver-side Tune callback that turns results into the Parquet tables.

    The writer is built in `setup`, so a restored experiment (whose callbacks Tune
    unpickles) re-reads the tables already on disk instead of a stale copy."""

    def __init__(self, sweep: Sweep, sweep_dir: str, live=None):
        self.sweep = sweep
        self.sweep_dir = sweep_dir
        self.live = live
        self.writer: ResultsWriter | None = None
        self.flags: dict[str, tuple[str, str]] = {}

    def setup(self, **info):
        self.writer = ResultsWriter(Path(self.sweep_dir), self.sweep.name, parameter_columns(self.sweep))
        if self.live is not None:
            self.live.start(self.writer)

    def _ensure(self, trial) -> None:
        if trial.trial_id not in self.writer.trials:
            self.writer.update_trial(
                trial.trial_id,
                **parameter_row(self.sweep, trial_params(trial.config)),
                status="pending",
                kimg=0.0,
                evaluations=0,
                kimg_budget=float(self.sweep.train.kimg),
                run_dir=str(Path(self.sweep_dir) / "trials" / trial.trial_id),
            )

    def on_trial_start(self, iteration, trials, trial, **info):
        self._ensure(trial)
        row = self.writer.trials[trial.trial_id]
        self.writer.update_trial(trial.trial_id, status="running", started=row.get("started") or now())
        self._refresh()

    def on_trial_restore(self, iteration, trials, trial, **info):
        self.on_trial_start(iteration, trials, trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._ensure(trial)
        if result.get("diverged"):
            self.flags[trial.trial_id] = ("diverged", result.get("reason", ""))
            return
        if result.get("error"):
            self.flags[trial.trial_id] = ("error", result["error"])
            return
        row = {
            "trial_id": trial.trial_id,
            **parameter_row(self.sweep, trial_params(trial.config)),
            **{k: result.get(k) for k in EVAL_KEYS},
            "time": now(),
        }
        self.writer.add_evaluation(row)
        self._summarise(trial)
        self._refresh()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ensure(trial)
        status, reason = self.flags.pop(trial.trial_id, (None, ""))
        if status is None:
            reached = self.writer.trials[trial.trial_id].get("kimg") or 0.0
            status = "completed" if reached >= self.sweep.train.kimg - 1e-9 else "stopped_early"
        self._summarise(trial, status=status, reason=reason, ended=now())
        self._refresh()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ensure(trial)
        self._summarise(trial, status="error", reason=error_reason(trial), ended=now())
        self._refresh()

    def on_experiment_end(self, trials, **info):
        if self.live is not None:
            self.live.stop()

    def _summarise(self, trial, **fields) -> None:
        evals = self.writer.trial_evaluations(trial.trial_id)
        summary: dict[str, Any] = {"evaluations": len(evals)}
        if evals:
            best = min(evals, key=lambda r: r["fid"])
            last = evals[-1]
            is_values = [r["is_mean"] for r in evals if r.get("is_mean") is not None]
            summary.update(
                best_fid=best["fid"], best_fid_kimg=best["kimg"], best_is=max(is_values, default=None),
                final_fid=last["fid"] if last.get("final") else None,
                final_is=last.get("is_mean") if last.get("final") else None,
                extractor=last.get("extractor"), kimg=last["kimg"], grid_path=last.get("grid_path"),
                node=last.get("node"), data_source=last.get("data_source"),
            )
        if trial.checkpoint is not None:
            summary["checkpoint_path"] = trial.checkpoint.path
        self.writer.update_trial(trial.trial_id, **summary, **fields)

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.refresh()


def build_tuner(sweep: Sweep, sweep_dir: SweepDir, dataset: PreparedDataset, *, resume: bool, live=None):
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, sweep=sweep, dataset=dataset, sweep_dir=str(sweep_dir.path)),
        {"cpu": sweep.resources.cpu, "gpu": sweep.resources.gpu},
    )
    if resume:
        # Tune's experiment state is pickled: restore only from the user's own results directory.
        return tune.Tuner.restore(str(sweep_dir.tune_path), trainable, resume_unfinished=True, resume_errored=True)

    metric, mode = sweep.metric.name, ("min" if sweep.metric.goal == "minimize" else "max")
    if sweep.scheduler.type == "asha":
        scheduler = ASHAScheduler(
            time_attr="kimg",
            max_t=sweep.scheduler.max_t,
            grace_period=sweep.scheduler.grace_period,
            reduction_factor=sweep.scheduler.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    search_alg = None
    if sweep.method == "optuna":
        import optuna
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the live table shows the trials
        search_alg = OptunaSearch(space=sweep.optuna_space, metric=metric, mode=mode, sampler=TPESampler(seed=sweep.search_seed))
        param_space: dict[str, Any] = {}
        num_samples = sweep.num_samples
    else:
        param_space = {"params": tune.grid_search(sweep.trials())}
        num_samples = 1
    tune_config = tune.TuneConfig(
        metric=metric,
        mode=mode,
        scheduler=scheduler,
        search_alg=search_alg,
        num_samples=num_samples,
        max_concurrent_trials=sweep.max_concurrent,
    )
    run_config = tune.RunConfig(
        name=sweep_dir.tune_path.name,
        storage_path=str(sweep_dir.tune_path.parent),
        callbacks=[ResultsCallback(sweep, str(sweep_dir.path), live)],
        failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
        # Tune saves its experiment state (what --resume restores) after every num_to_keep-th new
        # checkpoint of a trial, otherwise at most every 10 s. With 1, that state names each trial's
        # newest checkpoint: after a killed driver, --resume re-runs no finished trial and repeats
        # at most the one evaluation that was in flight.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        verbose=0,
    )
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


def start_ray(address: str | None, dashboard_host: str = "127.0.0.1"):
    """Join `address` (e.g. 'auto') or start a local Ray whose dashboard listens on localhost only."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Each evaluation checkpoints; Tune's advice to checkpoint less is noise for GAN sweeps.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address is None:
        kwargs.update(include_dashboard=True, dashboard_host=dashboard_host)
    context = ray.init(address=address, **kwargs)
    url = context.dashboard_url
    return f"http://{url}" if url and not url.startswith("http") else url
