"""Open an HTML file in Debian's headless chromium and return what it rendered."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest


def open_in_chromium(html: Path, profile_dir: Path) -> tuple[str, list[str]]:
    """(DOM after scripts ran, console errors of the page). Skips without chromium, fails in CI."""
    chromium = shutil.which("chromium")
    if chromium is None:
        message = "chromium not installed (apt-get install -y --no-install-recommends chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile_dir}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=5000", "--dump-dom", html.resolve().as_uri()],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    page_errors = [line for line in result.stderr.splitlines() if "Uncaught" in line or "ERROR:CONSOLE" in line]
    return result.stdout, page_errors
