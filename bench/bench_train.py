#!/usr/bin/env python
"""Training images/s: the textbook PyTorch DCGAN loop vs ours, with one row per optimisation.

Rows, for each variant and generator width (ratios are against that pair's textbook and tuned-loader rows):
  textbook         the PyTorch DCGAN tutorial loop: ImageFolder + PIL transforms + DataLoader(num_workers=2,
                   shuffle), fp32, default memory layout, sigmoid + nn.BCELoss, .item() reads every step
  tuned-loader     the same step with a tuned DataLoader: num_workers = every CPU this process may use,
                   pin_memory (CUDA), persistent_workers, non_blocking copies (a baseline, not cumulative)
  resident         textbook step on data held on the device, normalised once, batched by indexing
                   (gan.step.DeviceBatches.take(), the loop's own batcher)
  our-step         + our iteration, gan.step.TrainStep run eagerly: logit (softplus) losses, backward into
                   each network's own parameters, losses summed on the device (no per-step host sync)
  tuned            + cudnn.benchmark and TF32 matmuls/convs
  fused            + fused Adam
  compile          + torch.compile of G and D
  loop             gan.training.training_loop itself, train.cuda_graph=off (the defaults: fp32 + TF32,
                   contiguous layout, fused Adam; = the fused row plus the loop's bookkeeping)
  loop-graph       training_loop with train.cuda_graph=on (one CUDA graph per iteration)
  loop-compile     training_loop with train.compile=true
  loop-bf16        training_loop with train.amp=true (bf16 autocast; off by default)
  loop-cl          training_loop with train.channels_last=true (off by default)
textbook, resident ... compile are cumulative and run in this script's own loop (tuned-loader is a
side baseline); the loop* rows call the real training_loop. On CPU the GPU-only rows (tuned, fused,
compile and loop-graph/-compile/-bf16/-cl, whose switches training_loop ignores on CPU) are skipped.

Timing: every row times --kimg thousand images (default 20) after warm-up, once (no repeats): the
ladder rows after --warmup untimed steps, between two device syncs; the loop* rows train 2 x kimg with
an evaluation every kimg and read the second interval's `images_per_s`, which training_loop measures
between evaluations (the first interval absorbs warm-up, graph capture and compilation). Peak memory
(CUDA) is torch.cuda.max_memory_allocated since a reset made after the warm-up.

--check-graph trains --iterations iterations of one variant and width eagerly and with the CUDA graph
(both built as training_loop builds them, same seed), plus a second eager run as the run-to-run noise
floor, and prints both loss curves, the largest parameter differences and a verdict.

Needs torch, torchvision, numpy, pillow and torch-fidelity (imported by gan.metrics); no Ray.
    python bench/bench_train.py                 # all rows, 3 widths, dcgan and use-cmhsa-gan
    python bench/bench_train.py --quick         # width 512 only, small kimg (CPU smoke run)
    python bench/bench_train.py --check-graph --iterations 200 --variant dcgan --width 512
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torchvision.datasets
import torchvision.transforms as transforms
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gan.config import DataConfig, EvalConfig, ModelConfig, TrainConfig, TrialConfig, optimiser_settings  # noqa: E402
from gan.data import PreparedDataset, prepare_dataset  # noqa: E402
from gan.models import build_models  # noqa: E402
from gan.step import DeviceBatches, TrainStep  # noqa: E402  (the loop's own batcher and step)
from gan.training import build_trainer, set_training_backends, training_loop  # noqa: E402

WIDTHS = {
    "512": (512, 256, 128, 64),
    "1024": (1024, 512, 256, 128),
    "2048": (2048, 1024, 512, 256),
}
BCE_VARIANTS = ("dcgan", "use-gan", "cmhsa-gan", "use-cmhsa-gan")  # the textbook loss applies to these
# Cumulative switches: each row turns on its own switch plus those of every row above it.
LADDER = ("textbook", "resident", "our-step", "tuned", "fused", "compile")
BASELINES = ("tuned-loader",)  # the textbook step with a tuned DataLoader; not part of the ladder
LOOP_ROWS = {  # training_loop overrides; amp and channels_last are off by default, cuda_graph is auto (= off)
    "loop": {"cuda_graph": "off"},
    "loop-graph": {"cuda_graph": "on"},
    "loop-compile": {"compile": True, "cuda_graph": "off"},
    "loop-bf16": {"amp": True, "cuda_graph": "off"},
    "loop-cl": {"channels_last": True, "cuda_graph": "off"},
}
ROWS = ("textbook", *BASELINES, *LADDER[1:], *LOOP_ROWS)
GPU_ONLY = {"tuned", "fused", "compile", "loop-graph", "loop-compile", "loop-bf16", "loop-cl"}
BATCH = 100
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "anime-faces-64"
NA = "n/a"  # peak memory on a CPU


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.check_graph:
        sys.exit(check_graph(args, device))
    rows = [r for r in args.rows if device.type == "cuda" or r not in GPU_ONLY]
    skipped = [r for r in args.rows if r not in rows]
    if skipped:
        print(f"skipping GPU-only rows on {device.type}: {', '.join(skipped)}")
    defaults = backend_flags()
    load_at_start = round(os.getloadavg()[0], 2)
    dataset = prepare_dataset(DataConfig(path=str(args.data)))
    print(f"data: {dataset.source}: {len(dataset.split('train'))} training images (prepare {dataset.prepare_seconds:.1f} s)")
    print(f"tuned-loader workers: {loader_workers()}")

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        image_folder = textbook_image_folder(args.data, Path(tmp))
        for variant in args.variants:
            for width in args.widths:
                group = []
                for row in rows:
                    set_backend_flags(*defaults)  # training_loop and the `tuned` row change them globally
                    torch.manual_seed(0)
                    model_cfg = ModelConfig(variant=variant, g_widths=WIDTHS[width])
                    note = ""
                    try:
                        if row in LOOP_ROWS:
                            ips, peak, note = measure_training_loop(
                                model_cfg, dataset, device, args.kimg, LOOP_ROWS[row], Path(tmp) / f"{variant}-{width}-{row}")
                        else:
                            ips, peak = measure_ladder(
                                model_cfg, row_switches(row), dataset, image_folder, device, args.kimg, args.warmup)
                    except Exception as exc:  # one row failing (out of memory at 2048, ...) must not lose the rest
                        ips, peak, note = None, None, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                    result = {"variant": variant, "g_width": int(width), "row": row,
                              "images_per_s": None if ips is None else round(ips, 1),
                              "peak_mem_gib": peak if device.type == "cuda" else NA, "note": note}
                    group.append(result)
                    print(f"{variant:14s} {width:>5s} {row:14s} "
                          + (f"{ips:10.1f} img/s" if ips is not None else "    failed")
                          + (f"  peak {peak} GiB" if device.type == "cuda" and peak is not None else "")
                          + (f"  ({note})" if note else ""), flush=True)
                    torch._dynamo.reset()  # compiled graphs of one row must not serve the next
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                add_ratios(group)
                results += group

    columns = ["variant", "g_width", "row", "images_per_s", "vs_textbook", "vs_tuned_loader", "peak_mem_gib", "note"]
    meta = run_metadata(device_name(device), batch_size=BATCH, kimg_timed_per_row=args.kimg,
                        ladder_warmup_steps=args.warmup, tuned_loader_workers=loader_workers(),
                        data=args.data.name, load_average_1m_at_start=load_at_start)
    print()
    print(markdown_table(results, columns))
    write_results(Path(args.out_dir), "train", meta, {"training images/s": (results, columns)})


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="image folder (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", nargs="+", default=["dcgan", "use-cmhsa-gan"], choices=BCE_VARIANTS)
    p.add_argument("--widths", nargs="+", choices=list(WIDTHS), help="generator widths by first width (default: all)")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--kimg", type=float, help="thousand images timed per row (default 20; --quick: 0.5)")
    p.add_argument("--warmup", type=int, help="untimed steps before timing a ladder row (default 20; --quick: 3)")
    p.add_argument("--quick", action="store_true", help="width 512 only, small kimg and warm-up")
    p.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    g = p.add_argument_group("graph check (--check-graph)")
    g.add_argument("--check-graph", action="store_true",
                   help="train eagerly and with the CUDA graph from the same seed and compare (CUDA only)")
    g.add_argument("--iterations", type=int, default=200, help="iterations per run (default %(default)s)")
    g.add_argument("--variant", choices=BCE_VARIANTS, help="variant checked (default dcgan)")
    g.add_argument("--width", choices=list(WIDTHS), help="generator width checked (default 512)")
    g.add_argument("--points", type=int, default=10, help="loss/parameter read-outs along the run (default %(default)s)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--atol", type=float, default=1e-4,
                   help="parameter difference always accepted (default %(default)s)")
    g.add_argument("--noise-factor", type=float, default=10.0,
                   help="also accepted: this many times the eager-vs-eager difference (default %(default)s)")
    args = p.parse_args()
    if args.check_graph:
        args.variant, args.width = args.variant or "dcgan", args.width or "512"
        if args.iterations < 1 or args.points < 1:
            p.error("--iterations and --points must be >= 1")
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
        set_backend_flags(True, True, True)
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


# ---- --check-graph: graph vs eager training from the same seed --------------------------------------


def build_like_training_loop(model_cfg: ModelConfig, dataset: PreparedDataset, device: torch.device,
                             cuda_graph: str, seed: int) -> tuple[dict[str, nn.Module], TrainStep]:
    """Models, optimisers and TrainStep as gan.training.training_loop makes them: its seeding and backend
    flags (mirrored here), its batcher, and its own constructor `build_trainer` (fused Adam on CUDA, with
    capturable=True when the graph is asked for), with train.cuda_graph = `cuda_graph`."""
    cfg = TrialConfig(model=model_cfg, data=DataConfig(path=dataset.source),
                      train=TrainConfig(batch_size=BATCH, device=str(device), seed=seed, cuda_graph=cuda_graph))
    torch.manual_seed(cfg.train.seed)
    set_training_backends(device)
    batches = DeviceBatches(dataset.split("train"), cfg.train.batch_size, device, seed=cfg.train.seed)
    trainer = build_trainer(cfg, device, batches)
    return trainer.models, trainer.step


def snapshot(models: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Every floating-point parameter and buffer (BatchNorm statistics too), copied to the CPU."""
    return {f"{name}.{key}": t.detach().to("cpu", copy=True)
            for name, m in models.items() for key, t in m.state_dict().items() if t.is_floating_point()}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    worst, where = 0.0, ""
    for key, t in a.items():
        d = (t.double() - b[key].double()).abs().max().item()
        if not d <= worst:  # NaN counts as the worst
            worst, where = d, key
    return worst, where


def check_graph_run(model_cfg: ModelConfig, dataset: PreparedDataset, device: torch.device, cuda_graph: str,
                    iterations: int, marks: list[int], seed: int,
                    reference: dict[int, dict[str, torch.Tensor]] | None) -> dict:
    """Train `iterations`; at each mark read the losses (mean since the last mark) and either keep a
    parameter snapshot (reference run) or compare with the reference's snapshot at that mark."""
    models, train_step = build_like_training_loop(model_cfg, dataset, device, cuda_graph, seed)
    start_params = snapshot(models)
    out = {"losses": {}, "diff": {}, "snapshots": {}, "uses_graph": False, "note": "", "finite": True}
    for i in range(1, iterations + 1):
        train_step()
        if i in marks:
            out["losses"][i] = train_step.take_losses()
            params = snapshot(models)
            if reference is None:
                out["snapshots"][i] = params
            else:
                out["diff"][i] = max_difference(params, reference[i])
    synchronize(device)
    out["moved"] = max_difference(snapshot(models), start_params)
    out["uses_graph"], out["note"], out["finite"] = train_step.uses_graph, train_step.graph_note, train_step.all_finite()
    return out


def check_graph(args: argparse.Namespace, device: torch.device) -> int:
    """Exit status: 0 when graph and eager training agree within the tolerance (or there is no CUDA), else 1."""
    if device.type != "cuda" or not torch.cuda.is_available():
        print(f"--check-graph: CUDA graphs need CUDA; this run is on {device.type}, so there is nothing to compare. "
              "Run it on a machine with a GPU.")
        return 0
    return compare_graph_with_eager(args, device)


def compare_graph_with_eager(args: argparse.Namespace, device: torch.device) -> int:
    dataset = prepare_dataset(DataConfig(path=str(args.data)))
    model_cfg = ModelConfig(variant=args.variant, g_widths=WIDTHS[args.width])
    every = max(1, args.iterations // args.points)
    marks = sorted({*range(every, args.iterations + 1, every), args.iterations})
    print(f"check-graph: {args.variant} {list(WIDTHS[args.width])}, batch {BATCH}, {args.iterations} iterations, "
          f"seed {args.seed}, on {device_name(device)}", flush=True)
    defaults = backend_flags()
    t0 = time.perf_counter()
    eager = check_graph_run(model_cfg, dataset, device, "off", args.iterations, marks, args.seed, None)
    reference = eager.pop("snapshots")
    graph = check_graph_run(model_cfg, dataset, device, "on", args.iterations, marks, args.seed, reference)
    again = check_graph_run(model_cfg, dataset, device, "off", args.iterations, marks, args.seed, reference)
    set_backend_flags(*defaults)
    print(f"(three runs in {time.perf_counter() - t0:.1f} s)")

    rows = []
    for i in marks:
        row = {"iteration": i}
        for key in sorted(eager["losses"][i]):
            row[f"{key} eager"] = round(eager["losses"][i][key], 6)
            row[f"{key} graph"] = round(graph["losses"][i].get(key, float("nan")), 6)
        row["max_abs_diff graph-eager"] = f"{graph['diff'][i][0]:.3g}"
        row["max_abs_diff eager-eager"] = f"{again['diff'][i][0]:.3g}"
        rows.append(row)
    columns = list(rows[0])
    print()
    print(markdown_table(rows, columns))

    diff, where = graph["diff"][marks[-1]]
    floor, floor_where = again["diff"][marks[-1]]
    tolerance = max(args.atol, args.noise_factor * floor)
    print()
    print(f"largest absolute parameter difference, graph vs eager after {args.iterations} iterations: {diff:.3g}"
          + (f" ({where})" if where else ""))
    print(f"the same between two eager runs (run-to-run noise: cudnn.benchmark, atomics): {floor:.3g}"
          + (f" ({floor_where})" if floor_where else ""))
    print(f"largest parameter change made by training (eager run): {eager['moved'][0]:.3g} ({eager['moved'][1]})")
    print(f"graph in use: {graph['uses_graph']}" + (f" ({graph['note']})" if graph["note"] else ""))
    if not graph["uses_graph"]:
        verdict = "FAIL: the graph run did not use a CUDA graph, so nothing was compared"
    elif not (eager["finite"] and graph["finite"]):
        verdict = "FAIL: a run produced a non-finite loss"
    elif diff <= tolerance:
        verdict = (f"AGREE: graph vs eager {diff:.3g} <= tolerance {tolerance:.3g} "
                   f"(max(atol {args.atol:g}, {args.noise_factor:g} x eager-vs-eager {floor:.3g}))")
    else:
        verdict = (f"DISAGREE: graph vs eager {diff:.3g} > tolerance {tolerance:.3g} "
                   f"(max(atol {args.atol:g}, {args.noise_factor:g} x eager-vs-eager {floor:.3g}))")
    print(f"verdict: {verdict}")
    meta = run_metadata(device_name(device), variant=args.variant, g_widths=list(WIDTHS[args.width]),
                        batch_size=BATCH, iterations=args.iterations, seed=args.seed, data=args.data.name,
                        max_abs_diff_graph_vs_eager=diff, max_abs_diff_eager_vs_eager=floor,
                        max_param_change=eager["moved"][0], graph_used=graph["uses_graph"], verdict=verdict)
    write_results(Path(args.out_dir), "graph-check", meta, {"losses and parameter differences": (rows, columns)})
    return 0 if verdict.startswith("AGREE") else 1


# ---- helpers --------------------------------------------------------------------------------------


def backend_flags() -> tuple[bool, bool, bool]:
    # fp32_precision API only: torch refuses to read the legacy allow_tf32 flags once it has been used.
    return (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.fp32_precision == "tf32",
            torch.backends.cudnn.conv.fp32_precision == "tf32")


def set_backend_flags(benchmark: bool, matmul_tf32: bool, cudnn_tf32: bool) -> None:
    torch.backends.cudnn.benchmark = benchmark
    torch.backends.cuda.matmul.fp32_precision = "tf32" if matmul_tf32 else "ieee"
    torch.backends.cudnn.conv.fp32_precision = "tf32" if cudnn_tf32 else "ieee"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return f"{platform.processor() or 'CPU'} ({os.cpu_count()} cores)"


def run_metadata(device_label: str, **extra) -> dict:
    """What every results file starts with; the load average shows whether the machine was shared."""
    return {
        "device": device_label,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        **extra,
    }


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value) -> str:
        return "-" if value is None or value == "" else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(out_dir: Path, kind: str, meta: dict, tables: dict[str, tuple[list[dict], list[str]]]) -> None:
    """<out_dir>/<kind>-<device>-<date>.md (metadata + tables) and .json (the same, machine-readable).
    `tables` maps a title to (rows, columns). The other bench scripts use this too: one results format."""
    slug = "".join(c if c.isalnum() else "-" for c in meta["device"].lower()).strip("-")[:40]
    stem = out_dir / f"{kind}-{slug}-{meta['date']}"
    out_dir.mkdir(parents=True, exist_ok=True)
    text = f"# bench {kind}\n\n" + "\n".join(f"- {k}: `{v}`" for k, v in meta.items()) + "\n"
    for title, (rows, columns) in tables.items():
        text += f"\n## {title}\n\n{markdown_table(rows, columns)}\n"
    stem.with_suffix(".md").write_text(text)
    payload = {"meta": meta, "tables": {title: rows for title, (rows, _) in tables.items()}}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nwrote {stem}.md and .json")


if __name__ == "__main__":
    main()
