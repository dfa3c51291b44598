import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ANIME_FACES = Path(os.environ.get("GAN_TEST_DATA", REPO.parent / "shared" / "datasets" / "anime-faces-64"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Dataset and FID-statistics caches go to a per-session temp dir, never the user's home."""
    monkeypatch.setenv("GAN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "gan-cache"))


@pytest.fixture(scope="session")
def anime_subset(tmp_path_factory) -> Path:
    """A folder of the first 300 images of the shared anime-faces dataset (symlinks)."""
    if not ANIME_FACES.is_dir():
        pytest.skip(f"anime-faces dataset not found at {ANIME_FACES} (set GAN_TEST_DATA)")
    folder = tmp_path_factory.mktemp("anime300")
    for src in sorted(ANIME_FACES.glob("*.jpg"))[:300]:
        (folder / src.name).symlink_to(src)
    return folder


# hypothesis: no deadline (2 shared cores make timings noisy); in CI, derandomised so a run is repeatable.
try:
    from hypothesis import settings

    settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
    settings.register_profile("dev", deadline=None)
    settings.load_profile("ci" if os.environ.get("CI") else "dev")
except ImportError:  # hypothesis is in the test extra; the suite still collects without it
    pass
