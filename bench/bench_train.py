#!/usr/bin/env python
"""Training images/s: the textbook PyTorch DCGAN loop vs ours, with one row per optimisation.

Rows, for each variant and generator width (ratios are against that pair's textbook and tuned-loader rows):
  textbook            the PyTorch DCGAN tutorial loop: ImageFolder + PIL transforms + DataLoader(num_workers=2,
                      shuffle), fp32, default memory layout, sigmoid + nn.BCELoss, .item() reads every step
  tuned-loader        the same step with a tuned DataLoader: num_workers = every CPU this process may use,
                      pin_memory (CUDA), persistent_workers, non_blocking copies (a baseline, not cumulative)
  resident            textbook step on data held on the device, normalised once, batched by indexing
                      (gan.step.DeviceBatches.take(), the loop's own batcher)
  our-step            + our iteration, gan.step.TrainStep run eagerly: logit (softplus) losses, backward into
                      each network's own parameters, losses summed on the device (no per-step host sync)
  tuned               + cudnn.benchmark and TF32 matmuls/convs
  fused               + fused Adam
  compile             + torch.compile of G and D
  loop                gan.training.training_loop itself, train.cuda_graph=off (the defaults: fp32 + TF32,
                      contiguous layout, fused Adam; = the fused row plus the loop's bookkeeping)
  loop-graph          training_loop with train.cuda_graph=on (one CUDA graph per iteration)
  loop-graph-bf16     + train.amp=true (bf16 autocast)
  loop-graph-cl       + train.channels_last=true
  loop-graph-bf16-cl  + both
  loop-graph-compile  train.cuda_graph=on and train.compile=true: compiled kernels inside the graph
  loop-compile        training_loop with train.compile=true, cuda_graph off (default mode: no CUDA graph at all)
  loop-bf16           training_loop with train.amp=true (bf16 autocast; off by default), no graph
  loop-cl             training_loop with train.channels_last=true (off by default), no graph
textbook, resident ... compile are cumulative and run in this script's own loop (tuned-loader is a
side baseline); the loop* rows call the real training_loop. On CPU the GPU-only rows (tuned, fused,
compile and every loop-* row but loop, whose switches training_loop ignores on CPU) are skipped.

Timing: every row times --kimg thousand images (default 20) after warm-up, once (no repeats): the
ladder rows after --warmup untimed steps, between two device syncs; the loop* rows train 2 x kimg with
an evaluation every kimg and read the second interval's `images_per_s`, which training_loop measures
between evaluations (the first interval absorbs warm-up, graph capture and compilation). The fast rows
(the graph and compile loop rows) time at least --fast-kimg (default 100) so that launch-free iterations
are timed over seconds, not a fraction of one. Peak memory (CUDA) is torch.cuda.max_memory_allocated since
a reset made after the warm-up.

--check-graph (bench/graph_check.py) trains --iterations iterations of one variant and width eagerly, with
the CUDA graph, and eagerly again, deterministically, and says AGREE, DISAGREE or FAIL.

Needs torch, torchvision, numpy, pillow and torch-fidelity (imported by gan.metrics); no Ray.
    python bench/bench_train.py                 # all rows, 3 widths, dcgan and use-cmhsa-gan
    python bench/bench_train.py --quick         # width 512 only, small kimg (CPU smoke run)
    python bench/bench_train.py --check-graph --iterations 200 --variant dcgan --width 512
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torchvision.datasets
import torchvision.transforms as transforms
from bench_common import (
    BATCH,
    BCE_VARIANTS,
    DEFAULT_DATA,
    REPO,
    WIDTHS,
    backend_flags,
    device_name,
    markdown_table,
    peak_memory_gib,
    reset_peak_memory,
    run_metadata,
    set_backend_flags,
    synchronize,
    write_results,
)
from torch import nn

from gan.config import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    TrainConfig,
    TrialConfig,
    optimiser_settings,
)
from gan.data import PreparedDataset, prepare_dataset
from gan.models import build_models
from gan.precision import set_tf32
from gan.step import DeviceBatches, TrainStep  # the loop's own batcher and step
from gan.training import training_loop

# Cumulative switches: each row turns on its own switch plus those of every row above it.
LADDER = ("textbook", "resident", "our-step", "tuned", "fused", "compile")
BASELINES = ("tuned-loader",)  # the textbook step with a tuned DataLoader; not part of the ladder
LOOP_ROWS = {  # training_loop overrides; amp and channels_last are off by default, cuda_graph is auto (= off)
    "loop": {"cuda_graph": "off"},
    "loop-graph": {"cuda_graph": "on"},
    "loop-graph-bf16": {"cuda_graph": "on", "amp": True},
    "loop-graph-cl": {"cuda_graph": "on", "channels_last": True},
    "loop-graph-bf16-cl": {"cuda_graph": "on", "amp": True, "channels_last": True},
    "loop-graph-compile": {"cuda_graph": "on", "compile": True},
    "loop-compile": {"compile": True, "cuda_graph": "off"},
    "loop-bf16": {"amp": True, "cuda_graph": "off"},
    "loop-cl": {"channels_last": True, "cuda_graph": "off"},
}
ROWS = ("textbook", *BASELINES, *LADDER[1:], *LOOP_ROWS)
GPU_ONLY = {"tuned", "fused", "compile", *(row for row in LOOP_ROWS if row != "loop")}
# The rows meant to be fastest (graph, compile): timed over at least --fast-kimg, so an interval is long
# enough to measure even when an iteration is a single launch.
FAST_ROWS = {row for row, on in LOOP_ROWS.items() if on.get("cuda_graph") == "on" or on.get("compile")}
NA = "n/a"  # peak memory on a CPU


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.check_graph:
        import graph_check  # only here: the benchmark itself never needs it

        sys.exit(graph_check.run_from_args(args, device))
    rows = [r for r in args.rows if device.type == "cuda" or r not in GPU_ONLY]
    skipped = [r for r in args.rows if r not in rows]
    if skipped:
        print(f"skipping GPU-only rows on {device.type}: {', '.join(skipped)}")
    load_at_start = round(os.getloadavg()[0], 2)
    dataset = prepare_dataset(DataConfig(path=str(args.data)))
    print(f"data: {dataset.source}: {len(dataset.split('train'))} training images "
          f"(prepare {dataset.prepare_seconds:.1f} s)")
    print(f"tuned-loader workers: {loader_workers()}")

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        image_folder = textbook_image_folder(args.data, Path(tmp))
        for variant in args.variants:
            for width in args.widths:
                group = [run_row(row, variant, width, dataset, image_folder, device, args, Path(tmp)) for row in rows]
                add_ratios(group)
                results += group

    columns = ["variant", "g_width", "row", "kimg_timed", "images_per_s", "vs_textbook", "vs_tuned_loader",
               "peak_mem_gib", "note"]
    meta = run_metadata(device_name(device), batch_size=BATCH, kimg_timed_per_row=args.kimg,
                        kimg_timed_fast_rows=max(args.kimg, args.fast_kimg), ladder_warmup_steps=args.warmup,
                        tuned_loader_workers=loader_workers(), data=args.data.name,
                        load_average_1m_at_start=load_at_start)
    print()
    print(markdown_table(results, columns))
    write_results(Path(args.out_dir), "train", meta, {"training images/s": (results, columns)})


def run_row(row: str, variant: str, width: str, dataset: PreparedDataset, image_folder: Path,
            device: torch.device, args: argparse.Namespace, tmp: Path) -> dict:
    """One row measured (or its failure recorded: out of memory at 2048 must not lose the other rows)."""
    defaults = backend_flags()
    torch.manual_seed(0)
    model_cfg = ModelConfig(variant=variant, g_widths=WIDTHS[width])
    kimg = max(args.kimg, args.fast_kimg) if row in FAST_ROWS else args.kimg
    note = ""
    try:
        if row in LOOP_ROWS:
            ips, peak, note = measure_training_loop(model_cfg, dataset, device, kimg, LOOP_ROWS[row],
                                                    tmp / f"{variant}-{width}-{row}")
        else:
            ips, peak = measure_ladder(model_cfg, row_switches(row), dataset, image_folder, device, kimg, args.warmup)
    except Exception as exc:
        first_line = str(exc).splitlines()[0][:160] if str(exc) else ""
        ips, peak, note = None, None, f"failed: {type(exc).__name__}: {first_line}"
    finally:
        set_backend_flags(*defaults)  # training_loop and the `tuned` row change them process-wide
        torch._dynamo.reset()  # compiled graphs of one row must not serve the next
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"{variant:14s} {width:>5s} {row:18s} "
          + (f"{ips:10.1f} img/s" if ips is not None else "    failed")
          + (f"  peak {peak} GiB" if device.type == "cuda" and peak is not None else "")
          + (f"  ({note})" if note else ""), flush=True)
    return {"variant": variant, "g_width": int(width), "row": row, "kimg_timed": kimg,
            "images_per_s": None if ips is None else round(ips, 1),
            "peak_mem_gib": peak if device.type == "cuda" else NA, "note": note}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="image folder (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", nargs="+", default=["dcgan", "use-cmhsa-gan"], choices=BCE_VARIANTS)
    p.add_argument("--widths", nargs="+", choices=list(WIDTHS), help="generator widths by first width (default: all)")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--kimg", type=float, help="thousand images timed per row (default 20; --quick: 0.5)")
    p.add_argument("--fast-kimg", type=float, default=100.0,
                   help="at least this many kimg timed for the graph and compile loop rows (default %(default)s)")
    p.add_argument("--warmup", type=int, help="untimed steps before timing a ladder row (default 20; --quick: 3)")
    p.add_argument("--quick", action="store_true", help="width 512 only, small kimg and warm-up")
    p.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    g = p.add_argument_group("graph check (--check-graph, bench/graph_check.py)")
    g.add_argument("--check-graph", action="store_true",
                   help="train eagerly and with the CUDA graph from the same seed and compare (CUDA only)")
    g.add_argument("--iterations", type=int, default=200, help="iterations per run (default %(default)s)")
    g.add_argument("--exact", type=int, default=50,
                   help="the first this many iterations' losses must be bitwise equal (default %(default)s)")
    g.add_argument("--rtol", type=float, default=1e-4,
                   help="relative difference per tensor accepted after --iterations (default %(default)s)")
    g.add_argument("--variant", choices=BCE_VARIANTS, help="variant checked (default dcgan)")
    g.add_argument("--width", choices=list(WIDTHS), help="generator width checked (default 512)")
    g.add_argument("--points", type=int, default=10, help="segments of the printed loss curve (default %(default)s)")
    g.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.check_graph:
        args.variant, args.width = args.variant or "dcgan", args.width or "512"
        if args.iterations < 1 or args.points < 1 or not 1 <= args.exact <= args.iterations:
            p.error("--iterations and --points must be >= 1, and --exact between 1 and --iterations")
    elif args.variant or args.width:
        p.error("--variant/--width go with --check-graph; the benchmark takes --variants/--widths")
    args.widths = args.widths or (["512"] if args.quick else list(WIDTHS))
    args.kimg = args.kimg if args.kimg is not None else (0.5 if args.quick else 20.0)
    args.warmup = args.warmup if args.warmup is not None else (3 if args.quick else 20)
    if args.kimg * 1000 < BATCH:
        p.error(f"--kimg must cover at least one batch ({BATCH / 1000})")
    needs_data = not args.check_graph or torch.device(args.device).type == "cuda"
    if needs_data and not args.data.is_dir():
        p.error(f"--data {args.data}: not a folder")
    return args


def row_switches(row: str) -> set[str]:
    if row in BASELINES:
        return {"textbook", row}
    return set(LADDER[: LADDER.index(row) + 1])


def add_ratios(group: list[dict]) -> None:
    """vs_textbook and vs_tuned_loader: each row's images/s over that baseline's (same variant and width)."""
    base = {r["row"]: r["images_per_s"] for r in group}
    for r in group:
        for column, baseline in (("vs_textbook", "textbook"), ("vs_tuned_loader", "tuned-loader")):
            b = base.get(baseline)
            r[column] = round(r["images_per_s"] / b, 2) if r["images_per_s"] and b else None


# ---- the textbook loop (PyTorch DCGAN tutorial) ---------------------------------------------------


def textbook_image_folder(data: Path, tmp: Path) -> Path:
    """ImageFolder wants <root>/<class>/<images>; a one-class root linking to the data folder."""
    root = tmp / "imagefolder"
    root.mkdir()
    (root / "faces").symlink_to(data.resolve(), target_is_directory=True)
    return root


def loader_workers() -> int:
    """Every CPU this process may run on (the affinity mask, not the machine's count, where known)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def textbook_batches(image_folder: Path, image_size: int, device: torch.device, tuned: bool) -> Iterator[torch.Tensor]:
    dataset = torchvision.datasets.ImageFolder(
        root=str(image_folder),
        transform=transforms.Compose([
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ]),
    )
    if tuned:
        loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=loader_workers(),
                                             pin_memory=device.type == "cuda", persistent_workers=True)
    else:
        loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=2)
    while True:  # the tutorial's `for epoch ...: for data in dataloader`
        for images, _ in loader:
            yield images


def textbook_step(G: nn.Module, D: nn.Module, opt_g, opt_d, real: torch.Tensor, nz: int, device,
                  non_blocking: bool = False) -> None:
    """One iteration of the tutorial, with D's logits passed through a sigmoid for nn.BCELoss.
    Like the tutorial it reuses the D step's fakes for the G step (one G forward per iteration)."""
    criterion = nn.BCELoss()
    real = real.to(device, non_blocking=non_blocking)
    b = real.size(0)
    D.zero_grad()
    label = torch.full((b,), 1.0, dtype=torch.float, device=device)
    output = torch.sigmoid(D(real)).view(-1)
    err_d_real = criterion(output, label)
    err_d_real.backward()
    d_x = output.mean().item()
    noise = torch.randn(b, nz, 1, 1, device=device)
    fake = G(noise)
    label.fill_(0.0)
    output = torch.sigmoid(D(fake.detach())).view(-1)
    err_d_fake = criterion(output, label)
    err_d_fake.backward()
    d_g_z1 = output.mean().item()
    err_d = err_d_real + err_d_fake
    opt_d.step()
    G.zero_grad()
    label.fill_(1.0)
    output = torch.sigmoid(D(fake)).view(-1)
    err_g = criterion(output, label)
    err_g.backward()
    d_g_z2 = output.mean().item()
    opt_g.step()
    # The tutorial logs these every step (G_losses.append(errG.item()), ...): a host sync each.
    _ = (err_d.item(), err_g.item(), d_x, d_g_z1, d_g_z2)


# ---- the cumulative ladder ------------------------------------------------------------------------


def measure_ladder(
    model_cfg: ModelConfig,
    switches: set[str],
    dataset: PreparedDataset,
    image_folder: Path,
    device: torch.device,
    kimg: float,
    warmup: int,
) -> tuple[float, float | None]:
    """(images/s, peak GiB) of the textbook loop with `switches` applied, after `warmup` steps."""
    if "tuned" in switches:  # what training_loop sets on CUDA
        torch.backends.cudnn.benchmark = True
        set_tf32(True)
    opt = optimiser_settings(model_cfg.variant, TrainConfig())  # the variant's own lr and betas, as the loop
    models = build_models(model_cfg)
    for m in models.values():
        m.to(device).train()
    G, D = models["G"], models["D"]
    adam = dict(betas=(opt["beta1"], opt["beta2"]), fused="fused" in switches)
    opt_d = torch.optim.Adam(D.parameters(), lr=opt["lr_d"], **adam)
    opt_g = torch.optim.Adam(G.parameters(), lr=opt["lr_g"], **adam)
    loader = None

    if "resident" in switches:
        batches = DeviceBatches(dataset.split("train"), BATCH, device, seed=0)
    if "our-step" in switches:
        compiled = {k: torch.compile(m) for k, m in models.items()} if "compile" in switches else None
        train_step = TrainStep(variant=model_cfg.variant, models=models, opt_d=opt_d, opt_g=opt_g, batches=batches,
                               nz=model_cfg.nz, d_steps=opt["d_steps"], cuda_graph="off", compiled=compiled)

        def step() -> int:
            train_step()
            return BATCH * opt["d_steps"]
    else:
        if "resident" in switches:
            next_real = batches.take
        else:
            loader = textbook_batches(image_folder, model_cfg.image_size, device, tuned="tuned-loader" in switches)
            next_real = lambda: next(loader)  # noqa: E731
        non_blocking = "tuned-loader" in switches

        def step() -> int:
            real = next_real()
            textbook_step(G, D, opt_g, opt_d, real, model_cfg.nz, device, non_blocking)
            return len(real)

    try:
        for _ in range(warmup):
            step()
        synchronize(device)
        reset_peak_memory(device)
        images, target = 0, int(round(kimg * 1000))
        start = time.perf_counter()
        while images < target:
            images += step()
        synchronize(device)
        return images / (time.perf_counter() - start), peak_memory_gib(device)
    finally:
        if loader is not None:
            loader.close()  # stops the DataLoader's workers (persistent ones included) before the next row


# ---- the real training loop -----------------------------------------------------------------------


def measure_training_loop(
    model_cfg: ModelConfig, dataset: PreparedDataset, device: torch.device, kimg: float, overrides: dict, run_dir: Path
) -> tuple[float, float | None, str]:
    """training_loop's own images/s over its second evaluation interval (the first one warms up), the peak
    memory since the first evaluation, and whether the CUDA graph was in use."""
    cfg = TrialConfig(
        model=model_cfg,
        data=DataConfig(path=dataset.source),
        train=TrainConfig(kimg=2 * kimg, batch_size=BATCH, device=str(device), **overrides),
        # Cheapest evaluation the loop accepts: it is excluded from images_per_s anyway.
        eval=EvalConfig(every_kimg=kimg, fid_samples=10, final_fid_samples=10, extractor="tiny-conv",
                        fid_split="val", grid_size=2),
    )
    reports: list[dict] = []

    def report(metrics: dict, _checkpoint) -> None:
        reports.append(metrics)
        if len(reports) == 1:
            reset_peak_memory(device)  # after warm-up; the second interval and its (tiny) evaluation remain

    result = training_loop(cfg, run_dir, report=report, dataset=dataset)
    if result.status != "completed" or len(reports) < 2:
        raise RuntimeError(f"training_loop ended {result.status} ({result.reason}) after {len(reports)} evaluations")
    last = reports[-1]
    if overrides.get("cuda_graph") == "on":
        note = "graph" if last.get("cuda_graph") else (last.get("cuda_graph_note") or "graph not used: eager")
    else:
        note = ""
    return float(last["images_per_s"]), peak_memory_gib(device), note


if __name__ == "__main__":
    main()
