"""Ray Tune's W&B and MLflow logger callbacks, with what a GAN sweep needs on top (see orchestrator.sweepfile.tracking).

Both log each trial's flat parameters (`logged_params`), every evaluation's numeric results (fid, kimg,
losses, IS/KID, g_steps, ...; strings such as grid_path are skipped by Ray's loggers) and the evaluation's
sample grid: a W&B image `grid`, an MLflow artifact under `grids/`. They run in the driver, which reads the
grid from the results directory every node shares.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any
from unittest import mock

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.air.integrations.wandb import WandbLoggerCallback
from ray.tune.result import TIMESTEPS_TOTAL, TRAINING_ITERATION
from ray.tune.utils import flatten_dict

from orchestrator.run.tracked import logged_params, tracked_result
from orchestrator.run.tune_config import trial_params
from orchestrator.sweepfile.tracking import MlflowTracking, WandbTracking


def _grid(result: dict[str, Any]) -> str | None:
    path = result.get("grid_path")
    return path if isinstance(path, str) and Path(path).is_file() else None


class WandbLogger(WandbLoggerCallback):
    """One W&B run per trial: id = trial id (a resumed sweep goes on with the same runs), group = the sweep."""

    # Strings W&B would drop from a logged step: kept in the run's config instead.
    AUTO_CONFIG_KEYS = [*WandbLoggerCallback.AUTO_CONFIG_KEYS, "extractor", "data_source", "status", "reason"]

    def __init__(self, sweep, section: WandbTracking, sweep_dir: str | None = None):
        extra = {"entity": section.entity, "mode": section.mode, "tags": section.tags or None}
        super().__init__(project=section.project, group=section.group or sweep.name, resume="allow",
                         **{k: v for k, v in extra.items() if v is not None})
        self.sweep = sweep
        self.sweep_dir = sweep_dir  # W&B's local files (offline runs too) go to <sweep_dir>/wandb unless $WANDB_DIR

    def setup(self, *args, **kwargs):
        # Ray asks for an API key unless $WANDB_MODE says offline: the file's mode, when given, decides.
        with mock.patch.dict(os.environ, {"WANDB_MODE": self.kwargs["mode"]} if "mode" in self.kwargs else {}):
            return super().setup(*args, **kwargs)

    def _start_logging_actor(self, trial, exclude_results, **init_kwargs):
        init_kwargs["config"] = logged_params(self.sweep, trial_params(trial.config))
        # The logging actor may run in a Ray worker that did not inherit the driver's environment.
        for key, env, default in (("mode", "WANDB_MODE", None), ("dir", "WANDB_DIR", self.sweep_dir)):
            if key not in init_kwargs and (os.environ.get(env) or default):
                init_kwargs[key] = os.environ.get(env) or default
        super()._start_logging_actor(trial, exclude_results, **init_kwargs)

    def log_trial_result(self, iteration, trial, result):
        if (result := tracked_result(result)) is None:
            return
        if (grid := _grid(result)) is not None:
            import wandb  # installed: the sweep was validated (and only a sweep with tracking.wandb builds this)

            result["grid"] = wandb.Image(grid, caption=f"{result.get('kimg', 0):g} kimg")
        super().log_trial_result(iteration, trial, result)

    def on_experiment_end(self, trials, **info):
        # Trials an interrupt left unfinished never ended: finish their runs too, rather than wait
        # upload_timeout (30 min) for them.
        for trial in list(self._trial_queues):
            self._signal_logging_actor_stop(trial)
        super().on_experiment_end(trials, **info)


MLFLOW_TAGS = ("extractor", "data_source", "status", "reason")  # strings of a result, set as run tags


class MlflowLogger(MLflowLoggerCallback):
    """One MLflow run per trial, tagged with its trial id and sweep; a resumed sweep goes on with the same runs."""

    def __init__(self, sweep, section: MlflowTracking, sweep_dir: str | None = None):
        super().__init__(tracking_uri=section.tracking_uri, experiment_name=section.experiment or sweep.name,
                         tags={**section.tags, "sweep": sweep.name})
        self.sweep = sweep
        self.flagged: set[str] = set()  # trials that diverged or failed: their runs end FAILED
        self.logged_steps: dict[str, int] = {}  # trial id -> last step its run had when the sweep resumed

    def setup(self, *args, **kwargs):
        logging.getLogger("alembic").setLevel(logging.WARNING)  # no schema-migration chatter over the live table
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        super().setup(*args, **kwargs)

    def log_trial_start(self, trial):
        """A run per trial with its flat parameters (in one batch), or, on --resume, the run it had."""
        from mlflow.entities import Param

        if trial in self._trial_runs:  # restarted after a failure
            return
        client = self.mlflow_util._get_client()
        query = f"tags.trial_id = '{trial.trial_id}' and tags.sweep = '{self.sweep.name}'"
        found = client.search_runs([self.mlflow_util.experiment_id], query, max_results=1)
        if found:  # --resume: go on with its run, after the steps it logged (a trial may repeat an evaluation)
            run_id = self._trial_runs[trial] = found[0].info.run_id
            logged = client.get_metric_history(run_id, TRAINING_ITERATION)
            self.logged_steps[trial.trial_id] = max((int(m.step) for m in logged), default=0)
            return
        tags = {**self.tags, "trial_name": str(trial), "trial_id": trial.trial_id}
        run_id = self._trial_runs[trial] = self.mlflow_util.start_run(run_name=str(trial), tags=tags).info.run_id
        params = logged_params(self.sweep, trial_params(trial.config))
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def log_trial_result(self, iteration, trial, result):
        """Ray's logs each number with its own call (one request, or one SQLite commit, each): here the
        evaluation's numbers and tags go in one batch, at Ray's step (the training iteration)."""
        from mlflow.entities import Metric, RunTag

        if (result := tracked_result(result)) is None:
            return
        result.pop("config", None)  # the parameters are the run's params, not metrics
        if "status" in result:
            self.flagged.add(trial.trial_id)
        run_id, now = self._trial_runs[trial], int(time.time() * 1000)
        step = result.get(TIMESTEPS_TOTAL) or result[TRAINING_ITERATION]
        if step <= self.logged_steps.get(trial.trial_id, 0):
            return  # logged before the sweep was interrupted
        numbers = self.mlflow_util._parse_dict(flatten_dict(result))  # what Ray's would log: the float-like values
        client = self.mlflow_util._get_client()
        client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in numbers.items()],
                         tags=[RunTag(k, result[k][:5000]) for k in MLFLOW_TAGS if isinstance(result.get(k), str)])
        if (grid := _grid(result)) is not None:
            client.log_artifact(run_id, grid, artifact_path="grids")

    def log_trial_end(self, trial, failed: bool = False):
        super().log_trial_end(trial, failed=failed or trial.trial_id in self.flagged)


LOGGERS = {"wandb": WandbLogger, "mlflow": MlflowLogger}
