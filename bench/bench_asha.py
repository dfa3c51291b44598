#!/usr/bin/env python
"""What ASHA saves on one sweep: the same sweep file run with scheduler asha and with fifo.

Default sweep (CPU, ~2-4 min per scheduler on 2 cores): variant {dcgan, use-cmhsa-gan} x two tiny
g_widths x seeds {0, 1} = 8 trials on procedurally generated faces, tiny-conv FID, 4 kimg each,
an FID every 0.5 kimg, ASHA grace 1 kimg / reduction factor 2. Each run is
`orchestrator sweep FILE --results <temp root>` in a subprocess; from its trials.parquet the table
compares the total kimg trained, the wall time (including Ray's start), and the best FID found (and
by which trial).

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

from bench_train import REPO, device_name, markdown_table, run_metadata, write_results

DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "anime-faces-64"


def asha_sweep(name: str, scheduler: str, args: argparse.Namespace) -> dict:
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
        "scheduler": {"type": scheduler, "grace_period": args.grace, "reduction_factor": args.reduction_factor,
                      "max_t": args.kimg} if scheduler == "asha" else {"type": "fifo"},
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
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return seconds, root / "results" / spec["name"] / "trials.parquet"


def summarise(label: str, seconds: float, trials_file: Path) -> dict:
    trials = pq.read_table(trials_file).to_pylist()
    best = min((t for t in trials if t["best_fid"] is not None), key=lambda t: t["best_fid"])
    statuses: dict[str, int] = {}
    for t in trials:
        statuses[t["status"]] = statuses.get(t["status"], 0) + 1
    return {
        "run": label,
        "trials": len(trials),
        "statuses": " ".join(f"{k}={v}" for k, v in sorted(statuses.items())),
        "kimg_trained": round(sum(t["kimg"] or 0.0 for t in trials), 2),
        "wall_s": round(seconds, 1),
        "best_fid": round(best["best_fid"], 3),
        "best_trial": f"{best['variant']} {best['g_widths']} seed {best['seed']}",
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
            for scheduler in ("asha", "fifo"):
                seconds, trials_file = run_sweep(asha_sweep(f"bench-{scheduler}", scheduler, args), root)
                rows.append(summarise(scheduler, seconds, trials_file))
                print(rows[-1], flush=True)
            fifo = rows[-1]
            for row in rows:
                row["kimg_vs_fifo"] = round(row["kimg_trained"] / fifo["kimg_trained"], 2)
            title = "ASHA vs FIFO (same 8 trials)" if args.seeds == 2 else "ASHA vs FIFO"
            columns = ["run", "trials", "statuses", "kimg_trained", "kimg_vs_fifo", "wall_s", "best_fid", "best_trial"]
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
    p.add_argument("--kimg", type=float, default=4.0, help="budget per trial")
    p.add_argument("--every-kimg", type=float, default=0.5)
    p.add_argument("--grace", type=float, default=1.0, help="ASHA grace period, kimg")
    p.add_argument("--reduction-factor", type=float, default=2.0)
    p.add_argument("--seeds", type=int, default=2)
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
