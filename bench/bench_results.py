"""The driver's cost per result as a sweep grows: the results callback, the trial summaries and ASHA's saved
state, old path (every table and the scheduler's state rewritten whole on each result) against new (rows
appended to part files, the scheduler's changes to a journal).

    python bench/bench_results.py            # 100 .. 100,000 rows, then a 200-trial Tune run on local Ray
    python bench/bench_results.py --quick    # the callback path only, up to 10,000 rows (under 2 minutes)
    python bench/bench_results.py --tune-only    # the Tune run only

For each size N, the tables are pre-filled in bulk with N evaluations (16 per trial) and N/16 trials, and the
scheduler with those trials; then at least 200 results of a stub trial go through the results callback and
ConfigASHA, each timed. The Tune run times every method of our callback that Tune calls on the driver inside a
real run of short trials with a mock trainable and reports their share of the driver's wall time, in all and
per method. Work that
the results path hands to its sync thread (fsyncs, merges of part files) is not on the driver's thread: it is
reported beside, as `sync_thread_*` (wall and CPU time). The load average is printed before and after. The
last line is `per-evaluation ms: 100=<a> 1000=<b> 10000=<c>` (the new path's median).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from orchestrator.run.callbacks import ResultsCallback  # noqa: E402
from orchestrator.run.schedulers import ConfigASHA, config_key  # noqa: E402
from orchestrator.run.tune_config import trial_params  # noqa: E402
from orchestrator.store import parts  # noqa: E402
from orchestrator.store.parts import write_atomic  # noqa: E402
from orchestrator.store.tables import (  # noqa: E402
    EVALUATION_COLUMNS,
    EVALUATIONS_FILE,
    TRIAL_COLUMNS,
    TRIALS_FILE,
    parameter_columns,
    parameter_types,
    to_table,
)
from orchestrator.sweepfile.loading import load_sweep  # noqa: E402

SEEDS, EVALS_PER_TRIAL = 2, 16


def stub_trial(i: int) -> SimpleNamespace:
    return SimpleNamespace(trial_id=f"t{i:06d}", config={"params": {"variant": "dcgan", "seed": i % SEEDS,
                                                                   "lr_d": 1e-4 * (1 + i // SEEDS)}},
                           checkpoint=None, status="RUNNING")


def prefill(sweep_dir: Path, sweep, n_rows: int) -> None:
    """N evaluations and N/16 trials written in bulk, as a compacted sweep directory holds them."""
    params = parameter_types(parameter_columns(sweep.swept_names()))
    n_trials = max(1, n_rows // EVALS_PER_TRIAL)
    trials, evals = [], []
    for i in range(n_trials):
        t = stub_trial(i)
        p = {"variant": "dcgan", "seed": i % SEEDS, "g_widths": "32-16-8-8", "lr_d": t.config["params"]["lr_d"]}
        trials.append({"sweep": sweep.name, "trial_id": t.trial_id, **p, "status": "completed", "kimg": 4.0,
                       "evaluations": EVALS_PER_TRIAL, "best_fid": 20.0})
        evals += [{"sweep": sweep.name, "trial_id": t.trial_id, **p, "kimg": 0.25 * (k + 1), "fid": 30.0 - k,
                   "is_mean": 1.0, "extractor": "tiny-conv", "fid_samples": 256} for k in range(EVALS_PER_TRIAL)]
    write_atomic(to_table(evals[:n_rows], EVALUATION_COLUMNS, params), sweep_dir / EVALUATIONS_FILE)
    write_atomic(to_table(trials, TRIAL_COLUMNS, params), sweep_dir / TRIALS_FILE)


def scheduler_for(sweep, sweep_dir: Path, n_trials: int) -> ConfigASHA:
    s = ConfigASHA(str(sweep_dir / "scheduler.json"), time_attr="kimg", max_t=1e9, grace_period=1e8,
                   reduction_factor=2, trial_params=trial_params)
    s.set_search_properties("fid", "min")
    for i in range(n_trials):
        t = stub_trial(i)
        s._set("config_of", t.trial_id, config_key(t.config["params"]), log=False)
    s.snapshot()
    return s


class LegacyWriter:
    """The old results path, for comparison: all rows in memory, both tables rewritten whole after each change,
    a trial's summary by a scan of every evaluation, the scheduler's whole state rewritten as JSON."""

    def __init__(self, sweep_dir: Path, sweep, scheduler: ConfigASHA):
        import pyarrow.parquet as pq

        self.dir, self.sweep, self.scheduler = sweep_dir, sweep, scheduler
        self.params = parameter_types(parameter_columns(sweep.swept_names()))
        self.evaluations = {(r["trial_id"], round(r["kimg"], 6)): r
                            for r in pq.read_table(sweep_dir / EVALUATIONS_FILE).to_pylist()}
        self.trials = {r["trial_id"]: r for r in pq.read_table(sweep_dir / TRIALS_FILE).to_pylist()}

    def on_result(self, trial, result: dict) -> None:
        self.evaluations[(trial.trial_id, round(result["kimg"], 6))] = {"sweep": self.sweep.name,
                                                                       "trial_id": trial.trial_id, **result}
        rows = sorted(self.evaluations.values(), key=lambda r: (r["trial_id"], r["kimg"]))
        write_atomic(to_table(rows, EVALUATION_COLUMNS, self.params), self.dir / EVALUATIONS_FILE)
        mine = [r for (t, _), r in self.evaluations.items() if t == trial.trial_id]  # the old summary: a scan
        row = self.trials.setdefault(trial.trial_id, {"sweep": self.sweep.name, "trial_id": trial.trial_id})
        row.update(best_fid=min(r["fid"] for r in mine), evaluations=len(mine), kimg=result["kimg"])
        for r in self.trials.values():  # the old reconciliation: a scan of every trial
            r.get("status")
        rows = sorted(self.trials.values(), key=lambda r: r["trial_id"])
        write_atomic(to_table(rows, TRIAL_COLUMNS, self.params), self.dir / TRIALS_FILE)
        path = Path(self.scheduler.state_file)  # the old scheduler save: the whole state, every result
        path.write_text(json.dumps(self.scheduler._state()))


class SyncThreadTime:
    """Time spent on the sync thread (fsyncs; merges of parts, their fsync, rename and the deletion of their
    sources): not on the driver's thread, so not in the callback's figures, but reported beside them, as wall
    time and as that thread's CPU time."""

    def __init__(self):
        self.s = self.cpu_s = 0.0

    def __enter__(self):
        self.saved = {name: getattr(parts, name) for name in ("_fsync_all", "_merge")}
        for name, job in self.saved.items():
            setattr(parts, name, self._timed(job))
        return self

    def _timed(self, job):
        def timed(*args):
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                job(*args)
            finally:
                self.s += time.perf_counter() - start
                self.cpu_s += time.thread_time() - cpu
        return timed

    def __exit__(self, *exc):
        parts.drain_syncs()
        for name, job in self.saved.items():
            setattr(parts, name, job)


def time_calls(call, n: int) -> list[float]:
    times = []
    for k in range(n):
        start = time.perf_counter()
        call(k)
        times.append((time.perf_counter() - start) * 1000)
    return times


def bench_size(sweep, n_rows: int, calls: int, legacy: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-results-") as tmp, SyncThreadTime() as sync_thread:
        sweep_dir = Path(tmp)
        prefill(sweep_dir, sweep, n_rows)
        scheduler = scheduler_for(sweep, sweep_dir, max(1, n_rows // EVALS_PER_TRIAL))
        trial = stub_trial(10**6)
        controller = SimpleNamespace(get_trials=lambda: [], stop_trial=lambda t: None)
        scheduler.on_trial_add(controller, trial)

        def result(k: int) -> dict:
            return {"kimg": 0.25 * (k + 1), "fid": 50.0 - k * 1e-3, "is_mean": 1.0, "extractor": "tiny-conv",
                    "fid_samples": 256, "final": False, "training_iteration": k + 1}

        if legacy:
            writer = LegacyWriter(sweep_dir, sweep, scheduler)
            times = time_calls(lambda k: writer.on_result(trial, result(k)), calls)
        else:
            callback = ResultsCallback(sweep, str(sweep_dir), scheduler=scheduler)
            callback.setup()

            def call(k: int) -> None:
                r = result(k)
                scheduler.on_trial_result(controller, trial, r)
                callback.on_trial_result(k, [], trial, r)
                # Each evaluation carries a checkpoint, and with num_to_keep=1 Tune saves its experiment state
                # after every one: our callback's get_state (flush of parts and journal) runs per result too.
                callback.get_state()

            times = time_calls(call, calls)
            callback.get_state()
            callback.writer.sync()  # untimed: what is still on the sync thread, before the folder goes
    row = {"rows": n_rows, "path": "old" if legacy else "new", "calls": calls,
           "median_ms": round(statistics.median(times), 3), "p90_ms": round(sorted(times)[int(0.9 * calls)], 3),
           "mean_ms": round(statistics.fmean(times), 3)}
    if not legacy:
        row["sync_thread_ms_per_result"] = round(1000 * sync_thread.s / calls, 3)
        row["sync_thread_cpu_ms_per_result"] = round(1000 * sync_thread.cpu_s / calls, 3)
    return row


def bench_tune(sweep, n_trials: int) -> dict:
    """A real Tune run of `n_trials` short trials (mock trainable, 4 results each) through our callback and
    ConfigASHA; the time spent in our callback methods (get_state's flushes included) against the driver's
    wall time."""
    import ray
    from ray import tune

    spent = {"s": 0.0}
    by_method: dict[str, float] = {}  # seconds in each callback method

    def timed(name: str):
        def method(self, *args, **kwargs):
            start = time.perf_counter()
            out = getattr(ResultsCallback, name)(self, *args, **kwargs)
            took = time.perf_counter() - start
            spent["s"] += took
            spent[name] = spent.get(name, 0) + 1
            by_method[name] = by_method.get(name, 0.0) + took
            return out
        return method

    # Every method of ours that Tune calls on the driver, the per-trial and per-run ones included.
    Timed = type("Timed", (ResultsCallback,), {name: timed(name) for name in (
        "setup", "on_step_begin", "on_trial_start", "on_trial_restore", "on_trial_result", "on_trial_complete",
        "on_trial_error", "get_state", "on_experiment_end")})

    def mock(config):
        # Each report carries a (tiny) checkpoint, as every evaluation of a real trial does: with num_to_keep=1
        # Tune then saves its experiment state, and calls our get_state, after each one.
        for k in range(4):
            with tempfile.TemporaryDirectory() as ckpt:
                Path(ckpt, "state.txt").write_text(str(k))
                tune.report({"kimg": 0.25 * (k + 1), "fid": 40.0 - k, "extractor": "tiny-conv", "fid_samples": 64},
                            checkpoint=tune.Checkpoint.from_directory(ckpt))

    with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp, SyncThreadTime() as sync_thread:
        sweep_dir = Path(tmp)
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            trials = [{"variant": "dcgan", "seed": i % SEEDS, "lr_d": 1e-4 * (1 + i // SEEDS)} for i in range(n_trials)]
            scheduler = ConfigASHA(str(sweep_dir / "scheduler.json"), time_attr="kimg", max_t=1.0, grace_period=0.25,
                                   reduction_factor=2, trial_params=trial_params)
            start = time.perf_counter()
            tune.Tuner(
                tune.with_resources(mock, {"cpu": 0.25}),
                param_space={"params": tune.grid_search(trials)},
                tune_config=tune.TuneConfig(metric="fid", mode="min", scheduler=scheduler, reuse_actors=True),
                run_config=tune.RunConfig(storage_path=str(sweep_dir / "tune"), name="bench", verbose=0,
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1),  # as a sweep
                                          callbacks=[Timed(sweep, str(sweep_dir), scheduler=scheduler)]),
            ).fit()
            wall = time.perf_counter() - start
        finally:
            ray.shutdown()
    results = max(spent.get("on_trial_result", 0), 1)
    return {"trials": n_trials, "results": results, "results_per_trial": round(results / n_trials, 2),
            "get_state_calls": spent.get("get_state", 0), "wall_s": round(wall, 1),
            "results_per_s": round(results / wall, 2),
            "callback_ms_per_result": round(1000 * spent["s"] / results, 3),
            "callback_share_of_wall": f"{100 * spent['s'] / wall:.2f}%",
            "callback_ms_per_result_by_method": {k: round(1000 * v / results, 3) for k, v in by_method.items()},
            "sync_thread_ms_per_result": round(1000 * sync_thread.s / results, 3),
            "sync_thread_cpu_ms_per_result": round(1000 * sync_thread.cpu_s / results, 3),
            "sync_thread_share_of_wall": f"{100 * sync_thread.s / wall:.2f}%"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="callback path only, up to 10,000 rows")
    parser.add_argument("--calls", type=int, default=200, help="timed results per size (at least 200)")
    parser.add_argument("--tune-trials", type=int, default=200, help="trials of the Tune run")
    parser.add_argument("--tune-only", action="store_true", help="only the Tune run")
    args = parser.parse_args()
    sweep = load_sweep(REPO / "sweeps" / "smoke.yaml")
    print(json.dumps({"load_average_at_start": os.getloadavg()}), flush=True)
    if args.tune_only:
        print(json.dumps(bench_tune(sweep, args.tune_trials)), flush=True)
        print(json.dumps({"load_average_at_end": os.getloadavg()}), flush=True)
        return
    sizes = [100, 1000, 10000] if args.quick else [100, 1000, 10000, 100000]
    rows = []
    for n in sizes:
        for legacy in (True, False):
            calls = args.calls if not legacy or n <= 10000 else max(20, args.calls // 10)  # old path: slow
            rows.append(bench_size(sweep, n, calls, legacy))
            print(json.dumps(rows[-1]), flush=True)
    new = {r["rows"]: r["median_ms"] for r in rows if r["path"] == "new"}
    if not args.quick:
        print(json.dumps(bench_tune(sweep, args.tune_trials)), flush=True)
    print(json.dumps({"load_average_at_end": os.getloadavg()}), flush=True)
    print("per-evaluation ms: " + " ".join(f"{n}={new[n]}" for n in sizes if n <= 10000))


if __name__ == "__main__":
    pa.set_cpu_count(1)
    main()
