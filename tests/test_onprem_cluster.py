"""The on-premise path for real: Ray's cluster launcher (`ray up -y cluster/onprem.yaml`) starts a head over
ssh, `orchestrator sweep sweeps/smoke.yaml --address auto` runs on that head, `ray down -y` ends it.

The "lab server" is this machine, reached through an sshd of the test's own on 127.0.0.1 with throwaway
keys. The cluster file is cluster/onprem.yaml with only what a user of this machine would change (the
login, the key) plus what lets the test share the machine with others: its own directories instead of
~/gan-sweeps and ~/gan-sweeps-env, a free Ray port and temp dir, no `ray stop` (it would stop every Ray
on the machine), and ssh reaching the test's sshd through a ProxyCommand (Ray's ssh has no port
setting). The setup commands are the file's own: a virtual environment and `pip install -e` of the copied
repository; the environment sees this interpreter's packages through a .pth file, so nothing (torch
above all) is downloaded again.
"""
from __future__ import annotations

import getpass
import os
import secrets
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray  # noqa: F401  (importing Ray puts its bundled psutil on sys.path)
import psutil
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
RAY_UP_TIMEOUT_S = 600
SWEEP_TIMEOUT_S = 900
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


def kill_processes_mentioning(marker: str) -> None:
    """Stop, by pid, every process whose command line names `marker` (this test's folder: its Ray, its sshd)."""
    victims = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid != os.getpid() and any(marker in arg for arg in proc.info["cmdline"] or []):
                victims.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for proc in victims:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=30)


class Sshd:
    """An sshd on 127.0.0.1 that accepts only a throwaway key, for the current user only."""

    def __init__(self, folder: Path):
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


def cluster_file(sshd: Sshd, work: Path, ray_temp: Path, ray_port: int, relay: Path) -> Path:
    """cluster/onprem.yaml as a user of this machine would run it, made safe to share the machine."""
    config = yaml.safe_load((REPO / "cluster" / "onprem.yaml").read_text())
    config["cluster_name"] = f"gan-sweeps-test-{secrets.token_hex(4)}"
    config["auth"] = {"ssh_user": getpass.getuser(), "ssh_private_key": str(sshd.key),
                      "ssh_proxy_command": f"{sys.executable} {relay} {sshd.port}"}

    def here(text: str) -> str:  # the file's home-directory paths, moved into this test's folder
        return text.replace("~/gan-sweeps-env", str(work / "env")).replace("~/gan-sweeps", str(work / "gan-sweeps"))

    config["file_mounts"] = {here(remote): local for remote, local in config["file_mounts"].items()}
    env = work / "env"
    site = Path(sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)}))
    # The venv step, with this interpreter's packages visible (nothing downloaded) and no pip of its own.
    venv, install = config["setup_commands"]
    assert venv == "python3 -m venv ~/gan-sweeps-env", venv
    config["setup_commands"] = [
        f"{sys.executable} -m venv --without-pip {env} && echo {sysconfig.get_path('purelib')} > {site}/test-deps.pth"
        f" && printf '#!{env}/bin/python\\nfrom ray.scripts.scripts import main\\nmain()\\n' > {env}/bin/ray"
        f" && chmod +x {env}/bin/ray",
        here(install),
    ]
    ports = (f"--port={ray_port} --temp-dir={ray_temp} --dashboard-port={free_port()} "
             f"--ray-client-server-port={free_port()} --dashboard-agent-listen-port={free_port()} "
             f"--num-cpus=2 --object-store-memory={300 * 2**20} --disable-usage-stats")
    # Token authentication, explicitly (README, Security): with RAY_AUTH_MODE unset, `ray start --head`
    # turns it on by itself when ~/.ray/auth_token exists, and a driver given an address then fails.
    auth = f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token_file(work)}; "
    config["head_start_ray_commands"] = [
        auth + here(command).replace("--port=6379", ports)
        for command in config["head_start_ray_commands"] if not command.endswith("ray stop")
    ]
    assert len(config["head_start_ray_commands"]) == 1 and ports in config["head_start_ray_commands"][0]
    path = work / "onprem-test.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def token_file(work: Path) -> Path:
    """A throwaway Ray auth token for this test's cluster (never the user's ~/.ray)."""
    path = work / "auth_token"
    if not path.exists():
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path


def run(command: list[str], log: Path, timeout: float, env: dict[str, str]) -> subprocess.CompletedProcess:
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        proc = subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    return proc


def tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def test_ray_up_of_the_onprem_config_then_a_sweep_on_its_head_then_ray_down(tmp_path):
    missing = missing_tools()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide {', '.join(missing)} (.ci/run installs openssh-server and rsync)")
        pytest.skip(f"needs {', '.join(missing)} for an sshd on 127.0.0.1")
    # Short: Ray's Unix socket paths under its temp dir must fit in 107 bytes.
    work = Path(tempfile.mkdtemp(prefix="onprem-", dir="/tmp"))
    ray_temp = work / "ray"
    ray_port = free_port()
    relay = work / "relay.py"
    relay.write_text(RELAY)
    log = tmp_path / "launcher.log"
    home_files = [Path.home() / name for name in ("ray_bootstrap_config.yaml", "ray_bootstrap_key.pem")]
    existed = {path: path.exists() for path in home_files}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH_")}
    sshd = Sshd(work)
    config = None
    try:
        config = cluster_file(sshd, work, ray_temp, ray_port, relay)
        up = run([*RAY_CLI, "up", "-y", "--no-config-cache", str(config)], log, RAY_UP_TIMEOUT_S, env)
        assert up.returncode == 0, tail(log)

        results = work / "results"
        # On the head, as the README says: the file's environment, the copied repository, --address auto
        # (RAY_ADDRESS picks this test's head, never another Ray running on the machine).
        sweep = (f"cd {work / 'gan-sweeps'} && export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token_file(work)} "
                 f"RAY_ADDRESS=127.0.0.1:{ray_port} GAN_CACHE_DIR={work / 'cache'} && "
                 f"{work / 'env' / 'bin' / 'orchestrator'} sweep sweeps/smoke.yaml --address auto --results {results}")
        done = run([*RAY_CLI, "exec", str(config), sweep], log, SWEEP_TIMEOUT_S, env)
        assert done.returncode == 0, tail(log)

        trials = pq.read_table(results / "smoke" / "trials.parquet").to_pylist()
        evaluations = pq.read_table(results / "smoke" / "evaluations.parquet").to_pylist()
        assert len(trials) == 6, trials  # 3 variants x 2 seeds
        assert {t["status"] for t in trials} <= {"completed", "stopped_early"}, [(t["status"], t["reason"]) for t in trials]
        assert any(t["status"] == "completed" for t in trials)
        assert {row["trial_id"] for row in evaluations} == {t["trial_id"] for t in trials}
        assert len({row["node"] for row in evaluations}) == 1  # the one server: the head
        # The project ran from the copy `ray up` installed, not from this checkout.
        installed = (work / "gan-sweeps").resolve()
        imported = subprocess.run([str(work / "env" / "bin" / "python"), "-c", "import orchestrator; print(orchestrator.__file__)"],
                                  cwd=work, capture_output=True, text=True, timeout=120)  # cwd: not a checkout
        assert Path(imported.stdout.strip()).is_relative_to(installed), imported.stdout + imported.stderr

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
        kill_processes_mentioning(str(work))  # `ray down` leaves the head's Ray running (and its env)
        sshd.stop()
        for path, was_there in existed.items():
            if not was_there:
                path.unlink(missing_ok=True)
        if config is not None:
            name = yaml.safe_load(config.read_text())["cluster_name"]
            for leftover in Path(tempfile.gettempdir(), "ray").glob(f"cluster-{name}*"):
                leftover.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
