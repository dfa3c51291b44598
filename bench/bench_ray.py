#!/usr/bin/env python
"""What the sweep machinery costs around training: Ray Tune per trial and per report, Parquet, data.

Measured on this machine's CPU (no training anywhere):
  data prepare      gan.data.prepare_dataset of --data into a temporary cache: cold (decode, dedup,
                    write cache) and cached (stat the files, load one .npy)
  ray start         orchestrator.run.ray_start.start_ray (local Ray with dashboard), and ray.put of the
                    prepared dataset (what tune.with_parameters does once per sweep)
  per trial         Tuner.fit of --trials trivial trainables reporting once, one at a time:
                    wall time / trials = the start + stop cost of a trial
  per report        the same trials reporting --reports times: extra wall time / extra reports; with
                    a checkpoint: each report carries a fresh --checkpoint-mb MB directory (about a
                    width-512 DCGAN training checkpoint); compared with doing the same work without Ray
  parquet row       orchestrator.store.tables.ResultsWriter.add_evaluation (run by the driver-side callback
                    on every report: it rewrites the table) with 100 and 1000 rows already present
Trials run one at a time (max_concurrent_trials=1, 1 CPU each) so the costs do not overlap.
    python bench/bench_ray.py
    python bench/bench_ray.py --quick
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import ray
import torch
from bench_common import REPO, device_name, markdown_table, run_metadata, write_results
from ray import tune

from gan.config import DataConfig
from gan.data import prepare_dataset
from orchestrator.run.ray_start import start_ray
from orchestrator.store.tables import ResultsWriter

DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "anime-faces-64"


def main() -> None:
    args = parse_args()
    rows: list[dict] = []

    def record(what: str, seconds: float, per: str = "", count: int = 1, note: str = "") -> None:
        rows.append({"measure": what, "total_s": round(seconds, 3), "count": count, "per": per,
                     "per_unit": human_seconds(seconds / count), "note": note})
        print(rows[-1], flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        tmp = Path(tmp)
        dataset = None
        if args.data is not None:
            for state in ("cold", "cached"):
                start = time.perf_counter()
                dataset = prepare_dataset(DataConfig(path=str(args.data), cache_dir=str(tmp / "data-cache")))
                summary = dataset.summary()
                record(f"data prepare ({state})", time.perf_counter() - start, note=(
                    f"{summary['files_seen']} files, {summary['images_kept']} kept, "
                    f"{summary['duplicates_removed']} duplicates, cache_hit={summary['cache_hit']}"))

        for present in (100, 1000):
            seconds = parquet_row_seconds(tmp / f"parquet-{present}", present, args.parquet_calls)
            record(f"parquet evaluation row ({present} rows present)", seconds, "row", args.parquet_calls)

        baseline = without_ray(args, tmp / "no-ray")
        record("same reports without Ray", baseline["plain"], "report", args.trials * args.reports)
        record(f"same reports without Ray + {args.checkpoint_mb} MB checkpoint", baseline["ckpt"], "report",
               args.trials * args.reports)

        start = time.perf_counter()
        start_ray(None)
        try:
            record("ray start (local, dashboard)", time.perf_counter() - start)
            if dataset is not None:
                start = time.perf_counter()
                ray.put(dataset)
                record("ray.put of the prepared dataset", time.perf_counter() - start,
                       note=f"{dataset.images.nbytes / 2**20:.0f} MB of images")
            once = fit(args, tmp, reports=1, checkpoint_mb=0)
            record("trial start+stop (1 report each)", once, "trial", args.trials)
            extra = args.trials * (args.reports - 1)
            many = fit(args, tmp, reports=args.reports, checkpoint_mb=0)
            record("tune.report, no checkpoint", many - once, "report", extra,
                   note=f"minus {baseline['plain'] / (args.trials * args.reports) * 1000:.2f} ms without Ray")
            with_ckpt = fit(args, tmp, reports=args.reports, checkpoint_mb=args.checkpoint_mb)
            ckpt_once = fit(args, tmp, reports=1, checkpoint_mb=args.checkpoint_mb)
            per_plain = baseline["ckpt"] / (args.trials * args.reports)
            record(f"tune.report + {args.checkpoint_mb} MB checkpoint", with_ckpt - ckpt_once, "report", extra,
                   note=f"minus {per_plain * 1000:.1f} ms writing it without Ray")
        finally:
            ray.shutdown()

    columns = ["measure", "total_s", "count", "per", "per_unit", "note"]
    print()
    print(markdown_table(rows, columns))
    meta = run_metadata(device_name(torch.device("cpu")), ray=ray.__version__, trials=args.trials, reports=args.reports,
                        checkpoint_mb=args.checkpoint_mb, data=str(args.data))
    write_results(Path(args.out_dir), "ray", meta, {"overheads": (rows, columns)})


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="image folder to prepare (default: %(default)s)")
    p.add_argument("--no-data", dest="data", action="store_const", const=None, help="skip the data-preparation rows")
    p.add_argument("--trials", type=int, help="trivial trials per Tuner (default 8; --quick 4)")
    p.add_argument("--reports", type=int, help="reports per trial (default 20; --quick 6)")
    p.add_argument("--checkpoint-mb", type=float, default=15.0, help="size of each report's checkpoint")
    p.add_argument("--parquet-calls", type=int, default=20, help="timed add_evaluation calls")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    args = p.parse_args()
    args.trials = args.trials or (4 if args.quick else 8)
    args.reports = args.reports or (6 if args.quick else 20)
    if args.reports < 2 or args.trials < 1:
        p.error("need --trials >= 1 and --reports >= 2")
    if args.data is not None and not args.data.is_dir():
        p.error(f"--data {args.data}: not a folder (or pass --no-data)")
    return args


def human_seconds(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def trivial_trainable(config: dict) -> None:
    """Reports `reports` metric dicts, each with a fresh checkpoint directory if checkpoint_mb > 0."""
    payload = os.urandom(int(config["checkpoint_mb"] * 2**20)) if config["checkpoint_mb"] else b""
    for i in range(config["reports"]):
        metrics = {"kimg": float(i + 1), "fid": 100.0 - i, "loss_d": 0.5, "loss_g": 1.5, "images_per_s": 1e3}
        if payload:
            folder = tempfile.mkdtemp(prefix="bench-ckpt-")
            Path(folder, "checkpoint.pt").write_bytes(payload)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
            shutil.rmtree(folder)  # Tune has persisted it into storage_path by now
        else:
            tune.report(metrics)


def fit(args: argparse.Namespace, tmp: Path, *, reports: int, checkpoint_mb: float) -> float:
    """Wall seconds of one Tuner.fit with args.trials trivial trials run one at a time."""
    name = f"r{reports}-c{checkpoint_mb:g}-{time.monotonic_ns()}"
    tuner = tune.Tuner(
        tune.with_resources(trivial_trainable, {"cpu": 1}),
        param_space={"reports": reports, "checkpoint_mb": checkpoint_mb,
                     "trial": tune.grid_search(list(range(args.trials)))},
        tune_config=tune.TuneConfig(metric="fid", mode="min", max_concurrent_trials=1),
        run_config=tune.RunConfig(name=name, storage_path=str(tmp / "tune"), verbose=0,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),  # as orchestrator.run.tuner
    )
    start = time.perf_counter()
    results = tuner.fit()
    seconds = time.perf_counter() - start
    if results.errors:
        raise RuntimeError(f"trivial trials failed: {results.errors[0]}")
    shutil.rmtree(tmp / "tune" / name, ignore_errors=True)
    return seconds


def without_ray(args: argparse.Namespace, folder: Path) -> dict[str, float]:
    """The trials' own work (build the metrics; write the checkpoint file) in a plain loop."""
    folder.mkdir()
    payload = os.urandom(int(args.checkpoint_mb * 2**20))
    n = args.trials * args.reports
    start = time.perf_counter()
    for i in range(n):
        _ = {"kimg": float(i + 1), "fid": 100.0 - i, "loss_d": 0.5, "loss_g": 1.5, "images_per_s": 1e3}
    plain = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n):
        target = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=folder))
        (target / "checkpoint.pt").write_bytes(payload)
        shutil.rmtree(target)
    return {"plain": plain, "ckpt": time.perf_counter() - start}


def parquet_row_seconds(folder: Path, present: int, calls: int) -> float:
    """Seconds for `calls` add_evaluation calls on a table that already holds `present` rows."""
    writer = ResultsWriter(folder, "bench", ["g_widths", "seed", "variant"])
    now = datetime.now(timezone.utc)

    def row(i: int) -> dict:
        return {"trial_id": f"t{i % 50:03d}", "kimg": float(i), "fid": 50.0, "is_mean": 2.0, "extractor": "tiny-conv",
                "fid_samples": 2000, "final": False, "loss_d": 0.5, "loss_g": 1.5, "images_per_s": 1e3,
                "wall_s": 10.0, "variant": "dcgan", "g_widths": "512-256-128-64", "seed": 0, "time": now}

    for i in range(present):
        writer.evaluations[(row(i)["trial_id"], float(i))] = {"sweep": "bench", **row(i)}
    start = time.perf_counter()
    for i in range(present, present + calls):
        writer.add_evaluation(row(i))
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
