"""What one trial costs on this machine, measured in seconds: a few training iterations and one evaluation.

`time_iterations` builds a trial's models, optimisers and `TrainStep` the way
`gan.training.training_loop` does (the same device choice, CUDA switches, memory format, autocast,
fused/capturable Adam, torch.compile, CUDA graph) and times real iterations on random uint8 images of the
trial's shape: no dataset is prepared, so it takes seconds. `time_evaluation` times what an evaluation
adds: generating samples and extracting their features (per image, so it scales linearly with the sample
count) and the FID/IS statistics of those features (once per evaluation, on the device, as the Evaluator does).

The figures are what they say and no more: a laptop CPU does not predict a GPU, random images cost the
same as real ones only because the models never look at their content, and nothing here includes data
preparation, the one-off real-statistics pass, sample grids or checkpoints. torch (and gan) only: no Ray,
no pydantic.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from gan.config import INCEPTION, TrialConfig, optimiser_settings
from gan.models import Generator, init_weights
from gan.precision import precision_state, restore_precision
from gan.step import WARMUP_ITERATIONS, DeviceBatches
from gan.training import build_trainer, pick_device, set_training_backends  # the loop's own construction

EVAL_BATCH = 200  # gan.metrics.Evaluator's default batch: generation and extraction run in batches of this


@dataclass(frozen=True)
class IterationCost:
    """One training iteration (d_steps D updates and one G update) of one trial's model, as measured."""

    seconds_per_iteration: float
    images_per_iteration: int  # real images shown to D per iteration: d_steps x batch_size
    peak_memory_bytes: int | None  # CUDA: max_memory_allocated over the timing, less the random images; CPU: None
    device_label: str  # e.g. "cpu (1 thread)" or "NVIDIA H100 80GB HBM3 (cuda:0)"
    iterations: int  # how many were timed (after the warm-up)
    warmup: int
    device_memory_bytes: int | None = None  # CUDA: the device's total memory; CPU: None

    @property
    def seconds_per_kimg(self) -> float:
        return self.seconds_per_iteration * 1000 / self.images_per_iteration


@dataclass(frozen=True)
class EvalCost:
    """One evaluation: `seconds_fixed + samples * seconds_per_sample`; None where it was not measured."""

    seconds_per_sample: float | None  # generation + feature extraction, per generated image
    seconds_fixed: float | None  # FID (and IS, KID) statistics of the features: once per evaluation
    samples_timed: int
    extractor: str
    peak_memory_bytes: int | None  # CUDA: generator + extractor + one batch of each; CPU: None
    note: str = ""  # why it was not measured, when it was not

    @property
    def measured(self) -> bool:
        return self.seconds_per_sample is not None

    def seconds(self, samples: int) -> float | None:
        if not self.measured:
            return None
        return self.seconds_fixed + samples * self.seconds_per_sample


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    threads = torch.get_num_threads()
    return f"{device.type} ({threads} thread{'s' if threads != 1 else ''})"


@contextlib.contextmanager
def _like_a_trial(device: torch.device, threads: int | None) -> Iterator[None]:
    """The process-wide switches a trial runs with (training_loop's CUDA settings, the runner's thread
    count), restored afterwards."""
    saved_threads = torch.get_num_threads()
    saved_benchmark, saved_precision = torch.backends.cudnn.benchmark, precision_state()
    try:
        if threads is not None:
            torch.set_num_threads(max(1, int(threads)))
        set_training_backends(device)
        yield
    finally:
        torch.set_num_threads(saved_threads)
        torch.backends.cudnn.benchmark = saved_benchmark
        restore_precision(saved_precision)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(run: Callable[[], None], device: torch.device, *, at_least: int, min_seconds: float,
           max_seconds: float, max_iterations: int) -> tuple[float, int]:
    """(seconds, calls) of calling `run` at least `at_least` times and for at least `min_seconds`, but no
    more than `max_seconds` (at least once) or `max_iterations`. The device is synchronised only between
    chunks of calls (doubling in length), so asynchronous CUDA work overlaps as it does in training."""
    done, chunk = 0, 1
    _sync(device)
    start = time.perf_counter()
    while True:
        for _ in range(chunk):
            run()
        done += chunk
        _sync(device)
        elapsed = time.perf_counter() - start
        if done >= max_iterations or elapsed >= max_seconds or (done >= at_least and elapsed >= min_seconds):
            return elapsed, done
        per_call = elapsed / done
        room = int((max_seconds - elapsed) / per_call) if per_call > 0 else max_iterations
        chunk = max(1, min(chunk * 2, room, max_iterations - done))


def time_iterations(cfg: TrialConfig, *, iterations: int = 3, warmup: int = 1, min_seconds: float = 0.5,
                    max_seconds: float = 10.0, max_iterations: int = 1000, threads: int | None = None) -> IterationCost:
    """Seconds per training iteration of `cfg`'s model on cfg.train.device (auto: CUDA when available).

    `warmup` untimed iterations first (allocation, cudnn autotuning; with a CUDA graph, until it is
    captured), then at least `iterations` timed ones and at least `min_seconds`, stopping early once
    `max_seconds` are spent. `threads`: torch's CPU threads while timing (a trial uses resources.cpu).
    """
    tc, mc = cfg.train, cfg.model
    opt = optimiser_settings(mc.variant, tc)
    d_steps = opt["d_steps"]
    device = pick_device(tc.device)
    cuda = device.type == "cuda"
    with _like_a_trial(device, threads):
        torch.manual_seed(tc.seed)
        if cuda:
            _sync(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        # A few iterations' worth of random images (the loop holds the whole training split on the device
        # instead; that memory is reported apart, by the caller, since it depends on the dataset).
        n = tc.batch_size * d_steps * 4
        images = torch.randint(0, 256, (n, 3, mc.image_size, mc.image_size), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0)).numpy()
        batches = DeviceBatches(images, tc.batch_size, device, seed=tc.seed)
        buffer_bytes = sum(t.numel() * t.element_size() for t in (batches.images, batches.perm, batches.offsets))

        trainer = build_trainer(cfg, device, batches)  # exactly what training_loop trains
        step = trainer.step
        if step.want_graph:
            warmup = max(warmup, WARMUP_ITERATIONS + 1)  # capture happens after WARMUP_ITERATIONS: time replays
        for _ in range(warmup):
            step()
        seconds, count = _timed(step, device, at_least=iterations, min_seconds=min_seconds,
                                max_seconds=max_seconds, max_iterations=max_iterations)
        peak = None
        if cuda:
            peak = max(0, torch.cuda.max_memory_allocated(device) - base - buffer_bytes)
        label = device_label(device)
        total = torch.cuda.get_device_properties(device).total_memory if cuda else None
        del step, trainer, batches
        if cuda:
            torch.cuda.empty_cache()
    return IterationCost(seconds / count, d_steps * tc.batch_size, peak, label, count, warmup, total)


def inception_weights_missing(weights_path: str | None) -> str | None:
    """Why InceptionV3 can't be built without a download, or None when its weights are on this machine."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    from gan.metrics import WEIGHTS_ENV

    given = weights_path or os.environ.get(WEIGHTS_ENV)
    if given:
        return None if Path(given).is_file() else f"the InceptionV3 weights file {given} does not exist"
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(URL_INCEPTION_V3).name
    if cached.is_file():
        return None
    return (f"no InceptionV3 weights on this machine (eval.weights_path, ${WEIGHTS_ENV} and torch.hub's cache "
            "are empty) and the estimate never downloads them")


@functools.lru_cache(maxsize=4)
def _extractor(name: str, weights_path: str | None, device: str):
    from gan.metrics import build_extractor

    return build_extractor(name, weights_path=weights_path, device=device)


def time_evaluation(cfg: TrialConfig, *, samples: int | None = None, threads: int | None = None) -> EvalCost:
    """Seconds of one evaluation of `cfg`'s generator with cfg.eval.extractor, on cfg.train.device.

    Times `samples` generated images (default 256; 64 for InceptionV3 on a CPU) through generation and
    feature extraction in batches of 200, as gan.metrics.Evaluator does, after one untimed warm-up batch;
    then the statistics of those features (FID against the same statistics, IS, and KID when eval.kid)
    once. Returns an unmeasured EvalCost with a note when the extractor is InceptionV3 and its weights are
    not on this machine.
    """
    from gan.frechet import feature_statistics
    from gan.metrics import _extract, _feature_layers, score_features, to_uint8

    tc, mc, ec = cfg.train, cfg.model, cfg.eval
    device = pick_device(tc.device)
    cuda = device.type == "cuda"
    if ec.extractor == INCEPTION and (missing := inception_weights_missing(ec.weights_path)):
        return EvalCost(None, None, 0, ec.extractor, None, note=missing)
    if samples is None:
        samples = 64 if (ec.extractor == INCEPTION and not cuda) else 256
    samples = max(10, samples)
    with _like_a_trial(device, threads):
        module = _extractor(ec.extractor, ec.weights_path, str(device))
        fid_layer, isc_layer = _feature_layers(ec.extractor)
        if cuda:
            _sync(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        memory_format = torch.channels_last if (cuda and tc.channels_last) else torch.contiguous_format
        amp = cuda and tc.amp
        torch.manual_seed(tc.seed)
        G = Generator(mc)
        G.apply(init_weights)
        G.to(device=device, memory_format=memory_format).eval()
        gen = torch.Generator(device=device).manual_seed(0)

        def sample(n: int) -> torch.Tensor:  # as training_loop's evaluation samples
            z = torch.randn(n, mc.nz, device=device, generator=gen)
            with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                return to_uint8(G(z).float())

        def batches(total: int) -> Callable[[], Iterator[torch.Tensor]]:
            def run():
                remaining = total
                while remaining > 0:
                    n = min(EVAL_BATCH, remaining)
                    yield sample(n)
                    remaining -= n
            return run

        # warm-up: lazy initialisation; on CUDA a full batch, so cudnn autotunes the shape that is timed
        _extract(module, batches(min(EVAL_BATCH, samples) if cuda else 10), device)
        _sync(device)
        start = time.perf_counter()
        features = _extract(module, batches(samples), device)  # stays on the device
        _sync(device)
        per_sample = (time.perf_counter() - start) / samples
        peak = None
        if cuda:
            extractor_bytes = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
            peak = max(0, torch.cuda.max_memory_allocated(device) - base) + extractor_bytes

        fake = features[fid_layer]
        # warm-up: the first call of each linear-algebra routine (and on CUDA its library's load) costs more
        small = {fid_layer: fake[:, :8], isc_layer: features[isc_layer]}
        score_features(small, feature_statistics(fake[:, :8]), fid_layer, isc_layer)
        # The real statistics with their square root, as the Evaluator caches them: per evaluation, only the
        # generated side's statistics and the distance are computed (and IS, and KID against real features).
        real = feature_statistics(fake).with_sqrt()
        _sync(device)
        start = time.perf_counter()
        score_features(features, real, fid_layer, isc_layer,
                       real_kid_features=fake.to("cpu", torch.float32) if ec.kid else None)
        fixed = time.perf_counter() - start
    return EvalCost(per_sample, fixed, samples, ec.extractor, peak)


def training_split_bytes(cfg: TrialConfig) -> int | None:
    """Bytes of the training split on the device (DeviceBatches holds it as float32), where the image count
    is known without preparing the dataset: procedurally generated data only (None for a folder)."""
    if cfg.data.path is not None:
        return None
    n = cfg.data.synthetic_count
    n_train = n - int(math.floor(n * cfg.data.split[1] + 1e-9)) - int(math.floor(n * cfg.data.split[2] + 1e-9))
    return n_train * bytes_per_training_image(cfg)


def bytes_per_training_image(cfg: TrialConfig) -> int:
    return 3 * cfg.data.image_size**2 * 4  # float32 RGB
