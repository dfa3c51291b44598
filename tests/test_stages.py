"""Explore, then confirm: the leaderboard/report defaults and the report sections that tie a first stage X to
its confirm stage X-confirm (fake sweep directories written by hand, no Ray, no training)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.analysis.report import write_report
from orchestrator.store.reader import ResultsError, find_sweep, stage_note
from orchestrator.store.stages import confirm_stage_of, first_stage_of, read_selection
from orchestrator.store.tables import ResultsWriter

NOTE = "showing the confirm stage smoke-confirm (configurations selected on sweep smoke, fresh seeds); " \
       "the exploration: --sweep smoke"


def write_sweep(results: Path, name: str, fids: dict[str, list[float]], seeds: list[int]) -> Path:
    """A finished sweep: every variant on every seed, completed with an evaluation at 2 and 4 kimg."""
    sweep_dir = results / name
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "fingerprint").write_text("x\n")
    (sweep_dir / "sweep.yaml").write_text(f"name: {name}\neval: {{every_kimg: 2}}\n")
    writer = ResultsWriter(sweep_dir, name, ["seed", "variant"])
    for variant, values in fids.items():
        for seed, fid in zip(seeds, values, strict=True):
            trial_id = f"{variant}-{seed}"
            for kimg, value in ((2.0, fid * 2), (4.0, fid)):
                writer.add_evaluation({"trial_id": trial_id, "variant": variant, "seed": seed, "kimg": kimg,
                                       "fid": value, "extractor": "tiny-conv", "fid_samples": 64,
                                       "final": kimg == 4.0})
            writer.update_trial(trial_id, variant=variant, seed=seed, status="completed", final_fid=fid,
                                best_fid=fid, extractor="tiny-conv", kimg=4.0, kimg_budget=4.0,
                                final_fid_samples=64, evaluations=2)
    writer.close()
    return sweep_dir


def selection(**changes) -> dict:
    candidate = {"n": 2, "n_diverged": 0, "n_error": 0, "rung": 4.0}
    return {
        "format": 1, "sweep": "smoke", "confirm_sweep": "smoke-confirm", "first_stage_fingerprint": "ab" * 32,
        "metric": {"name": "fid", "mode": "min"},
        "rule": "Configurations ranked on the median final fid <of completed seeds>.",
        "rule_short": "top 1 on final fid + include variant=wgan", "top": 1, "include": [{"variant": "wgan"}],
        "seeds": [2, 3], "kimg": 4.0, "fid_split": "train", "allow_partial": False,
        "first_stage": {"trials": 6, "unfinished": 0, "errored": 0, "diverged": 0},
        "candidates": [
            {**candidate, "configuration": {"variant": "dcgan"}, "label": "variant=dcgan", "rank": 1,
             "tier": "completed", "value": 120.5, "seed_mean": 121.0, "chosen": True, "why": "top 1"},
            {**candidate, "configuration": {"variant": "<lsgan>"}, "label": "variant=<lsgan>", "rank": 2,
             "tier": "completed", "value": 130.25, "seed_mean": 131.0, "chosen": False, "why": None},
            {**candidate, "configuration": {"variant": "wgan"}, "label": "variant=wgan", "rank": None,
             "tier": "unranked", "value": None, "seed_mean": 300.0, "n_diverged": 1, "chosen": True,
             "why": "include variant=wgan"},
        ],
        "time": "2026-12-03T21:00:00+00:00", **changes,
    }


def write_stages(results: Path, **changes) -> tuple[Path, Path]:
    first = write_sweep(results, "smoke", {"dcgan": [120.0, 121.0], "<lsgan>": [130.0, 131.0],
                                           "wgan": [300.0, 301.0]}, seeds=[0, 1])
    confirm = write_sweep(results, "smoke-confirm", {"dcgan": [118.0, 119.0], "wgan": [290.0, 295.0]},
                          seeds=[2, 3])
    (confirm / "selection.json").write_text(json.dumps(selection(**changes)))
    return first, confirm


@pytest.fixture
def stages(tmp_path) -> tuple[Path, Path, Path]:
    results = tmp_path / "results"
    return (results, *write_stages(results))


# ---- finding the sweep ---------------------------------------------------------------------------


def test_the_confirm_stage_is_the_default_and_the_note_says_so(stages):
    results, first, confirm = stages
    assert find_sweep(results, None) == confirm
    assert stage_note(results, confirm) == NOTE
    assert stage_note(results, first) is None  # --sweep smoke: nothing to explain


def test_an_explicit_sweep_is_unchanged(stages):
    results, first, confirm = stages
    assert find_sweep(results, "smoke") == first
    assert find_sweep(results, "smoke-confirm") == confirm


def test_a_third_sweep_still_needs_a_choice(stages):
    results, _, confirm = stages
    write_sweep(results, "other", {"dcgan": [100.0]}, seeds=[0])
    with pytest.raises(ResultsError, match="several sweeps"):
        find_sweep(results, None)
    assert stage_note(results, confirm) is None


def test_only_the_first_stage_is_found_alone(tmp_path):
    results = tmp_path / "results"
    first = write_sweep(results, "smoke", {"dcgan": [120.0]}, seeds=[0])
    assert find_sweep(results, None) == first
    assert stage_note(results, first) is None
    assert confirm_stage_of(first) is None


@pytest.mark.parametrize("selection_text", [None, "{not json", json.dumps({"sweep": "elsewhere"}),
                                            json.dumps({"sweep": "../smoke"}), json.dumps(["smoke"])])
def test_a_directory_merely_named_confirm_is_not_a_confirm_stage(tmp_path, selection_text):
    results = tmp_path / "results"
    first = write_sweep(results, "smoke", {"dcgan": [120.0]}, seeds=[0])
    confirm = write_sweep(results, "smoke-confirm", {"dcgan": [118.0]}, seeds=[2])
    if selection_text is not None:
        (confirm / "selection.json").write_text(selection_text)
    with pytest.raises(ResultsError, match="several sweeps"):
        find_sweep(results, None)
    assert confirm_stage_of(first) is None and first_stage_of(confirm) in (None, results / "elsewhere")
    assert stage_note(results, confirm) is None


def test_the_stages_find_each_other(stages):
    _, first, confirm = stages
    assert confirm_stage_of(first) == confirm
    assert first_stage_of(confirm) == first and first_stage_of(first) is None
    assert read_selection(confirm)["seeds"] == [2, 3] and read_selection(first) is None


# ---- the reports ---------------------------------------------------------------------------------


def test_first_stage_report_links_the_confirm_stage_and_shows_the_selection(stages):
    _, first, confirm = stages
    page = write_report(first).read_text()
    assert '<h2 id="confirm">Confirm stage</h2>' in page
    assert 'href="../smoke-confirm/report.html"' in page
    results = first.parent
    assert f"run <code>orchestrator report --results {results} --sweep smoke-confirm</code>" in page  # not yet
    assert "ranked on the median final fid &lt;of completed seeds&gt;." in page  # the rule, escaped
    table = page[page.index('<table class="selection">'):]
    table = table[:table.index("</table>")]
    rows = table.split("<tr")[2:]  # after the header row
    assert len(rows) == 3
    assert [r.startswith(' class="chosen"') for r in rows] == [True, False, True]
    assert "<td>1</td><td>variant=dcgan</td>" in rows[0] and "<td>120.50</td><td>121.00</td>" in rows[0]
    assert "<td>top 1</td>" in rows[0] and "<td>include variant=wgan</td>" in rows[2]
    assert "<td>variant=&lt;lsgan&gt;</td>" in rows[1] and "<lsgan>" not in page
    assert ">unranked</td>" in rows[2] and "<td>1</td><td>0</td><td>chosen</td>" in rows[2]
    assert "fresh seeds 2, 3" in page
    assert "http://" not in page and "https://" not in page  # self-contained

    write_report(confirm)
    assert "not written yet" not in write_report(first).read_text()


def test_confirm_stage_report_says_where_its_configurations_came_from(stages):
    _, first, confirm = stages
    page = write_report(confirm).read_text()
    assert ("configurations selected by top 1 on final fid + include variant=wgan on sweep smoke; "
            "fresh seeds 2, 3") in page
    assert 'href="../smoke/report.html"' in page
    assert "--allow-partial" not in page and '<h2 id="confirm">' not in page
    assert page.index('id="confirm-stage"') < page.index('id="leaderboard"')  # near the top


def test_confirm_stage_report_says_when_the_first_stage_was_unfinished(tmp_path):
    _, confirm = write_stages(tmp_path / "results", allow_partial=True, rule_short="top <1>")
    page = write_report(confirm).read_text()
    assert "configurations selected by top &lt;1&gt; on sweep smoke; fresh seeds 2, 3 " \
           "(first stage unfinished: confirmed with --allow-partial)" in page


def test_a_malformed_selection_never_breaks_the_first_stage_report(tmp_path):
    first, _ = write_stages(tmp_path / "results", candidates="oops", metric=None, seeds=None)
    page = write_report(first).read_text()
    assert "Confirm stage" in page and "selection.json lists no candidates" in page


def test_a_lone_sweep_report_has_no_stage_section(tmp_path):
    page = write_report(write_sweep(tmp_path / "results", "smoke", {"dcgan": [120.0]}, seeds=[0])).read_text()
    assert 'id="confirm' not in page
