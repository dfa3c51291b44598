"""`orchestrator train FILE --trial N`: one trial of a sweep in this process, without Ray."""
import json
import math
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from orchestrator.cli import app

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "orchestrator.cli"]
# Trial 0 dcgan, trial 1 use-gan; a few seconds each on one CPU core.
TINY = """
name: tiny
data: {synthetic_count: 300}
model: {g_widths: [16, 8, 8, 8], d_widths: [8, 8, 16, 16]}
train: {kimg: 1, batch_size: 32}
eval: {every_kimg: 0.5, fid_samples: 64, final_fid_samples: 96, extractor: tiny-conv, grid_size: 2}
parameters:
  variant: {values: [dcgan, use-gan]}
scheduler: {type: asha, grace_period: 0.5, max_t: 1}
"""
# Numbers that differ between two runs of the same trial (timings, where the run directory is).
UNTIMED = ("wall_s", "images_per_s", "eval_seconds", "grid_path")


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def invoke(*args: str):
    return CliRunner().invoke(app, ["train", *args])


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--trial", "2"], "--trial: 2 is out of range: valid 0..1 (2 trials"),
        (["--trial", "-1"], "--trial: -1 is out of range: valid 0..1"),
        (["--trial", "0", "--set", "train.kimgg=2"], "train.kimgg: unknown key 'kimgg' (did you mean 'kimg'?)"),
        (["--trial", "0", "--set", "train.kimg=-1"], "train.kimg: must be a finite number > 0, got -1"),
        (["--trial", "0", "--set", "model.g_widths=[32, 16]"], "model.g_widths: needs 4 positive widths"),
        (
            ["--trial", "0", "--set", "eval.every_kimg=2"],
            "eval.every_kimg: 2.0 is more than the training budget of 1.0 kimg",
        ),
        (
            ["--trial", "0", "--set", "model.variant=wgan"],
            "--set model.variant: 'variant' is swept (parameters.variant)",
        ),
        (
            ["--trial", "0", "--set", "parameters.variant={values: [wgan]}"],
            "--set parameters.variant: swept parameters can't be set",
        ),
        (
            ["--trial", "0", "--set", "foo.bar=1"],
            "--set foo.bar: unknown or unsettable section 'foo' (settable: data, model",
        ),
        (["--trial", "0", "--set", "scheduler.max_t=2"], "unsettable section 'scheduler'"),
        (["--trial", "0", "--set", "kimg=2"], "--set kimg: expected SECTION.KEY=VALUE"),
        (["--trial", "0", "--set", "train.kimg=[1"], "--set train.kimg: value '[1' is not valid YAML"),
        (["--trial", "0", "--set", "train.kimg=1", "--set", "train.kimg=2"], "--set train.kimg: given twice"),
        (["--trial", "0", "--device", "gpu"], "--device gpu: must be auto, cpu, cuda or cuda:N"),
    ],
)
def test_bad_input_is_one_line_naming_the_file_key_and_value(tiny, tmp_path, args, expected):
    result = invoke(str(tiny), *args, "--out", str(tmp_path / "run"))
    line = one_error_line(result)
    assert expected in line
    assert line.startswith(f"error: {tiny}: ") or args[-2] == "--device"
    assert not (tmp_path / "run").exists()  # nothing was started


def test_no_cuda_is_one_line(tiny, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = one_error_line(invoke(str(tiny), "--trial", "0", "--device", "cuda:1", "--out", str(tmp_path / "run")))
    assert line == "error: --device cuda:1: CUDA is not available on this machine (use cpu or auto)"


def test_optuna_sweeps_have_no_numbered_trials(tmp_path):
    line = one_error_line(invoke(str(REPO / "sweeps" / "lr_ratio.yaml"), "--trial", "0", "--data", str(REPO)))
    assert "--trial: method optuna proposes its trials while the sweep runs" in line


def test_run_directory_is_never_overwritten_and_resume_needs_a_checkpoint(tiny, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    line = one_error_line(invoke(str(tiny), "--trial", "0", "--out", str(out), "--resume"))
    assert line == (
        f"error: --resume: no checkpoint in {out / 'checkpoint'} (run without --resume to start the "
        "trial, or give the --out of the run to continue)"
    )
    (out / "checkpoint").mkdir()
    (out / "stats.jsonl").write_text("{}\n")
    line = one_error_line(invoke(str(tiny), "--trial", "0", "--out", str(out)))
    assert line == (
        f"error: {out} holds the checkpoint of an earlier run: pass --resume to continue it, or choose another --out"
    )
    (out / "checkpoint").rmdir()
    line = one_error_line(invoke(str(tiny), "--trial", "0", "--out", str(out)))
    assert line == f"error: {out} is not empty (stats.jsonl): choose another --out, or delete it"
    assert (out / "stats.jsonl").read_text() == "{}\n"


def test_diverged_trial_exits_1_with_its_reason(tiny, tmp_path, monkeypatch):
    import torch

    import orchestrator.workflow.train as train_one
    from gan.training import TrainResult

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # this process runs other tests
    seen = {}

    def loop(cfg, run_dir, report, resume_from=None, dataset=None):
        seen.update(cfg=cfg, run_dir=run_dir, resume_from=resume_from)
        return TrainResult("diverged", 0.25, {}, None, "non-finite loss")

    monkeypatch.setattr(train_one, "training_loop", loop)
    monkeypatch.chdir(tmp_path)
    result = invoke(str(tiny), "--trial", "1", "--set", "train.kimg=0.5", "--device", "cpu")
    assert result.exit_code == 1, result.output
    default_out = Path("runs") / "tiny" / "trial-1"
    assert result.stdout.strip().splitlines()[-1] == (
        f"diverged (non-finite loss) at 0.25 kimg: no final FID, no evaluation before it; run dir {default_out}"
    )
    cfg = seen["cfg"]
    assert (cfg.model.variant, cfg.train.kimg, cfg.train.device) == ("use-gan", 0.5, "cpu")
    assert seen["run_dir"] == (tmp_path / default_out).resolve() and seen["resume_from"] is None


# Runs in a fresh interpreter in which `import ray` fails: trains trial 1 to the end (default run
# directory); then the same trial again, interrupted (as by Ctrl-C) right after its first evaluation,
# and continued with the command the interruption printed.
NO_RAY = """
import json, shlex, sys
sys.modules["ray"] = None  # any import of Ray now fails
from typer.testing import CliRunner
import orchestrator.workflow.train as train_one
from orchestrator.cli import app

SETS = ["--set", "eval.fid_samples=32", "--set", "eval.final_fid_samples=64"]
out = {}
r = CliRunner().invoke(app, ["train", "tiny.yaml", "--trial", "1", *SETS])
out["full"] = [r.exit_code, r.stdout, r.stderr]
r = CliRunner().invoke(app, ["train", "tiny.yaml", "--trial", "1", *SETS, "--resume"])
out["again"] = [r.exit_code, r.stdout, r.stderr]
r = CliRunner().invoke(app, ["train", "tiny.yaml", "--trial", "1", *SETS[2:], "--resume"])
out["changed"] = [r.exit_code, r.stdout, r.stderr]

real_loop = train_one.training_loop
def interrupted_loop(cfg, run_dir, report, **kwargs):
    def report_then_stop(metrics, checkpoint_dir):
        report(metrics, checkpoint_dir)
        raise KeyboardInterrupt  # Ctrl-C just after the first evaluation's checkpoint
    return real_loop(cfg, run_dir, report_then_stop, **kwargs)
train_one.training_loop = interrupted_loop
r = CliRunner().invoke(app, ["train", "tiny.yaml", "--trial", "1", *SETS, "--out", "cut"])
out["cut"] = [r.exit_code, r.stdout, r.stderr]
train_one.training_loop = real_loop
with open("cut/stats.jsonl") as f:
    out["cut_rows"] = len(f.readlines())
with open("cut/stats.jsonl", "a") as f:  # as if stopped after an evaluation's row, before its checkpoint
    f.write(json.dumps({"kimg": 1.024, "fid": 1.0}) + "\\n")
resume = shlex.split(r.stderr.split("continue with: ")[-1])
r = CliRunner().invoke(app, resume[1:])
out["resumed"] = [r.exit_code, r.stdout, r.stderr, resume]
out["modules"] = sorted(m for m, module in sys.modules.items() if module is not None
                        and (m.split(".")[0] == "ray"
                             or m in ("orchestrator.run.tuner", "orchestrator.workflow.sweep")))
print(json.dumps(out))
"""


def stats(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in UNTIMED} for row in rows]


def test_trains_without_ray_and_a_resumed_run_matches_an_uninterrupted_one(tiny, tmp_path):
    proc = subprocess.run([sys.executable, "-c", NO_RAY], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["modules"] == [], out["modules"]

    code, stdout, stderr = out["full"]
    full = tmp_path / "runs" / "tiny" / "trial-1"  # the default run directory
    assert code == 0, stderr
    rows = stats(full)
    assert [r["kimg"] for r in rows] == [0.512, 1.024]
    assert [r["fid_samples"] for r in rows] == [32, 64] and rows[-1]["final"]
    assert stdout.strip().splitlines()[-1] == (
        f"completed: 1.024 kimg, final FID {rows[-1]['fid']:.4f} (64 samples, tiny-conv); run dir runs/tiny/trial-1"
    )
    options = json.loads((full / "options.json").read_text())
    assert options["model"]["variant"] == "use-gan" and options["train"]["kimg"] == 1
    assert (options["eval"]["fid_samples"], options["eval"]["final_fid_samples"]) == (32, 64)
    assert sorted(p.name for p in full.iterdir()) == ["checkpoint", "grids", "options.json", "stats.jsonl"]

    code, stdout, stderr = out["again"]  # --resume of a finished run
    assert code == 0 and stdout.strip().splitlines()[-1].startswith(
        "completed (already: nothing left to train): 1.024 kimg"
    ), stdout + stderr
    assert stats(full) == rows

    code, stdout, stderr = out["changed"]  # --resume with other settings than the checkpoint's
    assert code == 2 and stderr.strip() == (
        "error: --resume: the checkpoint in runs/tiny/trial-1/checkpoint was trained with eval.fid_samples=32, "
        "this run has 64: pass the same --data and --set as the run it continues"
    )

    code, stdout, stderr = out["cut"]
    assert code == 130 and "Traceback" not in stdout + stderr
    resume = (
        "orchestrator train tiny.yaml --trial 1 --set eval.fid_samples=32 --set eval.final_fid_samples=64 "
        "--out cut --resume"
    )
    assert (
        stderr.strip()
        == f"interrupted at 0.512 kimg; checkpoint of 0.512 kimg in cut/checkpoint; continue with: {resume}"
    )
    assert out["cut_rows"] == 1

    code, stdout, stderr, command = out["resumed"]
    assert command == shlex.split(resume) and code == 0, stderr
    assert "resuming from cut/checkpoint at 0.512 kimg" in stdout
    assert untimed(stats(tmp_path / "cut")) == untimed(rows)  # bit for bit: FIDs, losses, g_steps
    grids = sorted(p.name for p in (full / "grids").iterdir())
    assert sorted(p.name for p in (tmp_path / "cut" / "grids").iterdir()) == grids
    assert all((full / "grids" / g).read_bytes() == (tmp_path / "cut" / "grids" / g).read_bytes() for g in grids)


def test_ctrl_c_says_where_the_checkpoint_is_and_how_to_resume(tiny, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [*CLI, "train", str(tiny), "--trial", "0", "--set", "train.kimg=200", "--out", str(out)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint").is_dir():  # the first evaluation is done
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        time.sleep(1.0)  # its report follows the checkpoint at once
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted at "), stderr
    # Which evaluation the signal came after depends on the machine's speed: the line names the latest one
    # reported (the first batch of 32 at or past each 0.5 kimg: 0.512, 1.024, 1.504, ...), whose checkpoint is
    # in the run directory.
    said = re.search(r"; checkpoint of ([0-9.]+) kimg in ", lines[0])
    points = {math.ceil(k * 500 / 32) * 32 for k in range(1, 400)}
    assert said and round(float(said.group(1)) * 1000) in points, lines[0]
    saved = json.loads(torch.load(out / "checkpoint" / "checkpoint.pt", weights_only=True)["state"])["images_shown"]
    assert saved / 1000 >= float(said.group(1))
    assert lines[0].endswith(
        f"kimg in {out / 'checkpoint'}; continue with: "
        f"orchestrator train {tiny} --trial 0 --set train.kimg=200 --out {out} --resume"
    )


# The same trial under Ray Tune: one trial, FIFO, CPU.
ONE_TRIAL = TINY.replace("values: [dcgan, use-gan]", "values: [use-gan]").replace(
    "scheduler: {type: asha, grace_period: 0.5, max_t: 1}", "scheduler: {type: fifo}"
)


@pytest.mark.slow
def test_run_directory_matches_the_same_trial_under_tune(tmp_path):
    sweep_file = tmp_path / "one.yaml"
    sweep_file.write_text(ONE_TRIAL)
    proc = subprocess.run(
        [*CLI, "sweep", str(sweep_file), "--results", str(tmp_path / "r")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tune_dir,) = (tmp_path / "r" / "tiny" / "trials").iterdir()
    proc = subprocess.run(
        [*CLI, "train", str(sweep_file), "--trial", "0", "--out", str(tmp_path / "alone")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    alone = tmp_path / "alone"

    assert (alone / "options.json").read_text() == (tune_dir / "options.json").read_text()
    assert sorted(p.name for p in alone.iterdir()) == sorted([p.name for p in tune_dir.iterdir()] + ["checkpoint"])
    assert sorted(p.name for p in (alone / "grids").iterdir()) == sorted(p.name for p in (tune_dir / "grids").iterdir())
    ours, tunes = stats(alone), stats(tune_dir)
    assert [sorted(r) for r in ours] == [sorted(r) for r in tunes]
    assert [r["kimg"] for r in ours] == [r["kimg"] for r in tunes] == [0.512, 1.024]
    # Bit-identical, FIDs included: same config and seed, and as many torch threads as train_trial sets
    # (resources.cpu), so every reduction adds in the same order.
    assert untimed(ours) == untimed(tunes)
