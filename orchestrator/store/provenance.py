"""Where every number came from: `<sweep>/provenance.jsonl`, one JSON object a line.

- `run`: written once per run of the driver, at the start and on every `--resume`: the project's version and git
  commit, the driver's environment (Python, torch, CUDA, NVIDIA driver, Ray, torch-fidelity), the effective
  configuration (`--data` resolved) and the data's fingerprint (the prepared dataset's cache key: a hash of the
  image files' names, sizes and times with the image size, split and seed).
- `node`: the environment of each node that ran trials, once per node and run.

A `--resume` whose code, versions, configuration or data differ from the run before says so in one line each
(returned by `record_provenance`); both runs stay recorded.
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

PROVENANCE_FILE = "provenance.jsonl"
PACKAGES = {"ray": "ray", "torch_fidelity": "torch-fidelity", "numpy": "numpy"}
REPO = Path(__file__).resolve().parents[2]  # the checkout, when the project is installed from one


def driver_version() -> str | None:
    """The NVIDIA driver's version, when this machine has one that can be read."""
    try:
        first = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
        return next((w for w in first.split() if w[:1].isdigit() and "." in w), first.strip())
    except (OSError, IndexError):
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """This process's versions; torch's only where it is already imported (reading it costs no import)."""
    torch = sys.modules.get("torch")
    return {
        "python": platform.python_version(),
        "torch": getattr(torch, "__version__", None) or _version("torch"),
        "cuda": getattr(getattr(torch, "version", None), "cuda", None),
        "driver": driver_version(),
        **{key: _version(dist) for key, dist in PACKAGES.items()},
        "host": platform.node(),
    }


def project() -> dict[str, Any]:
    """The project's version and, when it runs from a git checkout, its commit (and whether it was edited)."""
    commit = dirty = None
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode == 0:
            commit = head.stdout.strip()
            status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10)
            dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"version": _version("gan-sweeps"), "git_commit": commit, "git_dirty": dirty}


def read_provenance(sweep_dir: Path) -> list[dict[str, Any]]:
    path = sweep_dir / PROVENANCE_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a torn last line
            continue
    return records


def append(sweep_dir: Path, record: dict[str, Any]) -> None:
    with open(sweep_dir / PROVENANCE_FILE, "a") as f:
        f.write(json.dumps(record, default=str, sort_keys=True) + "\n")


def effective_config(sweep) -> dict[str, Any]:
    """The validated sweep as JSON, readable back as a sweep: each parameter keeps only the keys it was given
    (value, values or distribution), never the others as nulls."""
    config = sweep.model_dump(mode="json")
    config["parameters"] = {name: spec.model_dump(mode="json", exclude_unset=True)
                            for name, spec in sweep.parameters.items()}
    return config


def record_provenance(sweep, sweep_dir: Path, dataset, *, resume: bool) -> list[str]:
    """Append this run's record; on --resume, return one line per thing that changed since the last run."""
    record = {"event": "run", "resume": resume, "time": datetime.now(timezone.utc).isoformat(),
              "project": project(), "environment": environment(),
              "config": effective_config(sweep), "data": {"source": dataset.source, "fingerprint": dataset.key}}
    previous = [r for r in read_provenance(sweep_dir) if r.get("event") == "run"]
    append(sweep_dir, record)
    if not resume or not previous:
        return []
    return changes(previous[-1], record)


def changes(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """One line per difference of code, versions, configuration or data between two run records."""
    lines = []
    for section, what in (("project", "code"), ("environment", "versions")):
        old, new = before.get(section, {}), now.get(section, {})
        diff = [f"{k} {old.get(k)} -> {new.get(k)}" for k in sorted(set(old) | set(new))
                if k != "host" and old.get(k) != new.get(k)]
        if diff:
            lines.append(f"--resume with other {what} than the sweep's last run ({'; '.join(diff)}); both are "
                         f"recorded in {PROVENANCE_FILE}")
    if before.get("config") != now.get("config"):
        lines.append(f"--resume with another effective configuration than the last run; both are in {PROVENANCE_FILE}")
    if before.get("data") != now.get("data"):
        lines.append(f"--resume on other data than the last run ({before.get('data')} -> {now.get('data')})")
    return lines


def record_node(sweep_dir: Path, node: str, versions: dict[str, Any]) -> None:
    """A node's environment, the first time one of its trials reports in this run."""
    append(sweep_dir, {"event": "node", "node": node, "time": datetime.now(timezone.utc).isoformat(),
                       "environment": versions})
