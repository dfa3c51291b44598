"""End to end on CPU: the README's main job (sweeps/smoke.yaml) through Ray Tune."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from browser import open_in_chromium

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "orchestrator.cli"]


class BackgroundSweep:
    """`orchestrator sweep` of a sweep file's text in a process of its own, started now; `trials()` waits for it."""

    def __init__(self, folder: Path, name: str, text: str):
        self.folder, self.name = folder, name
        self.results = folder / "r"
        (folder / f"{name}.yaml").write_text(text)
        self.log = folder / f"{name}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([*CLI, "sweep", str(folder / f"{name}.yaml"), "--results", str(self.results)],
                                         cwd=REPO, stdout=out, stderr=subprocess.STDOUT)

    def trials(self) -> list[dict]:
        """Wait for the sweep to end, check that it succeeded, and return its trials table."""
        try:
            self.proc.wait(timeout=900)
        finally:
            self.stop()
        assert self.proc.returncode == 0, self.log.read_text()[-3000:]
        return pq.read_table(self.results / self.name / "trials.parquet").to_pylist()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # a graceful end of its local Ray
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def side_sweeps(tmp_path_factory):
    """The small sweeps of this module's other end-to-end tests, started at once and in the background: they
    run while the smoke sweep (one trial at a time, so one core) runs, instead of after it."""
    sweeps = {name: BackgroundSweep(tmp_path_factory.mktemp(name), name, text)
              for name, text in (("pairs", FIFO_SEEDS_SWEEP), ("opt", OPTUNA_SWEEP))}
    yield sweeps
    for sweep in sweeps.values():
        sweep.stop()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, side_sweeps):
    """The README's main job, sweeps/smoke.yaml, with one change: `max_concurrent: 1`, so Tune creates each seed
    only when the one before has ended, the hardest case for per-configuration ASHA. One run serves every test
    here; tests/test_interrupt.py runs the shipped file as it is (interrupted, then resumed to `done:`).
    (`side_sweeps`: the module's other sweeps run meanwhile.)"""
    folder = tmp_path_factory.mktemp("smoke")
    text = (REPO / "sweeps" / "smoke.yaml").read_text()
    assert "max_concurrent: null" in text
    (folder / "smoke.yaml").write_text(text.replace("max_concurrent: null", "max_concurrent: 1"))
    results = folder / "results"
    proc = subprocess.run(
        [*CLI, "sweep", str(folder / "smoke.yaml"), "--results", str(results)],
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
        assert Path(trial["grid_path"]).is_file()
        # keep_checkpoints: completed (the default): a stopped trial's checkpoint went when the sweep ended.
        if trial["status"] == "completed":
            assert Path(trial["checkpoint_path"]).is_dir()
        else:
            assert trial["checkpoint_path"] is None
        # g_steps counts generator updates: wgan makes 5 critic steps (5 batches of real images) per update
        d_steps = 5 if trial["variant"] == "wgan" else 1
        assert all(r["g_steps"] * 32 * d_steps == round(r["kimg"] * 1000) for r in rows)
        if trial["status"] == "completed":
            assert trial["kimg"] >= 4 and rows[-1]["final"] and rows[-1]["fid_samples"] == 512
            assert trial["final_fid"] == rows[-1]["fid"] and trial["final_fid_samples"] == 512
        else:
            assert trial["stopped_at_kimg"] in (1.0, 2.0)
    assert [t for t in trials.values() if t["status"] == "stopped_early"], "ASHA stopped no configuration"
    assert not (sweep_dir / ".parts").exists()  # compacted when the sweep ended
    runs = [json.loads(line) for line in (sweep_dir / "provenance.jsonl").read_text().splitlines()]
    assert [r["event"] for r in runs][0] == "run" and {r["event"] for r in runs} == {"run", "node"}
    assert runs[0]["data"]["source"] == "synthetic" and runs[0]["config"]["name"] == "smoke"
    assert runs[0]["environment"]["ray"] == "2.60.0"
    columns = pq.read_schema(sweep_dir / "evaluations.parquet").names
    for column in ("sweep", "trial_id", "variant", "seed", "g_widths", "kimg", "g_steps", "fid", "is_mean",
                   "extractor", "fid_samples", "loss_d", "loss_g", "images_per_s", "wall_s", "node", "time"):
        assert column in columns


@pytest.mark.slow
def test_config_asha_stops_every_seed_of_a_configuration_at_one_rung_on_their_mean(smoke):
    """scheduler.unit: config (the smoke sweep's): seeds of a variant end alike, judged on their mean."""
    results, _ = smoke
    evals = pq.read_table(results / "smoke" / "evaluations.parquet").to_pylist()
    trials = pq.read_table(results / "smoke" / "trials.parquet").to_pylist()
    by_variant: dict[str, list[dict]] = {}
    for t in trials:
        by_variant.setdefault(t["variant"], []).append(t)
    assert all(len(seeds) == 2 for seeds in by_variant.values())
    for _variant, seeds in by_variant.items():
        assert len({(t["status"], t["stopped_at_kimg"], t["stopped_metric"]) for t in seeds}) == 1, seeds
        rung = seeds[0]["stopped_at_kimg"]
        if rung is None:
            continue
        # The mean it was judged on is the mean over its seeds of the FID each reported at that rung.
        at_rung = [min((e for e in evals if e["trial_id"] == t["trial_id"] and e["kimg"] >= rung),
                       key=lambda e: e["kimg"])["fid"] for t in seeds]
        assert seeds[0]["stopped_metric"] == pytest.approx(sum(at_rung) / len(at_rung))
    assert any(seeds[0]["status"] == "stopped_early" for seeds in by_variant.values())
    assert any(seeds[0]["status"] == "completed" for seeds in by_variant.values())


@pytest.mark.slow
def test_config_asha_with_max_concurrent_1_decides_on_every_seed(smoke):
    """Every decision waits for both seeds of a variant, though the second is created only after the first
    ended: each cut's stopped_metric is the mean over all of the variant's seeds at the rung."""
    sweep_dir = smoke[0] / "smoke"
    evals = pq.read_table(sweep_dir / "evaluations.parquet").to_pylist()
    trials = pq.read_table(sweep_dir / "trials.parquet").to_pylist()
    assert len(trials) == 6 and {t["status"] for t in trials} <= {"completed", "stopped_early"}
    cut = [t for t in trials if t["status"] == "stopped_early"]
    assert cut, "ASHA cut no configuration"
    for t in cut:
        seeds = [s for s in trials if s["variant"] == t["variant"]]
        assert len(seeds) == 2
        at_rung = [min((e for e in evals if e["trial_id"] == s["trial_id"] and e["kimg"] >= t["stopped_at_kimg"]),
                       key=lambda e: e["kimg"])["fid"] for s in seeds]
        assert t["stopped_metric"] == pytest.approx(sum(at_rung) / 2)
    state = json.loads((sweep_dir / "scheduler.json").read_text())
    decisions = [d for rungs in state["decisions"].values() for d in rungs.values()]
    assert decisions and all(len(d["seeds"]) == 2 and d["decision"] in ("continue", "stop") for d in decisions)
    assert {t["device_used"] for t in trials} == {"cpu"}  # gpu: 0 means the CPU, and it is recorded


@pytest.mark.slow
def test_leaderboard_ranks_final_fids_of_completed_trials_only(smoke, orchestrator_cli):
    results, _ = smoke
    trials = {t["trial_id"]: t for t in pq.read_table(results / "smoke" / "trials.parquet").to_pylist()}
    proc = orchestrator_cli("leaderboard", "--results", results, "--format", "json", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    completed = sorted((t for t in trials.values() if t["status"] == "completed"), key=lambda t: t["final_fid"])
    assert [r["trial_id"] for r in rows if r["rank"] is not None] == [t["trial_id"] for t in completed]
    assert {r["trial_id"] for r in rows if r["rank"] is None} == set(trials) - {t["trial_id"] for t in completed}
    assert all(r["fid_samples"] == 512 and r["fid_kimg"] == 4.0 for r in rows if r["rank"] is not None)

    proc = orchestrator_cli("leaderboard", "--results", results, "--group-by", "variant", "--format", "json", cwd=REPO)
    groups = {g["variant"]: g for g in json.loads(proc.stdout)}
    assert set(groups) == {"dcgan", "use-cmhsa-gan", "wgan"}  # culled variants still appear
    for variant, group in groups.items():
        finals = [t["final_fid"] for t in trials.values() if t["variant"] == variant and t["status"] == "completed"]
        assert group["n"] == 2 and group["n_completed"] == len(finals)
        if finals:
            assert group["final_fid_mean"] == pytest.approx(sum(finals) / len(finals))
        else:
            assert group["final_fid_mean"] is None and group["stopped_at_kimg"] in (1.0, 2.0)
    ranked = [g["variant"] for g in json.loads(proc.stdout)]
    assert ranked[0] in [v for v, g in groups.items() if g["final_fid_mean"] is not None]


@pytest.mark.slow
def test_readme_headline_commands_and_at_kimg_on_the_smoke_sweep(smoke, orchestrator_cli):
    results, _ = smoke
    # The README's command:
    proc = orchestrator_cli("leaderboard", "--results", results, "--group-by", "variant", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "final FID at 4 kimg, 512 generated images" in proc.stdout and "use-cmhsa-gan" in proc.stdout
    proc = orchestrator_cli("leaderboard", "--results", results, "--at-kimg", "1", "--format", "json", cwd=REPO)
    rows = json.loads(proc.stdout)
    assert all(r["rank"] is not None and r["fid_samples"] == 256 and 1.0 <= r["kimg"] < 1.5 for r in rows)
    assert len(rows) == 6  # every trial reached the first rung


FIFO_SEEDS_SWEEP = """
name: pairs
data: {synthetic_count: 300}
model: {g_widths: [16, 8, 8, 8], d_widths: [8, 8, 16, 16]}
train: {kimg: 0.5, batch_size: 32}
eval: {every_kimg: 0.5, fid_samples: 64, final_fid_samples: 96, extractor: tiny-conv, grid_size: 2}
parameters:
  variant: {values: [dcgan, use-gan]}
  seed: {values: [0, 1, 2]}
scheduler: {type: fifo}
"""


@pytest.mark.slow
def test_baseline_difference_is_scipys_paired_t_test_over_the_seeds(side_sweeps, orchestrator_cli):
    from scipy import stats

    trials = side_sweeps["pairs"].trials()
    results = side_sweeps["pairs"].results
    assert sorted(t["seed"] for t in trials) == [0, 0, 1, 1, 2, 2]
    assert all(t["status"] == "completed" for t in trials)
    final = {(t["variant"], t["seed"]): t["final_fid"] for t in trials}
    dcgan = [final["dcgan", s] for s in range(3)]
    use = [final["use-gan", s] for s in range(3)]
    proc = orchestrator_cli("leaderboard", "--results", results, "--group-by", "variant",
                            "--baseline", "variant=dcgan", "--format", "json", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    groups = {g["variant"]: g for g in json.loads(proc.stdout)}
    expected = stats.ttest_rel(use, dcgan)
    assert groups["use-gan"]["test"] == "paired t"
    assert groups["use-gan"]["p_value"] == pytest.approx(expected.pvalue)
    assert groups["use-gan"]["diff_fid"] == pytest.approx(sum(use) / 3 - sum(dcgan) / 3)
    low, high = expected.confidence_interval(0.95)
    assert (groups["use-gan"]["diff_ci95_low"], groups["use-gan"]["diff_ci95_high"]) == pytest.approx((low, high))
    mean, half = groups["dcgan"]["final_fid_mean"], groups["dcgan"]["final_fid_ci95"]
    assert (mean - half, mean + half) == pytest.approx(
        stats.t.interval(0.95, 2, loc=sum(dcgan) / 3, scale=stats.sem(dcgan)))
    for fmt in ("markdown", "latex", "csv"):
        proc = orchestrator_cli("leaderboard", "--results", results, "--group-by", "variant",
                                "--baseline", "variant=dcgan", "--format", fmt, cwd=REPO)
        assert proc.returncode == 0 and "use-gan" in proc.stdout, proc.stderr


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
    assert "scheduler: asha, unit config" in out and "seed (effective)" in out


@pytest.mark.parametrize("path", sorted((REPO / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweeps_dry_run(path, orchestrator_cli):
    proc = orchestrator_cli("sweep", path, "--dry-run", "--data", REPO, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_report_of_the_smoke_sweep_opens_in_a_browser(smoke, tmp_path, orchestrator_cli):
    results, _ = smoke
    proc = orchestrator_cli("report", "--results", results, "--out", tmp_path / "r.html", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    dom, page_errors = open_in_chromium(tmp_path / "r.html", tmp_path / "profile")
    completed = sum(t["status"] == "completed" for t in pq.read_table(results / "smoke" / "trials.parquet").to_pylist())
    images = 1 + min(4, completed)  # FID curves + the grids of the best 4 ranked (completed) trials
    assert f'data-images-total="{images}"' in dom and f'data-images-ok="{images}"' in dom
    assert '<table class="groups">' in dom and "use-cmhsa-gan" in dom and "stopped_early" in dom
    assert "final FID at 4 kimg, 512 generated images" in dom
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

    from orchestrator.sweepfile.loading import load_sweep

    sweep = load_sweep(REPO / "sweeps" / "lr_ratio.yaml", data_override=str(REPO))
    restored = pickle.loads(pickle.dumps(sweep.optuna_space)).__self__
    assert restored.fingerprint() == sweep.fingerprint()


@pytest.mark.slow
def test_optuna_sweep_with_asha_runs_and_records_its_proposals(side_sweeps):
    trials = side_sweeps["opt"].trials()
    assert len(trials) == 3
    for t in trials:
        assert t["status"] in ("completed", "stopped_early")
        assert 1e-4 <= t["lr_d"] <= 8e-4
        assert (t["heads"] is None) == (t["variant"] == "dcgan")  # conditional parameter
