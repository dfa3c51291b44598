"""The cluster-launcher configs in cluster/ pass Ray's own validation, offline, and keep the project's
invariants.

`ray up` runs, in order: prepare_config (merge the provider's defaults.yaml, fill per-type worker limits),
the provider's resource autodetection (AWS: an EC2 API call), validate_config (Ray's JSON schema,
ray/autoscaler/ray-schema.json, plus cross-field checks) and the provider's bootstrap (IAM, subnets, key
pairs: cloud API calls). These tests run the two offline steps of the installed Ray, so a mistyped key
fails CI instead of a `ray up`; the cloud-side steps are only exercised by a real `ray up`.
"""
from __future__ import annotations

import copy
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
CONFIG_PATHS = sorted(CLUSTER_DIR.glob("*.yaml"))
AWS_CONFIG = CLUSTER_DIR / "gpu.yaml"
ONPREM_CONFIG = CLUSTER_DIR / "onprem.yaml"
# The cloud configs: autoscaled node types in a Docker image. The on-premise one lists its servers.
CLOUD_CONFIG_PATHS = [p for p in CONFIG_PATHS if p != ONPREM_CONFIG]
# The only ImageId of a GPU worker in gpu.yaml: replaced on the head by a head_setup_command.
AWS_RESOLVED_ON_HEAD = "gpu-dlami-resolved-on-head"
PROJECT_MOUNT = "~/gan-sweeps"
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


def head_start_command(config: dict[str, Any]) -> str:
    commands = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert len(commands) == 1, f"expected one `ray start` in head_start_ray_commands, got {commands}"
    return commands[0]


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


GCP_CONFIG_PATHS = [p for p in CONFIG_PATHS if load(p)["provider"]["type"] == "gcp"]


@pytest.mark.parametrize("path", GCP_CONFIG_PATHS, ids=lambda p: p.name)
def test_gcp_gpu_vms_terminate_on_host_maintenance(path: Path) -> None:
    for name, node_type in worker_types(load(path)).items():
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


def all_commands(config: dict[str, Any]) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    return [command for key in keys for command in config.get(key) or []]


@pytest.mark.parametrize("path", CONFIG_PATHS, ids=lambda p: p.name)
def test_every_command_is_valid_shell(path: Path) -> None:
    for command in all_commands(load(path)):
        check = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert check.returncode == 0, f"{command!r}: {check.stderr}"


@pytest.mark.parametrize("path", CONFIG_PATHS, ids=lambda p: p.name)
def test_nothing_is_copied_from_outside_the_repository(path: Path) -> None:
    """A path next to this checkout (the shared dataset) does not exist on a user's machine: `ray up`'s
    rsync would fail. The dataset goes to the head only (README), and reaches trials through Ray."""
    for remote, local in load(path)["file_mounts"].items():
        if local.startswith("~/.ray/"):
            continue  # the user's own Ray token, commented out by default
        assert (REPO_ROOT / local).resolve().is_relative_to(REPO_ROOT), f"{remote}: {local}"


def test_aws_needs_no_ami_id_from_the_user() -> None:
    config = load(AWS_CONFIG)
    text = AWS_CONFIG.read_text()
    assert "REPLACE" not in text
    head = config["available_node_types"][config["head_node_type"]]
    # Ray fills in its default Deep Learning AMI of the region for a node type without ImageId.
    assert "ImageId" not in head["node_config"]
    prepared = ray_validate(config)
    for name, node_type in worker_types(prepared).items():
        assert node_type["node_config"]["ImageId"] == AWS_RESOLVED_ON_HEAD, name
    resolver = [c for c in config["head_setup_commands"] if AWS_RESOLVED_ON_HEAD in c]
    assert len(resolver) == 1, "a head_setup_command must replace the workers' ImageId"
    code = shlex.split(resolver[0])
    assert code[:2] == ["python", "-c"]
    compile(code[2], "head_setup_commands[0]", "exec")  # at least valid Python
    assert "ray_bootstrap_config.yaml" in code[2] and "Deep Learning Base OSS Nvidia Driver GPU AMI" in code[2]


def test_gcp_images_are_public_image_families() -> None:
    config = load(CLUSTER_DIR / "gcp-gpu.yaml")
    for name, node_type in config["available_node_types"].items():
        for disk in node_type["node_config"]["disks"]:
            image = disk["initializeParams"]["sourceImage"]
            assert image.startswith("projects/deeplearning-platform-release/global/images/family/"), name


@pytest.mark.parametrize("path", CLOUD_CONFIG_PATHS, ids=lambda p: p.name)
def test_shared_storage_is_one_setting_near_the_top(path: Path) -> None:
    """The file system to mount is one variable in the first lines; empty (the default) mounts nothing,
    so `ray up` works before the user has one (the sweep's preflight then catches a multi-node run)."""
    text = path.read_text()
    assert text.count('SHARED_NFS="";') == 1
    assert text.index('SHARED_NFS="";') < text.index("available_node_types:")
    mount = next(c for c in load(path)["initialization_commands"] if "SHARED_NFS" in c)
    shell = subprocess.run(["bash", "-c", mount.replace("sudo ", "echo sudo ")], capture_output=True, text=True)
    assert shell.returncode == 0 and "mount" not in shell.stdout, shell.stdout + shell.stderr


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
    assert config["setup_commands"][-1] == f"{env_bin}python -m pip install -q -e {PROJECT_MOUNT}"
