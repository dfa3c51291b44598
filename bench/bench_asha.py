#!/usr/bin/env python
"""What ASHA saves on one sweep, and whether it still finds FIFO's answer: the same sweep file run with
fifo, with per-trial ASHA (`scheduler.unit: trial`) and with per-configuration ASHA (`unit: config`).

Default sweep (CPU, a few minutes per arm on 2 cores): variant {dcgan, use-cmhsa-gan} x two tiny
g_widths = 4 configurations x seeds {0, 1, 2} = 12 trials on procedurally generated faces, tiny-conv
FID, 2 kimg each, an FID every 0.5 kimg, ASHA grace 0.5 kimg / reduction factor 2. Each run is
`orchestrator sweep FILE --results <temp root>` in a subprocess; from its trials.parquet the table
compares the total kimg trained, the wall time (including Ray's start), and the best configuration by
mean final FID over its completed seeds (what a paper table reports), against FIFO's.

--packing (needs a CUDA GPU; not run on CPU): trials per GPU. --packing-trials trials of a width-512
DCGAN (seeds only) with resources.gpu 1, 0.5 and 0.25 (1, 2 and 4 trials sharing the GPU), fifo,
one evaluation per trial; compares wall time and aggregate images/s (total kimg / wall).
    python bench/bench_asha.py
    python bench/bench_asha.py --packing --data ../shared/datasets/anime-faces-64
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
import yaml
from bench_common import REPO, device_name, markdown_table, run_metadata, write_results

DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "anime-faces-64"


def asha_sweep(name: str, scheduler: str, args: argparse.Namespace, unit: str | None = None) -> dict:
    return {
        "name": name,
        "description": "bench_asha: ASHA vs FIFO on the same trials",
        "method": "grid",
        "metric": {"name": "fid", "goal": "minimize"},
        "data": {"path": None, "image_size": 64, "synthetic_count": 2000},
        "model": {"d_widths": [8, 16, 32, 32], "heads": 2},
        "train": {"kimg": args.kimg, "batch_size": 32},
        "eval": {"every_kimg": args.every_kimg, "fid_samples": 128, "final_fid_samples": 256,
                 "extractor": "tiny-conv", "grid_size": 4},
        "parameters": {
            "variant": {"values": ["dcgan", "use-cmhsa-gan"]},
            "g_widths": {"values": [[32, 16, 8, 8], [64, 32, 16, 8]]},
            "seed": {"values": list(range(args.seeds))},
        },
        "scheduler": {"type": scheduler, "unit": unit, "grace_period": args.grace,
                      "reduction_factor": args.reduction_factor, "max_t": args.kimg}
        if scheduler == "asha" else {"type": "fifo"},
        "resources": {"cpu": 1, "gpu": 0},
        "max_failures": 0,
    }


def packing_sweep(name: str, gpu_fraction: float, args: argparse.Namespace) -> dict:
    return {
        "name": name,
        "description": f"bench_asha --packing: {gpu_fraction} GPU per trial",
        "method": "grid",
        "data": {"path": str(args.data) if args.data else None},
        "model": {"variant": "dcgan", "g_widths": [512, 256, 128, 64]},
        "train": {"kimg": args.packing_kimg, "batch_size": 100, "device": "cuda"},
        "eval": {"every_kimg": args.packing_kimg, "fid_samples": 100, "final_fid_samples": 100,
                 "extractor": "tiny-conv", "grid_size": 2},
        "parameters": {"seed": {"values": list(range(args.packing_trials))}},
        "scheduler": {"type": "fifo"},
        "resources": {"cpu": args.packing_cpus, "gpu": gpu_fraction},
        "max_failures": 0,
    }


def run_sweep(spec: dict, root: Path, dry_run: bool = False) -> tuple[float, Path]:
    """Run `orchestrator sweep` on spec in a subprocess (Ray state never outlives it); wall seconds."""
    file = root / f"{spec['name']}.yaml"
    file.write_text(yaml.safe_dump(spec, sort_keys=False))
    command = [sys.executable, "-m", "orchestrator.cli", "sweep", str(file), "--results", str(root / "results")]
    start = time.perf_counter()
    done = subprocess.run(command + (["--dry-run"] if dry_run else []), cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n"
                           f"{done.stderr[-3000:]}")
    return seconds, root / "results" / spec["name"] / "trials.parquet"


def summarise(label: str, seconds: float, trials_file: Path) -> dict:
    trials = pq.read_table(trials_file).to_pylist()
    statuses: dict[str, int] = {}
    finals: dict[str, list[float]] = {}
    for t in trials:
        statuses[t["status"]] = statuses.get(t["status"], 0) + 1
        if t["status"] == "completed":
            finals.setdefault(f"{t['variant']} {t['g_widths']}", []).append(t["final_fid"])
    # The paper-table answer: the configuration with the lowest mean final FID over its completed seeds
    # (with per-trial ASHA those are the seeds that survived, which is what biases it).
    means = {config: sum(v) / len(v) for config, v in finals.items()}
    best = min(means, key=means.get)
    return {
        "run": label,
        "trials": len(trials),
        "statuses": " ".join(f"{k}={v}" for k, v in sorted(statuses.items())),
        "kimg_trained": round(sum(t["kimg"] or 0.0 for t in trials), 2),
        "wall_s": round(seconds, 1),
        "best_config": best,
        "best_mean_final_fid": round(means[best], 3),
        "seeds_in_mean": len(finals[best]),
    }


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-asha-") as tmp:
        root = Path(tmp)
        if args.packing and args.dry_run:  # validate the sweep files only (works without a GPU)
            for fraction in (1.0, 0.5, 0.25):
                run_sweep(packing_sweep(f"pack-{fraction:g}", fraction, args), root, dry_run=True)
            print("packing sweep files are valid (dry run)")
            return
        if args.packing:
            title, rows = "GPU packing (fifo, width 512)", packing(args, root)
            columns = ["gpu_per_trial", "trials", "kimg_trained", "wall_s", "images_per_s_total"]
        else:
            rows = []
            for label, scheduler, unit in (("fifo", "fifo", None), ("asha unit=trial", "asha", "trial"),
                                           ("asha unit=config", "asha", "config")):
                spec = asha_sweep(f"bench-{label.replace(' ', '-').replace('=', '-')}", scheduler, args, unit)
                seconds, trials_file = run_sweep(spec, root)
                rows.append(summarise(label, seconds, trials_file))
                print(rows[-1], flush=True)
            fifo = rows[0]
            for row in rows:
                row["kimg_vs_fifo"] = round(row["kimg_trained"] / fifo["kimg_trained"], 2)
                row["same_best_as_fifo"] = row["best_config"] == fifo["best_config"]
            title = f"FIFO vs per-trial vs per-configuration ASHA (4 configurations x {args.seeds} seeds)"
            columns = ["run", "trials", "statuses", "kimg_trained", "kimg_vs_fifo", "wall_s", "best_config",
                       "best_mean_final_fid", "seeds_in_mean", "same_best_as_fifo"]
    print()
    print(markdown_table(rows, columns))
    device = torch.device("cuda" if args.packing else "cpu")
    meta = run_metadata(device_name(device), kimg=args.packing_kimg if args.packing else args.kimg,
                        every_kimg=args.every_kimg, grace=args.grace, reduction_factor=args.reduction_factor)
    write_results(Path(args.out_dir), "packing" if args.packing else "asha", meta, {title: (rows, columns)})


def packing(args: argparse.Namespace, root: Path) -> list[dict]:
    if not torch.cuda.is_available():
        raise SystemExit("error: --packing needs a CUDA GPU (Ray would wait forever for GPU resources)")
    rows = []
    for fraction in (1.0, 0.5, 0.25):
        seconds, trials_file = run_sweep(packing_sweep(f"pack-{fraction:g}", fraction, args), root)
        trials = pq.read_table(trials_file).to_pylist()
        kimg = sum(t["kimg"] or 0.0 for t in trials)
        rows.append({"gpu_per_trial": fraction, "trials": len(trials), "kimg_trained": round(kimg, 2),
                     "wall_s": round(seconds, 1), "images_per_s_total": round(kimg * 1000 / seconds, 1)})
        print(rows[-1], flush=True)
    return rows


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kimg", type=float, default=2.0, help="budget per trial")
    p.add_argument("--every-kimg", type=float, default=0.5)
    p.add_argument("--grace", type=float, default=0.5, help="ASHA grace period, kimg")
    p.add_argument("--reduction-factor", type=float, default=2.0)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--packing", action="store_true", help="GPU packing instead (needs CUDA)")
    p.add_argument("--packing-trials", type=int, default=4)
    p.add_argument("--packing-kimg", type=float, default=20.0)
    p.add_argument("--packing-cpus", type=float, default=2.0, help="CPUs per trial in --packing")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="--packing's images (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="with --packing: only validate its sweep files")
    p.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    return p.parse_args()


if __name__ == "__main__":
    main()
