"""`tracking:` in a sweep file: Ray Tune's W&B and MLflow loggers, read back offline.

One real sweep (a shortened copy of sweeps/smoke.yaml) logs to W&B in offline mode and to an MLflow
SQLite store, both in a temp dir; the tests read what each tracker recorded and compare it with the
sweep's own Parquet tables.
"""
from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from orchestrator.run.tracked import logged_params, tracked_result
from orchestrator.run.tracking import tracking_callbacks
from orchestrator.sweepfile.errors import SweepError
from orchestrator.sweepfile.loading import load_sweep
from orchestrator.sweepfile.plan import plan_sweep

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "sweeps" / "smoke.yaml"


def with_tracking(tmp_path: Path, tracking: str, name: str = "tracked.yaml") -> Path:
    path = tmp_path / name
    path.write_text(SMOKE.read_text() + "\ntracking:\n" + tracking)
    return path


# --- validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tracking, key, message", [
    ("  wandb: {projct: gans}\n", "tracking.wandb.projct", "unknown key 'projct' (did you mean 'project'?)"),
    ("  neptune: {project: gans}\n", "tracking.neptune", "unknown key 'neptune' (valid: wandb, mlflow)"),
    ("  wandb: {mode: onlin}\n", "tracking.wandb.mode", "unknown value 'onlin' (expected 'online' or 'offline')"),
    ("  mlflow: {experiment: [a]}\n", "tracking.mlflow.experiment", "expected a string, got ['a']"),
])
def test_tracking_keys_are_validated_in_one_line(tmp_path, tracking, key, message):
    path = with_tracking(tmp_path, tracking)
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    assert str(err.value) == f"{path}: {key}: {message}"


def test_a_bare_tracker_key_turns_it_on_with_the_defaults(tmp_path):
    sweep = load_sweep(with_tracking(tmp_path, "  wandb:\n  mlflow:\n"))
    assert sweep.tracking.enabled() == ["wandb", "mlflow"]
    assert sweep.tracking.wandb.project == "gan-sweeps" and sweep.tracking.mlflow.experiment is None


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_missing_extra_is_one_line_at_validation_before_ray(tmp_path, tracker):
    """The package is made unimportable (sys.modules[name] = None) in a fresh interpreter."""
    path = with_tracking(tmp_path, f"  {tracker}: {{}}\n")
    script = (
        "import sys\n"
        f"sys.modules[{tracker!r}] = None\n"
        "from typer.testing import CliRunner\n"
        "from orchestrator.cli import app\n"
        f"r = CliRunner().invoke(app, ['sweep', {str(path)!r}, '--dry-run'])\n"
        "print(r.exit_code)\n"
        "print(r.output, end='')\n"
        "print('imported:', sorted(m for m in ('ray', 'wandb', 'mlflow') if sys.modules.get(m)))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [
        "2",
        f'error: {path}: tracking.{tracker}: needs the {tracker} extra: pip install -e ".[{tracker}]"',
        "imported: []",
    ]


def test_dry_run_of_a_tracked_sweep_imports_neither_ray_nor_a_tracker(tmp_path):
    path = with_tracking(tmp_path, "  wandb: {project: gans}\n  mlflow: {experiment: gans}\n")
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from orchestrator.cli import app\n"
        f"r = CliRunner().invoke(app, ['sweep', {str(path)!r}, '--dry-run'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(sorted(m for m in ('ray', 'wandb', 'mlflow') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_tracking_section_is_part_of_the_fingerprint(tmp_path):
    """So --resume refuses a changed section (Tune restores the callbacks the sweep started with)."""
    base = load_sweep(SMOKE).fingerprint()
    assert load_sweep(with_tracking(tmp_path, "")).fingerprint() == base  # `tracking:` with nothing in it
    a = load_sweep(with_tracking(tmp_path, "  wandb: {project: a}\n", "a.yaml")).fingerprint()
    b = load_sweep(with_tracking(tmp_path, "  wandb: {project: b}\n", "b.yaml")).fingerprint()
    assert len({base, a, b}) == 3


# --- what is logged ----------------------------------------------------------------------------------


def test_parameters_are_flat_and_readable():
    sweep = load_sweep(SMOKE)
    params = logged_params(sweep, {"variant": "wgan", "seed": 1})
    assert list(params)[:3] == ["sweep", "variant", "seed"]
    assert params["sweep"] == "smoke" and params["variant"] == "wgan" and params["seed"] == 1
    assert params["g_widths"] == "32-16-8-8" and params["kimg"] == 4.0 and params["heads"] == 2
    assert params["eval.extractor"] == "tiny-conv" and params["data.image_size"] == 64
    assert all(not isinstance(v, (dict, list)) for v in params.values())


def test_a_diverged_or_failed_trial_logs_its_status_not_a_placeholder_fid():
    """Nor a request to restart on a whole GPU (runner.WholeGpuAfterOom): those reports are no evaluations."""
    evaluation = {"kimg": 1.0, "fid": 12.5, "grid_path": "/x.png", "training_iteration": 2, "config": {}}
    assert tracked_result(evaluation) == evaluation
    diverged = tracked_result({"kimg": 1.5, "fid": 12.5, "diverged": True, "reason": "non-finite loss",
                               "training_iteration": 3, "node": "ab"})
    assert diverged == {"training_iteration": 3, "node": "ab", "status": "diverged", "reason": "non-finite loss"}
    failed = tracked_result({"kimg": 0.0, "fid": 1e6, "error": "out of memory: ...", "training_iteration": 1})
    assert failed == {"training_iteration": 1, "status": "error", "reason": "out of memory: ..."}
    from orchestrator.store.failures import RETRY_KEY

    assert tracked_result({"kimg": 0.0, "fid": 1e6, RETRY_KEY: "out of memory", "training_iteration": 2}) is None


def test_without_tracking_the_tuner_gets_no_logger_callback(tmp_path, monkeypatch):
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.air.integrations.wandb import WandbLoggerCallback

    from orchestrator.run import tuner as runner
    from orchestrator.store.sweep_dir import SweepDir

    built = {}
    monkeypatch.setattr(tune, "with_parameters", lambda fn, **kw: fn)  # would put the dataset in Ray's store
    monkeypatch.setattr(tune, "Tuner", lambda trainable, **kw: built.update(kw))
    for sweep, expected in ((load_sweep(SMOKE), []),
                            (load_sweep(with_tracking(tmp_path, "  wandb:\n  mlflow:\n")),
                             [WandbLoggerCallback, MLflowLoggerCallback])):
        runner.build_tuner(sweep, plan_sweep(sweep), SweepDir(tmp_path), dataset=None, resume=False)
        callbacks = built["run_config"].callbacks
        assert isinstance(callbacks[0], runner.ResultsCallback)
        assert [type(c).__mro__[1] for c in callbacks[1:]] == expected


def test_loggers_survive_the_pickling_of_tunes_saved_state(tmp_path):
    """Tuner.restore (--resume) unpickles the RunConfig, callbacks included, from Tune's saved state."""
    import ray.cloudpickle

    sweep = load_sweep(with_tracking(tmp_path, "  wandb: {project: gans, mode: offline, tags: [a]}\n"
                                               "  mlflow: {experiment: gans, tags: {lab: x}}\n"))
    wandb_logger, mlflow_logger = (ray.cloudpickle.loads(ray.cloudpickle.dumps(c)) for c in tracking_callbacks(sweep))
    assert wandb_logger.project == "gans" and wandb_logger.group == "smoke"
    assert wandb_logger.kwargs == {"resume": "allow", "mode": "offline", "tags": ["a"]}
    assert mlflow_logger.experiment_name == "gans" and mlflow_logger.tags == {"lab": "x", "sweep": "smoke"}


def test_offline_wandb_needs_no_api_key_and_online_says_how_to_get_one(tmp_path, monkeypatch):
    from orchestrator.run.tracking import check_trackers

    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # no `wandb login` of this machine's user
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    check_trackers(load_sweep(with_tracking(tmp_path, "  wandb: {mode: offline}\n", "offline.yaml")))
    online = with_tracking(tmp_path, "  wandb: {mode: online}\n", "online.yaml")
    monkeypatch.setenv("WANDB_MODE", "offline")  # the file's mode wins over the environment's
    with pytest.raises(SweepError) as err:
        check_trackers(load_sweep(online))
    assert str(err.value).startswith(f"{online}: tracking.wandb: no W&B API key: run `wandb login`")


# --- one real sweep, read back from both trackers ------------------------------------------------------


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """The smoke sweep cut to dcgan x 2 seeds, 1 kimg, FIFO, logging to offline W&B (its files in the sweep's
    results directory, the default without $WANDB_DIR) and to an MLflow SQLite store."""
    tmp = tmp_path_factory.mktemp("tracked")
    spec = yaml.safe_load(SMOKE.read_text())
    spec.update(
        name="tracked",
        data={**spec["data"], "synthetic_count": 300},
        train={**spec["train"], "kimg": 1},
        eval={**spec["eval"], "every_kimg": 0.5, "fid_samples": 64, "final_fid_samples": 64},
        parameters={"variant": {"values": ["dcgan"]}, "seed": {"values": [0, 1]}},
        scheduler={"type": "fifo"},
        tracking={"wandb": {"project": "gan-sweeps-tests"},
                  "mlflow": {"tracking_uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "tracked-test"}},
    )
    (tmp / "tracked.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_")) and k != "RAY_ADDRESS"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    # cwd: MLflow puts a SQLite store's artifacts in ./mlruns
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", str(tmp / "tracked.yaml"),
                           "--results", str(tmp / "results")], cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    sweep_dir = tmp / "results" / "tracked"
    trials = {t["trial_id"]: t for t in pq.read_table(sweep_dir / "trials.parquet").to_pylist()}
    evaluations = sorted(pq.read_table(sweep_dir / "evaluations.parquet").to_pylist(), key=lambda e: e["kimg"])
    assert len(trials) == 2 and {t["status"] for t in trials.values()} == {"completed"}
    return tmp, trials, {t: [e for e in evaluations if e["trial_id"] == t] for t in trials}


def wandb_records(path: Path):
    """The records of an offline run's .wandb file: W&B's LevelDB-style log (32 KiB blocks of chunks with a
    7-byte header: CRC, length, type full/first/middle/last) of wandb_internal_pb2.Record protobufs."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def read_wandb_run(run_dir: Path) -> dict:
    import json

    run = {"config": {}, "history": []}
    for record in wandb_records(next(run_dir.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(id=record.run.run_id, project=record.run.project, group=record.run.run_group)
            run["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            run["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            items = record.history.item
            run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
    return run


@pytest.mark.slow
def test_wandb_offline_run_per_trial_with_params_every_fid_and_the_grids(tracked):
    tmp, trials, evaluations = tracked
    wandb_dir = tmp / "results" / "tracked" / "wandb"
    runs = [read_wandb_run(d) for d in sorted(wandb_dir.glob("offline-run-*"))]
    assert sorted(r["id"] for r in runs) == sorted(trials)  # one run per trial, its id the trial id
    for run in runs:
        trial, evals = trials[run["id"]], evaluations[run["id"]]
        assert run["project"] == "gan-sweeps-tests" and run["group"] == "tracked"
        config = run["config"]
        assert (config["variant"], config["seed"]) == ("dcgan", trial["seed"]) and config["g_widths"] == "32-16-8-8"
        assert config["extractor"] == "tiny-conv" and config["data_source"] == "synthetic"
        steps = sorted((h for h in run["history"] if "fid" in h), key=lambda h: h["_step"])
        assert [h["fid"] for h in steps] == pytest.approx([e["fid"] for e in evals])  # once per evaluation
        assert [h["kimg"] for h in steps] == pytest.approx([e["kimg"] for e in evals])
        assert all("loss_d" in h and "g_steps" in h and "is_mean" in h for h in steps)
        for h in steps:  # each evaluation's sample grid, as a W&B image in the run's files
            run_dir = next(wandb_dir.glob(f"offline-run-*-{run['id']}"))
            assert h["grid/_type"] == "image-file" and (run_dir / "files" / h["grid/path"]).is_file()


@pytest.mark.slow
def test_mlflow_run_per_trial_with_params_fid_history_and_grid_artifacts(tracked):
    from mlflow.tracking import MlflowClient

    tmp, trials, evaluations = tracked
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    experiment = client.get_experiment_by_name("tracked-test")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(trials)  # one run per trial
    for run in runs:
        trial_id = run.data.tags["trial_id"]
        trial, evals = trials[trial_id], evaluations[trial_id]
        assert run.info.status == "FINISHED" and run.data.tags["sweep"] == "tracked"
        params = run.data.params
        assert (params["variant"], params["seed"], params["g_widths"]) == ("dcgan", str(trial["seed"]), "32-16-8-8")
        assert params["eval.fid_samples"] == "64" and not any(k.startswith(("params", "config")) for k in params)
        fid = sorted(client.get_metric_history(run.info.run_id, "fid"), key=lambda m: m.step)
        kimg = sorted(client.get_metric_history(run.info.run_id, "kimg"), key=lambda m: m.step)
        assert [m.value for m in fid] == pytest.approx([e["fid"] for e in evals])  # once per evaluation
        assert [m.value for m in kimg] == pytest.approx([e["kimg"] for e in evals])
        assert [m.step for m in fid] == [m.step for m in kimg]
        assert {"loss_d", "loss_g", "g_steps", "is_mean"} <= set(run.data.metrics)
        assert run.data.tags["extractor"] == "tiny-conv"
        grids = sorted(Path(a.path).name for a in client.list_artifacts(run.info.run_id, "grids"))
        assert grids == sorted(Path(e["grid_path"]).name for e in evals)
        assert Path(trial["grid_path"]).name in grids  # the latest


class FakeTrial:
    def __init__(self, trial_id: str, seed: int):
        self.trial_id, self.config = trial_id, {"params": {"variant": "dcgan", "seed": seed}}


@pytest.mark.slow
def test_a_resumed_sweep_goes_on_with_each_trials_mlflow_run(tracked):
    """A --resume driver's logger (Tune unpickles it from its saved state) finds each trial's run and skips
    the evaluations that run has already (a trial may repeat the one in flight when it was interrupted)."""
    import shutil

    from mlflow.tracking import MlflowClient

    tmp, trials, evaluations = tracked
    shutil.copy(tmp / "mlflow.db", tmp / "resumed.db")  # the other tests read the sweep's own store
    sweep = load_sweep(tmp / "tracked.yaml")
    sweep.tracking.wandb, sweep.tracking.mlflow.tracking_uri = None, f"sqlite:///{tmp}/resumed.db"
    (logger,) = tracking_callbacks(sweep)
    logger.setup()
    trial_id = sorted(trials)[0]
    trial, evals = FakeTrial(trial_id, trials[trial_id]["seed"]), evaluations[trial_id]
    logger.log_trial_start(trial)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/resumed.db")
    run_id = logger._trial_runs[trial]
    assert client.get_run(run_id).data.tags["trial_id"] == trial_id
    assert len(client.search_runs([logger.mlflow_util.experiment_id])) == len(trials)  # no new run
    logger.log_trial_result(0, trial, {"training_iteration": len(evals), "fid": 1.0, "kimg": evals[-1]["kimg"]})
    logger.log_trial_result(0, trial, {"training_iteration": len(evals) + 1, "fid": 2.0, "kimg": 9.0})
    fid = sorted(client.get_metric_history(run_id, "fid"), key=lambda m: m.step)
    assert [m.value for m in fid] == pytest.approx([e["fid"] for e in evals] + [2.0])
