"""FID / IS / KID of generator samples against a real split, computed with torch-fidelity.

torch-fidelity supplies the feature extractors (through its registry) and the IS/KID math;
this module adds what a sweep needs around them: in-memory generation instead of PNG files,
real-split statistics (and their covariance's square root) cached on disk once per
dataset/split/extractor weights, every extractor call in exact fp32 (no TF32), FID computed in
float64 on the evaluation device (gan.frechet; torch-fidelity's numpy version gives the same
number on the CPU), and a clear error when the InceptionV3 weights cannot be obtained offline.
"""
from __future__ import annotations

import functools
import hashlib
import http.client
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity import __version__ as TORCH_FIDELITY_VERSION
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from gan.config import EXTRACTORS, INCEPTION, TINY_CONV
from gan.frechet import GaussianStats, feature_statistics, frechet_distance
from gan.precision import exact_float32

WEIGHTS_ENV = "GAN_INCEPTION_WEIGHTS"
KID_MAX_SUBSET = 1000
DOWNLOAD_SOCKET_TIMEOUT_S = 10.0  # per socket operation, so offline hosts fail in seconds


class ExtractorUnavailable(RuntimeError):
    """The requested feature extractor cannot be built (e.g. Inception weights missing offline)."""


class TinyConvExtractor(FeatureExtractorBase):
    """Fixed random-weight conv net: an offline stand-in for Inception in tests and smoke runs.

    Its numbers are only comparable with other tiny-conv numbers.
    """

    SEED = 1234

    def __init__(self, name: str, features_list: list[str], **kwargs):
        super().__init__(name, features_list)
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(3, 32, 3, stride=2, padding=1),
                nn.Conv2d(32, 64, 3, stride=2, padding=1),
                nn.Conv2d(64, 128, 3, stride=2, padding=1),
            ]
        )
        self.head = nn.Linear(128, 10)
        # Weights come from a private generator so they are identical in every process
        # and do not disturb (or depend on) the global RNG.
        generator = torch.Generator().manual_seed(self.SEED)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("bias"):  # random biases would push every image into one class (IS = 1)
                    param.zero_()
                else:
                    param.copy_(torch.randn(param.shape, generator=generator) * (2.0 / param[0].numel()) ** 0.5)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return "128", "logits_unbiased"

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits_unbiased", "fid": "128", "kid": "128"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"tiny-conv expects uint8 images (B,3,H,W), got {x.dtype} {tuple(x.shape)}")
        h = x.float() / 127.5 - 1.0
        for conv in self.convs:
            h = F.relu(conv(h))
        pooled = h.mean(dim=(2, 3))
        # Per-image standardised features give the class head logits of usable spread (IS > 1).
        standardised = (pooled - pooled.mean(dim=1, keepdim=True)) / (pooled.std(dim=1, keepdim=True) + 1e-6)
        features = {"128": pooled, "logits_unbiased": self.head(standardised)}
        return tuple(features[name] for name in self.features_list)


if TINY_CONV not in FEATURE_EXTRACTORS_REGISTRY:  # registration is global; survive module reloads
    register_feature_extractor(TINY_CONV, TinyConvExtractor)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] -> uint8 pixels, rounded (not truncated) and clamped."""
    return ((x.detach() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


def _inception_weights_hint() -> str:
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    return (
        f"download {URL_INCEPTION_V3} on a machine with internet, then set {WEIGHTS_ENV}=/path/to/"
        f"{Path(URL_INCEPTION_V3).name} (or eval.weights_path in the sweep file), or copy it into {hub_dir}/; "
        f"for offline smoke runs use extractor '{TINY_CONV}' (its numbers are not comparable with Inception FID)"
    )


def _feature_layers(extractor: str) -> tuple[str, str]:
    """(layer for FID and KID, layer for IS), as torch-fidelity defines them for this extractor.

    Both registered extractors use the same layer for KID as for FID, so one real-feature
    cache serves both metrics.
    """
    cls = FEATURE_EXTRACTORS_REGISTRY[extractor]
    return cls.get_default_feature_layer_for_metric("fid"), cls.get_default_feature_layer_for_metric("isc")


def build_extractor(
    extractor: str, *, weights_path: str | None = None, device: str | torch.device = "cpu"
) -> FeatureExtractorBase:
    """Build a registered extractor producing the FID layer then the IS layer, on `device`.

    Inception weights: `weights_path`, else $GAN_INCEPTION_WEIGHTS, else torch.hub's cache
    (downloaded there on first use).
    """
    if extractor not in EXTRACTORS:
        raise ValueError(f"unknown extractor {extractor!r}; valid: {', '.join(EXTRACTORS)}")
    layers = list(_feature_layers(extractor))
    if extractor == TINY_CONV:
        return create_feature_extractor(TINY_CONV, layers, cuda=False, verbose=False).to(device)
    source = "eval.weights_path" if weights_path else f"${WEIGHTS_ENV}"
    weights_path = weights_path or os.environ.get(WEIGHTS_ENV) or None
    if weights_path is None:
        return _build_downloading_weights(layers).to(device)
    if not Path(weights_path).is_file():
        raise ExtractorUnavailable(
            f"InceptionV3 weights file not found: {weights_path} (from {source}); {_inception_weights_hint()}"
        )
    return create_feature_extractor(
        INCEPTION, layers, cuda=False, verbose=False, feature_extractor_weights_path=weights_path
    ).to(device)


def extractor_identity(extractor: str, module: FeatureExtractorBase, weights_path: str | None = None) -> str:
    """A hash of the weights `module` computes with, so cached statistics of other weights are never reused.

    tiny-conv: its generated state_dict. Inception: the weights file build_extractor loaded
    (`weights_path`, else $GAN_INCEPTION_WEIGHTS, else torch.hub's cached download).
    """
    if extractor == TINY_CONV:
        digest = hashlib.sha256()
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()
    path = weights_path or os.environ.get(WEIGHTS_ENV) or Path(torch.hub.get_dir()) / "checkpoints" / Path(
        URL_INCEPTION_V3
    ).name
    stat = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.cache
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """Hashed once per process (Inception's file is ~100 MB); size and mtime in the key catch a replaced file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _build_downloading_weights(layers: list[str]) -> FeatureExtractorBase:
    """Inception from torch.hub's cache, downloading the weights there if absent."""
    previous_timeout = socket.getdefaulttimeout()
    # torch.hub's download has no timeout of its own; this process-wide default only
    # matters while the weights are fetched, which happens once per machine.
    socket.setdefaulttimeout(DOWNLOAD_SOCKET_TIMEOUT_S)
    try:
        return create_feature_extractor(INCEPTION, layers, cuda=False, verbose=False)
    except (OSError, http.client.HTTPException) as exc:
        raise ExtractorUnavailable(
            f"InceptionV3 weights could not be downloaded ({exc}); {_inception_weights_hint()}"
        ) from exc
    finally:
        socket.setdefaulttimeout(previous_timeout)


def _extract(
    module: FeatureExtractorBase,
    batches: Callable[[], Iterator[torch.Tensor]],
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Run the extractor over uint8 batches in exact fp32; the features stay on `device` (float32)."""
    collected: dict[str, list[torch.Tensor]] = {name: [] for name in module.features_list}
    with torch.no_grad(), exact_float32():
        for images in batches():
            outputs = module(images.to(device, non_blocking=True))
            for name, feature in zip(module.features_list, outputs, strict=True):
                collected[name].append(feature)
    return {name: torch.cat(parts) for name, parts in collected.items()}


def _on_cpu(features: torch.Tensor) -> torch.Tensor:
    """IS and KID run in torch-fidelity's own code, on CPU float64 copies, exactly as torch-fidelity scores."""
    return features.to("cpu", torch.float64)


def _array_batches(images: np.ndarray, batch_size: int) -> Callable[[], Iterator[torch.Tensor]]:
    def batches():
        for start in range(0, len(images), batch_size):
            yield torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))

    return batches


def _check_images(images: np.ndarray, what: str) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
        shape = getattr(images, "shape", None)
        raise ValueError(f"{what} must be a uint8 numpy array (N,3,H,W), got {type(images).__name__} {shape}")
    if len(images) < 2:
        raise ValueError(f"{what} needs at least 2 images for a covariance, got {len(images)}")


def score_features(
    features: Mapping[str, torch.Tensor],
    real_stats: GaussianStats,
    fid_layer: str,
    isc_layer: str,
    *,
    isc: bool = True,
    real_kid_features: torch.Tensor | None = None,
) -> dict[str, float]:
    """FID (float64, on the features' device) and optionally IS and KID (torch-fidelity's code, CPU) of
    generated features against a real split; `real_kid_features` (its FID-layer features) asks for KID."""
    fake = features[fid_layer]
    result = {"fid": frechet_distance(real_stats, feature_statistics(fake))}
    if isc:
        scores = isc_features_to_metric(_on_cpu(features[isc_layer]))
        result["is_mean"] = scores[KEY_METRIC_ISC_MEAN]
        result["is_std"] = scores[KEY_METRIC_ISC_STD]
    if real_kid_features is not None:
        real = real_kid_features.to(torch.float64)
        subset = min(KID_MAX_SUBSET, len(fake), len(real))
        # generated first, as torch-fidelity orders input1/input2: the same random subsets, the same KID
        scores = kid_features_to_metric(_on_cpu(fake), real, kid_subset_size=subset, verbose=False)
        result["kid_mean"] = scores[KEY_METRIC_KID_MEAN]
        result["kid_std"] = scores[KEY_METRIC_KID_STD]
    return result


def _safe_name(text: str) -> str:
    """Filesystem-safe rendering of a cache-key part; a hash keeps distinct keys distinct."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", text)
    return safe if safe == text else f"{safe}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def _atomic_write(path: Path, write: Callable[[object], None]) -> None:
    """Write via a temp file in the same directory + os.replace: concurrent trials never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the shared cache from other users of the machine
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_cache_dir() -> Path:
    return Path(os.environ.get("GAN_CACHE_DIR") or Path.home() / ".cache" / "gan-sweeps")


def real_stats_path(
    cache_dir: str | None,
    *,
    dataset_key: str,
    split: str,
    real_shape: tuple[int, ...],
    extractor: str,
    weights_id: str,
) -> Path:
    """Where a real split's FID statistics are cached; KID features sit beside it (-features.npy).

    The key holds the extractor's weights hash (`extractor_identity`) and torch-fidelity's
    version, so new weights or new feature code never reuse old statistics."""
    count, _, height, width = real_shape
    stem = "-".join([
        _safe_name(dataset_key), _safe_name(split), f"{height}x{width}", extractor, f"n{count}",
        f"w{weights_id[:16]}", f"tf{_safe_name(TORCH_FIDELITY_VERSION)}",
    ])
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    return root / "fid-stats" / f"{stem}.npz"


class Evaluator:
    """Scores generator samples against one real split; build once per trial.

    The real split's FID statistics with their covariance's square root (and, for KID, its
    features) are computed once per dataset_key/split/image size/extractor weights/torch-fidelity
    version and cached under <cache_dir>/fid-stats/. They are held on `device` in float64, where
    each evaluation's Fréchet distance is computed.
    """

    def __init__(
        self,
        real_images: np.ndarray,
        *,
        dataset_key: str,
        split: str,
        extractor: str = INCEPTION,
        weights_path: str | None = None,
        cache_dir: str | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 200,
        kid: bool = False,
    ):
        _check_images(real_images, "real_images")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.extractor = extractor
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.image_shape = tuple(real_images.shape[1:])
        self._real_images = real_images  # kept (not copied) in case KID features are first needed later
        self._module = build_extractor(extractor, weights_path=weights_path, device=self.device)
        self._fid_layer, self._isc_layer = _feature_layers(extractor)
        self.stats_path = real_stats_path(
            cache_dir, dataset_key=dataset_key, split=split, real_shape=real_images.shape, extractor=extractor,
            weights_id=extractor_identity(extractor, self._module, weights_path),
        )
        self.features_path = self.stats_path.with_name(f"{self.stats_path.stem}-features.npy")
        self._real_stats: GaussianStats | None = None
        self._real_features: torch.Tensor | None = None
        self._load_or_compute_real(with_features=kid)

    @property
    def real_stats(self) -> GaussianStats:
        """The real split's statistics (float64, on the evaluation device) with their square root."""
        return self._real_stats

    def _load_or_compute_real(self, *, with_features: bool) -> None:
        if self.stats_path.is_file() and (not with_features or self.features_path.is_file()):
            with np.load(self.stats_path, allow_pickle=False) as stored:
                self._real_stats = GaussianStats.from_numpy(stored, self.device)
            if self._real_stats.sqrt_sigma is None:  # written before the square root was cached with them
                self._save_real_stats()
            if with_features:
                self._real_features = torch.from_numpy(np.load(self.features_path, allow_pickle=False))
            return
        features = _extract(self._module, _array_batches(self._real_images, self.batch_size), self.device)
        real = features[self._fid_layer]
        self._real_stats = feature_statistics(real)
        self._save_real_stats()
        if with_features:
            # float32 halves the file; kept float32 in memory too so KID is the same on cache hit and miss
            self._real_features = real.to("cpu", torch.float32)
            _atomic_write(self.features_path, lambda f: np.save(f, self._real_features.numpy()))

    def _save_real_stats(self) -> None:
        arrays = self._real_stats.with_sqrt().to_numpy()
        _atomic_write(self.stats_path, lambda f: np.savez(f, **arrays))

    def evaluate(
        self,
        sample_fn: Callable[[int], torch.Tensor],
        num_samples: int,
        *,
        kid: bool = False,
        isc: bool = True,
    ) -> dict[str, float | int | str]:
        """Generate `num_samples` images with sample_fn(n) -> uint8 (n,3,H,W) tensor and score them."""
        if num_samples < 10:
            raise ValueError(f"num_samples must be >= 10 (IS uses 10 splits), got {num_samples}")
        start = time.perf_counter()

        def batches():
            remaining = num_samples
            while remaining > 0:
                n = min(self.batch_size, remaining)
                images = sample_fn(n)
                if images.dtype != torch.uint8 or tuple(images.shape) != (n, *self.image_shape):
                    raise ValueError(
                        f"sample_fn({n}) must return uint8 images of shape {(n, *self.image_shape)}, "
                        f"got {images.dtype} {tuple(images.shape)}; convert with gan.metrics.to_uint8"
                    )
                yield images
                remaining -= n

        features = _extract(self._module, batches, self.device)
        if kid and self._real_features is None:
            self._load_or_compute_real(with_features=True)
        result: dict[str, float | int | str] = dict(score_features(
            features, self._real_stats, self._fid_layer, self._isc_layer, isc=isc,
            real_kid_features=self._real_features if kid else None,
        ))
        result["extractor"] = self.extractor
        result["fid_samples"] = num_samples
        result["eval_seconds"] = time.perf_counter() - start
        return result


def fid_between(
    images_a: np.ndarray,
    images_b: np.ndarray,
    extractor: str,
    device: str | torch.device = "cpu",
    *,
    weights_path: str | None = None,
    batch_size: int = 200,
) -> float:
    """FID between two uint8 (N,3,H,W) image sets, without any caching."""
    _check_images(images_a, "images_a")
    _check_images(images_b, "images_b")
    device = torch.device(device)
    module = build_extractor(extractor, weights_path=weights_path, device=device)
    fid_layer, _ = _feature_layers(extractor)
    stats = [
        feature_statistics(_extract(module, _array_batches(images, batch_size), device)[fid_layer])
        for images in (images_a, images_b)
    ]
    return frechet_distance(*stats)
