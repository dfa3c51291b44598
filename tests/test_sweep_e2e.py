"""End to end on CPU: the README's main job (sweeps/smoke.yaml) through Ray Tune."""
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from browser import open_in_chromium

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "orchestrator.cli"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    proc = subprocess.run(
        [*CLI, "sweep", "sweeps/smoke.yaml", "--results", str(results)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return results, proc.stdout


@pytest.mark.slow
def test_smoke_sweep_records_every_evaluation_and_asha_stops_some(smoke):
    results, stdout = smoke
    assert "procedurally generated" in stdout and "Ray dashboard: http://127.0.0.1:" in stdout
    sweep_dir = results / "smoke"
    evals = pq.read_table(sweep_dir / "evaluations.parquet").to_pylist()
    trials = {t["trial_id"]: t for t in pq.read_table(sweep_dir / "trials.parquet").to_pylist()}
    assert len(trials) == 6
    assert {t["status"] for t in trials.values()} <= {"completed", "stopped_early"}
    for trial_id, trial in trials.items():
        rows = [e for e in evals if e["trial_id"] == trial_id]
        stats = (Path(trial["run_dir"]) / "stats.jsonl").read_text().splitlines()
        assert [r["kimg"] for r in rows] == [json.loads(line)["kimg"] for line in stats]  # every evaluation, once
        assert trial["best_fid"] == min(r["fid"] for r in rows)
        assert trial["kimg"] == rows[-1]["kimg"]
        assert all(r["data_source"] == "synthetic" and r["extractor"] == "tiny-conv" for r in rows)
        assert Path(trial["grid_path"]).is_file() and Path(trial["checkpoint_path"]).is_dir()
        if trial["status"] == "completed":
            assert trial["kimg"] >= 4 and rows[-1]["final"] and rows[-1]["fid_samples"] == 512
            assert trial["final_fid"] == rows[-1]["fid"]
        else:
            assert trial["kimg"] < 4 and trial["final_fid"] is None and rows[-1]["fid_samples"] == 256
    stopped = [t for t in trials.values() if t["status"] == "stopped_early"]
    assert stopped, "ASHA stopped no trial early"
    columns = pq.read_schema(sweep_dir / "evaluations.parquet").names
    for column in ("sweep", "trial_id", "variant", "seed", "g_widths", "kimg", "fid", "is_mean", "extractor",
                   "fid_samples", "loss_d", "loss_g", "images_per_s", "wall_s", "node", "time"):
        assert column in columns


@pytest.mark.slow
def test_leaderboard_json_matches_parquet(smoke):
    results, _ = smoke
    trials = {t["trial_id"]: t for t in pq.read_table(results / "smoke" / "trials.parquet").to_pylist()}
    out = subprocess.run([*CLI, "leaderboard", "--results", str(results), "--format", "json"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    ranked = json.loads(out)
    assert [r["trial_id"] for r in ranked] == sorted(trials, key=lambda t: trials[t]["best_fid"])
    for row in ranked:
        assert row["best_fid"] == trials[row["trial_id"]]["best_fid"]
        assert row["status"] == trials[row["trial_id"]]["status"]

    out = subprocess.run([*CLI, "leaderboard", "--results", str(results), "--group-by", "variant", "--format", "json"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    groups = {g["variant"]: g for g in json.loads(out)}
    assert set(groups) == {"dcgan", "use-cmhsa-gan", "wgan"}
    for variant, group in groups.items():
        fids = [t["best_fid"] for t in trials.values() if t["variant"] == variant]
        assert group["n"] == len(fids) == 2
        assert group["best_fid_mean"] == pytest.approx(sum(fids) / len(fids))
        assert group["best_fid_ci95"] > 0


def test_dry_run_prints_trials_and_never_imports_ray():
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from orchestrator.cli import app\n"
        "r = CliRunner().invoke(app, ['sweep', 'sweeps/smoke.yaml', '--dry-run'])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'ray' not in sys.modules, 'dry run imported ray'\n"
        "print(r.output)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "smoke: 6 trials (grid)" in out
    assert out.count("use-cmhsa-gan") == 2


@pytest.mark.parametrize("path", sorted((REPO / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweeps_dry_run(path):
    proc = subprocess.run([*CLI, "sweep", str(path), "--dry-run", "--data", str(REPO)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_report_of_the_smoke_sweep_opens_in_a_browser(smoke, tmp_path):
    results, _ = smoke
    proc = subprocess.run([*CLI, "report", "--results", str(results), "--out", str(tmp_path / "r.html")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    dom, page_errors = open_in_chromium(tmp_path / "r.html", tmp_path / "profile")
    assert 'data-images-total="5"' in dom and 'data-images-ok="5"' in dom  # FID curves + 4 best grids
    assert '<table class="groups">' in dom and "use-cmhsa-gan" in dom and "stopped_early" in dom
    assert "name: smoke" in dom  # the sweep file that produced it
    assert not page_errors, page_errors


OPTUNA_SWEEP = """
name: opt
method: optuna
num_samples: 3
data: {synthetic_count: 300}
model: {g_widths: [16, 8, 8, 8], d_widths: [8, 8, 16, 16]}
train: {kimg: 0.5, batch_size: 32}
eval: {every_kimg: 0.25, fid_samples: 64, final_fid_samples: 96, extractor: tiny-conv, grid_size: 2}
parameters:
  lr_d: {distribution: log_uniform, min: 1.0e-4, max: 8.0e-4}
  variant: {values: [dcgan, cmhsa-gan]}
  heads: {values: [1, 2], when: {variant: [cmhsa-gan]}}
scheduler: {type: asha, grace_period: 0.25, reduction_factor: 2}
"""


def test_sweep_pickles_for_optunas_searcher_state():
    """OptunaSearch pickles its search space (a bound method of the Sweep) with plain pickle."""
    import pickle

    from orchestrator.schema import load_sweep

    sweep = load_sweep(REPO / "sweeps" / "lr_ratio.yaml", data_override=str(REPO))
    restored = pickle.loads(pickle.dumps(sweep.optuna_space)).__self__
    assert restored.fingerprint() == sweep.fingerprint()


@pytest.mark.slow
def test_optuna_sweep_with_asha_runs_and_records_its_proposals(tmp_path):
    (tmp_path / "opt.yaml").write_text(OPTUNA_SWEEP)
    proc = subprocess.run([*CLI, "sweep", str(tmp_path / "opt.yaml"), "--results", str(tmp_path / "r")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = pq.read_table(tmp_path / "r" / "opt" / "trials.parquet").to_pylist()
    assert len(trials) == 3
    for t in trials:
        assert t["status"] in ("completed", "stopped_early")
        assert 1e-4 <= t["lr_d"] <= 8e-4
        assert (t["heads"] is None) == (t["variant"] == "dcgan")  # conditional parameter
