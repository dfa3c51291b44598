"""Ray Tune glue: turn a validated Sweep into Tune trials that run `gan.training_loop`.

Only `orchestrator sweep` imports this module, so `--dry-run`, validation and the
leaderboard never import (let alone start) Ray.
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from ray.tune.execution.placement_groups import PlacementGroupFactory
from ray.tune.schedulers import FIFOScheduler, ResourceChangingScheduler

from gan.config import INCEPTION, TrialConfig
from gan.data import PreparedDataset
from gan.metrics import WEIGHTS_ENV
from gan.training import training_loop
from orchestrator.devices import DeviceUnavailable, device_used, trial_device
from orchestrator.failures import LAST_GOOD_PREFIX, sentinel
from orchestrator.results import ResultsWriter, parameter_value
from orchestrator.schedulers import RETRY_KEY, STATE_FILE, ConfigASHA, TrialASHA, expected_seeds
from orchestrator.schema import Sweep, SweepError
from orchestrator.storage import SharedCheck, StorageError, check_this_node
from orchestrator.sweep_dir import SweepDir
from orchestrator.tracking import tracking_callbacks

EVAL_KEYS = (
    "kimg", "g_steps", "fid", "is_mean", "is_std", "kid_mean", "kid_std", "extractor", "fid_samples", "final",
    "loss_d", "loss_g", "images_per_s", "eval_seconds", "wall_s", "grid_path", "node", "node_ip", "data_source",
    "device_used",
)
ERROR_FILE = "error.txt"  # trials/<id>/error.txt: why a trial ended in error (Tune's traceback, or the reason)


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


def train_trial(
    config: dict[str, Any],
    *,
    sweep: Sweep,
    dataset: PreparedDataset,
    sweep_dir: str,
    shared: SharedCheck | None = None,
    inception_weights: ShippedFile | None = None,
) -> None:
    """The Tune trainable: one trial of the sweep, resumable from Tune's latest checkpoint."""
    if shared is not None:  # e.g. a node the autoscaler added after the driver's preflight
        check_this_node(shared, Path(sweep_dir))
    params = trial_params(config)
    context = tune.get_context()
    run_dir = Path(sweep_dir) / "trials" / context.get_trial_id()
    cfg: TrialConfig = sweep.trial_config(params)
    if inception_weights is not None:  # the driver's file, not whatever this node has or lacks
        cfg.eval.weights_path = str(inception_weights.on_this_node())
    torch.set_num_threads(max(1, int(sweep.resources.cpu)))
    node = {
        "node": ray.get_runtime_context().get_node_id()[:12],
        "node_ip": ray.util.get_node_ip_address(),
        "data_source": dataset.source,
    }
    metric, worst = sweep.metric.name, sentinel(sweep.metric.mode)

    gpu_share = trial_gpu_share(context)
    try:  # a GPU share means CUDA; `gpu: 0` means the CPU, whatever GPUs the node has
        cfg.train.device = trial_device(cfg.train.device, gpu_share)
    except DeviceUnavailable as exc:  # infrastructure, not the configuration: `error`, never retried
        tune.report({"kimg": 0.0, metric: worst, "error": str(exc), **node})
        return
    node["device_used"] = device_used(cfg.train.device)
    inject_oom = os.environ.get(INJECT_OOM_ENV) == "1" and 0 < gpu_share < 1

    reported = []

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if inject_oom and reported:  # tests: what a neighbour's memory does to a trial sharing its GPU
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {INJECT_OOM_ENV} on a {gpu_share:g} GPU share)")
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        # Tune copies the checkpoint into its storage before report() returns; the node-local copy
        # is then replaced by the next evaluation's.
        tune.report({**metrics, **node}, checkpoint=checkpoint)
        reported.append(metrics["kimg"])

    checkpoint = tune.get_checkpoint()
    # Each checkpoint is written once, to node-local disk, and copied once, by Tune, to its storage
    # (not written to the shared run directory and then copied again).
    with tempfile.TemporaryDirectory(prefix="gan-sweeps-checkpoint-") as local:
        local_checkpoint = Path(local) / "checkpoint"
        try:
            if checkpoint is not None:
                with checkpoint.as_directory() as resume_dir:
                    result = training_loop(cfg, run_dir, report, resume_from=resume_dir, dataset=dataset,
                                           checkpoint_dir=local_checkpoint)
            else:
                result = training_loop(cfg, run_dir, report, dataset=dataset, checkpoint_dir=local_checkpoint)
        except RuntimeError as exc:  # torch.OutOfMemoryError is one
            if not out_of_memory(exc):
                raise
            reason = f"out of memory: {exc}"[:500]
            if 0 < gpu_share < 1:
                # A neighbour on the same GPU may have taken the memory: ask the scheduler (WholeGpuAfterOom) to
                # restart this trial once on a whole GPU. Tune pauses it inside this report and restarts it
                # from the last checkpoint it persisted (this result carries none: it is not an evaluation).
                tune.report({"kimg": 0.0, metric: worst, RETRY_KEY: reason, **node})
                reason = f"{reason} (and no scheduler moved the trial to a whole GPU)"
            # On a whole GPU (or none) the same config would run out again: end the trial as 'error' now.
            tune.report({"kimg": 0.0, metric: worst, "error": reason, **node})
            return
    if result.status == "diverged":
        # The worst value for ASHA and Optuna; the last good one is kept apart, never credited as the metric.
        last = {f"{LAST_GOOD_PREFIX}{metric}": result.metrics[metric]} if metric in result.metrics else {}
        tune.report({"kimg": result.kimg, metric: worst, **last, "diverged": True, "reason": result.reason, **node})


@dataclass(frozen=True)
class ShippedFile:
    """A driver-side file shipped to the trials through Ray's object store, written once per node."""

    name: str
    digest: str
    data: bytes

    @classmethod
    def read(cls, path: Path) -> "ShippedFile":
        data = path.read_bytes()
        return cls(path.name, hashlib.sha256(data).hexdigest(), data)

    def on_this_node(self) -> Path:
        target = Path(tempfile.gettempdir()) / "gan-sweeps-shipped" / self.digest / self.name
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{self.name}.{os.getpid()}.tmp")
            tmp.write_bytes(self.data)
            os.replace(tmp, target)  # trials starting together on one node never read a partial file
        return target


def shipped_inception_weights(sweep: Sweep) -> ShippedFile | None:
    """The InceptionV3 weights the driver would use (eval.weights_path, else $GAN_INCEPTION_WEIGHTS).

    Shipped, because a worker node has neither the driver's file system nor its environment. Without
    either, each node uses its own torch.hub cache or downloads the weights (README, Metrics)."""
    if sweep.eval.extractor != INCEPTION:
        return None
    given = sweep.eval.weights_path or os.environ.get(WEIGHTS_ENV)
    if not given:
        return None
    path = Path(given).expanduser()
    if not path.is_file():
        source = "eval.weights_path" if sweep.eval.weights_path else f"${WEIGHTS_ENV}"
        raise StorageError(f"{source}={given}: InceptionV3 weights file not found")
    return ShippedFile.read(path)


# Tests set this to "1" (in the Ray workers' environment) to make every trial on a GPU share run out of memory
# at its second evaluation: the out-of-memory retry is tested on machines without a GPU.
INJECT_OOM_ENV = "GAN_SWEEPS_INJECT_SHARED_GPU_OOM"


def trial_gpu_share(context) -> float:
    """The GPUs Tune gave this trial: a fraction when it shares one, 1 after WholeGpuAfterOom moved it."""
    try:
        return float(context.get_trial_resources().required_resources.get("GPU", 0.0))
    except Exception:  # outside Tune (or an API change): nothing to retry on
        return 0.0


class WholeGpuAfterOom:
    """ResourceChangingScheduler's allocation function for sweeps with `resources.gpu` < 1: a trial whose
    result says it ran out of memory on its GPU share (RETRY_KEY) is paused and restarted from its last
    checkpoint with a whole GPU, once; Tune starts it when a GPU is free (for instance after the neighbour
    ends). Out of memory again there, it ends as `error`."""

    def __init__(self, cpu: float):
        self.cpu = cpu

    def __call__(self, tune_controller, trial, result, scheduler):
        if result.get(RETRY_KEY):
            return PlacementGroupFactory([{"CPU": self.cpu, "GPU": 1.0}])
        return None


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

    def __init__(self, sweep: Sweep, sweep_dir: str, live=None, scheduler=None):
        self.sweep = sweep
        self.sweep_dir = sweep_dir
        self.live = live
        self.scheduler = scheduler  # TrialASHA / ConfigASHA: which trials it stopped, where and why
        self.writer: ResultsWriter | None = None
        self.flags: dict[str, tuple[str, str]] = {}
        self.retried: dict[str, str] = {}  # trial -> why it was moved to a whole GPU

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
        if result.get("device_used") and not self.writer.trials[trial.trial_id].get("device_used"):
            self.writer.update_trial(trial.trial_id, device_used=result["device_used"])
        if result.get("diverged"):
            self.flags[trial.trial_id] = ("diverged", result.get("reason", ""))
            return
        if result.get(RETRY_KEY):  # not an evaluation: the trial restarts on a whole GPU (WholeGpuAfterOom)
            self.retried[trial.trial_id] = result[RETRY_KEY]
            self.writer.update_trial(trial.trial_id, reason=f"{result[RETRY_KEY]} (on a GPU share; retrying on a whole GPU)")
            self._refresh()
            return
        if result.get("error"):
            retried = self.retried.get(trial.trial_id)
            reason = f"{result['error']} (on a whole GPU, after: {retried})" if retried else result["error"]
            self.flags[trial.trial_id] = ("error", reason[:1000])
            return
        row = {
            "trial_id": trial.trial_id,
            **parameter_row(self.sweep, trial_params(trial.config)),
            **{k: result.get(k) for k in EVAL_KEYS},
            "time": now(),
        }
        self.writer.add_evaluation(row)
        self._summarise(trial)
        self._reconcile()
        self._refresh()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ensure(trial)
        status, reason = self.flags.pop(trial.trial_id, (None, ""))
        if status == "error":
            self._write_error(trial.trial_id, reason)
        stop = self.scheduler.stop_info(trial.trial_id) if hasattr(self.scheduler, "stop_info") else None
        culled = {}
        if status is None and stop is not None:
            # Stopped by ASHA (with unit config: because its configuration's mean was cut at that rung,
            # so every seed of it ends here, whatever kimg this one had reached).
            status = "stopped_early"
            culled = {"stopped_at_kimg": float(stop[0]), "stopped_metric": float(stop[1])}
        elif status is None:
            reached = self.writer.trials[trial.trial_id].get("kimg") or 0.0
            status = "completed" if reached >= self.sweep.train.kimg - 1e-9 else "stopped_early"
        if not reason and trial.trial_id in self.retried:  # shown, not hidden: it needed a GPU of its own
            reason = f"finished on a whole GPU after: {self.retried[trial.trial_id]}"[:1000]
        self._summarise(trial, status=status, reason=reason, ended=now(), **culled)
        self._reconcile()
        self._refresh()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ensure(trial)
        try:
            text = trial.get_error() or ""
        except Exception:  # a callback that raises would end the whole sweep
            text = ""
        self._write_error(trial.trial_id, text or error_reason(trial))
        self._summarise(trial, status="error", reason=error_reason(trial), ended=now())
        self._refresh()

    def _write_error(self, trial_id: str, text: str) -> None:
        """The whole reason (Tune's traceback) goes to trials/<id>/error.txt; the table keeps its last line."""
        path = Path(self.sweep_dir) / "trials" / trial_id / ERROR_FILE
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text.rstrip() + "\n")
        except OSError:
            pass  # the reason is still in trials.parquet

    def on_experiment_end(self, trials, **info):
        if self.live is not None:
            self.live.stop()

    def _reconcile(self) -> None:
        """A seed that finished its budget before its configuration was culled (ConfigASHA lets seeds that are
        ahead keep training) ends like its siblings: stopped_early at the rung where the configuration was."""
        if not hasattr(self.scheduler, "stop_info"):
            return
        for trial_id, row in list(self.writer.trials.items()):
            if row.get("status") == "completed" and row.get("stopped_at_kimg") is None:
                stop = self.scheduler.stop_info(trial_id)
                if stop is not None:
                    self.writer.update_trial(trial_id, status="stopped_early", stopped_at_kimg=float(stop[0]),
                                             stopped_metric=float(stop[1]))

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
                final_fid_samples=last.get("fid_samples") if last.get("final") else None,
                extractor=last.get("extractor"), kimg=last["kimg"], g_steps=last.get("g_steps"),
                grid_path=last.get("grid_path"),
                node=last.get("node"), data_source=last.get("data_source"), device_used=last.get("device_used"),
            )
        if trial.checkpoint is not None:
            summary["checkpoint_path"] = trial.checkpoint.path
        self.writer.update_trial(trial.trial_id, **summary, **fields)

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.refresh()


# Tuner.restore reuses the TuneConfig and RunConfig saved when the sweep started: edits of these on
# --resume would be silently ignored, so they are refused instead.
FIXED_ON_RESUME = ("max_concurrent", "max_failures")


def check_resume_settings(sweep: Sweep, sweep_dir: SweepDir) -> None:
    """Refuse a --resume whose sweep file changed a setting that Ray Tune's saved state fixes."""
    import yaml

    # sweep.yaml is the file as given when the sweep started (a --resume never rewrites it).
    started = yaml.safe_load((sweep_dir.path / "sweep.yaml").read_text()) or {}
    for key in FIXED_ON_RESUME:
        before = started.get(key, Sweep.model_fields[key].default)
        now_ = getattr(sweep, key)
        if before != now_:
            raise SweepError(
                sweep.source_path, key,
                f"{now_} differs from {before}, the value the sweep started with; --resume keeps Ray Tune's "
                f"saved setting, so set it back to {before} (or start a fresh sweep under another --results)",
            )


def build_scheduler(sweep: Sweep, sweep_dir: SweepDir):
    """FIFO, or ASHA per trial or per configuration; both ASHAs keep their rungs in the sweep directory
    so that --resume makes the decisions an uninterrupted run would."""
    s = sweep.scheduler
    if s.type != "asha":
        return FIFOScheduler()
    state_file = str(sweep_dir.path / STATE_FILE)
    if s.unit == "config":
        # A decision waits for every seed the expansion gives a configuration, created by Tune or not yet.
        expected = expected_seeds(sweep.trials()) if sweep.method != "optuna" else None
        return ConfigASHA(state_file, time_attr="kimg", max_t=s.max_t, grace_period=s.grace_period,
                          reduction_factor=s.reduction_factor, trial_params=trial_params, expected_seeds=expected)
    return TrialASHA(state_file, time_attr="kimg", max_t=s.max_t, grace_period=s.grace_period,
                     reduction_factor=s.reduction_factor)


def tune_location(sweep: Sweep, sweep_dir: SweepDir, storage: str | None) -> tuple[str, str]:
    """(storage_path, experiment name) of Tune's RunConfig: <sweep>/tune by default, else <storage>/<sweep name>."""
    if storage is None:
        return str(sweep_dir.tune_path.parent), sweep_dir.tune_path.name
    return storage, sweep.name


def build_tuner(
    sweep: Sweep,
    sweep_dir: SweepDir,
    dataset: PreparedDataset,
    *,
    resume: bool,
    live=None,
    storage: str | None = None,
    shared: SharedCheck | None = None,
):
    """`storage`: where Tune keeps its state and checkpoints (an s3:// or gs:// URI or a shared path;
    None: <sweep>/tune). `shared`: what the preflight checked, for trials to check again on their node."""
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, sweep=sweep, dataset=dataset, sweep_dir=str(sweep_dir.path),
                             shared=shared, inception_weights=shipped_inception_weights(sweep)),
        {"cpu": sweep.resources.cpu, "gpu": sweep.resources.gpu},
    )
    storage_path, experiment = tune_location(sweep, sweep_dir, storage)
    if resume:  # sweep_run checked first that the file keeps what Tune restores (check_resume_settings)
        # Tune's experiment state is pickled: restore only from the user's own results directory
        # (or the storage its sweep started with, recorded in it).
        return tune.Tuner.restore(f"{storage_path}/{experiment}", trainable, resume_unfinished=True, resume_errored=True)

    metric, mode = sweep.metric.name, sweep.metric.mode
    scheduler = build_scheduler(sweep, sweep_dir)
    search_alg = None
    if sweep.method == "optuna":
        import optuna
        from optuna.samplers import TPESampler
        from orchestrator.search import PolicyOptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the live table shows the trials
        search_alg = PolicyOptunaSearch(space=sweep.optuna_space, metric=metric, mode=mode, sampler=TPESampler(seed=sweep.search_seed))
        param_space: dict[str, Any] = {}
        num_samples = sweep.num_samples
    else:
        param_space = {"params": tune.grid_search(sweep.trials())}
        num_samples = 1
    shares_gpu = 0 < sweep.resources.gpu < 1
    tune_config = tune.TuneConfig(
        metric=metric,
        mode=mode,
        # On a shared GPU, an out-of-memory trial is moved to a whole GPU once (WholeGpuAfterOom).
        scheduler=ResourceChangingScheduler(scheduler, WholeGpuAfterOom(sweep.resources.cpu)) if shares_gpu else scheduler,
        # A new worker process per trial costs seconds; only the out-of-memory retry (a trial's actor holds its
        # GPU share, and ResourceChangingScheduler requires it) needs fresh actors.
        reuse_actors=not shares_gpu,
        search_alg=search_alg,
        num_samples=num_samples,
        max_concurrent_trials=sweep.max_concurrent,
    )
    run_config = tune.RunConfig(
        name=experiment,
        storage_path=storage_path,
        # tracking: W&B / MLflow logger callbacks (none without the section)
        callbacks=[ResultsCallback(sweep, str(sweep_dir.path), live, scheduler=scheduler),
                   *tracking_callbacks(sweep, str(sweep_dir.path))],
        failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
        # Tune saves its experiment state (what --resume restores) after every num_to_keep-th new
        # checkpoint of a trial, otherwise at most every 10 s. With 1, that state names each trial's
        # newest checkpoint: after a killed driver, --resume re-runs no finished trial and repeats
        # at most the one evaluation that was in flight.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        verbose=0,
    )
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


# How long a cluster's GCS port may take to accept a connection before the sweep gives up.
RAY_CONNECT_TIMEOUT_S = 5.0


class RayUnreachable(ConnectionError):
    """Nothing answers at the Ray address a sweep was told to join."""


def _host_port(address: str) -> tuple[str, int] | None:
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    return (host.strip("[]"), int(port)) if sep and host and port.isdigit() else None


def check_ray_address(address: str) -> None:
    """Fail in seconds, naming the address, where ray.init would retry a dead cluster's GCS for a minute.

    `auto` is resolved as ray.init resolves it: RAY_ADDRESS if set, else the address the last `ray start`
    on this machine left in Ray's temp dir. Ray's last resort for `auto`, any GCS process `ps` shows, is
    refused here: on a shared machine that is someone else's local Ray.
    """
    target, origin = address, "--address"
    if address == "auto":
        from ray._common.utils import get_ray_address_file  # Ray 2.60's own location of that file

        target, origin = os.environ.get("RAY_ADDRESS", ""), "RAY_ADDRESS"
        if not target:
            origin = get_ray_address_file(None)
            try:
                target = Path(origin).read_text().strip()
            except OSError:
                target = ""
            if not target:
                raise RayUnreachable(f"no Ray cluster to join: RAY_ADDRESS is unset and no `ray start` left an address in {origin}")
    hostport = _host_port(target)
    if hostport is None:
        return  # not host:port: ray.init names the problem itself
    try:
        socket.create_connection(hostport, timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise RayUnreachable(f"nothing answers at {target} (from {origin}): {exc.strerror or exc}") from None


def start_ray(address: str | None, dashboard_host: str = "127.0.0.1"):
    """Join `address` (e.g. 'auto') or start a local Ray whose dashboard listens on localhost only.

    Without an address Ray is always started afresh, whatever RAY_ADDRESS says (ray.init only reads it
    for no address or 'auto') and whatever a former `ray start` left in Ray's temp dir."""
    if address is not None:
        check_ray_address(address)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # A failed trial's traceback goes to trials/<id>/error.txt, not the terminal: the sweep's closing lines
    # name each errored trial and its file.
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    # Each evaluation checkpoints; Tune's advice to checkpoint less is noise for GAN sweeps.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address is None:
        kwargs.update(include_dashboard=True, dashboard_host=dashboard_host)
    # "local" always starts a fresh Ray: never the stale or foreign cluster a former `ray start` left
    # in Ray's temp dir (which ray.init() with no address would join).
    context = ray.init(address=address if address is not None else "local", **kwargs)
    url = context.dashboard_url
    return f"http://{url}" if url and not url.startswith("http") else url
