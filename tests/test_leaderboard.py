"""The leaderboard's statistics against scipy.stats, on tables written by the project's own ResultsWriter.

Real sweeps check the same rules end to end (tests/test_sweep_e2e.py); these cover the cases a tiny
sweep cannot choose: n = 1, 2, 3, unequal groups, unpaired seeds, mixed extractors and sample counts.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from orchestrator.analysis.formats import as_latex, as_markdown, sections
from orchestrator.analysis.leaderboard import LeaderboardError, build_board, mean_ci
from orchestrator.store.tables import ResultsWriter

REPO = Path(__file__).resolve().parents[1]


def write_sweep(tmp_path: Path, trials: list[dict], evaluations: list[dict] = (), every_kimg: float = 20) -> Path:
    sweep_dir = tmp_path / "results" / "s"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "fingerprint").write_text("x\n")
    (sweep_dir / "sweep.yaml").write_text(f"name: s\neval: {{every_kimg: {every_kimg}}}\n")
    writer = ResultsWriter(sweep_dir, "s", ["g_widths", "seed", "variant"])
    for e in evaluations:
        writer.add_evaluation({"g_widths": "8-8-8-8", "extractor": "tiny-conv", "fid_samples": 64, **e})
    for i, t in enumerate(trials):
        row = {"g_widths": "8-8-8-8", "status": "completed", "extractor": "tiny-conv", "kimg": 4.0,
               "kimg_budget": 4.0, "final_fid_samples": 512, "evaluations": 1, **t}
        if row["status"] == "completed" and "final_fid" not in t:
            raise ValueError("a completed trial needs its final_fid")
        writer.update_trial(t.get("trial_id", f"t{i}"), **{k: v for k, v in row.items() if k != "trial_id"})
    writer.close()
    return sweep_dir


def trial(variant: str, seed: int, fid: float | None, status: str = "completed", **extra) -> dict:
    return {"trial_id": f"{variant}-{seed}", "variant": variant, "seed": seed, "status": status,
            "final_fid": fid, "final_is": None if fid is None else 1.0 + fid / 100, **extra}


def groups(board) -> dict:
    return {r["variant"]: r for r in board.rows}


def test_mean_and_ci_match_scipy_for_n_1_2_3():
    assert mean_ci([]) == (None, None)
    assert mean_ci([4.0]) == (4.0, None)
    for values in ([3.0, 5.0], [10.0, 12.0, 17.0]):
        mean, half = mean_ci(values)
        low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
        assert mean == pytest.approx(np.mean(values))
        assert (mean - half, mean + half) == pytest.approx((low, high))


def test_groups_rank_on_final_fid_of_completed_trials_only(tmp_path):
    sweep_dir = write_sweep(tmp_path, [
        trial("a", 0, 30.0), trial("a", 1, 34.0), trial("a", 2, 29.0),
        trial("b", 0, 20.0), trial("b", 1, None, "stopped_early", kimg=1.0, stopped_at_kimg=1.0, stopped_metric=50.0),
        trial("c", 0, None, "diverged", kimg=0.5, reason="non-finite loss"),
        trial("c", 1, None, "error", kimg=0.0, reason="boom"),
    ])
    board = build_board(sweep_dir, group_by=["variant"])
    g = groups(board)
    # b's single completed trial has the best FID, but a rank needs a key resting on at least 2 trials.
    assert [(r["variant"], r["rank"]) for r in board.rows] == [("a", 1), ("b", None), ("c", None)]
    assert "rests on 1 trial" in g["b"]["unranked_reason"] and g["b"]["final_fid_median"] == 20.0
    assert g["a"]["final_fid_mean"] == pytest.approx(31.0)
    assert g["a"]["final_fid_ci95"] == pytest.approx(mean_ci([30.0, 34.0, 29.0])[1])
    assert g["b"]["final_fid_mean"] == 20.0 and g["b"]["final_fid_ci95"] is None  # n = 1: no interval
    assert (g["b"]["n"], g["b"]["n_completed"], g["b"]["n_stopped_early"]) == (2, 1, 1)
    # A group in which nothing completed still appears, with its failures counted and no mean.
    assert g["c"]["final_fid_mean"] is None and (g["c"]["n_diverged"], g["c"]["n_error"]) == (1, 1)
    assert all(r["fid_kimg"] == 4.0 and r["fid_samples"] == 512 for r in board.rows)


def test_trials_ranking_lists_failures_after_the_ranked_trials(tmp_path):
    sweep_dir = write_sweep(tmp_path, [trial("a", 0, 30.0), trial("a", 1, 25.0),
                                       trial("b", 0, None, "stopped_early", kimg=1.0, stopped_at_kimg=1.0,
                                             stopped_metric=40.0)])
    rows = build_board(sweep_dir).rows
    assert [(r["rank"], r["trial_id"]) for r in rows] == [(1, "a-1"), (2, "a-0"), (None, "b-0")]
    assert rows[2]["status"] == "stopped_early" and rows[2]["stopped_at_kimg"] == 1.0
    assert build_board(sweep_dir, top=1).rows[0]["trial_id"] == "a-1"
    assert [r["rank"] for r in build_board(sweep_dir, top=1).rows] == [1, None]


def test_paired_baseline_matches_scipys_paired_t_test(tmp_path):
    a, b = [30.0, 34.0, 29.0], [26.0, 31.0, 27.5]
    sweep_dir = write_sweep(tmp_path, [trial("a", s, f) for s, f in enumerate(a)] +
                            [trial("b", s, f) for s, f in enumerate(b)])
    g = groups(build_board(sweep_dir, group_by=["variant"], baseline="variant=a"))
    expected = stats.ttest_rel(b, a)
    low, high = expected.confidence_interval(0.95)
    assert g["b"]["test"] == "paired t"
    assert g["b"]["diff_fid"] == pytest.approx(np.mean(np.subtract(b, a)))
    assert g["b"]["p_value"] == pytest.approx(expected.pvalue)
    assert (g["b"]["diff_ci95_low"], g["b"]["diff_ci95_high"]) == pytest.approx((low, high))
    assert g["a"]["is_baseline"] and g["a"]["diff_fid"] is None


def test_unequal_or_unpaired_groups_use_welchs_t_test(tmp_path):
    a, b = [30.0, 34.0, 29.0, 31.0], [26.0, 31.0]  # b ran seeds 5 and 6: no pairs
    sweep_dir = write_sweep(tmp_path, [trial("a", s, f) for s, f in enumerate(a)] +
                            [trial("b", s + 5, f) for s, f in enumerate(b)])
    g = groups(build_board(sweep_dir, group_by=["variant"], baseline="variant=a"))
    expected = stats.ttest_ind(b, a, equal_var=False)
    assert g["b"]["test"] == "Welch t"
    assert g["b"]["diff_fid"] == pytest.approx(np.mean(b) - np.mean(a))
    assert g["b"]["p_value"] == pytest.approx(expected.pvalue)
    assert (g["b"]["diff_ci95_low"], g["b"]["diff_ci95_high"]) == pytest.approx(expected.confidence_interval(0.95))


def test_a_baseline_needs_two_measured_trials_per_side(tmp_path):
    sweep_dir = write_sweep(tmp_path, [trial("a", 0, 30.0), trial("a", 1, 31.0), trial("b", 0, 20.0)])
    g = groups(build_board(sweep_dir, group_by=["variant"], baseline="variant=a"))
    assert g["b"]["diff_fid"] is None and g["b"]["test"] == "n < 2"


@pytest.mark.parametrize(
    "bad, message",
    [
        ("variant", "expected KEY=VALUE"),
        ("seed=0", "not a --group-by column"),
        ("variant=zzz", "no trial has variant=zzz"),
    ],
)
def test_bad_baseline_is_one_line(tmp_path, bad, message):
    sweep_dir = write_sweep(tmp_path, [trial("a", 0, 30.0)])
    with pytest.raises(LeaderboardError, match=message):
        build_board(sweep_dir, group_by=["variant"], baseline=bad)


def test_numbers_measured_differently_are_never_pooled(tmp_path):
    sweep_dir = write_sweep(
        tmp_path,
        [
            trial("a", 0, 30.0),
            trial("a", 1, 31.0, extractor="inception-v3-compat"),
            trial("a", 2, 32.0, final_fid_samples=10000),
        ],
    )
    board = build_board(sweep_dir, group_by=["variant"])
    blocks = {(r["extractor"], r["fid_samples"]): r["final_fid_mean"] for r in board.rows}
    assert blocks == {("tiny-conv", 512): 30.0, ("inception-v3-compat", 512): 31.0, ("tiny-conv", 10000): 32.0}
    ranked = [r for r in build_board(sweep_dir).rows if r["rank"] is not None]
    assert [r["rank"] for r in ranked] == [1, 1, 1]  # three rankings of one trial each


def test_at_kimg_compares_the_evaluation_at_that_kimg(tmp_path):
    evaluations = [
        {"trial_id": "a-0", "kimg": 0.512, "fid": 50.0},
        {"trial_id": "a-0", "kimg": 1.024, "fid": 40.0},
        {"trial_id": "a-1", "kimg": 0.512, "fid": 52.0},
        {"trial_id": "a-1", "kimg": 1.024, "fid": 41.0},
        {"trial_id": "b-0", "kimg": 0.512, "fid": 45.0},  # culled at 0.5: never at 1 kimg
        {"trial_id": "b-1", "kimg": 0.512, "fid": 47.0},
        {"trial_id": "b-1", "kimg": 1.024, "fid": 30.0},
    ]
    sweep_dir = write_sweep(
        tmp_path,
        [
            trial("a", 0, 30.0),
            trial("a", 1, 31.0),
            trial("b", 0, None, "stopped_early", kimg=0.512, stopped_at_kimg=0.5, stopped_metric=46.0),
            # a seed of b that ran past the rung where its configuration was culled does not count at 1 kimg
            trial("b", 1, None, "stopped_early", kimg=1.024, stopped_at_kimg=0.5, stopped_metric=46.0),
        ],
        evaluations,
        every_kimg=0.5,
    )
    g = groups(build_board(sweep_dir, group_by=["variant"], at_kimg=0.5))
    assert g["a"]["fid_mean"] == pytest.approx(51.0) and g["b"]["fid_mean"] == pytest.approx(46.0)
    assert g["a"]["fid_samples"] == 64 and g["a"]["fid_kimg"] == 0.5
    g = groups(build_board(sweep_dir, group_by=["variant"], at_kimg=1.0))
    assert g["a"]["fid_mean"] == pytest.approx(40.5) and g["b"]["fid_mean"] is None
    assert g["b"]["stopped_at_kimg"] == 0.5
    with pytest.raises(LeaderboardError, match="no trial has an evaluation at 3 kimg"):
        build_board(sweep_dir, at_kimg=3.0)


def test_partial_sweep_is_flagged(tmp_path):
    sweep_dir = write_sweep(
        tmp_path,
        [
            trial("a", 0, 30.0),
            trial("a", 1, None, "interrupted", kimg=1.0),
            trial("a", 2, None, "pending", kimg=0.0, evaluations=0),
        ],
    )
    board = build_board(sweep_dir, group_by=["variant"])
    assert "2 of 3 trials unfinished" in board.partial_note
    assert board.rows[0]["n_unfinished"] == 2


def test_markdown_and_latex_tables_say_what_the_fid_is(tmp_path):
    sweep_dir = write_sweep(
        tmp_path, [trial("a_1", 0, 30.0), trial("a_1", 1, 31.0), trial("b", 0, 20.0), trial("b", 1, 22.0)]
    )
    board = build_board(sweep_dir, group_by=["variant"], baseline="variant=a_1")
    secs = sections(board, ["variant"], ["g_widths", "seed", "variant"])
    md = as_markdown(secs, None)
    assert "final FID at 4 kimg, 512 generated images" in md and "| b | 2 |" in md and "paired t" in md
    tex = as_latex(secs, None)
    assert r"\begin{tabular}" in tex and r"a\_1" in tex and r"$\pm$" in tex and "\\toprule" in tex


@pytest.mark.parametrize("fmt", ["table", "json", "csv", "markdown", "latex"])
def test_every_format_runs_from_the_command_line(tmp_path, fmt, orchestrator_cli):
    write_sweep(tmp_path, [trial("a", 0, 30.0), trial("a", 1, 31.0), trial("b", 0, 20.0), trial("b", 1, 22.0)])
    proc = orchestrator_cli("leaderboard", "--results", tmp_path / "results", "--group-by", "variant",
                            "--baseline", "variant=a", "--format", fmt, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "b" in proc.stdout and "30.50" in proc.stdout or fmt in ("json", "csv")
    if fmt == "json":
        rows = json.loads(proc.stdout)
        assert [r["variant"] for r in rows] == ["b", "a"] and rows[0]["test"] == "paired t"


def test_bad_leaderboard_flags_exit_2_with_one_line(tmp_path, orchestrator_cli):
    write_sweep(tmp_path, [trial("a", 0, 30.0)])
    for flags, needle in (
        (["--baseline", "variant=a"], "--baseline needs --group-by"),
        (["--at-kimg", "-1"], "must be a number > 0"),
        (["--group-by", "nope"], "unknown column"),
    ):
        proc = orchestrator_cli("leaderboard", "--results", tmp_path / "results", *flags, cwd=REPO)
        assert proc.returncode == 2 and needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (
            proc.stderr
        )


# ---- the failure policy -------------------------------------------------------------------------------


def _no_non_finite(text: str) -> None:
    lowered = text.lower()
    assert "nan" not in lowered.replace("nanos", "") and "infinity" not in lowered and " inf" not in lowered


def test_a_group_with_most_seeds_diverged_is_never_ranked_on_its_survivor(tmp_path):
    """Survivor bias: a's one survivor (20) beats b, but 2 of its 3 seeds diverged: its key is +inf."""
    sweep_dir = write_sweep(
        tmp_path,
        [
            trial("a", 0, 20.0),
            trial("a", 1, None, "diverged", kimg=1.0, reason="non-finite loss"),
            trial("a", 2, None, "diverged", kimg=2.0, reason="non-finite loss"),
            trial("b", 0, 30.0),
            trial("b", 1, 31.0),
            trial("b", 2, 32.0),
            trial("c", 0, 22.0),
            trial("c", 1, None, "diverged", kimg=1.0),
            trial("c", 2, 26.0),
            trial("d", 0, 19.0),
            trial("d", 1, None, "diverged", kimg=1.0),  # exactly half: infinite too
        ],
    )
    board = build_board(sweep_dir, group_by=["variant"])
    g = groups(board)
    assert [(r["variant"], r["rank"]) for r in board.rows] == [("c", 1), ("b", 2), ("a", None), ("d", None)]
    assert g["c"]["final_fid_median"] == 26.0  # median of 22, 26 and +inf
    assert g["c"]["final_fid_mean"] == 24.0 and g["c"]["n_diverged"] == 1  # the mean stays over completed
    assert g["a"]["final_fid_median"] is None and "diverged on 2 of 3" in g["a"]["unranked_reason"]
    assert g["a"]["final_fid_mean"] == 20.0
    table = sections(board, ["variant"], ["g_widths", "seed", "variant"])[0]
    assert "completed and diverged trials" in table.title
    cells = {row[1]: row for row in table.rows}
    assert any("(2 of 3 diverged)" in c for c in cells["a"]) and any("unranked" in c for c in cells["a"])
    assert any("(1 of 3 diverged)" in c for c in cells["c"])

    excluded = build_board(sweep_dir, group_by=["variant"], failures="exclude")
    # d's and a's one survivor each: a number, but no rank (a key resting on one trial).
    assert [(r["variant"], r["rank"]) for r in excluded.rows] == [("c", 1), ("b", 2), ("d", None), ("a", None)]
    assert "completed trials only" in sections(excluded, ["variant"], ["variant"])[0].title


def test_errored_stopped_and_unfinished_trials_are_left_out_of_the_key_and_counted(tmp_path):
    sweep_dir = write_sweep(
        tmp_path,
        [
            trial("a", 0, 30.0),
            trial("a", 1, None, "error", kimg=0.0, reason="no usable CUDA"),
            trial("a", 2, None, "stopped_early", kimg=1.0, stopped_at_kimg=1.0, stopped_metric=50.0),
            trial("a", 3, None, "interrupted", kimg=1.0),
            trial("a", 4, 28.0),
            trial("b", 0, 31.0),
            trial("b", 1, 33.0),
        ],
    )
    g = groups(build_board(sweep_dir, group_by=["variant"]))
    assert g["a"]["rank"] == 1 and g["a"]["final_fid_median"] == 29.0
    assert (g["a"]["n"], g["a"]["n_error"], g["a"]["n_stopped_early"], g["a"]["n_unfinished"]) == (5, 1, 1, 1)
    assert g["b"]["rank"] == 2 and g["b"]["final_fid_median"] == 32.0


def test_exports_hold_no_nan_or_infinity(tmp_path):
    sweep_dir = write_sweep(
        tmp_path,
        [
            trial("a", 0, 20.0),
            trial("a", 1, None, "diverged", kimg=1.0, best_fid=float("nan")),
            trial("b", 0, 30.0),
            trial("b", 1, 31.0),
        ],
    )
    from typer.testing import CliRunner

    from orchestrator.cli import app

    for args in ([], ["--group-by", "variant"], ["--group-by", "variant", "--baseline", "variant=b"]):
        for fmt in ("json", "csv", "latex", "markdown"):  # in process: twelve CLI start-ups would cost 15 s
            result = CliRunner().invoke(app, ["leaderboard", "--results", str(tmp_path / "results"), *args,
                                              "--format", fmt])
            assert result.exit_code == 0, result.output
            _no_non_finite(result.stdout)
            if fmt == "json":
                json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    import pyarrow.parquet as pq

    stored = pq.read_table(sweep_dir / "trials.parquet").to_pylist()
    assert next(t for t in stored if t["trial_id"] == "a-1")["best_fid"] is None  # NaN is stored as null


def test_failures_flag_is_checked(tmp_path, orchestrator_cli):
    sweep_dir = write_sweep(tmp_path, [trial("a", 0, 20.0)])
    with pytest.raises(LeaderboardError, match="--failures sometimes"):
        build_board(sweep_dir, group_by=["variant"], failures="sometimes")
    proc = orchestrator_cli("leaderboard", "--results", tmp_path / "results", "--failures", "sometimes")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_baseline_comparisons_are_holm_adjusted_with_probability_of_improvement(tmp_path):
    from statsmodels.stats.multitest import multipletests

    base, fids = [30.0, 31.0, 29.5, 30.5], {"b": [26.0, 27.5, 25.0, 28.0], "c": [29.0, 32.0, 30.0, 28.5],
                                             "d": [35.0, 36.0, 33.5, 34.0]}
    sweep_dir = write_sweep(tmp_path, [trial("a", s, f) for s, f in enumerate(base)] +
                            [trial(v, s, f) for v, values in fids.items() for s, f in enumerate(values)])
    g = groups(build_board(sweep_dir, group_by=["variant"], baseline="variant=a"))
    raw = [g[v]["p_value"] for v in fids]
    assert raw == pytest.approx([stats.ttest_rel(values, base).pvalue for values in fids.values()])
    expected = multipletests(raw, method="holm")[1]
    assert [g[v]["p_holm"] for v in fids] == pytest.approx(list(expected))
    assert g["a"]["p_holm"] is None and g["a"]["prob_improvement"] is None
    # Paired: the share of seeds on which the group's FID is lower than the baseline's.
    assert g["b"]["prob_improvement"] == 1.0 and g["d"]["prob_improvement"] == 0.0
    assert g["c"]["prob_improvement"] == pytest.approx(0.5)
    assert g["c"]["prob_improvement_ci95_low"] <= 0.5 <= g["c"]["prob_improvement_ci95_high"]
    assert g["b"]["hedges_g"] < 0 < g["d"]["hedges_g"]  # negative: better than the baseline
    table = sections(build_board(sweep_dir, group_by=["variant"], baseline="variant=a"), ["variant"], ["variant"])[0]
    assert "p (Holm, 3 comparisons)" in table.headers
