"""Dataset preparation: decoding of awkward files, counts, splits, cache, and the real data set."""
from __future__ import annotations

import io
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gan.data as data
from gan.config import DataConfig
from gan.data import DataError, prepare_dataset, to_float
from gan.synthetic import synthetic_faces

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("GAN_TEST_DATA", REPO_ROOT.parent / "shared" / "datasets" / "anime-faces-64"))
needs_real_data = pytest.mark.skipif(
    not REAL_DATA.is_dir(), reason=f"real data set not found at {REAL_DATA} (set GAN_TEST_DATA)"
)


def _save(path: Path, image: Image.Image, **kwargs) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path.read_bytes()


def _noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture
def awkward_folder(tmp_path: Path) -> Path:
    """A folder with one file of each kind a scraped data set tends to contain."""
    root = tmp_path / "images"
    rgb = _save(root / "rgb.jpg", _noise(80, 72, 0), quality=95)
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # fully transparent black
    _save(root / "rgba.png", rgba)
    _save(root / "gray.png", Image.new("L", (64, 64), 100))
    palette = Image.new("P", (64, 64), 1)
    palette.paste(0, (0, 0, 32, 64))  # left half: the transparent index
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    _save(root / "palette.png", palette, transparency=0)
    _save(root / "cmyk.JPEG", Image.new("CMYK", (64, 64), (0, 255, 255, 0)), quality=95)  # red in CMYK
    _save(root / "gray16.png", Image.fromarray(np.full((64, 64), 128 * 257, np.uint16)))
    (root / "zz_duplicate.jpg").write_bytes(rgb)  # sorts after rgb.jpg, so it is the one dropped
    truncated = io.BytesIO()
    _noise(200, 200, 1).save(truncated, "JPEG")
    (root / "truncated.jpg").write_bytes(truncated.getvalue()[: len(truncated.getvalue()) // 2])
    (root / "zero.jpg").write_bytes(b"")
    (root / "not_really.png").write_text("this is text, not a PNG")
    (root / "notes.txt").write_text("ignored")
    _save(root / "small.png", _noise(32, 32, 2))
    _save(root / "nested" / "deeper" / "deep.png", _noise(64, 64, 3))
    os.symlink(root, root / "nested" / "loop")  # a symlink loop back to the top
    _save(tmp_path / "elsewhere" / "linked.webp", _noise(70, 70, 4))
    os.symlink(tmp_path / "elsewhere", root / "linked_folder")  # a symlinked folder outside the tree
    gradient = Image.linear_gradient("L").resize((4000, 3000)).convert("RGB")
    _save(root / "huge.jpg", gradient, quality=90)
    # Stored landscape with left half red, right half blue; EXIF orientation 6 = rotate 90 degrees clockwise.
    rotated = np.zeros((64, 96, 3), np.uint8)
    rotated[:, :48] = (255, 0, 0)
    rotated[:, 48:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(root / "exif_rotated.jpg", Image.fromarray(rotated), exif=exif.tobytes(), quality=95)
    return root


def _prepare(path: Path | None, cache: Path, **kwargs) -> data.PreparedDataset:
    folder = None if path is None else str(path)
    return prepare_dataset(DataConfig(path=folder, cache_dir=str(cache), **kwargs))


def _image(ds: data.PreparedDataset, relative: str) -> np.ndarray:
    return ds.images[ds.files.index(relative)]


def test_awkward_folder_counts(awkward_folder: Path, tmp_path: Path) -> None:
    ds = _prepare(awkward_folder, tmp_path / "cache")
    assert ds.stats == {
        "files_seen": 15,
        "ignored_files": 1,  # notes.txt
        "images_kept": 10,
        "duplicates_removed": 1,  # zz_duplicate.jpg
        "unreadable": 3,  # truncated.jpg, zero.jpg, not_really.png
        "too_small": 1,  # small.png
    }
    assert ds.files == sorted(ds.files)
    assert "nested/deeper/deep.png" in ds.files and "linked_folder/linked.webp" in ds.files
    assert not any("loop" in f for f in ds.files)
    assert ds.source == str(awkward_folder)
    assert ds.images.shape == (10, 3, 64, 64) and ds.images.dtype == np.uint8
    assert ds.images.flags["C_CONTIGUOUS"]


def test_every_mode_becomes_sensible_rgb(awkward_folder: Path, tmp_path: Path) -> None:
    ds = _prepare(awkward_folder, tmp_path / "cache")
    gray = _image(ds, "gray.png")
    assert (gray == 100).all()  # grey stays grey in all three channels
    assert (_image(ds, "rgba.png") == 255).all()  # transparency composited onto white
    palette = _image(ds, "palette.png")
    assert (palette[:, :, :32] == 255).all()  # transparent index becomes white
    assert (palette[:, :, 32:].reshape(3, -1).T == (200, 10, 10)).all()  # opaque colour kept
    red = _image(ds, "cmyk.JPEG").reshape(3, -1).mean(axis=1)
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    gray16 = _image(ds, "gray16.png")
    assert np.abs(gray16.astype(int) - 128).max() <= 1  # scaled from 16 bits, not clipped to 255
    huge = _image(ds, "huge.jpg").astype(int)
    assert huge[:, 0].mean() < 40 and huge[:, -1].mean() > 215  # the whole dark-to-light gradient, downscaled


def test_exif_orientation_is_applied(awkward_folder: Path, tmp_path: Path) -> None:
    image = _image(_prepare(awkward_folder, tmp_path / "cache"), "exif_rotated.jpg").astype(int)
    top, bottom = image[:, :24].reshape(3, -1).mean(axis=1), image[:, 40:].reshape(3, -1).mean(axis=1)
    assert top[0] > 200 and top[2] < 60  # the stored left (red) half is on top once rotated
    assert bottom[2] > 200 and bottom[0] < 60


def test_square_crop_and_resize(tmp_path: Path) -> None:
    stripes = np.zeros((64, 128, 3), np.uint8)
    stripes[:, 32:96] = 255  # white centre square, black side bands that the crop must remove
    _save(tmp_path / "wide" / "wide.png", Image.fromarray(stripes))
    _save(tmp_path / "wide" / "exact.png", _noise(64, 64, 7))
    ds = _prepare(tmp_path / "wide", tmp_path / "cache", image_size=32, min_side=32)
    assert ds.images.shape == (2, 3, 32, 32)
    assert (_image(ds, "wide.png") >= 250).all()
    exact = np.asarray(Image.open(tmp_path / "wide" / "exact.png")).transpose(2, 0, 1)
    ds64 = _prepare(tmp_path / "wide", tmp_path / "cache", image_size=64)
    assert np.array_equal(_image(ds64, "exact.png"), exact)  # already the right size: untouched


def test_min_side_defaults_to_image_size(awkward_folder: Path, tmp_path: Path) -> None:
    assert _prepare(awkward_folder, tmp_path / "cache", min_side=16).stats["too_small"] == 0
    assert _prepare(awkward_folder, tmp_path / "cache", image_size=72).stats["too_small"] == 9


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a chmod 000 file; covered by the next test")
def test_file_without_read_permission_is_unreadable(tmp_path: Path) -> None:
    _save(tmp_path / "imgs" / "a.png", _noise(64, 64, 0))
    locked = tmp_path / "imgs" / "b.png"
    _save(locked, _noise(64, 64, 1))
    locked.chmod(0)
    try:
        ds = _prepare(tmp_path / "imgs", tmp_path / "cache")
    finally:
        locked.chmod(0o644)
    assert ds.stats["unreadable"] == 1 and ds.stats["images_kept"] == 1


def test_read_error_is_counted_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path / "imgs" / "a.png", _noise(64, 64, 0))
    _save(tmp_path / "imgs" / "b.png", _noise(64, 64, 1))

    def open_denying_b(path, *args, **kwargs):
        if Path(path).name == "b.png":
            raise PermissionError(13, "Permission denied", str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(data, "open", open_denying_b, raising=False)  # small folder: decoded in-process
    ds = _prepare(tmp_path / "imgs", tmp_path / "cache")
    assert ds.stats["unreadable"] == 1 and ds.files == ["a.png"]


def test_decompression_bomb_is_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path / "imgs" / "ok.png", _noise(64, 64, 0))
    _save(tmp_path / "imgs" / "bomb.png", Image.new("RGB", (3000, 3000)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # 9 Mpx > twice the limit: refused
    ds = _prepare(tmp_path / "imgs", tmp_path / "cache")
    assert ds.stats["unreadable"] == 1 and ds.files == ["ok.png"]


@pytest.mark.parametrize("make", ["missing", "file", "empty", "only_text", "only_broken"])
def test_unusable_paths_raise_with_the_path(tmp_path: Path, make: str) -> None:
    target = tmp_path / "target"
    if make == "file":
        target.write_text("x")
    elif make != "missing":
        target.mkdir()
    if make == "only_text":
        (target / "readme.txt").write_text("x")
    if make == "only_broken":
        (target / "a.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=str(target)):
        _prepare(target, tmp_path / "cache")


def test_splits_are_deterministic_disjoint_and_covering(tmp_path: Path) -> None:
    first = _prepare(None, tmp_path / "cache", synthetic_count=100, split_seed=3)
    again = _prepare(None, tmp_path / "cache2", synthetic_count=100, split_seed=3)
    other = _prepare(None, tmp_path / "cache", synthetic_count=100, split_seed=4)
    sizes = {name: len(first.splits[name]) for name in ("train", "val", "test")}
    assert sizes == {"train": 80, "val": 10, "test": 10}
    joined = np.concatenate([first.splits[name] for name in ("train", "val", "test")])
    assert np.array_equal(np.sort(joined), np.arange(100))  # disjoint and covering
    assert all(first.splits[k].dtype == np.int64 for k in first.splits)
    assert all(np.array_equal(first.splits[k], again.splits[k]) for k in first.splits)
    assert not np.array_equal(first.splits["val"], other.splits["val"])
    assert np.array_equal(first.split("val"), first.images[first.splits["val"]])
    assert first.split("all") is first.images


def test_split_remainder_goes_to_train(tmp_path: Path) -> None:
    ds = _prepare(None, tmp_path / "cache", synthetic_count=7, split=(0.5, 0.25, 0.25))
    assert [len(ds.splits[k]) for k in ("train", "val", "test")] == [5, 1, 1]


@pytest.mark.parametrize("split", [(0.8, 0.1, 0.2), (1.1, -0.05, -0.05), (0.5, 0.5)])
def test_bad_split_fractions_raise(tmp_path: Path, split: tuple) -> None:
    with pytest.raises(DataError, match="split"):
        _prepare(None, tmp_path / "cache", synthetic_count=10, split=split)


def test_unknown_split_name_raises(tmp_path: Path) -> None:
    ds = _prepare(None, tmp_path / "cache", synthetic_count=10)
    with pytest.raises(DataError, match="validation"):
        ds.split("validation")


def test_second_prepare_is_a_cache_hit(awkward_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cold = _prepare(awkward_folder, cache)
    warm = _prepare(awkward_folder, cache)
    assert not cold.cache_hit and warm.cache_hit
    assert warm.prepare_seconds < cold.prepare_seconds
    assert warm.key == cold.key and warm.stats == cold.stats and warm.files == cold.files
    assert np.array_equal(warm.images, cold.images)
    assert all(np.array_equal(warm.splits[k], cold.splits[k]) for k in cold.splits)
    assert sorted(p.name for p in (cache / "data").iterdir()) == [cold.key]  # no staging leftovers


def test_cache_key_follows_settings_and_files(awkward_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    base = _prepare(awkward_folder, cache).key
    assert _prepare(awkward_folder, cache, image_size=32).key != base
    assert _prepare(awkward_folder, cache, split_seed=1).key != base
    _save(awkward_folder / "new.png", _noise(64, 64, 9))
    added = _prepare(awkward_folder, cache)
    assert added.key != base and not added.cache_hit and added.stats["images_kept"] == 11


def test_cache_dir_falls_back_to_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GAN_CACHE_DIR", str(tmp_path / "env-cache"))
    ds = prepare_dataset(DataConfig(path=None, synthetic_count=10))
    assert (tmp_path / "env-cache" / "data" / ds.key / "images.npy").is_file()


def test_concurrent_preparers_share_one_entry(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: _prepare(None, cache, synthetic_count=300), range(4)))
    assert all(np.array_equal(r.images, results[0].images) for r in results)
    assert [p.name for p in (cache / "data").iterdir()] == [results[0].key]
    assert _prepare(None, cache, synthetic_count=300).cache_hit


def test_synthetic_dataset(tmp_path: Path) -> None:
    ds = _prepare(None, tmp_path / "cache", synthetic_count=50, image_size=32)
    assert ds.source == "synthetic" and ds.images.shape == (50, 3, 32, 32) and ds.files == []
    assert ds.summary()["split_sizes"] == {"train": 40, "val": 5, "test": 5}


def test_synthetic_faces_shape_determinism_variety() -> None:
    faces = synthetic_faces(64, 64, seed=0)
    assert faces.shape == (64, 3, 64, 64) and faces.dtype == np.uint8
    assert np.array_equal(faces, synthetic_faces(64, 64, seed=0))
    assert not np.array_equal(faces, synthetic_faces(64, 64, seed=1))
    flat = faces.reshape(64, -1)
    assert len(np.unique(flat, axis=0)) == 64  # no two images equal
    assert faces.reshape(64, 3, -1).std(axis=2).min() > 10  # every image has structure, none is flat


def test_synthetic_faces_are_fast() -> None:
    start = time.perf_counter()
    synthetic_faces(2000, 64, seed=0)
    assert time.perf_counter() - start < 5.0  # ~0.7 s on 2 idle cores; slack for a loaded CI machine


def test_to_float_range() -> None:
    x = torch.tensor([0, 127, 255], dtype=torch.uint8)
    assert torch.allclose(to_float(x), torch.tensor([-1.0, 127 / 127.5 - 1, 1.0]))


@needs_real_data
def test_real_subset_decodes_unchanged(tmp_path: Path) -> None:
    subset = tmp_path / "subset"
    subset.mkdir()
    names = sorted(p.name for p in REAL_DATA.iterdir())[:300]
    for name in names:
        shutil.copyfile(REAL_DATA / name, subset / name)
    ds = _prepare(subset, tmp_path / "cache")
    assert ds.images.shape == (ds.stats["images_kept"], 3, 64, 64)
    assert ds.stats["images_kept"] + ds.stats["duplicates_removed"] == 300
    assert ds.stats["unreadable"] == ds.stats["too_small"] == 0
    first = np.asarray(Image.open(subset / ds.files[0]).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(ds.images[0], first)  # 64x64 JPEGs pass through pixel-exact


@pytest.mark.slow
@needs_real_data
def test_full_real_dataset(tmp_path: Path) -> None:
    cold = _prepare(REAL_DATA, tmp_path / "cache")
    assert cold.stats["files_seen"] == 19_992
    assert cold.stats["duplicates_removed"] == 4_141
    assert cold.stats["images_kept"] == 15_851
    assert cold.images.shape == (15_851, 3, 64, 64)
    warm = _prepare(REAL_DATA, tmp_path / "cache")
    assert warm.cache_hit  # its time is a benchmark figure (bench/bench_ray.py), not a test
    assert np.array_equal(warm.images, cold.images)
