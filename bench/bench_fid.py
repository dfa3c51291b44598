#!/usr/bin/env python
"""FID evaluation time: our Evaluator vs torch-fidelity fed PNG folders; and FID's sampling noise.

1. Timing, on the same generated images (same seed) and the same real split:
   ours          gan.metrics.Evaluator: samples go from G to the extractor in memory, in batches of
                 --batch; the real split's statistics are computed once and cached on disk.
   png-folder    the common recipe: generate, save one PNG per sample, then
                 torch_fidelity.calculate_metrics(input1=<fake folder>, input2=<real PNG folder>) with
                 torch-fidelity's own real-statistics cache (input2_cache_name).
   Each route is timed with the real statistics cold (first evaluation) and cached (every later one).
   Both routes should print the same FID (same images, same extractor).
2. Noise: FID of --noise-small and --noise-large samples, --repeats times each with fresh noise,
   for one fixed generator: mean, std, and the small-sample bias (mean small - mean large).

The generator is --checkpoint's (a training_loop checkpoint directory or file), else one of
--variant/--g-widths that training_loop trains here for --train-kimg (seed 0) on the same data.
Needs torch, torchvision, numpy, pillow and torch-fidelity; no Ray. The Inception extractor needs its
weights (--weights or $GAN_INCEPTION_WEIGHTS, else a download); offline, use --extractor tiny-conv.
    python bench/bench_fid.py --weights pt_inception-2015-12-05-6726825d.pth
    python bench/bench_fid.py --quick --extractor tiny-conv      # CPU: 1k/500/2k samples, 3 repeats
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch_fidelity
from PIL import Image

from bench_train import REPO, device_name, markdown_table, run_metadata, synchronize, write_results

from gan.config import DataConfig, EvalConfig, ModelConfig, TrainConfig, TrialConfig  # noqa: E402  (bench_train put the repo on sys.path)
from gan.data import prepare_dataset  # noqa: E402
from gan.metrics import EXTRACTORS, Evaluator, exact_float32, to_uint8  # noqa: E402
from gan.models import build_models  # noqa: E402
from gan.training import CHECKPOINT_FILE, load_trial_config, training_loop  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "anime-faces-64"


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    dataset = prepare_dataset(DataConfig(path=str(args.data)))
    real = dataset.split(args.split)
    print(f"data: {dataset.source} split {args.split}: {len(real)} images")

    def sampler(seed: int, timer: list[float] | None = None) -> Callable[[int], torch.Tensor]:
        """Like training_loop's evaluation sampler; `timer` accumulates generation seconds."""
        noise = torch.Generator(device=device).manual_seed(seed)

        def sample(n: int) -> torch.Tensor:
            start = time.perf_counter()
            z = torch.randn(n, G.nz, device=device, generator=noise)
            with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.amp):
                images = to_uint8(G(z).float())
            if timer is not None:
                synchronize(device)
                timer.append(time.perf_counter() - start)
            return images

        return sample

    with tempfile.TemporaryDirectory(prefix="bench-fid-") as tmp:
        tmp = Path(tmp)
        if args.checkpoint is None:
            args.checkpoint = train_briefly(args, dataset, device, tmp / "train")
        G, generator_label = load_generator(args, device)
        print(f"generator: {generator_label}", flush=True)
        timing = time_routes(args, device, dataset.key, real, sampler, tmp)
        noise_rows = noise_study(args, device, dataset.key, real, sampler, tmp / "ours-cache")

    timing_columns = ["route", "real_stats", "samples", "generate_s", "write_png_s", "metric_s", "total_s", "fid"]
    noise_columns = ["samples", "repeats", "fid_mean", "fid_std", "fid_min", "fid_max", "bias_vs_largest"]
    print()
    print(markdown_table(timing, timing_columns))
    print()
    print(markdown_table(noise_rows, noise_columns))
    meta = run_metadata(
        device_name(device), extractor=args.extractor, generator=generator_label, real_split=args.split,
        real_images=len(real), our_batch=args.batch, torch_fidelity_batch=args.tf_batch, bf16_sampling=args.amp,
        torch_fidelity=torch_fidelity.__version__, data=str(args.data),
    )
    write_results(Path(args.out_dir), "fid", meta, {
        "evaluation time": (timing, timing_columns),
        f"FID noise ({args.extractor})": (noise_rows, noise_columns),
    })


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="image folder (default: %(default)s)")
    p.add_argument("--split", default="train", choices=["train", "val", "test", "all"], help="real split")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--extractor", default="inception-v3-compat", choices=EXTRACTORS)
    p.add_argument("--weights", help="InceptionV3 weights file (else $GAN_INCEPTION_WEIGHTS, else download)")
    p.add_argument("--checkpoint", type=Path, help="training_loop checkpoint whose generator is scored")
    p.add_argument("--train-kimg", type=float, help="without --checkpoint: train one this long (default 10; --quick 1)")
    p.add_argument("--variant", default="dcgan", help="the trained generator's variant (without --checkpoint)")
    p.add_argument("--g-widths", type=int, nargs=4, default=[512, 256, 128, 64])
    p.add_argument("--samples", type=int, help="images per timed evaluation (default 10000; --quick 1000)")
    p.add_argument("--noise-small", type=int, help="default 2000; --quick 500")
    p.add_argument("--noise-large", type=int, help="default 10000; --quick 2000")
    p.add_argument("--repeats", type=int, help="default 5; --quick 3")
    p.add_argument("--batch", type=int, default=200, help="our generation/extraction batch (training_loop's)")
    p.add_argument("--tf-batch", type=int, default=64, help="torch-fidelity batch size (its default)")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="sample in fp32 on CUDA (default: bf16 like training_loop)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    args = p.parse_args()
    quick = args.quick
    args.samples = args.samples or (1000 if quick else 10_000)
    args.noise_small = args.noise_small or (500 if quick else 2000)
    args.noise_large = args.noise_large or (2000 if quick else 10_000)
    args.repeats = args.repeats or (3 if quick else 5)
    args.train_kimg = args.train_kimg or (1.0 if quick else 10.0)
    args.amp = args.amp and args.device.startswith("cuda")
    if args.repeats < 2:
        p.error("--repeats must be >= 2 for a standard deviation")
    if not args.data.is_dir():
        p.error(f"--data {args.data}: not a folder")
    return args


def train_briefly(args: argparse.Namespace, dataset, device: torch.device, run_dir: Path) -> Path:
    """A generator trained --train-kimg on the data. Untrained is useless here: its outputs are all
    near 0, so every sample rounds to the same uint8 image and FID has no sampling noise at all."""
    cfg = TrialConfig(
        model=ModelConfig(variant=args.variant, g_widths=tuple(args.g_widths)),
        data=DataConfig(path=dataset.source),
        train=TrainConfig(kimg=args.train_kimg, device=str(device)),
        eval=EvalConfig(every_kimg=args.train_kimg, fid_samples=10, final_fid_samples=10, extractor="tiny-conv",
                        fid_split="val", grid_size=2),
    )
    start = time.perf_counter()
    result = training_loop(cfg, run_dir, dataset=dataset)
    if result.status != "completed":
        raise RuntimeError(f"training the benchmark generator ended {result.status}: {result.reason}")
    print(f"trained the generator {args.train_kimg} kimg in {time.perf_counter() - start:.0f} s", flush=True)
    return run_dir / "checkpoint"


def load_generator(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, str]:
    cfg = load_trial_config(args.checkpoint)
    file = args.checkpoint / CHECKPOINT_FILE if args.checkpoint.is_dir() else args.checkpoint
    payload = torch.load(file, map_location="cpu", weights_only=True)
    G = build_models(cfg.model)["G"]
    G.load_state_dict(payload["models"]["G"])
    kimg = json.loads(payload["state"])["images_shown"] / 1000
    origin = "trained here" if args.checkpoint.is_relative_to(tempfile.gettempdir()) else str(args.checkpoint)
    label = f"{cfg.model.variant} {list(cfg.model.g_widths)} after {kimg:g} kimg ({origin}, seed {cfg.train.seed})"
    return G.to(device).eval(), label


def time_routes(args, device, dataset_key, real, sampler, tmp: Path) -> list[dict]:
    rows = []
    n = args.samples
    cache = tmp / "ours-cache"
    for real_stats in ("cold", "cached"):
        start = time.perf_counter()
        evaluator = Evaluator(real, dataset_key=dataset_key, split=args.split, extractor=args.extractor,
                              weights_path=args.weights, cache_dir=str(cache), device=device, batch_size=args.batch)
        generate: list[float] = []
        scores = evaluator.evaluate(sampler(seed=0, timer=generate), n, isc=False)
        total = time.perf_counter() - start
        rows.append({"route": "ours (in memory)", "real_stats": real_stats, "samples": n,
                     "generate_s": round(sum(generate), 2), "write_png_s": 0.0,
                     "metric_s": round(total - sum(generate), 2), "total_s": round(total, 2),
                     "fid": round(scores["fid"], 3)})
        print(rows[-1], flush=True)

    start = time.perf_counter()
    real_dir = write_pngs(torch.from_numpy(real), tmp / "real")
    print(f"(setup, untimed: wrote {len(real)} real PNGs in {time.perf_counter() - start:.1f} s)")
    for real_stats in ("cold", "cached"):
        start = time.perf_counter()
        sample = sampler(seed=0)
        fake_dir = tmp / f"fake-{real_stats}"
        fake_dir.mkdir()
        generate = write = 0.0
        for first in range(0, n, args.batch):
            t0 = time.perf_counter()
            images = sample(min(args.batch, n - first)).cpu()
            t1 = time.perf_counter()
            write_pngs(images, fake_dir, first)
            generate, write = generate + t1 - t0, write + time.perf_counter() - t1
        t_metric = time.perf_counter()
        with exact_float32():  # as the Evaluator extracts: without it cuDNN convolutions default to TF32
            metrics = torch_fidelity.calculate_metrics(
                input1=str(fake_dir), input2=str(real_dir), fid=True, cuda=device.type == "cuda",
                batch_size=args.tf_batch, feature_extractor=args.extractor,
                feature_extractor_weights_path=args.weights, cache_root=str(tmp / "tf-cache"),
                input2_cache_name=f"bench-real-{dataset_key[:16]}-{args.split}-{args.extractor}", verbose=False,
            )
        end = time.perf_counter()
        rows.append({"route": "torch-fidelity (PNG folders)", "real_stats": real_stats, "samples": n,
                     "generate_s": round(generate, 2), "write_png_s": round(write, 2),
                     "metric_s": round(end - t_metric, 2), "total_s": round(end - start, 2),
                     "fid": round(metrics["frechet_inception_distance"], 3)})
        print(rows[-1], flush=True)
    return rows


def write_pngs(images: torch.Tensor, folder: Path, first_index: int = 0) -> Path:
    folder.mkdir(exist_ok=True)
    for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(image).save(folder / f"{first_index + i:06d}.png")
    return folder


def noise_study(args, device, dataset_key, real, sampler, cache: Path) -> list[dict]:
    """FID of independent sample sets (fresh noise seeds) at two sample counts, same generator."""
    evaluator = Evaluator(real, dataset_key=dataset_key, split=args.split, extractor=args.extractor,
                          weights_path=args.weights, cache_dir=str(cache), device=device, batch_size=args.batch)
    fids: dict[int, list[float]] = {}
    for n in (args.noise_small, args.noise_large):
        fids[n] = [evaluator.evaluate(sampler(seed=100 + r), n, isc=False)["fid"] for r in range(args.repeats)]
        print(f"FID @ {n}: {json.dumps([round(f, 3) for f in fids[n]])}", flush=True)
    largest = statistics.mean(fids[args.noise_large])
    return [
        {"samples": n, "repeats": len(v), "fid_mean": round(statistics.mean(v), 3),
         "fid_std": round(statistics.stdev(v), 3), "fid_min": round(min(v), 3), "fid_max": round(max(v), 3),
         "bias_vs_largest": round(statistics.mean(v) - largest, 3)}
        for n, v in fids.items()
    ]


if __name__ == "__main__":
    main()
