"""The cluster-launcher configs in cluster/ pass Ray's own validation, offline, and keep the project's
invariants: token authentication on every node, an explicit image with a new enough NVIDIA driver and a
big enough disk for every node type, shared-storage mounts that fail loudly, and docs whose commands match.

`ray up` runs, in order: prepare_config (merge the provider's defaults.yaml, fill per-type worker limits),
the provider's resource autodetection (AWS: an EC2 API call), validate_config (Ray's JSON schema,
ray/autoscaler/ray-schema.json, plus cross-field checks) and the provider's bootstrap (IAM, subnets, key
pairs: cloud API calls). These tests run the two offline steps of the installed Ray, so a mistyped key
fails CI instead of a `ray up`; the cloud-side steps are only exercised by a real `ray up` (the on-premise
file's, for real, in tests/test_onprem_cluster.py).
"""
from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_DIR = REPO_ROOT / "cluster"
DOCS = REPO_ROOT / "docs" / "cluster.md"
CONFIG_PATHS = sorted(CLUSTER_DIR.glob("*.yaml"))
AWS_CONFIG = CLUSTER_DIR / "gpu.yaml"
GCP_CONFIG = CLUSTER_DIR / "gcp-gpu.yaml"
ONPREM_CONFIG = CLUSTER_DIR / "onprem.yaml"
AWS_IAM = CLUSTER_DIR / "aws-iam"
# The cloud configs: autoscaled node types in a Docker image. The on-premise one lists its servers.
CLOUD_CONFIG_PATHS = [p for p in CONFIG_PATHS if p != ONPREM_CONFIG]
PROJECT_MOUNT = "~/gan-sweeps"
# Token authentication, exactly as every start command must begin (tests/test_onprem_cluster.py runs it).
AUTH_LINE = "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=~/.ray/auth_token; "
TOKEN_MOUNT = "~/.ray/auth_token"
# torch 2.14.1 is the CUDA 13.0 build; CUDA 13.0 needs an NVIDIA driver of at least 580 (NVIDIA's CUDA
# toolkit release notes, "CUDA Driver" table: >= 580.65.06 on Linux).
MIN_DRIVER = 580
MIN_ROOT_DISK_GB = 150
# AWS's public SSM parameters of its Deep Learning AMIs: EC2 resolves `resolve:ssm:<parameter>` at launch.
AWS_DLAMI_PARAMETER = re.compile(r"^resolve:ssm:/aws/service/deeplearning/ami/x86_64/[a-z0-9.-]+/latest/ami-id$")
# Instance families whose every size has NVIDIA GPUs.
AWS_GPU_FAMILIES = ("g4dn", "g5", "g6", "g6e", "gr6", "p3", "p4d", "p4de", "p5", "p5e", "p5en")
# GCP machine series that come with GPUs attached (others need guestAccelerators).
GCP_GPU_MACHINE_SERIES = ("a2", "a3", "g2")


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def ray_validate(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` checks before it talks to the cloud; returns the config with Ray's defaults merged in."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def start_command(config: dict[str, Any], key: str) -> str:
    commands = [c for c in config[key] if "ray start" in c]
    assert len(commands) == 1, f"expected one `ray start` in {key}, got {commands}"
    return commands[0]


def head_start_command(config: dict[str, Any]) -> str:
    return start_command(config, "head_start_ray_commands")


def worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: node_type
        for name, node_type in config["available_node_types"].items()
        if name != config["head_node_type"]
    }


def provides_gpus(provider: str, node_config: dict[str, Any]) -> bool:
    if provider == "aws":
        return node_config["InstanceType"].split(".")[0] in AWS_GPU_FAMILIES
    if provider == "gcp":
        series = node_config["machineType"].split("-")[0]
        return series in GCP_GPU_MACHINE_SERIES or bool(node_config.get("guestAccelerators"))
    raise AssertionError(f"no GPU check for provider {provider!r}")


def pinned_ray_version() -> str:
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    match = re.search(r'"ray\[[^\]]*\]==([^"]+)"', pyproject)
    assert match, "pyproject.toml does not pin ray with =="
    return match.group(1)


def all_commands(config: dict[str, Any]) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    return [command for key in keys for command in config.get(key) or []]


def mount_command(path: Path) -> str:
    [command] = [c for c in load(path)["initialization_commands"] if "SHARED_NFS" in c]
    return command


def driver_check_command(path: Path) -> str:
    [command] = [c for c in load(path)["initialization_commands"] if "driver_version" in c]
    return command


def stub(folder: Path, name: str, script: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)


def test_cloud_and_onprem_configs_exist() -> None:
    assert {p.name for p in CONFIG_PATHS} >= {"gpu.yaml", "gcp-gpu.yaml", "onprem.yaml"}


@pytest.mark.parametrize("path", CONFIG_PATHS, ids=lambda p: p.name)
def test_config_passes_ray_validation(path: Path) -> None:
    prepared = ray_validate(load(path))
    # Nothing from the provider's defaults.yaml leaked in: the defaults install a nightly Ray wheel.
    assert prepared["setup_commands"] == load(path)["setup_commands"]


@pytest.mark.parametrize(
    ("pattern", "broken"),
    [
        (r"^max_workers:", "max_worker:"),  # top-level key
        (r"^head_start_ray_commands:", "head_start_ray_command:"),
        (r"^  ssh_user:", "  ssh_usr:"),  # key inside auth
        (r"^    min_workers:", "    min_worker:"),  # key inside a node type
        (r"^head_node_type: head_cpu", "head_node_type: head"),  # names no node type
    ],
)
def test_broken_copy_fails_ray_validation(pattern: str, broken: str) -> None:
    text, replaced = re.subn(pattern, broken, AWS_CONFIG.read_text(), count=1, flags=re.MULTILINE)
    assert replaced == 1, f"{pattern!r} not found in {AWS_CONFIG.name}"
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_validate(yaml.safe_load(text))


# --- token authentication -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIG_PATHS, ids=lambda p: p.name)
def test_token_auth_is_on_in_the_head_and_worker_start_commands(path: Path) -> None:
    config = load(path)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        command = start_command(config, key)
        assert command.startswith(AUTH_LINE), f"{key}: {command}"
    # The token `ray get-auth-token --generate` writes locally, mounted on every node at Ray's own path.
    assert config["file_mounts"][TOKEN_MOUNT] == TOKEN_MOUNT
    text = path.read_text()
    assert "RAY_AUTH_MODE=disabled" not in text
    assert not re.search(r"^\s*#\s*~/\.ray/auth_token", text, flags=re.MULTILINE), "token mount commented out"


@pytest.mark.parametrize("path", CONFIG_PATHS, ids=lambda p: p.name)
def test_auth_line_sets_token_mode_and_the_mounted_token_path(path: Path, tmp_path: Path) -> None:
    """The shipped line, run by bash: the mode and the token path every Ray process of the node inherits."""
    command = start_command(load(path), "head_start_ray_commands")
    auth = command[: len(AUTH_LINE)]
    shell = subprocess.run(["bash", "-c", auth + 'echo "$RAY_AUTH_MODE $RAY_AUTH_TOKEN_PATH"'],
                           env={"HOME": str(tmp_path), "PATH": os.environ["PATH"]}, capture_output=True, text=True)
    assert shell.stdout.split() == ["token", str(tmp_path / ".ray" / "auth_token")], shell.stdout + shell.stderr


@pytest.mark.parametrize("path", CONFIG_PATHS, ids=lambda p: p.name)
def test_dashboard_listens_on_loopback_only(path: Path) -> None:
    command = head_start_command(load(path))
    assert "--dashboard-host=127.0.0.1" in command
    assert "0.0.0.0" not in command


@pytest.mark.parametrize("path", CONFIG_PATHS, ids=lambda p: p.name)
def test_head_starts_the_autoscaler(path: Path) -> None:
    command = head_start_command(load(path))
    assert "--head" in command
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in command


@pytest.mark.parametrize("path", CLOUD_CONFIG_PATHS, ids=lambda p: p.name)
def test_head_runs_no_trials(path: Path) -> None:
    config = load(path)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert not head["resources"].get("GPU")


@pytest.mark.parametrize("path", CLOUD_CONFIG_PATHS, ids=lambda p: p.name)
def test_an_autoscaling_gpu_worker_type_exists(path: Path) -> None:
    config = load(path)
    provider = config["provider"]["type"]
    gpu_types = [
        name
        for name, node_type in worker_types(config).items()
        if node_type["resources"].get("GPU", 0) >= 1
        and node_type.get("max_workers", config["max_workers"]) > 0
        and provides_gpus(provider, node_type["node_config"])
    ]
    assert gpu_types, f"{path.name}: no worker type both declares and provides a GPU"


def test_gcp_gpu_vms_terminate_on_host_maintenance() -> None:
    for name, node_type in worker_types(load(GCP_CONFIG)).items():
        if provides_gpus("gcp", node_type["node_config"]):
            scheduling = node_type["node_config"].get("scheduling")
            assert isinstance(scheduling, dict), f"{name}: scheduling must be one object, not a list"
            assert scheduling.get("onHostMaintenance") == "TERMINATE", name


@pytest.mark.parametrize("path", CONFIG_PATHS, ids=lambda p: p.name)
def test_every_node_gets_and_installs_the_project(path: Path) -> None:
    config = load(path)
    local = config["file_mounts"].get(PROJECT_MOUNT)
    assert local is not None, f"file_mounts lacks {PROJECT_MOUNT}"
    # `ray up` runs from the repository root, so the relative local path must point there.
    assert (REPO_ROOT / local).resolve() == REPO_ROOT
    assert any(
        re.search(rf"\bpip install\b.*\s-e\s+{re.escape(PROJECT_MOUNT)}/?(\s|$)", command)
        for command in config["setup_commands"]
    ), "setup_commands must run `pip install -e ~/gan-sweeps` on every node"


@pytest.mark.parametrize("path", CLOUD_CONFIG_PATHS, ids=lambda p: p.name)
def test_image_carries_the_pinned_ray(path: Path) -> None:
    image = load(path)["docker"]["image"]
    tag = image.rsplit(":", 1)[1]
    assert tag.startswith(f"{pinned_ray_version()}-"), f"{image} does not carry Ray {pinned_ray_version()}"
    assert "-gpu" in tag or "-cu" in tag, f"{image} is not a CUDA image"


@pytest.mark.parametrize("path", CLOUD_CONFIG_PATHS, ids=lambda p: p.name)
def test_containers_see_shared_results_storage(path: Path) -> None:
    assert "-v /shared:/shared" in load(path)["docker"]["run_options"]


@pytest.mark.parametrize("path", CONFIG_PATHS, ids=lambda p: p.name)
def test_every_command_is_valid_shell(path: Path) -> None:
    for command in all_commands(load(path)):
        check = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert check.returncode == 0, f"{command!r}: {check.stderr}"


@pytest.mark.parametrize("path", CONFIG_PATHS, ids=lambda p: p.name)
def test_nothing_is_copied_from_outside_the_repository(path: Path) -> None:
    """A path next to this checkout (the shared dataset) does not exist on a user's machine: `ray up`'s
    rsync would fail. The dataset goes to the head only (docs), and reaches trials through Ray. The one
    exception is the user's own Ray token."""
    for remote, local in load(path)["file_mounts"].items():
        if (remote, local) == (TOKEN_MOUNT, TOKEN_MOUNT):
            continue
        assert (REPO_ROOT / local).resolve().is_relative_to(REPO_ROOT), f"{remote}: {local}"


# --- images, drivers, disks -----------------------------------------------------------------------------


def aws_root_disk_gb(node_config: dict[str, Any]) -> int:
    [root] = [m for m in node_config["BlockDeviceMappings"] if m["DeviceName"] == "/dev/sda1"]
    return root["Ebs"]["VolumeSize"]


def test_every_aws_node_type_has_an_explicit_image_and_a_big_enough_root_disk() -> None:
    config = load(AWS_CONFIG)
    for name, node_type in config["available_node_types"].items():
        node_config = node_type["node_config"]
        image = node_config.get("ImageId", "")
        # No ImageId would mean Ray's DEFAULT_AMI (a Deep Learning AMI on Ubuntu 18.04, end of life).
        assert re.fullmatch(r"ami-[0-9a-f]{8,17}", image) or AWS_DLAMI_PARAMETER.match(image), f"{name}: {image!r}"
        assert aws_root_disk_gb(node_config) >= MIN_ROOT_DISK_GB, name
    # Ray passes the ImageId through untouched (a placeholder a setup command rewrites could leak back).
    prepared = ray_validate(config)
    for name, node_type in prepared["available_node_types"].items():
        assert node_type["node_config"]["ImageId"] == config["available_node_types"][name]["node_config"]["ImageId"]
    assert not config["head_setup_commands"] or not any("ImageId" in c for c in config["head_setup_commands"])


def test_aws_images_are_dlamis_with_a_580_or_newer_driver() -> None:
    """The Base OSS Nvidia Driver DLAMIs carry the newest driver branch AWS supports (580 since late 2025,
    docs/cluster.md); the old "latest_dlami" default and the pre-580 families are refused."""
    for name, node_type in load(AWS_CONFIG)["available_node_types"].items():
        image = node_type["node_config"]["ImageId"]
        assert "/base-oss-nvidia-driver-gpu-" in image, f"{name}: {image}"
        assert "ubuntu-18.04" not in image and "ubuntu-20.04" not in image, image


def test_aws_head_role_may_resolve_the_images_and_pass_the_worker_role() -> None:
    config = load(AWS_CONFIG)
    policy = json.loads((AWS_IAM / "head-policy.json").read_text())

    def allowed(action: str, resource: str) -> bool:
        for statement in policy["Statement"]:
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
            if statement["Effect"] == "Allow" and action in actions and any(
                fnmatch.fnmatchcase(resource, pattern) for pattern in resources
            ):
                return True
        return False

    head = config["available_node_types"][config["head_node_type"]]["node_config"]
    assert head["IamInstanceProfile"] == {"Name": "gan-sweeps-head"}  # not Ray's default role: no ssm there
    for name, node_type in worker_types(config).items():
        node_config = node_type["node_config"]
        parameter = node_config["ImageId"].removeprefix("resolve:ssm:")
        assert allowed("ssm:GetParameters", f"arn:aws:ssm:{config['provider']['region']}::parameter{parameter}"), name
        role = node_config["IamInstanceProfile"]["Name"]
        assert allowed("iam:PassRole", f"arn:aws:iam::123456789012:role/{role}"), name


def test_aws_iam_script_creates_the_profiles_the_config_names(tmp_path: Path) -> None:
    """cluster/aws-iam/create-roles.sh against a stub `aws` that has no roles yet: every call is logged."""
    calls = tmp_path / "calls"
    stub(tmp_path, "aws", f'echo "$*" >> {calls}\ncase "$2" in get-*) exit 254;; esac')
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    run = subprocess.run(["bash", str(AWS_IAM / "create-roles.sh")], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    log = calls.read_text()
    config = load(AWS_CONFIG)
    names = {t["node_config"]["IamInstanceProfile"]["Name"] for t in config["available_node_types"].values()}
    assert names == {"gan-sweeps-head", "gan-sweeps-worker"}
    for name in names:
        assert f"iam create-role --role-name {name} " in log
        assert f"iam create-instance-profile --instance-profile-name {name}" in log
        assert f"iam add-role-to-instance-profile --instance-profile-name {name} --role-name {name}" in log
    ec2_full_access = "arn:aws:iam::aws:policy/AmazonEC2FullAccess"
    assert f"iam attach-role-policy --role-name gan-sweeps-head --policy-arn {ec2_full_access}" in log
    for document in re.findall(r"file://(\S+)", log):
        assert Path(document).is_file(), document


def test_gcp_images_are_a_deep_learning_vm_family_with_a_580_or_newer_driver() -> None:
    """A static check can only read the family's name: Deep Learning VM families end in -nvidia-<branch>
    (docs/cluster.md says where the family was found)."""
    config = load(GCP_CONFIG)
    for name, node_type in config["available_node_types"].items():
        [disk] = node_type["node_config"]["disks"]
        image = disk["initializeParams"]["sourceImage"]
        assert image.startswith("projects/deeplearning-platform-release/global/images/family/"), name
        driver = re.search(r"-nvidia-(\d+)$", image)
        assert driver and int(driver.group(1)) >= MIN_DRIVER, f"{name}: {image}"
        assert disk["initializeParams"]["diskSizeGb"] >= MIN_ROOT_DISK_GB, name
        assert image.rsplit("/", 1)[1] in DOCS.read_text(), "docs/cluster.md must name the image family"


@pytest.mark.parametrize("path", CONFIG_PATHS, ids=lambda p: p.name)
@pytest.mark.parametrize(
    ("nvidia_smi", "ok"),
    [
        ("echo 570.133.20", False),
        ("echo 535.247.01", False),
        ("echo 580.65.06", True),
        ("echo 595.71.05; echo 595.71.05", True),  # two GPUs
        # No GPU (a CPU head on a GPU image): nvidia-smi fails, with its message on stdout. Nothing to check.
        ("echo 'NVIDIA-SMI has failed because it couldn'\\''t communicate with the NVIDIA driver.'; exit 9", True),
        ("echo 'No devices were found'; exit 6", True),
        ("exit 127", True),  # no nvidia-smi at all
    ],
)
def test_nodes_refuse_an_nvidia_driver_older_than_580(path: Path, nvidia_smi: str, ok: bool, tmp_path: Path) -> None:
    stub(tmp_path, "nvidia-smi", nvidia_smi)
    check = subprocess.run(["bash", "-c", driver_check_command(path)], capture_output=True, text=True,
                           env={"PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert (check.returncode == 0) == ok, check.stdout + check.stderr
    if ok:
        assert check.stderr == "", check.stderr
    else:
        assert "older than 580" in check.stderr


# --- shared storage -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CLOUD_CONFIG_PATHS, ids=lambda p: p.name)
def test_shared_storage_is_one_setting_near_the_top(path: Path) -> None:
    """The file system to mount is one variable in the first lines; empty (the default) mounts nothing,
    so `ray up` works before the user has one (the sweep's preflight then catches a multi-node run)."""
    text = path.read_text()
    assert text.count('SHARED_NFS="";') == 1
    assert text.index('SHARED_NFS="";') < text.index("available_node_types:")


@pytest.mark.parametrize("path", CLOUD_CONFIG_PATHS, ids=lambda p: p.name)
def test_no_command_hides_a_failed_mount(path: Path) -> None:
    command = mount_command(path)
    assert not re.search(r";\s*sudo chown", command), "a `; sudo chown` after the mount reports chown's status"
    # The mount is checked right after it, and a failed check ends the command.
    assert re.search(r"mountpoint -q /shared \|\| \{ echo [^}]*>&2; exit 1; \}", command), command


def mountpoint_here() -> str | None:
    for candidate in ("/dev/shm", "/proc", "/"):
        if subprocess.run(["mountpoint", "-q", candidate]).returncode == 0:
            return candidate
    return None


@pytest.mark.skipif(subprocess.run(["bash", "-c", "command -v mountpoint"], capture_output=True).returncode != 0,
                    reason="needs util-linux's mountpoint")
@pytest.mark.parametrize("path", CLOUD_CONFIG_PATHS, ids=lambda p: p.name)
@pytest.mark.parametrize(
    ("case", "shared_nfs", "mount", "ok"),
    [
        ("mount fails", "fs.example:/", "echo 'mount.nfs4: Connection timed out' >&2; exit 32", False),
        ("mount claims success, mounts nothing", "fs.example:/", "exit 0", False),
        ("already mounted", "fs.example:/", "exit 32", True),
        ("no shared storage", "", "exit 32", True),
    ],
)
def test_a_node_whose_shared_folder_is_not_mounted_fails_its_setup(
    path: Path, case: str, shared_nfs: str, mount: str, ok: bool, tmp_path: Path
) -> None:
    """The YAML's command as written, run by bash with stubs for sudo, mount, apt-get and chown, and with
    /shared moved to a folder of the test's (or, for "already mounted", to a real mountpoint here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    stub(bin_dir, "sudo", 'exec "$@"')
    for name in ("apt-get", "mount.nfs", "mount.nfs4"):
        stub(bin_dir, name, f'echo "{name} $*" >> {log}')
    stub(bin_dir, "mount", f'echo "mount $*" >> {log}\n{mount}')
    stub(bin_dir, "chown", f'echo "chown $*" >> {log}')
    if case == "already mounted":
        shared = mountpoint_here()
        if shared is None:
            pytest.skip("no mountpoint on this machine")
    else:
        shared = str(tmp_path / "shared")
    command = mount_command(path).replace('SHARED_NFS="";', f'SHARED_NFS="{shared_nfs}";').replace("/shared", shared)
    setup = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                           env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    calls = log.read_text() if log.exists() else ""
    assert (setup.returncode == 0) == ok, f"{case}: exit {setup.returncode}\n{setup.stderr}\n{calls}"
    if ok:
        assert f"chown 1000:100 {shared}" in calls
        assert "mount " not in calls  # nothing to mount: no shared storage, or already mounted
    else:
        assert f"{shared} on " in setup.stderr and "is not a mountpoint" in setup.stderr and shared_nfs in setup.stderr
        assert "chown" not in calls, "chown ran after a failed mount"
        assert "mount -t nfs" in calls


# --- the Docker image and the on-premise file -----------------------------------------------------------


def test_dockerfile_builds_from_the_configs_image() -> None:
    dockerfile = (CLUSTER_DIR / "Dockerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.MULTILINE)
    images = {load(p)["docker"]["image"] for p in CLOUD_CONFIG_PATHS}
    assert bases == sorted(images), (bases, images)
    # It copies only the repository's own files (docker build runs from the repository root).
    for source in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)\s+\S+$", dockerfile, flags=re.MULTILINE):
        for part in source.split():
            assert (REPO_ROOT / part).exists(), part


def test_onprem_runs_its_servers_from_a_virtual_environment() -> None:
    config = load(ONPREM_CONFIG)
    assert config["provider"]["type"] == "local"
    assert config["provider"]["head_ip"] == "127.0.0.1" and config["provider"]["worker_ips"] == []
    env_bin = "~/gan-sweeps-env/bin/"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in config[key]:
            assert f"{env_bin}ray " in command, command
    assert config["setup_commands"] == ["python3 -m venv ~/gan-sweeps-env",
                                        f"{env_bin}python -m pip install -q -e {PROJECT_MOUNT}"]


# --- docs/cluster.md: commands as written --------------------------------------------------------------


def doc_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", DOCS.read_text(), flags=re.MULTILINE | re.DOTALL)


def doc_commands() -> list[str]:
    """The docs' shell commands: the bash blocks (continuation lines joined) and the inline `ray ...` ones."""
    commands = []
    for block in doc_blocks("bash"):
        commands += [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    commands += re.findall(r"`((?:ray|RAY_AUTH_MODE=token ray|export RAY_AUTH_MODE)[^`]*)`", DOCS.read_text())
    return commands


def test_docs_shell_blocks_are_valid_shell() -> None:
    for block in doc_blocks("bash"):
        check = subprocess.run(["bash", "-n", "-c", block], capture_output=True, text=True)
        assert check.returncode == 0, f"{block}\n{check.stderr}"


def test_docs_commands_name_existing_files_and_run_as_written() -> None:
    commands = doc_commands()
    assert commands
    for command in commands:
        for name in re.findall(r"\bcluster/[\w./-]+", command):
            assert (REPO_ROOT / name).exists(), f"{command}: {name}"
        words = shlex.split(command, comments=True) if "'" in command or '"' in command else command.split()
        joined = " ".join(words)
        if "orchestrator sweep" in joined and "ray exec" in command:
            # ray exec runs in the node's home directory: the sweep file is relative to the project.
            assert re.search(r"cd ~/gan-sweeps && (~/gan-sweeps-env/bin/)?orchestrator sweep", joined), command
        if "orchestrator sweep" in joined and ("ray exec" in command or "ray job submit" in command):
            assert re.search(r"--results /shared/\S+", joined), command
            data = re.search(r"--data (\S+)", joined)
            assert data and data.group(1) in ("~/data/anime-faces", "/home/ray/data/anime-faces"), command
        if "ray exec" in command and re.search(r"ray status", joined):
            # `ray status` does not turn token mode on by itself, unlike a driver's `--address auto`.
            assert re.search(r"RAY_AUTH_MODE=token (~/gan-sweeps-env/bin/)?ray status", joined), command


def test_docs_put_the_dataset_where_the_sweep_commands_read_it() -> None:
    text = DOCS.read_text()
    assert re.search(r"ray rsync-up cluster/gpu\.yaml \S+ '~/data/anime-faces/'", text)


def test_docs_ray_job_commands_run_with_the_token() -> None:
    for block in doc_blocks("bash"):
        lines = block.splitlines()
        for i, line in enumerate(lines):
            if re.match(r"\s*ray job ", line):
                assert any("export RAY_AUTH_MODE=token" in earlier for earlier in lines[:i]), block


def test_docs_push_code_with_no_restart_and_say_why() -> None:
    text = DOCS.read_text()
    assert "ray up --no-restart cluster/gpu.yaml" in text
    section = text[text.index("ray up --no-restart cluster/gpu.yaml") - 2000:]
    assert "restart" in section and "sweep" in section


def test_docs_show_the_aws_iam_policies_verbatim() -> None:
    text = DOCS.read_text()
    for document in sorted(AWS_IAM.glob("*.json")):
        match = re.search(rf"`cluster/aws-iam/{re.escape(document.name)}`[^\n]*\n+```json\n(.*?)^```", text,
                          flags=re.MULTILINE | re.DOTALL)
        assert match, f"docs/cluster.md lacks a json block after `cluster/aws-iam/{document.name}`"
        assert json.loads(match.group(1)) == json.loads(document.read_text()), document.name
