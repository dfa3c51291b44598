"""Counts that belong to the mean beside them (a trial is counted in the block of its planned measurement), and
labels that say which FID a number is (sample count, kimg, "first evaluation at or past")."""
from __future__ import annotations

import dataclasses

import pytest
from test_leaderboard_pooling import PARAMS, SWEEP_YAML, t, write

from orchestrator.analysis.formats import sections, why
from orchestrator.analysis.leaderboard import build_board, stopped_text
from orchestrator.analysis.plan import Plan, read_plan, samples_label


def test_plan_defaults_are_gan_configs():
    from gan.config import EvalConfig, TrainConfig

    plan = Plan()
    assert plan.extractor == EvalConfig().extractor and plan.kimg == TrainConfig().kimg
    assert (plan.fid_samples, plan.final_fid_samples) == (EvalConfig().fid_samples, EvalConfig().final_fid_samples)
    assert plan.every_kimg == EvalConfig().every_kimg
    assert {f.name for f in dataclasses.fields(Plan)} <= {f.name for f in dataclasses.fields(EvalConfig)} | {"kimg"}


def test_plan_is_read_from_the_sweep_file_with_defaults_for_what_it_leaves_out(tmp_path):
    (tmp_path / "sweep.yaml").write_text("train: {kimg: 80}\neval: {final_fid_samples: 5000, fid_samples: oops}\n")
    assert read_plan(tmp_path) == Plan(kimg=80.0, final_fid_samples=5000)
    (tmp_path / "sweep.yaml").write_text(": not yaml [")
    assert read_plan(tmp_path) == Plan()
    assert read_plan(tmp_path / "missing") == Plan()


def test_a_trial_without_a_number_is_counted_in_the_block_it_was_planned_for(tmp_path):
    """Half the sweep measured with 512 images, half with 10,000 (two runs of a sweep file under one name):
    the counts beside each mean are that block's, whether or not its trials got a number."""
    sweep_dir = write(tmp_path, [
        t("a", 0, 30.0), t("a", 1, 31.0),
        t("a", 2, None, status="stopped_early", stopped_at_kimg=1.0, stopped_metric=60.0),  # planned: 512 (file)
        t("a", 3, 20.0, final_fid_samples=10000), t("a", 4, 21.0, final_fid_samples=10000),
        t("a", 5, None, status="diverged", final_fid_samples=10000),  # recorded its own plan: 10,000
    ])
    rows = {r["fid_samples"]: r for r in build_board(sweep_dir, group_by=["variant"]).rows}
    assert set(rows) == {512, 10000}
    small, large = rows[512], rows[10000]
    assert (small["n"], small["n_measured"], small["n_completed"], small["n_stopped_early"], small["n_diverged"]) == \
        (3, 2, 2, 1, 0)
    assert (large["n"], large["n_measured"], large["n_completed"], large["n_stopped_early"], large["n_diverged"]) == \
        (3, 2, 2, 0, 1)
    assert small["final_fid_mean"] == 30.5 and large["final_fid_mean"] == 20.5
    # Each block ranks on its own; the diverged trial counts in the key of its planned block only.
    assert small["final_fid_median"] == 30.5 and large["final_fid_median"] == 21.0
    assert small["rank"] == large["rank"] == 1


def test_trials_without_any_record_take_the_sweep_files_plan(tmp_path):
    sweep_yaml = "name: s\ntrain: {kimg: 8}\neval: {every_kimg: 1, final_fid_samples: 2048, extractor: tiny-conv}\n"
    sweep_dir = write(tmp_path, [
        t("a", 0, 30.0, kimg_budget=8.0, final_fid_samples=2048), t("a", 1, 32.0, kimg_budget=8.0,
                                                                      final_fid_samples=2048),
        # Never started: no extractor, budget or sample count recorded.
        t("a", 2, None, status="pending", extractor=None, kimg_budget=None, kimg=0.0, evaluations=0),
    ], sweep_yaml=sweep_yaml)
    [row] = build_board(sweep_dir, group_by=["variant"]).rows
    assert (row["extractor"], row["fid_kimg"], row["fid_samples"]) == ("tiny-conv", 8.0, 2048)
    assert (row["n"], row["n_measured"], row["n_unfinished"]) == (3, 2, 1)


def test_the_table_shows_n_in_mean(tmp_path):
    sweep_dir = write(tmp_path, [t("a", 0, 30.0), t("a", 1, 31.0), t("a", 2, None, status="error")])
    table = sections(build_board(sweep_dir, group_by=["variant"]), ["variant"], PARAMS)[0]
    row = dict(zip(table.headers, table.rows[0], strict=True))
    assert (row["n"], row["n in mean"], row["error"]) == ("3", "2", "1")


# ---- labels ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("samples, label", [(2000, "FID-2k"), (10000, "FID-10k"), (256, "FID-256"),
                                            (2500, "FID-2.5k"), (None, "FID")])
def test_samples_label(samples, label):
    assert samples_label(samples) == label


def test_asha_stopping_figure_names_its_sample_count(tmp_path):
    evaluations = [{"trial_id": "a-None-0", "variant": "a", "seed": 0, "kimg": 1.0, "fid": 60.0, "fid_samples": 2000},
                   {"trial_id": "a-None-0", "variant": "a", "seed": 0, "kimg": 2.0, "fid": 50.0, "fid_samples": 2000}]
    sweep_dir = write(tmp_path, [t("a", 0, None, status="stopped_early", stopped_at_kimg=1.0, stopped_metric=60.0),
                                 t("b", 0, 20.0), t("b", 1, 21.0)], evaluations)
    trials = build_board(sweep_dir).rows
    stopped = next(r for r in trials if r["trial_id"] == "a-None-0")
    assert stopped["stopped_fid_samples"] == 2000  # from the evaluations table, not the sweep file's 256
    assert why(stopped) == "stopped by ASHA on FID-2k at 1 kimg: 60.00"
    group = next(r for r in build_board(sweep_dir, group_by=["variant"]).rows if r["variant"] == "a")
    assert stopped_text(group) == "FID-2k at 1 kimg: 60.00"
    table = sections(build_board(sweep_dir, group_by=["variant"]), ["variant"], PARAMS)[0]
    assert "stopped by ASHA (FID there)" in table.headers and any("FID-2k at 1 kimg: 60.00" in r for r in table.rows)


def test_asha_sample_count_falls_back_to_the_sweep_file(tmp_path):
    sweep_dir = write(tmp_path, [t("a", 0, None, status="stopped_early", stopped_at_kimg=1.0, stopped_metric=60.0),
                                 t("b", 0, 20.0)])
    assert build_board(sweep_dir).rows[-1]["stopped_fid_samples"] == 256  # eval.fid_samples of SWEEP_YAML


def test_at_kimg_title_says_first_evaluation_at_or_past(tmp_path):
    # Measured with 128 images at 1 kimg (the sweep file says 256): what was measured there defines the block.
    evaluations = [{"trial_id": f"a-None-{s}", "variant": "a", "seed": s, "kimg": 1.02, "fid": 40.0 + s,
                    "fid_samples": 128} for s in range(2)]
    sweep_dir = write(tmp_path, [t("a", s, 30.0 + s) for s in range(2)] +
                      [t("b", s, None, status="stopped_early", kimg=0.5, stopped_at_kimg=0.5, stopped_metric=70.0)
                       for s in range(2)], evaluations, sweep_yaml=SWEEP_YAML)
    board = build_board(sweep_dir, group_by=["variant"], at_kimg=1.0)
    title = sections(board, ["variant"], PARAMS)[0].title
    assert title.startswith("extractor tiny-conv: FID at the first evaluation at or past 1 kimg, 128 generated images")
    assert "over trials measured there" in title
    # b never reached 1 kimg: counted in the block it was planned for (FID-128 at 1 kimg), with no number.
    b = next(r for r in board.rows if r["variant"] == "b")
    assert (b["fid_samples"], b["n"], b["n_measured"], b["n_stopped_early"]) == (128, 2, 0, 2)
    assert len(board.rows) == 2  # one block
    trials = sections(build_board(sweep_dir, at_kimg=1.0), None, PARAMS)
    assert "first evaluation at or past 1 kimg" in trials[0].title
