"""Ray Tune glue: turn a validated Sweep into a Tuner whose trials run `gan.training_loop`.

Only `orchestrator sweep` imports this module, so `--dry-run`, validation and the
leaderboard never import (let alone start) Ray.
"""
from __future__ import annotations

from typing import Any

from ray import tune
from ray.tune.schedulers import FIFOScheduler, ResourceChangingScheduler

from gan.data import PreparedDataset
from orchestrator.run.callbacks import ResultsCallback
from orchestrator.run.schedulers import (
    STATE_FILE,
    ConfigASHA,
    TrialASHA,
    expected_seeds,
)
from orchestrator.run.storage import SharedCheck
from orchestrator.run.tracking import tracking_callbacks
from orchestrator.run.trainable import (
    WholeGpuAfterOom,
    shipped_inception_weights,
    train_trial,
)
from orchestrator.run.tune_config import trial_params
from orchestrator.store.sweep_dir import SweepDir
from orchestrator.sweepfile.plan import SweepPlan
from orchestrator.sweepfile.sections import Sweep


def build_scheduler(sweep: Sweep, plan: SweepPlan, sweep_dir: SweepDir):
    """FIFO, or ASHA per trial or per configuration; both ASHAs keep their rungs in the sweep directory
    so that --resume makes the decisions an uninterrupted run would."""
    s = sweep.scheduler
    if s.type != "asha":
        return FIFOScheduler()
    state_file = str(sweep_dir.path / STATE_FILE)
    if s.unit == "config":
        # A decision waits for every seed the expansion gives a configuration, created by Tune or not yet;
        # Optuna's configurations are proposed at run time, each on every swept seed (run.seed_search).
        optuna = sweep.method == "optuna"
        expected = expected_seeds(plan.trials) if not optuna else None
        seeds = plan.seeds if optuna else None
        return ConfigASHA(state_file, time_attr="kimg", max_t=s.max_t, grace_period=s.grace_period,
                          reduction_factor=s.reduction_factor, trial_params=trial_params, expected_seeds=expected,
                          default_seeds=len(seeds) if seeds else None)
    return TrialASHA(state_file, time_attr="kimg", max_t=s.max_t, grace_period=s.grace_period,
                     reduction_factor=s.reduction_factor)


def tune_location(sweep: Sweep, sweep_dir: SweepDir, storage: str | None) -> tuple[str, str]:
    """(storage_path, experiment name) of Tune's RunConfig: <sweep>/tune by default, else <storage>/<sweep name>."""
    if storage is None:
        return str(sweep_dir.tune_path.parent), sweep_dir.tune_path.name
    return storage, sweep.name


def build_tuner(
    sweep: Sweep,
    plan: SweepPlan,
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
    if resume:  # the claim checked first that the file keeps what Tune restores (FIXED_ON_RESUME)
        # Tune's experiment state is pickled: restore only from the user's own results directory
        # (or the storage its sweep started with, recorded in it).
        return tune.Tuner.restore(
            f"{storage_path}/{experiment}", trainable, resume_unfinished=True, resume_errored=True
        )

    metric, mode = sweep.metric.name, sweep.metric.mode
    scheduler = build_scheduler(sweep, plan, sweep_dir)
    search_alg = None
    if sweep.method == "optuna":
        import optuna
        from optuna.samplers import TPESampler

        from orchestrator.run.search import PolicyOptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the live table shows the trials
        if plan.seeds is None:
            search_alg = PolicyOptunaSearch(
                space=sweep.optuna_space, metric=metric, mode=mode, sampler=TPESampler(seed=sweep.search_seed)
            )
        else:  # Optuna searches configurations; each runs on every seed and is told the seed mean
            from orchestrator.run.seed_search import optuna_with_seeds

            search_alg = optuna_with_seeds(sweep, plan.seeds)
        param_space: dict[str, Any] = {}
        num_samples = plan.total  # num_samples configurations x the swept seeds
    else:
        param_space = {"params": tune.grid_search(plan.trials)}
        num_samples = 1
    shares_gpu = 0 < sweep.resources.gpu < 1
    tune_config = tune.TuneConfig(
        metric=metric,
        mode=mode,
        # On a shared GPU, an out-of-memory trial is moved to a whole GPU once (WholeGpuAfterOom).
        scheduler=ResourceChangingScheduler(scheduler, WholeGpuAfterOom(sweep.resources.cpu))
        if shares_gpu
        else scheduler,
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
        callbacks=[
            ResultsCallback(sweep, str(sweep_dir.path), live, scheduler=scheduler),
            *tracking_callbacks(sweep, str(sweep_dir.path)),
        ],
        failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
        # Tune saves its experiment state (what --resume restores) after every num_to_keep-th new
        # checkpoint of a trial, otherwise at most every 10 s. With 1, that state names each trial's
        # newest checkpoint: after a killed driver, --resume re-runs no finished trial and repeats
        # at most the one evaluation that was in flight.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        verbose=0,
    )
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
