"""`orchestrator sweep --storage` and `--resume` refuse what they cannot honour with one line and exit
code 2, before any trial (and before Ray starts). The multi-node preflight itself runs on a real cluster
in tests/test_multinode.py."""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from orchestrator.run.storage import STORAGE_FILE
from orchestrator.store.sweep_dir import SweepDir
from orchestrator.sweepfile.loading import load_sweep

# The CLI cases: four subprocesses that import torch and Ray, ~100 s together on 2 busy cores.
slow = pytest.mark.slow

SWEEP = """\
name: keep
data: {{synthetic_count: 100}}
model: {{g_widths: [32, 16, 8, 8], d_widths: [8, 16, 16, 32]}}
train: {{kimg: 0.5, batch_size: 25}}
eval: {{every_kimg: 0.25, fid_samples: 64, final_fid_samples: 64, extractor: tiny-conv, grid_size: 2}}
{extra}
"""


def started_sweep(root: Path, extra: str = "", storage: Path | None = None) -> Path:
    """A results root holding sweep 'keep' as an interrupted run leaves it (fingerprint, sweep.yaml, tune/)."""
    file = root / "keep.yaml"
    file.write_text(SWEEP.format(extra=extra))
    sweep_dir = SweepDir.claim(load_sweep(file), root / "results", resume=False)
    sweep_dir.tune_path.mkdir()
    if storage is not None:
        (sweep_dir.tune_path / STORAGE_FILE).write_text(f"{storage}\n")
    sweep_dir.release()
    return file


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GAN_CACHE_DIR": str(cwd / "cache")}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cases: dict[str, tuple[list[str], Path]] = {}

    root = tmp_path_factory.mktemp("bad-scheme")
    (root / "keep.yaml").write_text(SWEEP.format(extra=""))
    cases["bad_scheme"] = (["keep.yaml", "--results", "results", "--storage", "ftp://host/x"], root)

    root = tmp_path_factory.mktemp("concurrency")
    file = started_sweep(root, "max_concurrent: 2")
    file.write_text(SWEEP.format(extra="max_concurrent: 4"))  # edited before --resume
    cases["max_concurrent"] = ([str(file), "--results", "results", "--resume"], root)

    root = tmp_path_factory.mktemp("failures")
    file = started_sweep(root)  # default max_failures: 2
    file.write_text(SWEEP.format(extra="max_failures: 5"))
    cases["max_failures"] = ([str(file), "--results", "results", "--resume"], root)

    root = tmp_path_factory.mktemp("other-storage")
    file = started_sweep(root, storage=root / "first-storage")
    cases["other_storage"] = (
        [str(file), "--results", "results", "--resume", "--storage", str(root / "elsewhere")],
        root,
    )

    with ThreadPoolExecutor(len(cases)) as pool:  # each subprocess pays for importing torch
        futures = {name: pool.submit(cli, args, cwd) for name, (args, cwd) in cases.items()}
        return {name: (future.result(), cases[name][1]) for name, future in futures.items()}


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@slow
def test_unsupported_storage_scheme_is_refused_before_anything_is_created(runs):
    proc, root = runs["bad_scheme"]
    line = one_error_line(proc)
    assert "--storage ftp://host/x" in line and "s3://" in line and "gs://" in line
    assert not (root / "results").exists()


@slow
@pytest.mark.parametrize(
    ("case", "key", "before", "after"),
    [("max_concurrent", "max_concurrent", 2, 4), ("max_failures", "max_failures", 2, 5)],
)
def test_resume_refuses_an_edit_that_ray_tune_would_silently_ignore(runs, case, key, before, after):
    proc, root = runs[case]
    line = one_error_line(proc)
    assert line.startswith(f"error: {root / 'keep.yaml'}: {key}: {after} differs from {before}"), line
    assert f"set it back to {before}" in line
    assert "Ray dashboard" not in proc.stdout  # refused before Ray started
    assert not (root / "results" / "keep" / "trials.parquet").exists()


@slow
def test_resume_with_another_storage_than_the_sweep_started_with_is_refused(runs):
    proc, root = runs["other_storage"]
    line = one_error_line(proc)
    assert str(root / "elsewhere") in line and str(root / "first-storage") in line
    assert "Ray dashboard" not in proc.stdout


def test_inception_weights_of_the_driver_are_shipped_and_written_once_per_node(tmp_path, monkeypatch):
    from orchestrator.run.trainable import shipped_inception_weights

    weights = tmp_path / "weights-inception.pth"
    weights.write_bytes(b"not really weights" * 1000)
    file = tmp_path / "w.yaml"
    file.write_text(f"name: w\neval: {{weights_path: '{weights}'}}\n")
    shipped = shipped_inception_weights(load_sweep(file))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "node-tmp"))  # another node's /tmp
    on_node = shipped.on_this_node()
    assert on_node.read_bytes() == weights.read_bytes() and on_node.name == weights.name
    assert on_node.is_relative_to(tmp_path / "node-tmp")
    assert shipped.on_this_node() == on_node  # a second trial on the node reuses the file

    # The driver's environment variable reaches trials the same way; tiny-conv needs no weights.
    file.write_text("name: w\n")
    monkeypatch.setenv("GAN_INCEPTION_WEIGHTS", str(weights))
    assert shipped_inception_weights(load_sweep(file)).data == weights.read_bytes()
    file.write_text("name: w\neval: {extractor: tiny-conv}\n")
    assert shipped_inception_weights(load_sweep(file)) is None


def test_missing_weights_named_by_the_driver_environment_is_one_line(tmp_path, monkeypatch):
    from orchestrator.run.storage import StorageError
    from orchestrator.run.trainable import shipped_inception_weights

    file = tmp_path / "w.yaml"
    file.write_text("name: w\n")
    monkeypatch.setenv("GAN_INCEPTION_WEIGHTS", str(tmp_path / "nope.pth"))
    with pytest.raises(StorageError, match=r"^\$GAN_INCEPTION_WEIGHTS=.*nope.pth: InceptionV3 weights file not found$"):
        shipped_inception_weights(load_sweep(file))


def test_a_node_without_the_drivers_token_is_refused_before_training(tmp_path):
    from orchestrator.run.storage import (
        SharedCheck,
        StorageError,
        check_this_node,
        unseen,
        write_markers,
    )

    shared, local = tmp_path / "shared", tmp_path / "elsewhere"
    token = write_markers([shared])
    assert unseen([str(shared)], token) == []
    check_this_node(SharedCheck((str(shared),), token), shared)  # sees it: no error
    local.mkdir()
    with pytest.raises(StorageError, match="not shared with this node"):
        check_this_node(SharedCheck((str(local),), token), local)
    assert unseen([str(shared)], "another-run") == [str(shared)]  # a stale marker of an earlier run
