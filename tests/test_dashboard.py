"""A local `orchestrator sweep` (no --address) serves Ray's dashboard on localhost only, while it runs.

The dashboard port also serves the Jobs API, which runs arbitrary code: it must not listen on a public
interface, and Ray 2.60's default token authentication must guard its API. RAY_AUTH_MODE is left unset,
as a user leaves it; RAY_AUTH_TOKEN_PATH points Ray at a temp token so it never writes ~/.ray/auth_token.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest
import ray  # noqa: F401

pytestmark = pytest.mark.slow

SWEEP_TIMEOUT_S = 300
DASHBOARD_LINE = re.compile(r"Ray dashboard: http://([^:/\s]+):(\d+)")
SWEEP = """\
name: dashboard
method: grid
metric: {name: fid, goal: minimize}
data: {path: null, image_size: 64, synthetic_count: 200}
model: {g_widths: [32, 16, 8, 8], d_widths: [8, 16, 32, 32], heads: 2}
train: {kimg: 0.5, batch_size: 32}
eval: {every_kimg: 0.5, fid_samples: 64, final_fid_samples: 64, extractor: tiny-conv, grid_size: 2}
parameters:
  seed: {values: [0]}
scheduler: {type: fifo}
resources: {cpu: 1, gpu: 0}
"""


def http_status(url: str, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def listeners(port: int) -> list:
    return [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port]


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a running process and everything it started (its local Ray), by pid; then reap it."""
    if proc.poll() is not None:
        return
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def test_local_sweep_serves_its_dashboard_on_localhost_only_with_token_auth(tmp_path):
    sweep_file = tmp_path / "dashboard.yaml"
    sweep_file.write_text(SWEEP)
    token = secrets.token_hex(32)
    token_file = tmp_path / "auth_token"
    token_file.write_text(token)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH_")}
    env["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    log = tmp_path / "driver.log"
    command = [
        sys.executable,
        "-m",
        "orchestrator.cli",
        "sweep",
        str(sweep_file),
        "--results",
        str(tmp_path / "results"),
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + SWEEP_TIMEOUT_S
        while not (match := DASHBOARD_LINE.search(log.read_text())):
            assert proc.poll() is None, f"sweep exited without printing its dashboard URL:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "no dashboard URL printed"
            time.sleep(0.1)
        host, port = match.group(1), int(match.group(2))
        assert host == "127.0.0.1"
        url = f"http://127.0.0.1:{port}"

        assert http_status(f"{url}/")[0] == 200  # the dashboard's page
        assert http_status(f"{url}/api/version")[0] in (401, 403)  # its API, without the token
        status, body = http_status(f"{url}/api/version", token)
        assert status == 200 and json.loads(body)["ray_version"] == ray.__version__
        sockets = listeners(port)
        assert {c.laddr.ip for c in sockets} == {"127.0.0.1"}
        dashboard = [psutil.Process(c.pid) for c in sockets]

        proc.wait(timeout=SWEEP_TIMEOUT_S)
        assert proc.returncode == 0, log.read_text()[-4000:]
    finally:
        kill_tree(proc)
    # The sweep's own Ray, dashboard included, ends with it.
    deadline = time.monotonic() + 30
    while any(alive(p) for p in dashboard) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(alive(p) for p in dashboard), "the dashboard outlived the sweep"
