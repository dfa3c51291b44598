#!/usr/bin/env python
"""FID evaluation time: our Evaluator vs torch-fidelity fed PNG folders; and FID's sampling noise.

1. Timing, on the same generated images (same seed) and the same real split:
   ours          gan.metrics.Evaluator, built once as a trial builds it (extractor, real statistics
                 computed or read from the cache: `build_s`), then `evaluate()` timed alone: samples go
                 from G to the extractor in memory, in batches of --batch, and the FID is computed in
                 float64 on the device.
   png-folder    the common recipe: generate, save one PNG per sample, then
                 torch_fidelity.calculate_metrics(input1=<fake folder>, input2=<real PNG folder>) with
                 torch-fidelity's own real-statistics cache (input2_cache_name).
   Each route is timed with the real statistics cold (first evaluation) and cached (every later one).
   Both routes should print the same FID (same images, same extractor). A second table splits our
   cached route end to end: generation, then feature extraction, then the statistics (mean and
   covariance of the features) and the Frechet distance on the device, the last two timed on their
   own, and for comparison torch-fidelity's Frechet distance (numpy, CPU) on the same statistics.
   InceptionV3 without a weights file (--weights, $GAN_INCEPTION_WEIGHTS or torch.hub's cache): the
   same architecture with RANDOM weights, written to a temporary file and loaded through the same
   code (torch-fidelity's FeatureExtractorInceptionV3): the timing holds, the FIDs mean nothing, and
   the output says so. This script never downloads the weights.
2. Noise: FID of --noise-small and --noise-large samples, --repeats times each with fresh noise,
   for one fixed generator: mean, std, and the small-sample bias (mean small - mean large). Its
   extractor is --noise-extractor: by default the timing's, or tiny-conv when the timing had to use
   random Inception weights (random-weight Inception noise says nothing).

The generator is --checkpoint's (a training_loop checkpoint directory or file), else one of
--variant/--g-widths that training_loop trains here for --train-kimg (seed 0) on the same data.
Needs torch, torchvision, numpy, pillow and torch-fidelity; no Ray.
    python bench/bench_fid.py --weights weights-inception-2015-12-05-6726825d.pth
    python bench/bench_fid.py                                     # no weights file: random-weight Inception timing
    python bench/bench_fid.py --quick --extractor tiny-conv      # CPU: 1k/500/2k samples, 3 repeats
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from bench_common import (
    DEFAULT_DATA,
    REPO,
    device_name,
    markdown_table,
    run_metadata,
    synchronize,
    write_results,
)
from PIL import Image
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import (
    URL_INCEPTION_V3,
    FeatureExtractorInceptionV3,
)
from torch_fidelity.metric_fid import fid_statistics_to_metric

from gan.config import (
    INCEPTION,
    TINY_CONV,
    DataConfig,
    EvalConfig,
    ModelConfig,
    TrainConfig,
    TrialConfig,
)
from gan.data import prepare_dataset
from gan.frechet import feature_statistics, frechet_distance
from gan.metrics import EXTRACTORS, WEIGHTS_ENV, Evaluator, exact_float32, to_uint8
from gan.models import build_models
from gan.training import CHECKPOINT_FILE, load_trial_config, training_loop

RANDOM_WEIGHTS = "RANDOM weights (timing only: these FIDs mean nothing)"


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    dataset = prepare_dataset(DataConfig(path=str(args.data)))
    real = dataset.split(args.split)
    if args.real_limit:
        real = real[: args.real_limit]
    print(f"data: {dataset.source} split {args.split}: {len(real)} images"
          + (f" (the first {args.real_limit})" if args.real_limit else ""))

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
        args.weights, weights_label = resolve_weights(args, tmp)
        extractor_label = f"{args.extractor}, {weights_label}"
        noise_extractor = args.noise_extractor or (TINY_CONV if weights_label == RANDOM_WEIGHTS else args.extractor)
        noise_weights = args.weights if noise_extractor == args.extractor else None
        noise_label = extractor_label if noise_extractor == args.extractor else noise_extractor
        print(f"timing extractor: {extractor_label}; noise extractor: {noise_label}", flush=True)
        if args.checkpoint is None:
            args.checkpoint = train_briefly(args, dataset, device, tmp / "train")
        G, generator_label, trained_amp = load_generator(args, device)
        args.amp = device.type == "cuda" and (trained_amp if args.amp is None else args.amp)
        print(f"generator: {generator_label}; sampling in {'bf16' if args.amp else 'fp32'}", flush=True)
        timing, stages = time_routes(args, device, dataset.key, real, sampler, tmp)
        noise_rows = noise_study(args, noise_extractor, noise_weights, device, dataset.key, real, sampler,
                                 tmp / "ours-cache")

    timing_columns = ["route", "real_stats", "samples", "build_s", "generate_s", "write_png_s", "metric_s",
                      "evaluate_s", "total_s", "fid"]
    stage_columns = ["stage", "seconds", "how"]
    noise_columns = ["samples", "repeats", "fid_mean", "fid_std", "fid_min", "fid_max", "bias_vs_largest"]
    if weights_label == RANDOM_WEIGHTS:
        print(f"\nNOTE: InceptionV3 ran with {RANDOM_WEIGHTS}: the times are those of the real extractor, "
              "the FIDs are not.")
    print()
    print(markdown_table(timing, timing_columns))
    print()
    print(markdown_table(stages, stage_columns))
    print()
    print(markdown_table(noise_rows, noise_columns))
    meta = run_metadata(
        device_name(device), extractor=extractor_label, noise_extractor=noise_label, generator=generator_label,
        real_split=args.split, real_images=len(real), our_batch=args.batch, torch_fidelity_batch=args.tf_batch,
        bf16_sampling=args.amp, torch_fidelity=torch_fidelity.__version__, data=args.data.name,
    )
    write_results(Path(args.out_dir), "fid", meta, {
        f"evaluation time ({extractor_label})": (timing, timing_columns),
        f"FID-{args.samples} end to end, ours with cached real statistics ({extractor_label})": (stages, stage_columns),
        f"FID noise ({noise_label})": (noise_rows, noise_columns),
    })


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="image folder (default: %(default)s)")
    p.add_argument("--split", default="train", choices=["train", "val", "test", "all"], help="real split")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--extractor", default=INCEPTION, choices=EXTRACTORS, help="timing extractor (default %(default)s)")
    p.add_argument("--weights", help=f"InceptionV3 weights file (else ${WEIGHTS_ENV}, else torch.hub's cache; "
                   "none of them: random weights, timing only)")
    p.add_argument("--random-weights", action="store_true",
                   help="InceptionV3 with random weights even when a weights file exists (timing only)")
    p.add_argument("--noise-extractor", choices=EXTRACTORS,
                   help="extractor of the noise study (default: --extractor, or tiny-conv when Inception has "
                   "random weights)")
    p.add_argument("--real-limit", type=int, help="use only the first N images of the real split (smoke runs)")
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
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="sample in bf16 on CUDA (default: as the generator's training_loop did, train.amp)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    args = p.parse_args()
    quick = args.quick
    args.samples = args.samples or (1000 if quick else 10_000)
    args.noise_small = args.noise_small or (500 if quick else 2000)
    args.noise_large = args.noise_large or (2000 if quick else 10_000)
    args.repeats = args.repeats or (3 if quick else 5)
    args.train_kimg = args.train_kimg or (1.0 if quick else 10.0)
    if args.repeats < 2:
        p.error("--repeats must be >= 2 for a standard deviation")
    if args.real_limit is not None and args.real_limit < 2:
        p.error("--real-limit must be >= 2 (a covariance)")
    if not args.data.is_dir():
        p.error(f"--data {args.data}: not a folder")
    return args


def resolve_weights(args: argparse.Namespace, tmp: Path) -> tuple[str | None, str]:
    """(weights path handed to our Evaluator and to torch-fidelity, label for the output).

    InceptionV3: --weights, else $GAN_INCEPTION_WEIGHTS (either must exist), else torch.hub's cached
    download if present, else random weights written under `tmp`. Never a download."""
    if args.extractor != INCEPTION:
        return None, "fixed random weights (its own; comparable only with itself)"
    explicit = args.weights or os.environ.get(WEIGHTS_ENV)
    if explicit and not Path(explicit).is_file():
        sys.exit(f"InceptionV3 weights file not found: {explicit} (--weights or ${WEIGHTS_ENV})")
    hub = Path(torch.hub.get_dir()) / "checkpoints" / Path(URL_INCEPTION_V3).name
    found = explicit or (str(hub) if hub.is_file() else None)
    if found and not args.random_weights:
        return found, f"pretrained weights ({Path(found).name})"
    if not args.random_weights:
        print(f"no InceptionV3 weights file (--weights, ${WEIGHTS_ENV}, {hub.name} in torch.hub's cache): "
              f"timing with {RANDOM_WEIGHTS}", flush=True)
    return str(write_random_inception_weights(tmp / "inception-v3-RANDOM-weights-timing-only.pth")), RANDOM_WEIGHTS


def write_random_inception_weights(path: Path, seed: int = 0) -> Path:
    """A state_dict for torch-fidelity's InceptionV3 with random weights, built by its own class (whose
    constructor always loads weights: here an empty dict, which the subclass below leaves unloaded).
    Convolutions get He-normal weights so activations keep their scale through the ~90 layers (PyTorch's
    default init shrinks them layer by layer): the arithmetic, and so the time, is that of the real net."""

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):
            if state_dict:
                raise ValueError("Unloaded only stands in for an empty state_dict")
            return None

    empty = path.with_name("empty-state-dict.pth")
    torch.save({}, empty)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left alone
        torch.manual_seed(seed)
        module = Unloaded(INCEPTION, ["2048"], feature_extractor_weights_path=str(empty))
        with torch.no_grad():
            for m in module.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(module.state_dict(), path)
    return path


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


def load_generator(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, str, bool]:
    """The checkpoint's generator, a label for it, and whether its training_loop sampled in bf16 (train.amp)."""
    cfg = load_trial_config(args.checkpoint)
    file = args.checkpoint / CHECKPOINT_FILE if args.checkpoint.is_dir() else args.checkpoint
    payload = torch.load(file, map_location="cpu", weights_only=True)
    G = build_models(cfg.model)["G"]
    G.load_state_dict(payload["models"]["G"])
    kimg = json.loads(payload["state"])["images_shown"] / 1000
    origin = "trained here" if args.checkpoint.is_relative_to(tempfile.gettempdir()) else str(args.checkpoint)
    label = f"{cfg.model.variant} {list(cfg.model.g_widths)} after {kimg:g} kimg ({origin}, seed {cfg.train.seed})"
    return G.to(device).eval(), label, bool(cfg.train.amp)


def time_ours(real: np.ndarray, dataset_key: str, split: str, extractor: str, weights: str | None, cache: Path,
              device: torch.device, batch: int, sample: Callable[[int], torch.Tensor], generate: list[float],
              n: int) -> tuple[dict, Evaluator]:
    """Our route as a trial runs it: the Evaluator built once (timed apart: `build_s`), then `evaluate()` alone.
    `sample` appends its generation seconds to `generate`."""
    synchronize(device)
    start = time.perf_counter()
    evaluator = Evaluator(real, dataset_key=dataset_key, split=split, extractor=extractor, weights_path=weights,
                          cache_dir=str(cache), device=device, batch_size=batch)
    synchronize(device)
    built = time.perf_counter()
    scores = evaluator.evaluate(sample, n, isc=False)  # returns a float: the device is synchronised
    end = time.perf_counter()
    row = {"route": "ours (in memory)", "samples": n, "build_s": round(built - start, 2),
           "generate_s": round(sum(generate), 2), "write_png_s": 0.0,
           "metric_s": round(end - built - sum(generate), 2), "evaluate_s": round(end - built, 2),
           "total_s": round(end - start, 2), "fid": round(scores["fid"], 3)}
    return row, evaluator


def time_routes(args, device, dataset_key, real, sampler, tmp: Path) -> tuple[list[dict], list[dict]]:
    """Both routes, cold and cached; and our cached route split into stages."""
    rows = []
    n = args.samples
    cache = tmp / "ours-cache"
    for real_stats in ("cold", "cached"):
        generate: list[float] = []
        row, evaluator = time_ours(real, dataset_key, args.split, args.extractor, args.weights, cache, device,
                                   args.batch, sampler(seed=0, timer=generate), generate, n)
        rows.append({**row, "real_stats": real_stats})
        print(rows[-1], flush=True)
    stages = fid_stages(rows[-1], evaluator, n)

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
                     "build_s": 0.0, "generate_s": round(generate, 2), "write_png_s": round(write, 2),
                     "metric_s": round(end - t_metric, 2), "evaluate_s": round(end - start, 2),
                     "total_s": round(end - start, 2), "fid": round(metrics["frechet_inception_distance"], 3)})
        print(rows[-1], flush=True)
    return rows, stages


def fid_stages(cached: dict, evaluator: Evaluator, n: int) -> list[dict]:
    """Our evaluate() end to end: generation and the metric step as timed, and within the metric step the
    statistics (mean + covariance of n features) and the Frechet distance timed on their own on the evaluation
    device, on n random features of the extractor's dimension against the cached real statistics (their cost
    depends on the sizes only); extraction is the metric step less those two. torch-fidelity's Frechet distance
    (numpy on the CPU) on the same statistics is timed too, for comparison."""
    device = evaluator.device
    real_stats = evaluator.real_stats
    dims = real_stats.mu.shape[0]
    features = torch.randn(n, dims, generator=torch.Generator().manual_seed(0)).to(device)
    feature_statistics(features[:, :8])  # first calls load the device's linear-algebra libraries
    frechet_distance(feature_statistics(features[:, :8]).with_sqrt(), feature_statistics(features[:, :8]))
    synchronize(device)
    t0 = time.perf_counter()
    fake_stats = feature_statistics(features)
    synchronize(device)
    t1 = time.perf_counter()
    ours = frechet_distance(real_stats, fake_stats)  # returns a float: synchronised
    t2 = time.perf_counter()
    numpy_real = {"mu": real_stats.mu.cpu().numpy(), "sigma": real_stats.sigma.cpu().numpy()}
    numpy_fake = {"mu": fake_stats.mu.cpu().numpy(), "sigma": fake_stats.sigma.cpu().numpy()}
    t3 = time.perf_counter()
    theirs = fid_statistics_to_metric(numpy_real, numpy_fake, verbose=False)["frechet_inception_distance"]
    t4 = time.perf_counter()
    statistics_s, frechet_s = t1 - t0, t2 - t1
    where = f"torch float64 on {device.type}"
    return [
        {"stage": f"generate {n} images", "seconds": cached["generate_s"], "how": "timed (device synced)"},
        {"stage": "extract features", "seconds": round(cached["metric_s"] - statistics_s - frechet_s, 2),
         "how": "evaluate() less generation and the two rows below"},
        {"stage": f"statistics: mean + covariance of {n} x {dims} features", "seconds": round(statistics_s, 3),
         "how": f"timed alone ({where})"},
        {"stage": f"Frechet distance ({dims} x {dims}), real square root cached", "seconds": round(frechet_s, 3),
         "how": f"timed alone ({where})"},
        {"stage": "evaluate() (ours, real statistics cached)", "seconds": cached["evaluate_s"], "how": "timed"},
        {"stage": "for comparison: torch-fidelity's Frechet distance", "seconds": round(t4 - t3, 3),
         "how": f"numpy on the CPU, same statistics (FID {theirs:.6g} vs ours {ours:.6g})"},
    ]


def write_pngs(images: torch.Tensor, folder: Path, first_index: int = 0) -> Path:
    folder.mkdir(exist_ok=True)
    for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(image).save(folder / f"{first_index + i:06d}.png")
    return folder


def noise_study(args, extractor, weights, device, dataset_key, real, sampler, cache: Path) -> list[dict]:
    """FID of independent sample sets (fresh noise seeds) at two sample counts, same generator."""
    evaluator = Evaluator(real, dataset_key=dataset_key, split=args.split, extractor=extractor,
                          weights_path=weights, cache_dir=str(cache), device=device, batch_size=args.batch)
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
