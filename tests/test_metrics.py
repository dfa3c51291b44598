import hashlib
import socket
import time

import numpy as np
import pytest
import torch
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from PIL import Image
from torch_fidelity.metric_fid import (
    fid_features_to_statistics,
    fid_statistics_to_metric,
)
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

import gan.metrics as metrics
from gan.frechet import GaussianStats, feature_statistics, frechet_distance
from gan.metrics import (
    TINY_CONV,
    Evaluator,
    ExtractorUnavailable,
    TinyConvExtractor,
    build_extractor,
    extractor_identity,
    fid_between,
    real_stats_path,
    to_uint8,
)
from gan.precision import precision_state, restore_precision, set_tf32

SIZE = 32


def dark_noise(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 64, (n, 3, SIZE, SIZE), dtype=np.uint8)


def bright_smooth(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, SIZE)[None, None, None, :]
    base = rng.uniform(180, 220, (n, 3, 1, 1))
    return (base + 35 * ramp).astype(np.uint8).repeat(SIZE, axis=2)


def sampler(images: np.ndarray, calls: list[int] | None = None):
    """sample_fn drawing successive images from `images`, recording requested batch sizes."""
    position = 0

    def sample(n: int) -> torch.Tensor:
        nonlocal position
        if calls is not None:
            calls.append(n)
        batch = torch.from_numpy(images[position : position + n])
        position += n
        return batch

    return sample


def evaluator(tmp_path, real: np.ndarray, **kwargs) -> Evaluator:
    kwargs = {"dataset_key": "synthetic", "split": "train", "extractor": TINY_CONV, **kwargs}
    return Evaluator(real, cache_dir=str(tmp_path), **kwargs)


def count_extractions(monkeypatch) -> list[int]:
    """Record how many images each feature-extraction pass sees."""
    seen: list[int] = []
    original = metrics._extract

    def counting(module, batches, device):
        features = original(module, batches, device)
        seen.append(len(next(iter(features.values()))))
        return features

    monkeypatch.setattr(metrics, "_extract", counting)
    return seen


def test_fid_of_a_set_with_itself_is_zero():
    images = dark_noise(200, seed=0)
    assert abs(fid_between(images, images, TINY_CONV)) < 1e-3


def test_fid_separates_different_distributions_from_halves_of_one():
    same = dark_noise(400, seed=0)
    halves = fid_between(same[:200], same[200:], TINY_CONV)
    different = fid_between(same[:200], bright_smooth(200, seed=1), TINY_CONV)
    assert different > 5.0
    assert halves < different / 20


def test_tiny_conv_is_registered_and_deterministic():
    assert FEATURE_EXTRACTORS_REGISTRY[TINY_CONV] is TinyConvExtractor
    images = torch.from_numpy(dark_noise(4, seed=0))
    first = build_extractor(TINY_CONV)(images)
    second = build_extractor(TINY_CONV)(images)
    assert [f.shape for f in first] == [(4, 128), (4, 10)]  # FID/KID feature, IS logits
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_evaluate_returns_documented_keys(tmp_path):
    real = dark_noise(120, seed=0)
    calls: list[int] = []
    result = evaluator(tmp_path, real, batch_size=32).evaluate(sampler(dark_noise(100, seed=1), calls), 100)
    assert set(result) == {"fid", "is_mean", "is_std", "extractor", "fid_samples", "eval_seconds"}
    assert result["extractor"] == TINY_CONV
    assert result["fid_samples"] == 100
    assert calls == [32, 32, 32, 4]
    assert result["is_mean"] > 0 and result["is_std"] >= 0
    assert result["eval_seconds"] >= 0
    assert all(isinstance(result[k], float) for k in ("fid", "is_mean", "is_std", "eval_seconds"))


def test_evaluate_with_kid_adds_kid_keys_with_subset_no_larger_than_the_sets(tmp_path):
    real = dark_noise(60, seed=0)  # fewer real images than KID's usual subset of 1000
    result = evaluator(tmp_path, real, kid=True).evaluate(sampler(dark_noise(50, seed=1)), 50, kid=True)
    assert {"kid_mean", "kid_std"} <= set(result)
    assert np.isfinite(result["kid_mean"]) and np.isfinite(result["kid_std"])


def test_evaluate_ranks_real_like_samples_above_different_ones(tmp_path):
    ev = evaluator(tmp_path, dark_noise(200, seed=0), kid=True)
    close = ev.evaluate(sampler(dark_noise(100, seed=1)), 100, kid=True)
    far = ev.evaluate(sampler(bright_smooth(100, seed=1)), 100, kid=True)
    assert close["fid"] < far["fid"] / 20
    assert close["kid_mean"] < far["kid_mean"]


def test_evaluate_rejects_float_samples_with_a_hint(tmp_path):
    ev = evaluator(tmp_path, dark_noise(20, seed=0))
    with pytest.raises(ValueError, match="to_uint8"):
        ev.evaluate(lambda n: torch.zeros(n, 3, SIZE, SIZE), 20)


def test_real_statistics_are_cached_per_split(tmp_path, monkeypatch):
    real = dark_noise(100, seed=0)
    extractions = count_extractions(monkeypatch)
    first = evaluator(tmp_path, real)
    assert first.stats_path.is_file() and extractions == [100]
    second = evaluator(tmp_path, real)
    assert extractions == [100]  # cache hit: real images not run through the extractor again
    assert second.stats_path == first.stats_path
    samples = dark_noise(50, seed=1)
    assert second.evaluate(sampler(samples), 50)["fid"] == first.evaluate(sampler(samples), 50)["fid"]
    other_split = evaluator(tmp_path, real, split="val")
    assert other_split.stats_path != first.stats_path and extractions[-1] == 100
    assert not list(first.stats_path.parent.glob("*.tmp"))  # atomic writes leave no partial files


def test_cache_key_separates_extractor_weights_split_and_image_size(tmp_path):
    def path(**changes):
        key = {"dataset_key": "anime", "split": "train", "real_shape": (100, 3, 64, 64), "extractor": TINY_CONV,
               "weights_id": "ab" * 32}
        return real_stats_path(str(tmp_path), **{**key, **changes})

    base = path()
    assert base.parent == tmp_path / "fid-stats"
    others = [path(extractor="inception-v3-compat"), path(split="val"), path(real_shape=(100, 3, 32, 32)),
              path(weights_id="cd" * 32)]
    assert len({base, *others}) == 5
    assert f"tf{torch_fidelity.__version__}" in base.name  # new feature code never reuses old statistics
    assert path(dataset_key="a/b").parent == base.parent  # keys cannot escape the cache directory


def test_kid_features_cache_gives_the_same_kid(tmp_path, monkeypatch):
    real, samples = dark_noise(80, seed=0), dark_noise(40, seed=1)
    fresh = evaluator(tmp_path, real, kid=True).evaluate(sampler(samples), 40, kid=True)
    extractions = count_extractions(monkeypatch)
    cached = evaluator(tmp_path, real, kid=True).evaluate(sampler(samples), 40, kid=True)
    assert extractions == [40]  # only the generated samples
    assert cached["kid_mean"] == fresh["kid_mean"]


def test_unknown_extractor_lists_valid_names():
    with pytest.raises(ValueError, match="inception-v3-compat.*tiny-conv"):
        fid_between(dark_noise(4, 0), dark_noise(4, 1), "resnet")


def test_missing_weights_file_is_named(monkeypatch, tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(ExtractorUnavailable, match=str(missing)):
        build_extractor("inception-v3-compat", weights_path=str(missing))
    monkeypatch.setenv("GAN_INCEPTION_WEIGHTS", str(missing))
    with pytest.raises(ExtractorUnavailable, match=f"{missing}.*GAN_INCEPTION_WEIGHTS"):
        build_extractor("inception-v3-compat")


def test_inception_download_that_stalls_fails_fast_with_instructions(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached weights
    monkeypatch.delenv("GAN_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(metrics, "DOWNLOAD_SOCKET_TIMEOUT_S", 0.5)
    with socket.socket() as server:  # accepts connections (kernel backlog) but never answers
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setattr(tf_inception, "URL_INCEPTION_V3", f"http://127.0.0.1:{port}/weights.pth")
        start = time.perf_counter()
        with pytest.raises(ExtractorUnavailable) as error:
            evaluator(tmp_path, dark_noise(4, 0), extractor="inception-v3-compat")
    assert time.perf_counter() - start < 5
    message = str(error.value)
    assert "GAN_INCEPTION_WEIGHTS" in message and "tiny-conv" in message
    assert metrics.URL_INCEPTION_V3 in message  # the real download URL, to fetch elsewhere


def test_to_uint8_rounds_and_clamps():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0])
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255, 255]
    assert to_uint8(x).dtype == torch.uint8


# --- against torch-fidelity's own pipeline ------------------------------------------------------


def varied(n: int, seed: int) -> np.ndarray:
    """Images of several kinds (noise, ramps, flat colours), so IS, FID and KID all have something to measure."""
    rng = np.random.default_rng(seed)
    kinds = [dark_noise(n, seed), bright_smooth(n, seed),
             rng.integers(0, 256, (n, 3, 1, 1), dtype=np.uint8).repeat(SIZE, 2).repeat(SIZE, 3)]
    pick = rng.integers(0, len(kinds), n)
    return np.stack([kinds[k][i] for i, k in enumerate(pick)])


def write_pngs(images: np.ndarray, folder) -> str:
    folder.mkdir()
    for i, image in enumerate(images.transpose(0, 2, 3, 1)):
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    return str(folder)


def test_evaluator_equals_torch_fidelity_on_the_same_images(tmp_path):
    real = varied(300, seed=0)
    fake = np.concatenate([varied(100, seed=1), dark_noise(100, seed=2)])  # over-weights one kind
    ours = evaluator(tmp_path / "cache", real, kid=True, batch_size=64).evaluate(sampler(fake), len(fake), kid=True)
    reference = torch_fidelity.calculate_metrics(
        input1=write_pngs(fake, tmp_path / "fake"), input2=write_pngs(real, tmp_path / "real"),
        fid=True, isc=True, kid=True, kid_subset_size=len(fake), feature_extractor=TINY_CONV,
        cuda=False, cache=False, save_cpu_ram=True, verbose=False,  # save_cpu_ram: no DataLoader workers
    )
    assert ours["fid"] > 1 and ours["is_mean"] > 1.1 and ours["kid_mean"] > 1e-3  # nothing degenerate
    assert ours["fid"] == pytest.approx(reference["frechet_inception_distance"], rel=1e-5)
    assert ours["is_mean"] == pytest.approx(reference["inception_score_mean"], rel=1e-5)
    assert ours["is_std"] == pytest.approx(reference["inception_score_std"], rel=1e-4, abs=1e-7)
    assert ours["kid_mean"] == pytest.approx(reference["kernel_inception_distance_mean"], rel=1e-4)
    assert ours["kid_std"] == pytest.approx(reference["kernel_inception_distance_std"], rel=1e-4)


def test_inception_score_of_images_in_one_class_is_one(tmp_path):
    rng = np.random.default_rng(0)
    one = bright_smooth(1, seed=0)  # near-copies of one image: the same class with the same confidence
    copies = np.clip(one.astype(int) + rng.integers(-1, 2, (100, 3, SIZE, SIZE)), 0, 255).astype(np.uint8)
    result = evaluator(tmp_path, dark_noise(50, seed=0)).evaluate(sampler(copies), len(copies))
    assert result["is_mean"] == pytest.approx(1.0, abs=1e-3)


# --- exact fp32 extraction, whatever the caller switched on ----------------------------------------


def tf32_state() -> tuple[str, str]:
    return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision


def test_features_are_extracted_without_tf32_and_the_callers_setting_comes_back(tmp_path, monkeypatch):
    during: list[tuple[str, str]] = []
    forward = TinyConvExtractor.forward

    def spy(self, x):
        during.append(tf32_state())
        assert torch.get_float32_matmul_precision() == "highest"  # readable inside too (Inductor reads it)
        return forward(self, x)

    monkeypatch.setattr(TinyConvExtractor, "forward", spy)
    saved = precision_state()
    try:
        set_tf32(True)  # as training_loop does on CUDA (gan.training.set_training_backends)
        on = tf32_state()
        ev = evaluator(tmp_path, dark_noise(40, seed=0), batch_size=16)  # real statistics: 3 batches
        assert tf32_state() == on
        ev.evaluate(sampler(dark_noise(20, seed=1)), 20)  # samples: 2 batches
        assert tf32_state() == on and torch.get_float32_matmul_precision() == "high"
    finally:
        restore_precision(saved)
    assert on == ("tf32", "tf32")
    assert during == [("ieee", "ieee")] * 5


# --- the Fréchet distance in float64 on the evaluation device ------------------------------------


def gaussian_features(n: int, dims: int, seed: int, shift: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dims, dims, generator=g, dtype=torch.float64) / dims**0.5
    return (torch.randn(n, dims, generator=g, dtype=torch.float64) + shift) @ mixing


@pytest.mark.parametrize("n, dims", [(600, 64), (1000, 256), (100, 128)], ids=["full-rank", "wide", "rank-deficient"])
def test_frechet_distance_equals_torch_fidelity_on_the_same_statistics(n, dims):
    a, b = gaussian_features(n, dims, seed=0, shift=0.0), gaussian_features(n, dims, seed=1, shift=0.3)
    stats_a, stats_b = fid_features_to_statistics(a), fid_features_to_statistics(b)
    reference = fid_statistics_to_metric(stats_a, stats_b, verbose=False)["frechet_inception_distance"]
    ours = frechet_distance(GaussianStats.from_numpy(stats_a), GaussianStats.from_numpy(stats_b))
    assert ours == pytest.approx(reference, rel=1e-6)
    # the statistics themselves, computed in torch, are numpy.cov's
    mine = feature_statistics(a)
    np.testing.assert_allclose(mine.mu.numpy(), stats_a["mu"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mine.sigma.numpy(), stats_a["sigma"], rtol=1e-10, atol=1e-12)
    assert frechet_distance(mine, feature_statistics(b)) == pytest.approx(reference, rel=1e-6)


def test_real_statistics_are_cached_with_their_square_root(tmp_path, monkeypatch):
    real, samples = dark_noise(200, seed=0), dark_noise(150, seed=1)
    first = evaluator(tmp_path, real)
    with np.load(first.stats_path) as stored:
        assert set(stored.files) == {"mu", "sigma", "sqrt_sigma"}
        root, sigma = stored["sqrt_sigma"], stored["sigma"]
    np.testing.assert_allclose(root @ root, sigma, atol=1e-6 * np.abs(sigma).max())
    fid = first.evaluate(sampler(samples), 150)["fid"]

    # A cache written before the square root was stored: used, and completed on disk.
    with np.load(first.stats_path) as stored:
        old = {"mu": stored["mu"], "sigma": stored["sigma"]}
    np.savez(first.stats_path, **old)
    extractions = count_extractions(monkeypatch)
    upgraded = evaluator(tmp_path, real)
    assert extractions == []  # the real images were not extracted again
    with np.load(first.stats_path) as stored:
        assert "sqrt_sigma" in stored.files
    assert upgraded.evaluate(sampler(samples), 150)["fid"] == pytest.approx(fid, rel=1e-9)
    reference = fid_statistics_to_metric(
        old, fid_features_to_statistics(metrics._on_cpu(
            metrics._extract(upgraded._module, metrics._array_batches(samples, 200), torch.device("cpu"))["128"])),
        verbose=False)["frechet_inception_distance"]
    assert fid == pytest.approx(reference, rel=1e-6)


# --- the cache knows which weights made it --------------------------------------------------------


def test_statistics_of_other_extractor_weights_are_not_reused(tmp_path, monkeypatch):
    real = dark_noise(60, seed=0)
    first = evaluator(tmp_path, real)
    monkeypatch.setattr(TinyConvExtractor, "SEED", TinyConvExtractor.SEED + 1)  # same name, other weights
    extractions = count_extractions(monkeypatch)
    second = evaluator(tmp_path, real)
    assert second.stats_path != first.stats_path and extractions == [60]


def test_inception_weights_file_is_hashed_once_and_rehashed_when_replaced(tmp_path, monkeypatch):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"first weights" * 1000)
    opened: list[str] = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda file, *a, **k: (opened.append(str(file)), real_open(file, *a, **k))[1])
    first = extractor_identity("inception-v3-compat", None, weights_path=str(weights))
    again = extractor_identity("inception-v3-compat", None, weights_path=str(weights))
    assert first == again == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert opened.count(str(weights.resolve())) == 1  # hashed once per process
    weights.write_bytes(b"other weights" * 999)
    assert extractor_identity("inception-v3-compat", None, weights_path=str(weights)) != first
