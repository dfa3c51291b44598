import contextlib
import os
import subprocess
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


@pytest.fixture
def orchestrator_cli(monkeypatch):
    """`orchestrator_cli(*ARGS, cwd=None)`: `orchestrator ARGS` run in this process by typer's CliRunner, as a shell
    with its output piped runs it (the console 200 columns wide, no colour), returned as a CompletedProcess (exit
    code, stdout, stderr); an exception the command does not turn into an exit code is raised here. It saves the
    second a new interpreter spends importing the project. Only for checks that need no process of their own:
    not which modules a command imports, signals, or what it takes from sys.argv (`leaderboard --save`)."""
    from rich.console import Console
    from typer.testing import CliRunner

    import orchestrator.cli as cli

    monkeypatch.setattr(cli, "console", Console(width=200, force_terminal=False))

    def run(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
        args = [str(a) for a in args]
        with contextlib.chdir(cwd or Path.cwd()):
            result = CliRunner().invoke(cli.app, args)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return subprocess.CompletedProcess(["orchestrator", *args], result.exit_code, result.stdout, result.stderr)

    return run


# hypothesis: no deadline (2 shared cores make timings noisy); in CI, derandomised so a run is repeatable.
try:
    from hypothesis import settings

    settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
    settings.register_profile("dev", deadline=None)
    settings.load_profile("ci" if os.environ.get("CI") else "dev")
except ImportError:  # hypothesis is in the test extra; the suite still collects without it
    pass
