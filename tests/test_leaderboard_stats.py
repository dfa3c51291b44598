"""The leaderboard's use of orchestrator.analysis.statistics, against independent references (scipy, statsmodels)
and as properties (hypothesis) of whole boards. The statistics themselves are tested in test_statistics.py."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from statsmodels.stats.multitest import multipletests
from test_leaderboard_pooling import REPO, t, write

from orchestrator.analysis.comparisons import Baseline
from orchestrator.analysis.groups import BOOTSTRAP_RESAMPLES, group_trials, mean_interval
from orchestrator.analysis.leaderboard import build_board
from orchestrator.analysis.measure import VALUE_COLUMNS, Measured
from orchestrator.analysis.statistics import BOOTSTRAP_MIN_N, bootstrap_mean_ci

BLOCK = ("tiny-conv", 4.0, 512)


def test_bootstrap_interval_of_a_group_mean(tmp_path):
    rng = np.random.default_rng(3)
    many, few = list(rng.normal(30, 2, 12).round(3)), [40.0, 42.5, 41.0]
    sweep_dir = write(tmp_path, [t("many", s, f) for s, f in enumerate(many)] +
                      [t("few", s, f) for s, f in enumerate(few)])
    rows = {r["variant"]: r for r in build_board(sweep_dir, group_by=["variant"], ci="bootstrap").rows}
    # The values sorted first: the interval depends on the values, not on the order of rows in the tables.
    low, high = bootstrap_mean_ci(sorted(many), resamples=BOOTSTRAP_RESAMPLES, seed=0)
    assert (rows["many"]["final_fid_ci95_low"], rows["many"]["final_fid_ci95_high"]) == (low, high)
    assert rows["many"]["final_fid_ci95"] is None  # no half-width: a bootstrap interval is not symmetric
    # An independent percentile bootstrap (scipy) agrees up to resampling noise.
    ref = stats.bootstrap((np.array(many),), np.mean, n_resamples=10_000, method="percentile",
                          random_state=np.random.default_rng(1)).confidence_interval
    assert low == pytest.approx(ref.low, abs=0.1 * (high - low)) and high == pytest.approx(ref.high,
                                                                                         abs=0.1 * (high - low))
    assert rows["many"]["ci_method"] == "bootstrap" and rows["many"]["ci_warning"] is None  # 12 >= the minimum
    assert len(few) < BOOTSTRAP_MIN_N and "fewer than" in rows["few"]["ci_warning"]
    # Student t by default, with its bounds too.
    rows_t = {r["variant"]: r for r in build_board(sweep_dir, group_by=["variant"]).rows}
    mean, half = rows_t["few"]["final_fid_mean"], rows_t["few"]["final_fid_ci95"]
    expected = stats.t.interval(0.95, 2, loc=np.mean(few), scale=stats.sem(few))
    assert (rows_t["few"]["final_fid_ci95_low"], rows_t["few"]["final_fid_ci95_high"]) == pytest.approx(expected)
    assert (mean - half, mean + half) == pytest.approx(expected)


def test_bootstrap_from_the_command_line_warns_below_the_minimum(tmp_path, orchestrator_cli):
    write(tmp_path, [t("a", s, 30.0 + s) for s in range(3)] + [t("b", s, 20.0 + s * 1.5) for s in range(3)])
    base = ["leaderboard", "--results", tmp_path / "results", "--group-by", "variant", "--ci", "bootstrap"]
    proc = orchestrator_cli(*base, "--format", "json", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert all(r["final_fid_ci95_low"] < r["final_fid_ci95_high"] for r in rows)
    assert "warning: bootstrap intervals from 3 values" in proc.stderr
    proc = orchestrator_cli(*base, "--format", "markdown", cwd=REPO)
    assert "bootstrap 95% CI" in proc.stdout and "†" in proc.stdout and "fewer than 10 values" in proc.stdout
    proc = orchestrator_cli(*base[:-1], "wide", cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_unpaired_probability_of_improvement_is_mann_whitney_u(tmp_path):
    base, group = [30.0, 31.0, 29.0, 33.0], [28.0, 31.0, 27.5]  # group ran other seeds: unpaired
    sweep_dir = write(tmp_path, [t("base", s, f) for s, f in enumerate(base)] +
                      [t("x", s + 10, f) for s, f in enumerate(group)])
    row = next(r for r in build_board(sweep_dir, group_by=["variant"], baseline="variant=base").rows
               if r["variant"] == "x")
    u = stats.mannwhitneyu(base, group).statistic  # pairs where the baseline's FID is higher (ties: half)
    assert row["test"] == "Welch t" and row["prob_improvement"] == pytest.approx(u / (len(base) * len(group)))
    assert row["p_value"] == pytest.approx(stats.ttest_ind(group, base, equal_var=False).pvalue)
    assert row["prob_improvement_ci95_low"] <= row["prob_improvement"] <= row["prob_improvement_ci95_high"]


def test_holm_family_is_each_block(tmp_path):
    """Two blocks (512 and 10,000 images): each block's p-values are adjusted within that block only."""
    fids = {"base": [30.0, 31.0, 29.5], "b": [26.0, 27.5, 25.0], "c": [29.0, 32.0, 30.0]}
    trials = [t(v, s, f) for v, values in fids.items() for s, f in enumerate(values)]
    trials += [t(v, s + 5, f + 1.0 + 0.3 * s, final_fid_samples=10000)
               for v, values in fids.items() for s, f in enumerate(values)]
    board = build_board(write(tmp_path, trials), group_by=["variant"], baseline="variant=base")
    for samples in (512, 10000):
        rows = [r for r in board.rows if r["fid_samples"] == samples and r["p_value"] is not None]
        assert len(rows) == 2
        expected = multipletests([r["p_value"] for r in rows], method="holm")[1]
        assert [r["p_holm"] for r in rows] == pytest.approx(list(expected))


# ---- properties of whole boards ----------------------------------------------------------------------------


def board_rows(fids: dict[str, list[float]], baseline: str = "v0") -> list[dict]:
    """group_trials on in-memory tables: every trial completed, measured in one block."""
    ids = [f"{v}-{s}" for v, values in fids.items() for s in range(len(values))]
    trials = pd.DataFrame({"trial_id": ids, "status": "completed", "stopped_at_kimg": None, "stopped_metric": None,
                           "variant": [i.rsplit("-", 1)[0] for i in ids],
                           "seed": [int(i.rsplit("-", 1)[1]) for i in ids]})
    values = pd.DataFrame({"trial_id": ids, "fid": [f for v in fids.values() for f in v], "isc": None,
                           "extractor": BLOCK[0], "fid_kimg": BLOCK[1], "fid_samples": BLOCK[2], "kimg": 4.0,
                           "g_steps": 1}, columns=VALUE_COLUMNS)
    return group_trials(trials, Measured(values, "final FID", "final_"), ["variant"], dict.fromkeys(ids, BLOCK),
                        baseline=Baseline("variant", baseline, f"variant={baseline}"))


fid = st.floats(5.0, 200.0).map(lambda x: round(x, 1))  # rounding makes ties likely
groups = st.lists(st.lists(fid, min_size=1, max_size=6), min_size=2, max_size=5).map(
    lambda gs: {f"v{i}": g for i, g in enumerate(gs)})


@settings(max_examples=40, deadline=None)
@given(groups)
def test_holm_is_at_least_raw_and_keeps_the_raw_order(fids):
    rows = [r for r in board_rows(fids) if r["p_value"] is not None]
    for r in rows:
        assert r["p_value"] <= r["p_holm"] <= 1.0
    for a in rows:
        for b in rows:
            if a["p_value"] <= b["p_value"]:
                assert a["p_holm"] <= b["p_holm"] + 1e-12


@settings(max_examples=40, deadline=None)
@given(groups)
def test_ranks_rest_on_numbers_and_come_first(fids):
    rows = board_rows(fids)
    ranks = [r["rank"] for r in rows]
    ranked = [r for r in rows if r["rank"] is not None]
    assert ranks[:len(ranked)] == list(range(1, len(ranked) + 1))  # 1..k, then only unranked rows
    assert all(r["n_measured"] >= 2 and r["final_fid_median"] is not None for r in ranked)
    keys = [r["final_fid_median"] for r in ranked]
    assert keys == sorted(keys)
    assert all(r["unranked_reason"] for r in rows if r["rank"] is None)
    assert sum(r["n"] for r in rows) == sum(len(v) for v in fids.values())  # every trial counted once


@settings(max_examples=30, deadline=None)
@given(st.lists(fid, min_size=2, max_size=8))
def test_a_copy_of_the_baseline_has_probability_of_improvement_one_half(values):
    rows = {r["variant"]: r for r in board_rows({"base": values, "copy": list(values)}, baseline="base")}
    copy = rows["copy"]
    assert copy["test"] == "paired t" and copy["prob_improvement"] == 0.5 and copy["diff_fid"] == 0.0
    assert rows["base"]["prob_improvement"] is None and rows["base"]["no_comparison_reason"] == "the baseline"


def test_mean_interval_methods():
    assert mean_interval([]) == {"mean": None, "half": None, "low": None, "high": None, "warning": None}
    assert mean_interval([3.0], "bootstrap")["low"] is None  # one value: no interval, as with t
    x = [1.0, 2.0, 4.0, 8.0]
    assert (mean_interval(x, "bootstrap")["low"], mean_interval(x, "bootstrap")["high"]) == \
        bootstrap_mean_ci(x, resamples=BOOTSTRAP_RESAMPLES, seed=0)
    shuffled = mean_interval([8.0, 1.0, 4.0, 2.0], "bootstrap")
    assert (shuffled["low"], shuffled["high"]) == bootstrap_mean_ci(x, resamples=BOOTSTRAP_RESAMPLES, seed=0)
    r = mean_interval(x, "t")
    assert (r["low"], r["high"]) == pytest.approx(stats.t.interval(0.95, 3, loc=np.mean(x), scale=stats.sem(x)))


def test_the_analysis_layer_never_imports_torch_or_ray(tmp_path):
    write(tmp_path, [t("a", s, 30.0 + s) for s in range(2)])
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from orchestrator.analysis.formats import sections\n"
        "from orchestrator.analysis.leaderboard import build_board\n"
        "from orchestrator.analysis.saved import save_board\n"
        f"d = Path({str(tmp_path / 'results' / 's')!r})\n"
        "b = build_board(d, group_by=['variant'], ci='bootstrap')\n"
        f"save_board(Path({str(tmp_path / 'out')!r}), b, sections(b, ['variant'], []), sweep_dir=d, command='x', "
        "flags={})\n"
        "bad = [m for m in ('torch', 'ray', 'torch_fidelity') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True)
