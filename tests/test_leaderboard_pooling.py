"""Groups never average over configurations silently, never rank without a number, and a baseline that lacks a
parameter (dcgan has no heads) is compared with every value of it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from scipy import stats

from orchestrator.analysis.formats import sections
from orchestrator.analysis.leaderboard import LeaderboardError, build_board
from orchestrator.store.tables import ResultsWriter

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "orchestrator.cli"]  # tests/test_leaderboard_save.py: a process of its own
PARAMS = ["g_widths", "heads", "seed", "variant"]
SWEEP_YAML = ("name: s\ntrain: {kimg: 4}\n"
              "eval: {every_kimg: 1, fid_samples: 256, final_fid_samples: 512, extractor: tiny-conv}\n")


def write(tmp_path: Path, trials: list[dict], evaluations: list[dict] = (), sweep_yaml: str = SWEEP_YAML) -> Path:
    """A sweep directory as `orchestrator sweep` leaves it; trials default to completed at the 4-kimg budget."""
    sweep_dir = tmp_path / "results" / "s"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "fingerprint").write_text("f00d\n")
    (sweep_dir / "sweep.yaml").write_text(sweep_yaml)
    writer = ResultsWriter(sweep_dir, "s", PARAMS)
    for e in evaluations:
        writer.add_evaluation({"g_widths": "8-8", "extractor": "tiny-conv", "fid_samples": 256, "final": False, **e})
    for t in trials:
        row = {"g_widths": "8-8", "heads": None, "status": "completed", "extractor": "tiny-conv", "kimg": 4.0,
               "kimg_budget": 4.0, "evaluations": 1, **t}
        if row["status"] == "completed":
            row.setdefault("final_fid_samples", 512)
        writer.update_trial(row.pop("trial_id"), **row)
    writer.close()
    return sweep_dir


def t(variant: str, seed: int, fid: float | None, heads: int | None = None, status: str = "completed", **extra):
    return {"trial_id": f"{variant}-{heads}-{seed}", "variant": variant, "heads": heads, "seed": seed,
            "status": status, "final_fid": fid, "final_is": None if fid is None else 2.0, **extra}


DCGAN = [30.0, 31.0, 32.0]
HEADS = {1: [27.0, 28.5, 29.0], 2: [33.0, 31.5, 35.0], 4: [30.0, 30.5, 29.5]}


def heads_sweep(tmp_path: Path) -> Path:
    """sweeps/heads.yaml in small: dcgan (no heads) and cmhsa-gan at three heads settings, 3 seeds each."""
    return write(tmp_path, [t("dcgan", s, f) for s, f in enumerate(DCGAN)] +
                 [t("cmhsa-gan", s, f, heads=h) for h, fids in HEADS.items() for s, f in enumerate(fids)])


def by_key(board, *columns) -> dict:
    return {tuple(r[c] for c in columns): r for r in board.rows}


# ---- no silent pooling --------------------------------------------------------------------------------


def test_a_group_holding_several_configurations_has_no_mean_rank_or_test(tmp_path):
    board = build_board(heads_sweep(tmp_path), group_by=["variant"], baseline="variant=dcgan")
    g = by_key(board, "variant")
    cmhsa, dcgan = g[("cmhsa-gan",)], g[("dcgan",)]
    assert (cmhsa["n_configs"], cmhsa["pooled_over"]) == (3, "heads")
    assert (dcgan["n_configs"], dcgan["pooled_over"]) == (1, None)  # heads null on every dcgan trial
    for field in ("final_fid_mean", "final_fid_ci95", "final_fid_median", "final_is_mean", "diff_fid", "p_value"):
        assert cmhsa[field] is None, field
    assert cmhsa["rank"] is None and "add heads to --group-by" in cmhsa["unranked_reason"]
    assert "mixes 3 configurations" in cmhsa["no_comparison_reason"]
    assert (cmhsa["n"], cmhsa["n_measured"], cmhsa["n_completed"]) == (9, 9, 9)  # counts stay
    assert [r["variant"] for r in board.rows] == ["dcgan", "cmhsa-gan"]  # the group with a number first
    assert dcgan["rank"] == 1
    # The table marks the row and says why in one cell.
    table = sections(board, ["variant"], PARAMS)[0]
    assert "configurations" in table.headers
    row = next(r for r in table.rows if r[1] == "cmhsa-gan")
    assert "3 (heads)" in row and any(c.startswith("unranked: mixes 3 configurations") for c in row)


def test_pool_averages_over_configurations_and_marks_the_row(tmp_path):
    board = build_board(heads_sweep(tmp_path), group_by=["variant"], baseline="variant=dcgan", pool=True)
    cmhsa = by_key(board, "variant")[("cmhsa-gan",)]
    pooled = [f for fids in HEADS.values() for f in fids]
    assert cmhsa["final_fid_mean"] == pytest.approx(sum(pooled) / len(pooled))
    assert cmhsa["rank"] is not None and cmhsa["pooled_over"] == "heads"
    # 9 pooled trials against 3 dcgan seeds: no pairs, so Welch's test.
    assert cmhsa["test"] == "Welch t"
    assert cmhsa["p_value"] == pytest.approx(stats.ttest_ind(pooled, DCGAN, equal_var=False).pvalue)
    assert "averaged over them (--pool)" in sections(board, ["variant"], PARAMS)[0].title
    assert any("--pool" in w for w in board.warnings)


def test_when_every_group_pools_the_refusal_is_one_line_naming_the_parameters(tmp_path, orchestrator_cli):
    sweep_dir = heads_sweep(tmp_path)
    with pytest.raises(LeaderboardError) as err:
        build_board(sweep_dir, group_by=["g_widths"])  # one width: the single group holds every configuration
    message = str(err.value)
    assert "heads, variant" in message and "--group-by g_widths,heads,variant" in message and "--pool" in message
    assert build_board(sweep_dir, group_by=["g_widths"], pool=True).rows[0]["n_configs"] == 4
    proc = orchestrator_cli("leaderboard", "--results", tmp_path / "results", "--group-by", "g_widths", cwd=REPO)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--group-by g_widths,heads,variant" in proc.stderr
    proc = orchestrator_cli("leaderboard", "--results", tmp_path / "results", "--group-by", "g_widths",
                            "--pool", "--format", "json", cwd=REPO)
    assert proc.returncode == 0 and json.loads(proc.stdout)[0]["pooled_over"] == "heads, variant"
    assert "warning: --pool: 1 group(s) average over several configurations" in proc.stderr


def test_seed_and_repeat_are_replicates_not_configurations(tmp_path):
    sweep_dir = write(tmp_path, [t("a", s, 30.0 + s) for s in range(3)] + [t("b", s, 20.0 + s) for s in range(3)])
    board = build_board(sweep_dir, group_by=["variant"])
    assert all(r["n_configs"] == 1 and r["pooled_over"] is None for r in board.rows)


def test_pool_needs_group_by(tmp_path):
    with pytest.raises(LeaderboardError, match="--pool needs --group-by"):
        build_board(heads_sweep(tmp_path), pool=True)


# ---- conditional baselines ------------------------------------------------------------------------------


def test_a_baseline_without_the_parameter_is_compared_with_every_value_of_it(tmp_path):
    from statsmodels.stats.multitest import multipletests

    board = build_board(heads_sweep(tmp_path), group_by=["variant", "heads"], baseline="variant=dcgan")
    g = by_key(board, "variant", "heads")
    assert g[("dcgan", None)]["is_baseline"] and g[("dcgan", None)]["no_comparison_reason"] == "the baseline"
    raw = []
    for heads, fids in HEADS.items():
        row = g[("cmhsa-gan", heads)]
        expected = stats.ttest_rel(fids, DCGAN)  # same seeds and widths: paired
        assert row["test"] == "paired t" and row["p_value"] == pytest.approx(expected.pvalue)
        assert row["diff_fid"] == pytest.approx(sum(fids) / 3 - sum(DCGAN) / 3)
        assert row["no_comparison_reason"] is None
        raw.append(row["p_value"])
    # One family: the three heads settings against dcgan, Holm-adjusted together.
    assert [g[("cmhsa-gan", h)]["p_holm"] for h in HEADS] == pytest.approx(list(multipletests(raw, method="holm")[1]))
    table = sections(board, ["variant", "heads"], PARAMS)[0]
    assert "3 comparisons with variant=dcgan, Holm-adjusted" in table.title


def test_an_exact_baseline_wins_over_one_matching_through_a_null(tmp_path):
    # The baseline variant ran with heads 1 too: heads=1 is compared with it, heads=2 with the heads-less runs.
    sweep_dir = write(tmp_path, [t("base", s, 30.0 + s) for s in range(2)] +
                      [t("base", s, 10.0 + s, heads=1) for s in range(2)] +
                      [t("x", s, 20.0 + s, heads=h) for h in (1, 2) for s in range(2)])
    g = by_key(build_board(sweep_dir, group_by=["variant", "heads"], baseline="variant=base"), "variant", "heads")
    assert g[("x", 1)]["diff_fid"] == pytest.approx(10.0)
    assert g[("x", 2)]["diff_fid"] == pytest.approx(-10.0)


def test_a_row_without_a_comparison_says_why(tmp_path):
    sweep_dir = write(tmp_path, [t("base", s, 30.0 + s, heads=1) for s in range(2)] + [t("x", 0, 20.0, heads=1)] +
                      [t("x", s, 25.0 + s, heads=2) for s in range(2)])
    board = build_board(sweep_dir, group_by=["variant", "heads"], baseline="variant=base")
    g = by_key(board, "variant", "heads")
    assert g[("x", 1)]["test"] == "n < 2" and "1 measured trial(s) here, 2 in the baseline" in \
        g[("x", 1)]["no_comparison_reason"]
    assert g[("x", 2)]["no_comparison_reason"] == "no variant=base group with heads=2"
    cells = {(r[1], r[2]): r for r in sections(board, ["variant", "heads"], PARAMS)[0].rows}
    assert cells[("x", "2")][-1] == "no variant=base group with heads=2"


# ---- ranks only for numbers -------------------------------------------------------------------------------


def test_only_groups_with_a_finite_key_on_two_trials_are_ranked_and_they_come_first(tmp_path, orchestrator_cli):
    sweep_dir = write(tmp_path, [
        t("two", 0, 30.0), t("two", 1, 32.0),
        t("one", 0, 10.0),  # best number, on one trial
        t("culled", 0, None, status="stopped_early", stopped_at_kimg=1.0, stopped_metric=50.0),
        t("culled", 1, None, status="stopped_early", stopped_at_kimg=1.0, stopped_metric=50.0),
        t("lost", 0, None, status="diverged"), t("lost", 1, 20.0),
    ])
    rows = build_board(sweep_dir, group_by=["variant"]).rows
    assert [(r["variant"], r["rank"]) for r in rows] == [("two", 1), ("one", None), ("lost", None), ("culled", None)]
    reasons = {r["variant"]: r["unranked_reason"] for r in rows}
    assert "rests on 1 trial" in reasons["one"] and "diverged on 1 of 2" in reasons["lost"]
    assert reasons["culled"] == "no measured or diverged trial"
    proc = orchestrator_cli("leaderboard", "--results", tmp_path / "results", "--group-by", "variant",
                            "--format", "json", cwd=REPO)
    assert [r["rank"] for r in json.loads(proc.stdout)] == [1, None, None, None]
