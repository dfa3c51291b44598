#!/usr/bin/env python
"""Every GPU figure in one command, on one GPU, in at most about five minutes (--budget-s).

    python bench/gpu_check.py [--data .gpu/faces] [--out $OUT/gpu_check.md] [--weights inception.pth]

Writes a markdown report section by section, flushed after each, so a run cut short keeps what it measured:
1. the machine: GPU, driver, CUDA, cuDNN, and the versions of torch (which may differ from the pinned one),
   torchvision, numpy and torch-fidelity;
2. the graph check (bench/graph_check.py, in a subprocess so that its deterministic settings never reach the
   speed figures) for dcgan, use-gan, cmhsa-gan and use-cmhsa-gan at width 512: AGREE, DISAGREE or FAIL;
3. bench_train.py's width-512 rows for dcgan: textbook, tuned loader, eager (loop), graph, graph-bf16, graph-cl;
4. FID-10k end to end as a trial evaluates: the Evaluator built once (cold, then from its cache), evaluate()
   timed alone, split into generation, extraction, statistics and the Fréchet distance on the device;
5. a torch.profiler summary per iteration (eager and graph; dcgan and use-cmhsa-gan): wall time, GPU-busy
   fraction, and which scaled-dot-product-attention kernel ran;
6. the same bench rows for use-cmhsa-gan, as far as the time budget allows.
A section that would not fit in the budget left is skipped and says so. Without CUDA it prints that it needs
CUDA and exits 0. Imports torch, torchvision, numpy, torch-fidelity and gan: nothing of Ray, pydantic or the
orchestrator. Stage the data and torch-fidelity with ../shared/tools/stage-gpu-run (into .gpu/).
"""
from __future__ import annotations

import time

STARTED = time.monotonic()  # the budget counts from here, imports included

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_common import BATCH, DEFAULT_DATA, REPO, WIDTHS, markdown_table  # noqa: E402

STAGED = REPO / ".gpu"
BENCH_ROWS = {"textbook": "textbook", "tuned-loader": "tuned loader", "loop": "eager", "loop-graph": "graph",
              "loop-graph-bf16": "graph-bf16", "loop-graph-cl": "graph-cl"}
GRAPH_CHECK_VARIANTS = ("dcgan", "use-gan", "cmhsa-gan", "use-cmhsa-gan")
ROW_RESERVE_S = 30  # don't start a bench row with less than this left
SECTION_RESERVE_S = {"graph check": 60, "FID": 40, "profiler": 25}


class Report:
    """The markdown file, appended to and flushed one section at a time."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# gpu_check\n")

    def section(self, title: str, body: str) -> None:
        elapsed = time.monotonic() - STARTED
        with open(self.path, "a") as f:
            f.write(f"\n## {title}\n\n{body.rstrip()}\n\n_(written {elapsed:.0f} s after start)_\n")
            f.flush()
            os.fsync(f.fileno())
        print(f"\n## {title}\n\n{body.rstrip()}", flush=True)


def remaining(budget_s: float) -> float:
    return budget_s - (time.monotonic() - STARTED)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    default_data = STAGED / "faces" if (STAGED / "faces").is_dir() else DEFAULT_DATA
    default_out = Path(os.environ["OUT"]) if os.environ.get("OUT") else STAGED
    p.add_argument("--data", type=Path, default=default_data, help="image folder (default: %(default)s)")
    p.add_argument("--out", type=Path, default=default_out / "gpu_check.md", help="report (default: %(default)s)")
    p.add_argument("--weights", help="InceptionV3 weights (else $GAN_INCEPTION_WEIGHTS or torch.hub's cache; "
                   "none: random weights, timing only)")
    p.add_argument("--budget-s", type=float, default=290.0, help="wall-clock budget (default %(default)s)")
    p.add_argument("--graph-iterations", type=int, default=120, help="iterations per graph-check run")
    p.add_argument("--kimg", type=float, default=20.0, help="kimg timed per bench row (default %(default)s)")
    p.add_argument("--fast-kimg", type=float, default=100.0, help="at least this for the graph rows")
    p.add_argument("--fid-samples", type=int, default=10_000)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check.py needs CUDA: torch.cuda.is_available() is False here, so nothing was measured. "
              "Run it on a machine with a GPU.")
        return 0
    report = Report(args.out)
    report.section("machine", machine_section(args))
    device = torch.device("cuda")
    sections = [
        ("graph check (graph vs eager, deterministic, width 512)", lambda: graph_check_section(args)),
        ("training images/s, dcgan, width 512", lambda: bench_rows_section(args, device, "dcgan")),
        (f"FID-{args.fid_samples} end to end", lambda: fid_section(args, device)),
        ("profiler: one iteration on the GPU (width 512)", lambda: profiler_section(device)),
        ("training images/s, use-cmhsa-gan, width 512", lambda: bench_rows_section(args, device, "use-cmhsa-gan")),
    ]
    for title, run in sections:
        reserve = next((s for key, s in SECTION_RESERVE_S.items() if key in title), ROW_RESERVE_S)
        if remaining(args.budget_s) < reserve:
            report.section(title, f"skipped: {remaining(args.budget_s):.0f} s of the {args.budget_s:.0f} s budget "
                                  f"left, this section needs about {reserve} s")
            continue
        try:
            body = run()
        except Exception as exc:  # one section failing must not lose the others
            body = f"failed: {type(exc).__name__}: {str(exc)[:500]}"
        report.section(title, body)
    print(f"\nwrote {args.out} ({time.monotonic() - STARTED:.0f} s)")
    return 0


# ---- 1. the machine ---------------------------------------------------------------------------------------


def machine_section(args: argparse.Namespace) -> str:
    import torch_fidelity
    import torchvision

    props = torch.cuda.get_device_properties(0)
    pinned = re.search(r'"torch==([^"]+)"', (REPO / "pyproject.toml").read_text()) if (
        REPO / "pyproject.toml").is_file() else None
    rows = [
        ("GPU", f"{props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}, "
                f"{props.multi_processor_count} SMs"),
        ("driver", nvidia_smi("driver_version")),
        ("CUDA (torch build)", torch.version.cuda),
        ("cuDNN", torch.backends.cudnn.version()),
        ("torch", torch.__version__ + (f" (pinned {pinned.group(1)}: "
                                       f"{'same' if torch.__version__.startswith(pinned.group(1)) else 'DIFFERENT'})"
                                       if pinned else "")),
        ("torchvision", torchvision.__version__),
        ("numpy", np.__version__),
        ("torch-fidelity", torch_fidelity.__version__),
        ("python", platform.python_version()),
        ("CPU cores (affinity)", len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
        ("data", f"{args.data} ({sum(1 for _ in args.data.iterdir()) if args.data.is_dir() else 'missing'} files)"),
        ("git commit", git_commit()),
        ("command", " ".join([Path(sys.executable).name, *sys.argv])),
        ("date", time.strftime("%Y-%m-%d %H:%M:%S %Z")),
    ]
    return markdown_table([{"what": k, "value": v} for k, v in rows], ["what", "value"])


def nvidia_smi(field: str) -> str:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no nvidia-smi)"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown (no git checkout)"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


# ---- 2. the graph check ------------------------------------------------------------------------------------


def graph_check_section(args: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory(prefix="gpu-check-graph-") as tmp:
        out = Path(tmp) / "graph-check.json"
        command = [sys.executable, str(REPO / "bench" / "graph_check.py"), "--data", str(args.data),
                   "--variants", *GRAPH_CHECK_VARIANTS, "--width", "512", "--iterations", str(args.graph_iterations),
                   "--json", str(out)]
        env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # before cuBLAS starts in that process
        timeout = max(30.0, min(180.0, remaining(args.budget_s) - 150))  # leave room for the other sections
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
            ended = f"exit status {done.returncode}"
            stderr = done.stderr
        except subprocess.TimeoutExpired as exc:
            ended = f"stopped after {timeout:.0f} s (time budget); variants not listed were not checked"
            stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        payload = json.loads(out.read_text()) if out.is_file() else {"results": []}
    rows = payload["results"]
    columns = ["variant", "verdict", "first_loss_mismatch", "state_mismatches", "worst_final", "seconds", "why"]
    text = (f"`{' '.join(Path(c).name if i < 2 else c for i, c in enumerate(command))}`: {ended}. Each variant: "
            f"eager, graph and eager again, {args.graph_iterations} iterations, batch {BATCH}, the first 50 "
            "compared bitwise (losses), then the whole training state, then every tensor within rtol 1e-4.\n\n")
    text += markdown_table(rows, columns) if rows else "no variant finished."
    if stderr.strip():
        tail = "\n".join(stderr.strip().splitlines()[-8:])
        text += f"\n\nstderr (last lines):\n\n```\n{tail}\n```"
    return text


# ---- 3 and 6. bench rows ------------------------------------------------------------------------------------


_prepared: dict = {}


def dataset_for(data: Path):
    from gan.config import DataConfig
    from gan.data import prepare_dataset

    if data not in _prepared:
        _prepared[data] = prepare_dataset(DataConfig(path=str(data)))
    return _prepared[data]


def bench_rows_section(args: argparse.Namespace, device: torch.device, variant: str) -> str:
    import bench_train

    dataset = dataset_for(args.data)
    row_args = argparse.Namespace(kimg=args.kimg, fast_kimg=args.fast_kimg, warmup=20)
    results, skipped = [], []
    eager_ips = None  # the eager loop's images/s bounds how long a graph row (2 x at least fast-kimg) takes
    with tempfile.TemporaryDirectory(prefix="gpu-check-rows-") as tmp:
        image_folder = bench_train.textbook_image_folder(args.data, Path(tmp))
        for row in BENCH_ROWS:
            needed = ROW_RESERVE_S
            if row in bench_train.FAST_ROWS and eager_ips:
                needed = max(needed, 2 * max(args.kimg, args.fast_kimg) * 1000 / eager_ips + 15)
            if remaining(args.budget_s) < needed:
                skipped.append(row)
                continue
            result = bench_train.run_row(row, variant, "512", dataset, image_folder, device, row_args, Path(tmp))
            if row == "loop":
                eager_ips = result["images_per_s"]
            results.append(result)
    bench_train.add_ratios(results)
    for r in results:
        r["row"] = f"{BENCH_ROWS[r['row']]} (`{r['row']}`)"
    columns = ["row", "images_per_s", "vs_textbook", "vs_tuned_loader", "kimg_timed", "peak_mem_gib", "note"]
    text = (f"{variant} {list(WIDTHS['512'])}, batch {BATCH}, {len(dataset.split('train'))} training images; "
            f"ladder rows time {args.kimg} kimg after 20 warm-up steps, loop rows train 2 x kimg and read the second "
            f"interval (graph rows: at least {args.fast_kimg} kimg). One run, no repeats.\n\n")
    text += markdown_table(results, columns)
    if skipped:
        text += f"\n\nskipped for lack of time: {', '.join(skipped)}"
    return text


# ---- 4. FID ---------------------------------------------------------------------------------------------


def fid_section(args: argparse.Namespace, device: torch.device) -> str:
    import bench_fid

    from gan.config import INCEPTION, ModelConfig
    from gan.metrics import to_uint8
    from gan.models import build_models

    dataset = dataset_for(args.data)
    real = dataset.split("train")
    with tempfile.TemporaryDirectory(prefix="gpu-check-fid-") as tmp:
        weights_args = argparse.Namespace(extractor=INCEPTION, weights=args.weights, random_weights=False)
        weights, label = bench_fid.resolve_weights(weights_args, Path(tmp))
        torch.manual_seed(0)
        G = build_models(ModelConfig(variant="dcgan", g_widths=WIDTHS["512"]))["G"].to(device).eval()

        def sampler(generate: list[float]):
            noise = torch.Generator(device=device).manual_seed(0)

            def sample(n: int) -> torch.Tensor:  # as training_loop's evaluation samples (fp32: amp is off)
                start = time.perf_counter()
                with torch.no_grad():
                    images = to_uint8(G(torch.randn(n, G.nz, device=device, generator=noise)).float())
                torch.cuda.synchronize(device)
                generate.append(time.perf_counter() - start)
                return images

            return sample

        rows = []
        for cache_state in ("cold", "cached"):
            generate: list[float] = []
            row, evaluator = bench_fid.time_ours(real, dataset.key, "train", INCEPTION, weights, Path(tmp) / "cache",
                                                 device, 200, sampler(generate), generate, args.fid_samples)
            rows.append({**row, "real_stats": cache_state})
        stages = bench_fid.fid_stages(rows[-1], evaluator, args.fid_samples)
    columns = ["real_stats", "samples", "build_s", "generate_s", "metric_s", "evaluate_s", "total_s", "fid"]
    return (f"InceptionV3 with {label}; generator: an untrained dcgan {list(WIDTHS['512'])} (the time does not "
            f"depend on training; its FID means nothing); real split: train, {len(real)} images. `build_s` builds "
            "the Evaluator as a trial does (cold: extracts the real split; cached: reads its statistics); "
            "`evaluate_s` is evaluate() alone.\n\n" + markdown_table(rows, columns)
            + "\n\nSplit of the cached evaluate():\n\n" + markdown_table(stages, ["stage", "seconds", "how"]))


# ---- 5. profiler ------------------------------------------------------------------------------------------


def profiler_section(device: torch.device) -> str:
    import gpu_profile

    from gan.config import ModelConfig, TrainConfig, TrialConfig
    from gan.step import WARMUP_ITERATIONS, DeviceBatches
    from gan.training import build_trainer, set_training_backends

    images = torch.randint(0, 256, (1000, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rows = []
    for variant in ("dcgan", "use-cmhsa-gan"):
        for mode in ("off", "on"):
            cfg = TrialConfig(model=ModelConfig(variant=variant, g_widths=WIDTHS["512"]),
                              train=TrainConfig(batch_size=BATCH, device="cuda", cuda_graph=mode))
            torch.manual_seed(0)
            set_training_backends(device)
            trainer = build_trainer(cfg, device, DeviceBatches(images.numpy(), BATCH, device, seed=0))
            for _ in range(WARMUP_ITERATIONS + 5):  # warm-up, capture, first replays
                trainer.step()
            summary = gpu_profile.profile_step(trainer.step, device, iterations=10)
            label = "graph" if trainer.step.uses_graph else ("eager" if mode == "off" else "eager (capture failed)")
            rows.append({"variant": variant, "mode": label, **summary})
            del trainer
            torch.cuda.empty_cache()
    columns = ["variant", "mode", "wall_ms", "gpu_busy_ms", "gpu_busy_fraction", "gpu_events_per_iteration",
               "sdpa_backend", "attention_kernels"]
    return ("Per training iteration (batch 100, random images): `wall_ms` timed without the profiler over 10 "
            "iterations; `gpu_busy_ms` is the union of kernel, memcpy and memset time under torch.profiler; "
            "`sdpa_backend` is the aten op the attention dispatched to (eager only: a graph replay runs no host "
            "ops), `attention_kernels` the kernel names that look like attention. A graph row with no GPU events "
            "means the profiler did not trace inside the graph.\n\n" + markdown_table(rows, columns))


if __name__ == "__main__":
    sys.exit(main())
