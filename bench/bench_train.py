#!/usr/bin/env python
"""Training images/s: the textbook PyTorch DCGAN loop vs ours, with one row per optimisation.

Rows, for each variant and generator width (speedups are against that pair's textbook row):
  textbook         the PyTorch DCGAN tutorial loop: ImageFolder + PIL transforms + DataLoader(num_workers=2,
                   shuffle), fp32, default memory layout, sigmoid + nn.BCELoss, .item() reads every step
  resident         + data held on the device as uint8 and batched by indexing (gan.training's batcher)
  our-step         + our step: logit (softplus) losses, no per-step host sync
  tuned            + cudnn.benchmark and TF32 matmuls/convs
  channels-last    + channels_last memory format
  bf16             + bf16 autocast
  fused            + fused Adam
  compile          + torch.compile of G and D
  loop             gan.training.training_loop itself (everything above except compile)
  loop-compile     training_loop with train.compile = true
  loop-no-bf16     training_loop with train.amp = false
  loop-no-cl       training_loop with train.channels_last = false
Rows textbook..compile are cumulative and run in this script's own loop; the loop* rows call the real
training_loop and should agree with the fused / compile rows. On CPU the GPU-only switches (tuned ...
compile, which training_loop ignores on CPU) are skipped.

Images/s is measured after warm-up (cudnn autotuning, compilation, DataLoader worker start): the
cumulative rows time `kimg` thousand images after --warmup steps; the loop* rows train 2 x kimg with
an evaluation every kimg and read the second interval's `images_per_s`, which training_loop measures
between evaluations (evaluation, grids and checkpoints excluded).

Needs torch, torchvision, numpy, pillow and torch-fidelity (imported by gan.metrics); no Ray.
    python bench/bench_train.py                 # all rows, 3 widths, dcgan and use-cmhsa-gan
    python bench/bench_train.py --quick         # width 512 only, small kimg
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torchvision.datasets
import torchvision.transforms as transforms
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gan import losses  # noqa: E402
from gan.config import DataConfig, EvalConfig, ModelConfig, TrainConfig, TrialConfig  # noqa: E402
from gan.data import PreparedDataset, prepare_dataset  # noqa: E402
from gan.models import build_models  # noqa: E402
from gan.training import DeviceBatches, training_loop  # noqa: E402  (the loop's own batcher: same data path)

WIDTHS = {
    "512": (512, 256, 128, 64),
    "1024": (1024, 512, 256, 128),
    "2048": (2048, 1024, 512, 256),
}
BCE_VARIANTS = ("dcgan", "use-gan", "cmhsa-gan", "use-cmhsa-gan")  # the textbook loss applies to these
# Cumulative switches: each row turns on its own switch plus those of every row above it.
LADDER = ("textbook", "resident", "our-step", "tuned", "channels-last", "bf16", "fused", "compile")
GPU_ONLY = {"tuned", "channels-last", "bf16", "fused", "compile", "loop-compile", "loop-no-bf16", "loop-no-cl"}
LOOP_ROWS = {
    "loop": {},
    "loop-compile": {"compile": True},
    "loop-no-bf16": {"amp": False},
    "loop-no-cl": {"channels_last": False},
}
ROWS = LADDER + tuple(LOOP_ROWS)
BATCH = 100
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "anime-faces-64"


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    rows = [r for r in args.rows if device.type == "cuda" or r not in GPU_ONLY]
    skipped = [r for r in args.rows if r not in rows]
    if skipped:
        print(f"skipping GPU-only rows on {device.type}: {', '.join(skipped)}")
    defaults = backend_flags()
    load_at_start = round(os.getloadavg()[0], 2)
    dataset = prepare_dataset(DataConfig(path=str(args.data)))
    print(f"data: {dataset.source}: {len(dataset.split('train'))} training images (prepare {dataset.prepare_seconds:.1f} s)")

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        image_folder = textbook_image_folder(args.data, Path(tmp))
        for variant in args.variants:
            for width in args.widths:
                textbook_ips = None
                for row in rows:
                    set_backend_flags(*defaults)  # training_loop and the `tuned` row change them globally
                    torch.manual_seed(0)
                    model_cfg = ModelConfig(variant=variant, g_widths=WIDTHS[width])
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    if row in LOOP_ROWS:
                        ips = measure_training_loop(model_cfg, dataset, device, args.kimg, LOOP_ROWS[row], Path(tmp) / row)
                    else:
                        switches = set(LADDER[: LADDER.index(row) + 1])
                        ips = measure_ladder(model_cfg, switches, dataset, image_folder, device, args.kimg, args.warmup)
                    textbook_ips = ips if row == "textbook" else textbook_ips
                    result = {
                        "variant": variant,
                        "g_width": int(width),
                        "row": row,
                        "images_per_s": round(ips, 1),
                        "speedup": round(ips / textbook_ips, 2) if textbook_ips else None,
                        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                        if device.type == "cuda"
                        else None,
                    }
                    results.append(result)
                    print(f"{variant:14s} {width:>5s} {row:14s} {ips:10.1f} img/s"
                          + (f"  x{result['speedup']:.2f}" if result["speedup"] else ""), flush=True)
                    torch._dynamo.reset()  # compiled graphs of one row must not serve the next

    columns = ["variant", "g_width", "row", "images_per_s", "speedup", "peak_mem_gib"]
    meta = run_metadata(device_name(device), batch_size=BATCH, kimg_per_row=args.kimg, warmup_steps=args.warmup,
                        data=str(args.data), load_average_1m_at_start=load_at_start)
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
    p.add_argument("--kimg", type=float, help="thousand images timed per row (default 10; --quick: 0.5)")
    p.add_argument("--warmup", type=int, help="untimed steps before timing a ladder row (default 20; --quick: 3)")
    p.add_argument("--quick", action="store_true", help="width 512 only, small kimg and warm-up")
    p.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    args = p.parse_args()
    args.widths = args.widths or (["512"] if args.quick else list(WIDTHS))
    args.kimg = args.kimg if args.kimg is not None else (0.5 if args.quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (3 if args.quick else 20)
    if args.kimg * 1000 < BATCH:
        p.error(f"--kimg must cover at least one batch ({BATCH / 1000})")
    if not args.data.is_dir():
        p.error(f"--data {args.data}: not a folder")
    return args


# ---- the textbook loop (PyTorch DCGAN tutorial) ---------------------------------------------------


def textbook_image_folder(data: Path, tmp: Path) -> Path:
    """ImageFolder wants <root>/<class>/<images>; a one-class root linking to the data folder."""
    root = tmp / "imagefolder"
    root.mkdir()
    (root / "faces").symlink_to(data.resolve(), target_is_directory=True)
    return root


def textbook_batches(image_folder: Path, image_size: int) -> Iterator[torch.Tensor]:
    dataset = torchvision.datasets.ImageFolder(
        root=str(image_folder),
        transform=transforms.Compose([
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ]),
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=2)
    while True:  # the tutorial's `for epoch ...: for data in dataloader`
        for images, _ in loader:
            yield images


def textbook_step(G: nn.Module, D: nn.Module, opt_g, opt_d, real: torch.Tensor, nz: int, device) -> None:
    """One iteration of the tutorial, with D's logits passed through a sigmoid for nn.BCELoss.
    Like the tutorial it reuses the D step's fakes for the G step (one G forward per iteration)."""
    criterion = nn.BCELoss()
    real = real.to(device)
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
) -> float:
    """Images/s of the textbook loop with `switches` applied, after `warmup` steps."""
    if "tuned" in switches:  # what training_loop sets on CUDA
        set_backend_flags(True, True, True)
    memory_format = torch.channels_last if "channels-last" in switches else torch.contiguous_format
    models = build_models(model_cfg)
    G, D = (models[k].to(device=device, memory_format=memory_format) for k in ("G", "D"))
    tc = TrainConfig()
    fused = "fused" in switches
    opt_d = torch.optim.Adam(D.parameters(), lr=tc.lr_d, betas=(0.5, 0.999), fused=fused)
    opt_g = torch.optim.Adam(G.parameters(), lr=tc.lr_g, betas=(0.5, 0.999), fused=fused)
    Gc, Dc = (torch.compile(m) if "compile" in switches else m for m in (G, D))

    if "resident" in switches:
        batches = DeviceBatches(dataset.split("train"), BATCH, device, seed=0)
        next_real: Callable[[], torch.Tensor] = lambda: batches.next(memory_format)  # noqa: E731
    else:
        loader = textbook_batches(image_folder, model_cfg.image_size)
        next_real = lambda: next(loader)  # noqa: E731

    if "our-step" in switches:
        loss_sum = torch.zeros((), device=device)  # training_loop accumulates losses on the device

        def step() -> int:
            nonlocal loss_sum
            real = next_real()
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled="bf16" in switches):
                out_d = losses.dcgan_d_loss(Gc, Dc, real, torch.randn(len(real), model_cfg.nz, device=device))
            opt_d.zero_grad(set_to_none=True)
            out_d["loss_d"].backward()
            opt_d.step()
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled="bf16" in switches):
                out_g = losses.dcgan_g_loss(Gc, Dc, torch.randn(BATCH, model_cfg.nz, device=device))
            opt_g.zero_grad(set_to_none=True)
            out_g["loss_g"].backward()
            opt_g.step()
            loss_sum = loss_sum + out_d["loss_d"].detach().float() + out_g["loss_g"].detach().float()
            return len(real)
    else:

        def step() -> int:
            real = next_real()
            textbook_step(G, D, opt_g, opt_d, real, model_cfg.nz, device)
            return len(real)

    G.train()
    D.train()
    for _ in range(warmup):
        step()
    synchronize(device)
    images, target = 0, int(round(kimg * 1000))
    start = time.perf_counter()
    while images < target:
        images += step()
    synchronize(device)
    return images / (time.perf_counter() - start)


# ---- the real training loop -----------------------------------------------------------------------


def measure_training_loop(
    model_cfg: ModelConfig, dataset: PreparedDataset, device: torch.device, kimg: float, overrides: dict, run_dir: Path
) -> float:
    """training_loop's own images/s over its second evaluation interval (the first one warms up)."""
    cfg = TrialConfig(
        model=model_cfg,
        data=DataConfig(path=dataset.source),
        train=TrainConfig(kimg=2 * kimg, batch_size=BATCH, device=str(device), **overrides),
        # Cheapest evaluation the loop accepts: it is excluded from images_per_s anyway.
        eval=EvalConfig(every_kimg=kimg, fid_samples=10, final_fid_samples=10, extractor="tiny-conv",
                        fid_split="val", grid_size=2),
    )
    reports: list[dict] = []
    result = training_loop(cfg, run_dir, report=lambda metrics, _: reports.append(metrics), dataset=dataset)
    if result.status != "completed" or len(reports) < 2:
        raise RuntimeError(f"training_loop ended {result.status} ({result.reason}) after {len(reports)} evaluations")
    return float(reports[-1]["images_per_s"])


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
        return "-" if value is None else str(value)

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
