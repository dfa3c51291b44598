"""Turn a folder of images (or procedurally generated faces) into a cached uint8 array with splits.

Pipeline for a folder (see README "Data"):
1. Walk it recursively, following symlinked folders once each (symlink loops are cut by
   remembering the real path of every folder visited). Files ending in .jpg .jpeg .png
   .webp .bmp (any case) are candidates; other files are counted as `ignored_files`.
2. Decode each candidate with Pillow: EXIF orientation applied; transparent images are
   composited onto white (what a viewer shows; a plain convert("RGB") would reveal
   whatever colour hides under alpha 0); 16-bit greyscale is scaled to 8 bits (not
   clipped); every other mode goes through convert("RGB"). Files that fail to read or
   decode (truncated, empty, not really an image, decompression bomb, no permission) are
   counted as `unreadable` and skipped.
3. Images whose shorter side is below `min_side` are dropped (`too_small`): upscaled small
   images are blurry, and the papers filtered low-quality images too.
4. Byte-identical files are dropped after the first in path order (`duplicates_removed`).
5. Centre-crop to a square and resize to `image_size` with Lanczos (reducing_gap=3, which
   pre-shrinks very large images by an integer factor first: same quality, much faster).
   Large JPEGs are decoded at a reduced scale (Image.draft) that still covers the target.

The result is cached on disk under a key derived from the file manifest (relative path,
size, mtime_ns of every candidate) and the settings (image_size, min_side, split,
split_seed), so a second call only stats the files and loads one .npy file. Editing a file
in place keeps the old key only if its size and mtime both stay the same, which in
practice never happens. Because the key covers `split` and `split_seed`, it identifies
exactly which images each split holds: anything derived from a split (FID reference
statistics) may be cached under it. The folder's absolute path is not part of the key, so
the same files mounted elsewhere (mtimes preserved) hit the same entry.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from gan.config import SPLITS, DataConfig
from gan.synthetic import synthetic_faces

if TYPE_CHECKING:
    import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CACHE_FORMAT = 1  # bump when the cached content or preprocessing changes meaning
_POOL_MIN_FILES = 2000  # below this, starting worker processes costs more than it saves
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class DataError(ValueError):
    """A data set that cannot be prepared; the message names the path and the problem."""


@dataclass
class PreparedDataset:
    images: np.ndarray  # uint8 (N, 3, H, W), C-contiguous
    splits: dict[str, np.ndarray]  # int64 indices into images: train, val, test, all
    stats: dict[str, int]
    source: str  # absolute folder path, or "synthetic"
    key: str  # cache key (hex)
    cache_hit: bool
    prepare_seconds: float
    files: list[str] = field(default_factory=list)  # relative path of each image; empty if synthetic

    def split(self, name: str) -> np.ndarray:
        """The uint8 images of one split ("train", "val", "test" or "all")."""
        if name not in self.splits:
            raise DataError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        if name == "all":
            return self.images
        return self.images[self.splits[name]]

    def summary(self) -> dict:
        """Counts for reports and the CLI: files seen, kept, dropped (by reason), split sizes."""
        return {
            "source": self.source,
            **self.stats,
            "split_sizes": {name: len(self.splits[name]) for name in ("train", "val", "test")},
            "image_shape": list(self.images.shape[1:]),
            "cache_hit": self.cache_hit,
            "prepare_seconds": round(self.prepare_seconds, 3),
        }


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [-1, 1], the papers' (x - 0.5) / 0.5 on x in [0, 1]."""
    return images.float().div_(127.5).sub_(1.0)  # in place on the new float copy: one allocation


def prepare_dataset(cfg: DataConfig) -> PreparedDataset:
    """Load (from cache when possible) the images `cfg` describes, with deterministic splits."""
    start = time.perf_counter()
    _check_config(cfg)
    split_settings = {"split": list(cfg.split), "split_seed": cfg.split_seed}
    if cfg.path is None:
        source = "synthetic"
        key = _cache_key(
            {"synthetic_count": cfg.synthetic_count, "image_size": cfg.image_size, **split_settings}
        )
        build = functools.partial(_build_synthetic, cfg)
    else:
        root = Path(cfg.path).expanduser().resolve()
        candidates, ignored, manifest = _scan_folder(root)
        source = str(root)
        key = _cache_key(
            {"manifest": manifest, "image_size": cfg.image_size, "min_side": _min_side(cfg), **split_settings}
        )
        build = functools.partial(_decode_folder, root, candidates, ignored, cfg)

    entry = _writable_cache_root(cfg) / key
    cached = _load_cache(entry)
    cache_hit = cached is not None
    if cached is None:
        cached = build()
        _write_cache(entry, *cached)
    images, stats, files = cached

    return PreparedDataset(
        images=images,
        splits=_split_indices(len(images), cfg.split, cfg.split_seed),
        stats=stats,
        source=source,
        key=key,
        cache_hit=cache_hit,
        prepare_seconds=time.perf_counter() - start,
        files=files,
    )


def _check_config(cfg: DataConfig) -> None:
    if cfg.image_size < 1:
        raise DataError(f"data.image_size must be >= 1, got {cfg.image_size}")
    if cfg.min_side is not None and cfg.min_side < 1:
        raise DataError(f"data.min_side must be >= 1 or null, got {cfg.min_side}")
    if cfg.path is None and cfg.synthetic_count < 1:
        raise DataError(f"data.synthetic_count must be >= 1, got {cfg.synthetic_count}")
    if len(cfg.split) != 3 or any(f < 0 for f in cfg.split) or abs(sum(cfg.split) - 1) > 1e-6:
        raise DataError(f"data.split must be three non-negative fractions summing to 1, got {cfg.split}")


def _min_side(cfg: DataConfig) -> int:
    return cfg.image_size if cfg.min_side is None else cfg.min_side


def _cache_root(cfg: DataConfig) -> Path:
    base = cfg.cache_dir or os.environ.get("GAN_CACHE_DIR") or Path.home() / ".cache" / "gan-sweeps"
    return Path(base).expanduser() / "data"


def _writable_cache_root(cfg: DataConfig) -> Path:
    """The data cache folder, created and probed with a file: a sweep's trials write their FID
    statistics beside it, so a cache that cannot be written fails here in one line, not in every trial."""
    root = _cache_root(cfg)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as e:
        reason = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else (e.strerror or str(e))
        raise DataError(
            f"{root}: cannot create or write the data cache ({reason}); set data.cache_dir or GAN_CACHE_DIR "
            "to a writable folder"
        ) from None
    return root


def _scan_folder(root: Path) -> tuple[list[tuple[str, Path]], int, list]:
    """Candidate files sorted by relative path, the count of ignored files, and the manifest."""
    if not root.exists():
        raise DataError(f"{root}: data folder does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: data path is not a folder")
    candidates: list[tuple[str, Path]] = []
    manifest: list[tuple[str, int, int]] = []
    ignored = 0
    visited = {os.path.realpath(root)}
    pending = [(root, "")]
    while pending:
        folder, prefix = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as e:
            raise DataError(f"{folder}: cannot list folder ({e.strerror})") from e
        for entry in entries:
            relative = prefix + entry.name
            if entry.is_dir():  # follows symlinks; the real-path set stops loops
                real = os.path.realpath(entry.path)
                if real not in visited:
                    visited.add(real)
                    pending.append((Path(entry.path), relative + "/"))
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                try:
                    st = entry.stat()
                    size, mtime = st.st_size, st.st_mtime_ns
                except OSError:  # broken symlink: kept as a candidate, counted unreadable later
                    size, mtime = -1, -1
                candidates.append((relative, Path(entry.path)))
                manifest.append((relative, size, mtime))
            else:
                ignored += 1
    if not candidates:
        raise DataError(
            f"{root}: no image files ({' '.join(IMAGE_EXTENSIONS)}) found"
            + (f"; {ignored} other files ignored" if ignored else "")
        )
    candidates.sort()
    manifest.sort()
    return candidates, ignored, manifest


def _cache_key(content: dict) -> str:
    blob = json.dumps({"format": CACHE_FORMAT, **content}, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _build_synthetic(cfg: DataConfig) -> tuple[np.ndarray, dict[str, int], list[str]]:
    images = synthetic_faces(cfg.synthetic_count, cfg.image_size, seed=cfg.split_seed)
    stats = {"files_seen": 0, "ignored_files": 0, "images_kept": len(images),
             "duplicates_removed": 0, "unreadable": 0, "too_small": 0}
    return images, stats, []


def _decode_folder(
    root: Path, candidates: list[tuple[str, Path]], ignored: int, cfg: DataConfig
) -> tuple[np.ndarray, dict[str, int], list[str]]:
    load = functools.partial(_load_image, size=cfg.image_size, min_side=_min_side(cfg))
    paths = [path for _, path in candidates]
    workers = min(_cpu_count(), max(1, len(paths) // 500))
    if len(paths) < _POOL_MIN_FILES or workers < 2:
        results = list(map(load, paths))
    else:
        # fork, not spawn/forkserver: those re-import the caller's __main__ in every worker, which
        # breaks scripts without an `if __name__ == "__main__"` guard. The workers only run Pillow,
        # numpy and hashlib, none of which need locks that other parent threads (torch, Ray) hold.
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            results = list(pool.map(load, paths, chunksize=max(1, len(paths) // (workers * 8))))

    stats = {"files_seen": len(paths), "ignored_files": ignored, "images_kept": 0,
             "duplicates_removed": 0, "unreadable": 0, "too_small": 0}
    seen_digests: set[str] = set()
    kept: list[np.ndarray] = []
    files: list[str] = []
    for (relative, _), (verdict, digest, pixels) in zip(candidates, results, strict=True):
        if verdict != "ok":
            stats[verdict] += 1
        elif digest in seen_digests:
            stats["duplicates_removed"] += 1
        else:
            seen_digests.add(digest)
            kept.append(pixels)
            files.append(relative)
    stats["images_kept"] = len(kept)
    if not kept:
        raise DataError(
            f"{root}: no usable image among {len(paths)} image files "
            f"({stats['unreadable']} unreadable, {stats['too_small']} smaller than {_min_side(cfg)} px)"
        )
    return np.ascontiguousarray(np.stack(kept)), stats, files


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects CPU pinning, unlike os.cpu_count()
    except AttributeError:
        return os.cpu_count() or 1


def _load_image(path: Path, size: int, min_side: int) -> tuple[str, str | None, np.ndarray | None]:
    """Decode one file -> ("ok", sha256 of its bytes, uint8 (3, size, size)) or (reason, None, None)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        with warnings.catch_warnings():
            # Large-but-legitimate images warn; only DecompressionBombError (twice the limit) is refused.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if min(width, height) < min_side:
                return "too_small", None, None
            # JPEG only: decode at 1/2, 1/4 or 1/8 scale when that still covers `size` (no-op otherwise).
            image.draft(None, (size, size))
            image = _to_rgb(ImageOps.exif_transpose(image))
            pixels = _square(image, size)
    # Arbitrary files can fail in many ways (OSError, SyntaxError, ValueError, struct.error, ...);
    # any failure to read or decode one file means "skip it", never "abort the data set".
    except Exception:
        return "unreadable", None, None
    return "ok", hashlib.sha256(data).hexdigest(), pixels


def _square(image: Image.Image, size: int) -> np.ndarray:
    """Centre square crop resized to (3, size, size) uint8; an image already that size passes unchanged."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    # crop() before resize(): resize(box=...) would let the filter reach past the crop edge.
    image = image.crop((left, top, left + side, top + side))
    image = image.resize((size, size), Image.LANCZOS, reducing_gap=3.0)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        # 16-bit greyscale: convert("L") would clip everything above 255 to white; scale instead.
        grey = np.asarray(image).astype(np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _split_indices(n: int, fractions: tuple[float, float, float], seed: int) -> dict[str, np.ndarray]:
    """One seeded permutation cut into train/val/test; floor sizes, the remainder goes to train."""
    order = np.random.default_rng(seed).permutation(n).astype(np.int64)
    n_val = int(np.floor(n * fractions[1] + 1e-9))
    n_test = int(np.floor(n * fractions[2] + 1e-9))
    n_train = n - n_val - n_test
    return {
        "train": np.sort(order[:n_train]),
        "val": np.sort(order[n_train : n_train + n_val]),
        "test": np.sort(order[n_train + n_val :]),
        "all": np.arange(n, dtype=np.int64),
    }


def _load_cache(entry: Path) -> tuple[np.ndarray, dict[str, int], list[str]] | None:
    if not entry.is_dir():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text())
        images = np.load(entry / "images.npy")
    except (OSError, ValueError) as e:
        raise DataError(f"{entry}: corrupt data cache entry ({e}); delete it to rebuild") from e
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != meta["stats"]["images_kept"]:
        raise DataError(f"{entry}: data cache entry does not match its meta.json; delete it to rebuild")
    return images, meta["stats"], meta["files"]


def _write_cache(entry: Path, images: np.ndarray, stats: dict[str, int], files: list[str]) -> None:
    """Build the entry in a temporary folder beside it, then rename: readers never see half an entry."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
        staging.chmod(0o755)  # mkdtemp makes it owner-only; a shared cache should stay readable
    except OSError as e:
        warnings.warn(f"{entry.parent}: cannot write the data cache ({e}); continuing without it", stacklevel=2)
        return
    try:
        np.save(staging / "images.npy", images)
        meta = {"format": CACHE_FORMAT, "stats": stats, "files": files}
        (staging / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(staging, entry)
        except OSError:
            if not entry.is_dir():
                raise
            # Another process (e.g. a parallel trial) finished the same entry first; theirs is identical.
    except OSError as e:
        warnings.warn(f"{entry}: cannot write the data cache ({e}); continuing without it", stacklevel=2)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
