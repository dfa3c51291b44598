"""Bad input through the command line: a bad sweep file, data folder or results directory ends the
command with one line on stderr and a non-zero exit code, before Ray is imported and before
anything is written under --results.

Every case runs `orchestrator` in a subprocess, like a user would. The subprocesses are started
together (module-scoped fixtures) because each one pays for importing torch.
"""
from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# `orchestrator ARGS` in-process, plus one addition: at exit, the names of all imported modules go
# to the file named by the first argument (to prove that Ray was never imported).
RUN_CLI = (
    "import atexit, sys\n"
    "modules_file = sys.argv.pop(1)\n"
    "atexit.register(lambda: open(modules_file, 'w').write('\\n'.join(sorted(sys.modules))))\n"
    "sys.argv[0] = 'orchestrator'\n"
    "from orchestrator.cli import app\n"
    "app()\n"
)
PARALLEL = 4


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    modules: set[str]

    @property
    def imported_ray(self) -> bool:
        return any(m == "ray" or m.startswith("ray.") for m in self.modules)


def run_cli(args: list[str], workdir: Path, cache: Path) -> Run:
    workdir.mkdir(parents=True, exist_ok=True)
    modules = workdir / "modules.txt"
    env = {**os.environ, "GAN_CACHE_DIR": str(cache)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", RUN_CLI, str(modules), *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=180)
    imported = set(modules.read_text().split()) if modules.exists() else set()
    return Run(proc.returncode, proc.stdout, proc.stderr, imported)


def run_all(cases: dict[str, list[str]], root: Path, cache: Path) -> dict[str, Run]:
    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = {name: pool.submit(run_cli, args, root / "runs" / name, cache) for name, args in cases.items()}
        return {name: f.result() for name, f in futures.items()}


def assert_one_line_error(run: Run, *expected: str) -> str:
    assert run.returncode == 2, (run.returncode, run.stderr[-2000:])  # the README promises 2 for bad input
    assert "Traceback" not in run.stderr and "Traceback" not in run.stdout
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    return lines[0]


# --- sweep files ---------------------------------------------------------------------------------

VALID = """\
name: cli-errors
data: {synthetic_count: 300}
model: {g_widths: [32, 16, 8, 8], d_widths: [8, 16, 16, 32], heads: 2}
train: {kimg: 1, batch_size: 25}
eval: {every_kimg: 0.25, fid_samples: 64, final_fid_samples: 64, extractor: tiny-conv}
parameters:
  variant: {values: [dcgan, use-cmhsa-gan]}
  seed: {values: [0, 1]}
"""


def variant(**replace: str) -> str:
    """VALID with some lines replaced (by their key) or added."""
    lines = VALID.splitlines()
    for key, line in replace.items():
        hits = [i for i, existing in enumerate(lines) if existing.lstrip().startswith(f"{key}:")]
        if hits:
            lines[hits[0]] = line
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


MARKER = "yaml-code-ran"
# name -> (sweep file text, extra CLI arguments, text the one error line must contain)
BAD_SWEEPS: dict[str, tuple[str, list[str], list[str]]] = {
    "yaml-syntax": ("name: x\nparameters: {seed: {values: [0, 1}\n", [], ["invalid YAML at line 2"]),
    "empty-file": ("", [], ["file is empty"]),
    "top-level-list": ("- name: x\n", [], ["expected a mapping"]),
    "duplicate-key": (VALID + "name: again\n", [], ["duplicate key 'name'"]),
    "unknown-key": (variant(schedular="schedular: {type: asha}"), [], ["schedular", "unknown key", "scheduler"]),
    "wrong-type": (variant(train="train: {kimg: 1, batch_size: many}"), [], ["train.batch_size", "'many'"]),
    "missing-name": (VALID.replace("name: cli-errors\n", ""), [], ["name", "required key is missing"]),
    "unknown-variant": (variant(variant="  variant: {values: [dcgan, stylegan]}"), [],
                        ["parameters.variant.values[1]", "'stylegan'"]),
    "unknown-method": (variant(method="method: bayes"), [], ["method", "'bayes'"]),
    "unknown-scheduler": (variant(scheduler="scheduler: {type: hyperband}"), [], ["scheduler.type", "'hyperband'"]),
    "negative-lr": (variant(train="train: {kimg: 1, batch_size: 25, lr_d: -1.0e-4}"), [], ["train.lr_d", "-0.0001"]),
    "zero-lr-swept": (variant(lr_g="  lr_g: {values: [1.0e-4, 0]}"), [], ["parameters.lr_g.values[1]", "got 0"]),
    "heads-not-dividing": (variant(heads="  heads: {values: [2, 3]}"), [],
                           ["parameters.heads.values[1]", "heads=3", "8 generator channels"]),
    "grace-over-max-t": (variant(scheduler="scheduler: {type: asha, grace_period: 2, max_t: 1}"), [],
                         ["scheduler.grace_period", "2"]),
    "empty-values": (variant(seed="  seed: {values: []}"), [], ["parameters.seed.values", "[]"]),
    "every-kimg-over-budget": (variant(train="train: {kimg: 0.1, batch_size: 25}"), [],
                               ["eval.every_kimg", "0.25", "0.1"]),
    "data-path-missing": (variant(data="data: {path: /nonexistent/faces}"), [],
                          ["data.path", "directory not found", "/nonexistent/faces"]),
    "data-override-missing": (VALID, ["--data", "/nonexistent/faces"],
                              ["data.path", "/nonexistent/faces", "data override"]),
    "python-tag": (f"name: !!python/object/apply:os.system ['touch {MARKER}']\n", [],
                   ["invalid YAML", "python/object/apply:os.system"]),
}


@pytest.fixture(scope="module")
def bad_sweep_runs(tmp_path_factory) -> tuple[Path, dict[str, Run]]:
    root = tmp_path_factory.mktemp("bad-sweeps")
    cases = {}
    for name, (text, extra, _) in BAD_SWEEPS.items():
        file = root / f"{name}.yaml"
        file.write_text(text)
        cases[name] = ["sweep", str(file), "--results", str(root / "results" / name), *extra]
    cases["file-not-found"] = ["sweep", str(root / "missing.yaml"), "--results", str(root / "results" / "missing")]
    (root / "ok.yaml").write_text(VALID)
    cases["dry-run"] = ["sweep", str(root / "ok.yaml"), "--dry-run", "--results", str(root / "results" / "dry-run")]
    return root, run_all(cases, root, tmp_path_factory.getbasetemp() / "gan-cache")


@pytest.mark.slow  # one CLI process per bad file: ~30 s of start-ups on 2 cores
@pytest.mark.parametrize("case", sorted(BAD_SWEEPS))
def test_bad_sweep_file_fails_with_one_line_before_anything_starts(case, bad_sweep_runs):
    root, runs = bad_sweep_runs
    run = runs[case]
    file = str(root / f"{case}.yaml")
    line = assert_one_line_error(run, file, *BAD_SWEEPS[case][2])
    assert line.startswith("error: ")
    assert not run.imported_ray
    assert not (root / "results" / case).exists()  # nothing created under --results
    assert not (root / "runs" / case / MARKER).exists()  # the YAML tag was not executed


@pytest.mark.slow  # one CLI process per bad file: ~30 s of start-ups on 2 cores
def test_missing_sweep_file(bad_sweep_runs):
    root, runs = bad_sweep_runs
    assert_one_line_error(runs["file-not-found"], str(root / "missing.yaml"), "file not found")
    assert not (root / "results" / "missing").exists()


@pytest.mark.slow  # one CLI process per bad file: ~30 s of start-ups on 2 cores
def test_dry_run_prints_the_trials_and_starts_nothing(bad_sweep_runs):
    root, runs = bad_sweep_runs
    run = runs["dry-run"]
    assert run.returncode == 0, run.stderr
    assert "cli-errors: 4 trials (grid)" in run.stdout
    assert "use-cmhsa-gan" in run.stdout
    assert not run.imported_ray
    assert not (root / "results" / "dry-run").exists()


def test_sweep_name_taken_by_a_different_sweep(tmp_path, tmp_path_factory):
    from orchestrator.store.sweep_dir import SweepDir
    from orchestrator.sweepfile.loading import load_sweep

    results = tmp_path / "results"
    first = tmp_path / "first.yaml"
    first.write_text(VALID)
    SweepDir.claim(load_sweep(first), results, resume=False).release()
    before = sorted((p.name, p.read_bytes()) for p in (results / "cli-errors").iterdir())
    second = tmp_path / "second.yaml"
    second.write_text(variant(seed="  seed: {values: [0, 1, 2]}"))
    for resume in ([], ["--resume"]):
        run = run_cli(["sweep", str(second), "--results", str(results), *resume], tmp_path / "run",
                      tmp_path_factory.getbasetemp() / "gan-cache")
        assert_one_line_error(run, str(results / "cli-errors"), "holds a different sweep named 'cli-errors'")
        assert not run.imported_ray
        assert sorted((p.name, p.read_bytes()) for p in (results / "cli-errors").iterdir()) == before


# --- data folders --------------------------------------------------------------------------------


def picture(seed: int, size: int = 80, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
    return rgb if mode == "RGB" else rgb.convert(mode)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header says width x height: a decompression bomb for any decoder that trusts it."""
    data = bytearray(encoded(picture(0, 8, "L"), "PNG"))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4:ihdr + 13]))
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def messy_folder(root: Path) -> dict[str, int]:
    """Every kind of file a scraped image folder holds; returns the counts `data prepare` must report."""
    root.mkdir()
    (root / "sub").mkdir()
    (root / "sub" / "loop").symlink_to("..", target_is_directory=True)  # a symlink loop
    good = {
        "rgb.jpg": encoded(picture(1), "JPEG", quality=95),
        "large.jpg": encoded(picture(2, 1500), "JPEG"),
        "rgba.png": encoded(picture(3, mode="RGBA"), "PNG"),
        "grey.jpg": encoded(picture(4, mode="L"), "JPEG"),
        "cmyk.jpg": encoded(picture(5, mode="CMYK"), "JPEG"),
        "palette.png": encoded(picture(6, mode="P"), "PNG", transparency=0),
        "sixteen-bit.png": encoded(Image.fromarray(np.arange(80 * 80, dtype=np.uint16).reshape(80, 80) * 9), "PNG"),
        "sub/nested.webp": encoded(picture(7), "WEBP"),
        "SHOUTING.JPEG": encoded(picture(8), "JPEG"),
    }
    for name, blob in good.items():
        (root / name).write_bytes(blob)
    (root / "sub" / "copy-of-rgb.jpg").write_bytes(good["rgb.jpg"])
    (root / "truncated.jpg").write_bytes(good["large.jpg"][: len(good["large.jpg"]) // 3])
    (root / "zero-bytes.png").write_bytes(b"")
    (root / "not-an-image.jpg").write_bytes(b"<html>404 not found</html>")
    (root / "bomb.png").write_bytes(png_claiming_size(60_000, 60_000))
    (root / "small.png").write_bytes(encoded(picture(9, 32), "PNG"))
    (root / "notes.txt").write_text("not an image")
    return {"files_seen": 15, "images_kept": 9, "duplicates_removed": 1, "unreadable": 4, "too_small": 1,
            "ignored_files": 1}


@pytest.fixture(scope="module")
def data_runs(tmp_path_factory) -> tuple[Path, dict[str, int], dict[str, Run]]:
    root = tmp_path_factory.mktemp("bad-data")
    expected = messy_folder(root / "messy")
    (root / "empty").mkdir()
    (root / "no-images").mkdir()
    (root / "no-images" / "a.jpg").write_bytes(b"")
    (root / "no-images" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "a-file.jpg").write_bytes(b"")
    cases = {name: ["data", "prepare", str(root / name)]
             for name in ("messy", "empty", "no-images", "a-file.jpg", "missing")}
    return root, expected, run_all(cases, root, tmp_path_factory.getbasetemp() / "gan-cache")


def test_data_prepare_counts_every_kind_of_bad_file(data_runs):
    _, expected, runs = data_runs
    run = runs["messy"]
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    rows = {}
    for line in run.stdout.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 2:
            rows[cells[0]] = cells[1]
    assert {k: int(rows[k]) for k in expected} == expected


@pytest.mark.parametrize("case, expected", [
    ("empty", "no image files"),
    ("no-images", "no usable image among 2 image files (2 unreadable"),
    ("a-file.jpg", "not a folder"),
    ("missing", "does not exist"),
])
def test_data_prepare_without_usable_images_fails_with_one_line(case, expected, data_runs):
    root, _, runs = data_runs
    line = assert_one_line_error(runs[case], str(root / case), expected)
    assert runs[case].returncode == 2, line


# --- results directories -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def leaderboard_runs(tmp_path_factory) -> tuple[Path, dict[str, Run]]:
    from orchestrator.store.tables import ResultsWriter

    root = tmp_path_factory.mktemp("bad-results")
    (root / "empty").mkdir()
    started = root / "started" / "s"  # claimed, no trial reported yet
    started.mkdir(parents=True)
    (started / "fingerprint").write_text("0" * 64)
    pending = root / "pending" / "s"  # trials known, none evaluated
    pending.mkdir(parents=True)
    (pending / "fingerprint").write_text("0" * 64)
    writer = ResultsWriter(pending, "s", ["seed"])
    writer.update_trial("t1", seed=0, status="running")
    writer.close()
    truncated = root / "truncated" / "s"
    truncated.mkdir(parents=True)
    (truncated / "fingerprint").write_text("0" * 64)
    writer = ResultsWriter(truncated, "s", ["seed"])
    writer.update_trial("t1", seed=0, status="completed", best_fid=12.0, extractor="tiny-conv")
    writer.close()
    whole = (truncated / "trials.parquet").read_bytes()
    (truncated / "trials.parquet").write_bytes(whole[: len(whole) // 2])
    cases = {name: ["leaderboard", "--results", str(root / name)]
             for name in ("missing", "empty", "started", "pending", "truncated")}
    cases["unknown-sweep"] = ["leaderboard", "--results", str(root / "started"), "--sweep", "nope"]
    return root, run_all(cases, root, tmp_path_factory.getbasetemp() / "gan-cache")


@pytest.mark.parametrize("case, expected", [
    ("missing", "no results directory"),
    ("empty", "no sweeps here yet"),
    ("started", "no trials recorded yet"),
    ("pending", "no trial has an evaluation yet"),
    ("truncated", "unreadable trials table"),
    ("unknown-sweep", "no sweep named 'nope' (found: s)"),
])
def test_leaderboard_without_results_says_so_in_one_line(case, expected, leaderboard_runs):
    root, runs = leaderboard_runs
    assert_one_line_error(runs[case], str(root / case.replace("unknown-sweep", "started")), expected)
    assert not runs[case].imported_ray


# --- paths the commands create -------------------------------------------------------------------

# Tests run as root, where permissions alone never make a directory unwritable: a path under a regular
# file, or under /proc, cannot be created by anyone.
UNWRITABLE = "/proc/gan-sweeps-cannot-exist"


@pytest.fixture(scope="module")
def path_runs(tmp_path_factory) -> tuple[Path, dict[str, Run]]:
    root = tmp_path_factory.mktemp("bad-paths")
    (root / "ok.yaml").write_text(VALID)
    (root / "a-file").write_text("not a folder\n")
    cache = tmp_path_factory.getbasetemp() / "gan-cache"
    sweep = ["sweep", str(root / "ok.yaml")]
    cases = {
        "results-under-file": ([*sweep, "--results", str(root / "a-file" / "results")], cache),
        "results-in-proc": ([*sweep, "--results", UNWRITABLE], cache),
        "cache-under-file": ([*sweep, "--results", str(root / "results" / "c1")], root / "a-file" / "cache"),
        "cache-in-proc": ([*sweep, "--results", str(root / "results" / "c2")], Path(UNWRITABLE)),
    }
    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = {name: pool.submit(run_cli, args, root / "runs" / name, where)
                   for name, (args, where) in cases.items()}
        return root, {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("case, path, reason", [
    ("results-under-file", "{root}/a-file/results/cli-errors", "Not a directory"),
    ("results-in-proc", UNWRITABLE + "/cli-errors", "No such file or directory"),
    ("cache-under-file", "{root}/a-file/cache/data", "Not a directory"),
    ("cache-in-proc", UNWRITABLE + "/data", "No such file or directory"),
])
def test_a_path_that_cannot_be_created_fails_with_one_line_before_ray(case, path, reason, path_runs):
    root, runs = path_runs
    line = assert_one_line_error(runs[case], path.format(root=root), reason)
    assert line.startswith("error: ") and runs[case].returncode == 2
    assert not runs[case].imported_ray
    assert (root / "a-file").read_text() == "not a folder\n"
    assert not (root / "results").exists()  # an unusable cache stops the sweep before it claims --results
