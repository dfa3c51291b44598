"""Explore, then confirm, end to end on CPU: the smoke sweep (per-configuration ASHA) with a smaller budget, then
`--resume` with `confirm: {top: 1, include: [{variant: wgan}], seeds: 2}` continues into its confirm stage."""
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "orchestrator.cli"]
CONFIRM = "confirm: {top: 1, include: [{variant: wgan}], seeds: 2}\n"


def run_cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def smoke_text() -> str:
    """sweeps/smoke.yaml at half the budget and smaller FIDs: the same grid, ASHA per configuration."""
    text = (REPO / "sweeps" / "smoke.yaml").read_text()
    for old, new in (("  kimg: 4 ", "  kimg: 2 "), ("  max_t: 4 ", "  max_t: 2 "),
                     ("  synthetic_count: 2000", "  synthetic_count: 600"), ("  fid_samples: 256", "  fid_samples: 64"),
                     ("  final_fid_samples: 512", "  final_fid_samples: 128")):
        assert old in text
        text = text.replace(old, new)
    return text


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory):
    """The first stage alone, then `--resume` of the same sweep with a confirm: section (which is not part of
    the first stage's fingerprint): the resume finds the first stage finished and runs the confirm stage."""
    folder = tmp_path_factory.mktemp("confirm")
    file, results = folder / "smoke.yaml", folder / "results"
    file.write_text(smoke_text())
    first = run_cli("sweep", str(file), "--results", str(results))
    assert first.returncode == 0, first.stderr[-3000:]
    file.write_text(smoke_text() + CONFIRM)
    second = run_cli("sweep", str(file), "--results", str(results), "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    return results, second.stdout


def table(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


@pytest.mark.slow
def test_resume_between_the_stages_runs_the_confirm_stage_on_fresh_seeds(two_stages):
    results, stdout = two_stages
    assert "sweep smoke: finished; continuing with its confirm stage smoke-confirm" in stdout
    first = table(results / "smoke" / "trials.parquet")
    confirm = table(results / "smoke-confirm" / "trials.parquet")
    assert {t["seed"] for t in first} == {0, 1} and {t["seed"] for t in confirm} == {2, 3}
    assert all(t["status"] == "completed" and t["final_fid"] is not None for t in confirm)
    selection = json.loads((results / "smoke-confirm" / "selection.json").read_text())
    chosen = {c["configuration"]["variant"] for c in selection["candidates"] if c["chosen"]}
    assert chosen == {t["variant"] for t in confirm} and "wgan" in chosen
    assert len(confirm) == 2 * len(chosen)  # every chosen configuration on both fresh seeds, FIFO: all completed
    assert "paper table (fresh seeds): orchestrator leaderboard --results" in stdout


@pytest.mark.slow
def test_selection_names_the_leader_the_first_stages_leaderboard_ranks_first(two_stages):
    """The leaderboard (independent of the selection code) ranks the first stage's variants on the median final
    FID of completed and diverged seeds: its rank 1 is the configuration selection.json chose as top 1."""
    results, _ = two_stages
    board = run_cli("leaderboard", "--results", str(results), "--sweep", "smoke", "--group-by", "variant",
                    "--format", "json")
    assert board.returncode == 0, board.stderr
    leader = next(g["variant"] for g in json.loads(board.stdout) if g["rank"] == 1)
    selection = json.loads((results / "smoke-confirm" / "selection.json").read_text())
    top = [c for c in selection["candidates"] if c["why"] and "top 1" in c["why"]]
    assert [c["configuration"]["variant"] for c in top] == [leader] and top[0]["tier"] == "completed"
    assert selection["first_stage_fingerprint"] == (results / "smoke" / "fingerprint").read_text().strip()
    assert selection["seeds"] == [2, 3] and selection["kimg"] == 2.0


@pytest.mark.slow
def test_leaderboard_and_report_default_to_the_confirm_stage(two_stages):
    results, _ = two_stages
    board = run_cli("leaderboard", "--results", str(results), "--group-by", "variant", "--format", "json")
    assert board.returncode == 0 and "showing the confirm stage smoke-confirm" in board.stderr
    assert {g["variant"] for g in json.loads(board.stdout)} == {
        t["variant"] for t in table(results / "smoke-confirm" / "trials.parquet")}
    report = run_cli("report", "--results", str(results), "--sweep", "smoke")
    assert report.returncode == 0, report.stderr
    html = (results / "smoke" / "report.html").read_text()
    assert "Confirm stage" in html and "../smoke-confirm/report.html" in html


@pytest.mark.slow
def test_a_changed_selection_cannot_resume_the_confirm_stage_and_nothing_is_overwritten(two_stages):
    results, _ = two_stages
    before = (results / "smoke-confirm" / "selection.json").read_text()
    again = run_cli("confirm", "--results", str(results), "--sweep", "smoke", "--top", "2", "--resume")
    assert again.returncode == 2 and "can't resume this confirm stage: the selection changed" in again.stderr
    fresh = run_cli("confirm", "--results", str(results), "--sweep", "smoke")  # the same selection, not resumed
    assert fresh.returncode == 2 and "already ran here; pass --resume" in fresh.stderr
    assert "Traceback" not in again.stderr + fresh.stderr
    assert (results / "smoke-confirm" / "selection.json").read_text() == before
