"""The Tune trainable: one trial of a sweep, resumable from Tune's latest checkpoint, under the failure
policy (a diverged trial reports the sentinel, an infrastructure error is reported as `error`, never retried
as a crash) and device truth (orchestrator.run.devices).

Also what a trial needs from the driver (the InceptionV3 weights) and the out-of-memory retry on a whole GPU.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from ray.tune.execution.placement_groups import PlacementGroupFactory

from gan.config import INCEPTION, TrialConfig
from gan.data import PreparedDataset
from gan.metrics import WEIGHTS_ENV
from gan.training import training_loop
from orchestrator.run.devices import DeviceUnavailable, device_used, trial_device
from orchestrator.run.storage import STORAGE_FAILED_KEY, SharedCheck, StorageError, problem_here
from orchestrator.run.tune_config import trial_params
from orchestrator.run.watchdog import HangWatch, run_watched
from orchestrator.store.failures import LAST_GOOD_PREFIX, RETRY_KEY, sentinel
from orchestrator.store.provenance import environment
from orchestrator.sweepfile.sections import DEFAULT_HANG_TIMEOUT_MIN, Sweep


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

    problem = problem_here(shared, Path(sweep_dir)) if shared is not None else None
    if problem:  # e.g. a node the autoscaler added after the driver's preflight, without the mount
        # Not this trial's fault, and the same on every retry: the driver stops the whole sweep (resumable, this
        # trial included) when it sees this result. Tune then ends this worker inside the second report (an
        # exception here would be an unhandled error in the driver); it returns only if nothing stopped the sweep.
        for _ in range(2):
            tune.report({"kimg": 0.0, metric: worst, "error": problem, STORAGE_FAILED_KEY: problem, **node})
        raise StorageError(problem)

    gpu_share = trial_gpu_share(context)
    try:  # a GPU share means CUDA; `gpu: 0` means the CPU, whatever GPUs the node has
        cfg.train.device = trial_device(cfg.train.device, gpu_share)
    except DeviceUnavailable as exc:  # infrastructure, not the configuration: `error`, never retried
        tune.report({"kimg": 0.0, metric: worst, "error": str(exc), **node})
        return
    node["device_used"] = device_used(cfg.train.device)
    versions = environment()  # provenance: the callback records each node's versions once
    inject_oom = os.environ.get(INJECT_OOM_ENV) == "1" and 0 < gpu_share < 1
    inject_hang = float(os.environ.get(INJECT_HANG_ENV) or 0)

    reported = []
    watch = HangWatch(getattr(sweep, "hang_timeout_min", DEFAULT_HANG_TIMEOUT_MIN))

    def send(result: dict[str, Any], checkpoint: tune.Checkpoint | None = None) -> None:
        """tune.report from the training thread, under the hang watchdog."""
        with watch.reporting():
            tune.report(result, checkpoint=checkpoint)

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if inject_hang and not reported:  # tests: a trial stuck before its first report (a hard NFS mount, say)
            time.sleep(inject_hang)
        if inject_oom and reported:  # tests: what a neighbour's memory does to a trial sharing its GPU
            raise torch.OutOfMemoryError(
                f"CUDA out of memory (injected by {INJECT_OOM_ENV} on a {gpu_share:g} GPU share)"
            )
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        # Tune copies the checkpoint into its storage before report() returns; the node-local copy
        # is then replaced by the next evaluation's.
        first = {} if reported else {"node_versions": versions}
        send({**metrics, **node, **first}, checkpoint=checkpoint)
        reported.append(metrics["kimg"])

    checkpoint = tune.get_checkpoint()

    def train() -> None:
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
                    # A neighbour on the same GPU may have taken the memory: ask the scheduler (WholeGpuAfterOom)
                    # to restart this trial once on a whole GPU. Tune pauses it inside this report and restarts it
                    # from the last checkpoint it persisted (this result carries none: it is not an evaluation).
                    send({"kimg": 0.0, metric: worst, RETRY_KEY: reason, **node})
                    reason = f"{reason} (and no scheduler moved the trial to a whole GPU)"
                # On a whole GPU (or none) the same config would run out again: end the trial as 'error' now.
                send({"kimg": 0.0, metric: worst, "error": reason, **node})
                return
        if result.status == "diverged":
            # The worst value for ASHA and Optuna; the last good one is kept apart, never credited as the metric.
            last = {f"{LAST_GOOD_PREFIX}{metric}": result.metrics[metric]} if metric in result.metrics else {}
            send({"kimg": result.kimg, metric: worst, **last, "diverged": True, "reason": result.reason, **node})

    hung = run_watched(train, watch)  # the training thread's exception is raised here, for Tune
    if hung:  # `error`, never retried; the stuck thread is left behind and can report nothing more
        tune.report({"kimg": reported[-1] if reported else 0.0, metric: worst, "error": hung, **node})


@dataclass(frozen=True)
class ShippedFile:
    """A driver-side file shipped to the trials through Ray's object store, written once per node."""

    name: str
    digest: str
    data: bytes

    @classmethod
    def read(cls, path: Path) -> ShippedFile:
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
# Tests set this to a number of seconds (in the Ray workers' environment): every trial sleeps that long before its
# first report, as if stuck; the hang watchdog is tested without a stuck file system.
INJECT_HANG_ENV = "GAN_SWEEPS_INJECT_HANG_S"


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
