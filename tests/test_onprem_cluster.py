"""The on-premise path for real: Ray's cluster launcher (`ray up -y cluster/onprem.yaml`) starts a head over
ssh with the file's token authentication, clients without the token are refused and clients with it
accepted, `orchestrator sweep sweeps/smoke.yaml --address auto` runs on that head, `ray up --no-restart`
leaves the running Ray alone, `ray down -y` ends it.

The "lab server" is this machine, reached through an sshd of the test's own on 127.0.0.1 with throwaway
keys. The cluster file is cluster/onprem.yaml as shipped, changed only where a test machine must:
  - the login (this user, a throwaway key, a ProxyCommand to the test's sshd: Ray's ssh has no port
    setting) and the cluster's name;
  - ports and Ray's temp dir (free ones, so other Rays on the machine are untouched) and the node
    address (127.0.0.1);
  - the install step: the virtual environment sees this interpreter's packages through a .pth file, so
    nothing (torch above all) is downloaded again;
  - no `ray stop` before `ray start` (it would stop every Ray on the machine).
Everything else, the token lines above all (file_mounts' ~/.ray/auth_token, and
`export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=~/.ray/auth_token;` in the start commands) runs as
shipped. Paths stay as written too: "home" on both sides is a folder of the test's (the test's sshd sets
HOME for its sessions; `ray up` and the local clients run with HOME set to another one), so `~` in the
file, `ray get-auth-token --generate` and the file mount of ~/.ray/auth_token never touch the user's home;
the sshd also sets RAY_TMPDIR, so `--address auto` on the "server" finds this test's head and no other.
"""
from __future__ import annotations

import copy
import getpass
import importlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray  # noqa: F401  (importing Ray puts its bundled psutil on sys.path)
import yaml

psutil = importlib.import_module("psutil")  # after `import ray`, whatever order the imports are sorted in

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ONPREM = REPO / "cluster" / "onprem.yaml"
RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
RAY_UP_TIMEOUT_S = 600
SWEEP_TIMEOUT_S = 900
# What cluster/onprem.yaml must ship, and the test keeps byte for byte.
AUTH_LINE = "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=~/.ray/auth_token; "
TOKEN_MOUNT = "~/.ray/auth_token"
# ssh's ProxyCommand: copy bytes between ssh (stdin/stdout) and the test's sshd on 127.0.0.1:PORT.
RELAY = """\
import os, socket, sys, threading
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
def upstream():
    while data := os.read(0, 65536):
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
threading.Thread(target=upstream, daemon=True).start()
while data := sock.recv(65536):
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]
"""
# A client of the cluster, run in its own process: connects to the GCS (or Ray Client) at argv[1].
CLIENT = """\
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print("CONNECTED", ray.cluster_resources().get("CPU"))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_tools() -> list[str]:
    missing = [tool for tool in ("ssh", "ssh-keygen", "rsync") if shutil.which(tool) is None]
    if not os.path.exists(SSHD):
        missing.append("sshd")
    if os.geteuid() != 0:
        missing.append("root (sshd needs it to log a user in)")
    return missing


def kill_processes_of(work: Path) -> None:
    """Stop, by pid, this test's processes and their children: those whose command line names `work`, or
    whose HOME is inside it (everything started over the test's ssh: its Ray, the sweep)."""
    marker = str(work)
    victims: set[psutil.Process] = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid == os.getpid():
                continue
            home = proc.environ().get("HOME", "")
            if home.startswith(marker) or any(marker in arg for arg in proc.info["cmdline"] or []):
                victims.add(proc)
                victims.update(proc.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    victims.discard(psutil.Process())
    for proc in victims:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(victims), timeout=30)


class Sshd:
    """An sshd on 127.0.0.1 that accepts only a throwaway key, for the current user only. Its sessions get
    HOME=`home` (the "server's" home directory), RAY_TMPDIR=`ray_tmpdir` (where Ray's temp dir, and the
    address file that `--address auto` reads, are: the test's own, not /tmp/ray of other Rays here) and
    Ray's usage stats off (nothing leaves the machine)."""

    def __init__(self, folder: Path, home: Path, ray_tmpdir: Path):
        self.folder = folder
        self.port = free_port()
        self.key = folder / "id_ed25519"
        for key in (self.key, folder / "host_ed25519"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        (folder / "authorized_keys").write_text(self.key.with_suffix(".pub").read_text())
        config = folder / "sshd_config"
        config.write_text(
            f"ListenAddress 127.0.0.1\nPort {self.port}\nHostKey {folder / 'host_ed25519'}\n"
            f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPidFile {folder / 'sshd.pid'}\n"
            f"AllowUsers {getpass.getuser()}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nX11Forwarding no\n"
            f"SetEnv HOME={home} RAY_TMPDIR={ray_tmpdir} RAY_USAGE_STATS_ENABLED=0\n"
            f"Subsystem sftp internal-sftp\n"
        )
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
        self.log = folder / "sshd.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert self.proc.poll() is None, f"sshd exited: {self.log.read_text()}"
                assert time.monotonic() < deadline, f"sshd did not listen: {self.log.read_text()}"
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Ports:
    def __init__(self) -> None:
        self.gcs, self.dashboard, self.client, self.agent = (free_port() for _ in range(4))


def cluster_file(sshd: Sshd, work: Path, ray_temp: Path, ports: Ports, relay: Path) -> Path:
    """cluster/onprem.yaml as a user of this machine would run it, made safe to share the machine."""
    shipped = yaml.safe_load(ONPREM.read_text())
    config = copy.deepcopy(shipped)
    config["cluster_name"] = f"gan-sweeps-test-{secrets.token_hex(4)}"
    config["auth"] = {"ssh_user": getpass.getuser(), "ssh_private_key": str(sshd.key),
                      "ssh_proxy_command": f"{sys.executable} {relay} {sshd.port}"}

    # The install step: a virtual environment in the file's place that sees this interpreter's packages
    # (nothing downloaded, no pip of its own), plus the `ray` command the file's start commands call.
    env = "~/gan-sweeps-env"
    site = Path(sysconfig.get_path("purelib", vars={"base": "/B", "platbase": "/B"})).relative_to("/B")
    venv = f"python3 -m venv {env}"
    assert venv in config["setup_commands"], config["setup_commands"]
    config["setup_commands"][config["setup_commands"].index(venv)] = (
        f"{sys.executable} -m venv --without-pip {env}"
        f" && echo {sysconfig.get_path('purelib')} > {env}/{site}/test-deps.pth"
        f" && printf '#!/bin/sh\\nexec \"$(dirname \"$0\")/python\" -m ray.scripts.scripts \"$@\"\\n' > {env}/bin/ray"
        f" && chmod +x {env}/bin/ray"
    )

    # Ports, temp dir and address of this test's Ray; no `ray stop` (see the module docstring).
    flags = (f"--port={ports.gcs} --temp-dir={ray_temp} --node-ip-address=127.0.0.1 "
             f"--dashboard-port={ports.dashboard} --ray-client-server-port={ports.client} "
             f"--dashboard-agent-listen-port={ports.agent}")
    config["head_start_ray_commands"] = [
        command.replace("--port=6379", flags)
        for command in config["head_start_ray_commands"] if not command.endswith("ray stop")
    ]
    [start] = config["head_start_ray_commands"]
    assert flags in start
    # The token, as shipped: the same file mount, the same auth line in front of `ray start`.
    assert start.startswith(AUTH_LINE), start
    assert config["file_mounts"] == shipped["file_mounts"] and config["file_mounts"][TOKEN_MOUNT] == TOKEN_MOUNT
    assert config["initialization_commands"] == shipped["initialization_commands"]
    changed = {key for key in shipped.keys() | config.keys() if shipped.get(key) != config.get(key)}
    assert changed == {"cluster_name", "auth", "setup_commands", "head_start_ray_commands"}, changed
    path = work / "onprem-test.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(command: list[str], log: Path, timeout: float, env: dict[str, str]) -> subprocess.CompletedProcess:
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        proc = subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    return proc


def tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def http_status(url: str, token: str | None = None, method: str = "GET") -> int:
    request = urllib.request.Request(url, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def server_logs(ray_temp: Path, prefix: str) -> str:
    """The ends of the head's log files named prefix*, for a failing assertion's message."""
    logs = sorted((ray_temp / "session_latest" / "logs").glob(f"{prefix}*"))
    return "\n".join(f"--- {log.name}\n{tail(log, 2000)}" for log in logs)


def gcs_pid(ray_temp: Path) -> int:
    """The pid of this test's GCS server (its command line names this test's Ray temp dir)."""
    pids = [p.pid for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == "gcs_server" and any(str(ray_temp) in arg for arg in p.info["cmdline"] or [])]
    assert len(pids) == 1, pids
    return pids[0]


def test_ray_up_of_the_onprem_config_with_token_auth_then_a_sweep_then_ray_down(tmp_path):
    missing = missing_tools()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide {', '.join(missing)} (.ci/run installs openssh-server and rsync)")
        pytest.skip(f"needs {', '.join(missing)} for an sshd on 127.0.0.1")
    # Short: Ray's Unix socket paths under its temp dir must fit in 107 bytes.
    work = Path(tempfile.mkdtemp(prefix="onprem-", dir="/tmp"))
    ray_temp = work / "ray"
    server_home, local_home, nobody_home = work / "home", work / "local-home", work / "nobody"
    for home in (server_home, local_home, nobody_home):
        home.mkdir()
    ports = Ports()
    relay = work / "relay.py"
    relay.write_text(RELAY)
    client = work / "client.py"
    client.write_text(CLIENT)
    log = tmp_path / "launcher.log"
    clean = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH_")}
    env = {**clean, "HOME": str(local_home)}  # the user's machine: `ray up`, `ray exec`, the CLI
    (server_home / ".bashrc").touch()  # Ray's ssh commands source it
    sshd = Sshd(work, server_home, ray_temp.parent)
    config = None
    try:
        # The docs' first step, on "your machine": the token that the file mounts to every server.
        made = run([*RAY_CLI, "get-auth-token", "--generate"], log, 120, env)
        assert made.returncode == 0, tail(log)
        local_token = local_home / ".ray" / "auth_token"
        local_token.chmod(0o600)
        token = local_token.read_text().strip()
        assert len(token) >= 32

        config = cluster_file(sshd, work, ray_temp, ports, relay)
        up = run([*RAY_CLI, "up", "-y", "--no-config-cache", str(config)], log, RAY_UP_TIMEOUT_S, env)
        assert up.returncode == 0, tail(log)
        server_token = server_home / ".ray" / "auth_token"
        assert server_token.read_text().strip() == token  # copied by the file mount, mode kept
        assert server_token.stat().st_mode & 0o077 == 0, oct(server_token.stat().st_mode)

        # Token authentication is on: without the token, the dashboard, the dashboard agent's Jobs API,
        # the GCS and the Ray Client server refuse; with it, they answer.
        dashboard = f"http://127.0.0.1:{ports.dashboard}"
        assert http_status(f"{dashboard}/api/version") == 401
        assert http_status(f"{dashboard}/api/version", token="not-the-token") in (401, 403)
        assert http_status(f"{dashboard}/api/version", token=token) == 200
        agent_jobs = f"http://127.0.0.1:{ports.agent}/api/job_agent/jobs/"
        assert http_status(agent_jobs, method="POST") == 401
        assert http_status(agent_jobs, token=token, method="POST") not in (401, 403)
        # Ray's own clients, each in a process of its own. Without the token (no RAY_AUTH_* and no
        # ~/.ray/auth_token) the GCS and the Ray Client server refuse them, and say why; with it they join,
        # which also shows that the addresses are right. The strangers first (both at once: each waits out
        # its client's retries), then the clients with the token, one at a time (the Ray Client server starts
        # a server process per client, which a loaded 2-core machine may not start in time: one retry).
        gcs, ray_client = f"127.0.0.1:{ports.gcs}", f"ray://127.0.0.1:{ports.client}"
        # A stranger retries 5 times, 2 s apart at most, not for Ray's default 20 s (GCS: RAY_NUM_REDIS_GET_RETRIES
        # one a second) and 30 s (Ray Client: backing off from 5 s): refused just the same, sooner.
        stranger = {**clean, "HOME": str(nobody_home), "RAY_NUM_REDIS_GET_RETRIES": "5",
                    "RAY_CLIENT_INITIAL_CONNECTION_TIMEOUT_S": "2", "RAY_CLIENT_MAX_CONNECTION_TIMEOUT_S": "2"}
        with_token = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(local_token)}

        def start_client(target: str, client_env: dict[str, str]) -> subprocess.Popen:
            return subprocess.Popen([sys.executable, str(client), target], env=client_env, cwd=work,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        strangers = {target: start_client(target, stranger) for target in (gcs, ray_client)}
        for target, proc in strangers.items():
            out = proc.communicate(timeout=240)[0]
            joined = proc.returncode == 0 and "CONNECTED" in out
            assert not joined, f"{target} let a client in without the token:\n{out}"
            if target == gcs:
                assert "Unauthenticated" in out, out[-3000:]
        proxy_log = server_logs(ray_temp, "ray_client_server.err")
        assert "Authentication required but no authorization header provided" in proxy_log, proxy_log
        for target, attempts in ((gcs, 1), (ray_client, 2)):
            for attempt in range(1, attempts + 1):
                proc = start_client(target, with_token)
                out = proc.communicate(timeout=240)[0]
                if proc.returncode == 0 and "CONNECTED" in out:
                    break
                logs = server_logs(ray_temp, "ray_client")
                assert attempt < attempts, f"{target} refused the token:\n{out[-3000:]}\n{logs}"
        # The docs' CLI use of the token: RAY_AUTH_MODE=token, the token read from ~/.ray/auth_token.
        jobs = [*RAY_CLI, "job", "list", "--address", dashboard]
        assert subprocess.run(jobs, env={**env, "RAY_AUTH_MODE": "token"}, cwd=work, capture_output=True,
                              timeout=120).returncode == 0
        assert subprocess.run(jobs, env=env, cwd=work, capture_output=True, timeout=120).returncode != 0
        # ... and on the head, through `ray exec`, as docs/cluster.md writes it.
        status = run([*RAY_CLI, "exec", str(config), "RAY_AUTH_MODE=token ~/gan-sweeps-env/bin/ray status"],
                     log, 300, env)
        assert status.returncode == 0, tail(log)
        # A Ray Job submitted with the token: its driver joins with --address auto, without any RAY_AUTH_*
        # of its own (it inherits the head's, set by the start command).
        entry = [str(server_home / "gan-sweeps-env" / "bin" / "python"), "-c",
                 "import ray; ray.init(address='auto'); print('JOB-JOINED')"]
        job = subprocess.run([*RAY_CLI, "job", "submit", "--address", dashboard, "--", *entry],
                             env={**env, "RAY_AUTH_MODE": "token"}, cwd=work, capture_output=True, text=True,
                             timeout=300)
        assert job.returncode == 0 and "JOB-JOINED" in job.stdout, job.stdout[-3000:] + job.stderr[-3000:]

        # The sweep on the head, as docs/cluster.md runs it: in the copied project, the file's environment,
        # --address auto (the head's address file; the driver finds ~/.ray/auth_token itself), no RAY_AUTH_*.
        results = work / "results"
        sweep = (f"cd ~/gan-sweeps && GAN_CACHE_DIR={work / 'cache'} "
                 f"~/gan-sweeps-env/bin/orchestrator sweep sweeps/smoke.yaml --address auto --results {results}")
        done = run([*RAY_CLI, "exec", str(config), sweep], log, SWEEP_TIMEOUT_S, env)
        assert done.returncode == 0, tail(log)

        trials = pq.read_table(results / "smoke" / "trials.parquet").to_pylist()
        evaluations = pq.read_table(results / "smoke" / "evaluations.parquet").to_pylist()
        assert len(trials) == 6, trials  # 3 variants x 2 seeds
        statuses = [(t["status"], t["reason"]) for t in trials]
        assert {t["status"] for t in trials} <= {"completed", "stopped_early"}, statuses
        assert any(t["status"] == "completed" for t in trials)
        assert {row["trial_id"] for row in evaluations} == {t["trial_id"] for t in trials}
        assert len({row["node"] for row in evaluations}) == 1  # the one server: the head
        # The project ran from the copy `ray up` installed, not from this checkout.
        installed = (server_home / "gan-sweeps").resolve()
        imported = subprocess.run([str(server_home / "gan-sweeps-env" / "bin" / "python"), "-c",
                                   "import orchestrator; print(orchestrator.__file__)"],
                                  cwd=work, capture_output=True, text=True, timeout=120)  # cwd: not a checkout
        assert Path(imported.stdout.strip()).is_relative_to(installed), imported.stdout + imported.stderr

        # `ray up --no-restart` (the docs' way to push code) leaves the running Ray alone: same GCS.
        before = gcs_pid(ray_temp)
        again = run([*RAY_CLI, "up", "-y", "--no-restart", "--no-config-cache", str(config)], log,
                    RAY_UP_TIMEOUT_S, env)
        assert again.returncode == 0, tail(log)
        assert gcs_pid(ray_temp) == before, "ray up --no-restart restarted Ray"
        assert http_status(f"{dashboard}/api/version", token=token) == 200

        # `ray down` runs a bare `ray stop` on the head: with a `ray` on the login PATH it would stop
        # every Ray on this machine, other people's included.
        probe = subprocess.run([*RAY_CLI, "exec", str(config), "command -v ray || echo no-ray-on-path"],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        if "no-ray-on-path" in probe.stdout:
            down = run([*RAY_CLI, "down", "-y", str(config)], log, 300, env)
            assert down.returncode == 0, tail(log)
        else:
            assert not os.environ.get("CI"), f"`ray` on the ssh login PATH in CI: {probe.stdout}"
    finally:
        kill_processes_of(work)  # `ray down` leaves the head's Ray running (its `ray stop` finds no `ray`)
        sshd.stop()
        if config is not None:
            name = yaml.safe_load(config.read_text())["cluster_name"]
            for leftover in Path(tempfile.gettempdir(), "ray").glob(f"cluster-{name}*"):
                leftover.unlink(missing_ok=True)
            for cached in Path(tempfile.gettempdir()).glob("ray-config-*"):  # `ray exec`'s config cache
                try:
                    if name in cached.read_text(errors="replace"):
                        cached.unlink()
                except OSError:
                    pass
        shutil.rmtree(work, ignore_errors=True)
