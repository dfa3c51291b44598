"""Explore, then confirm: the `confirm:` and `configurations:` rules, the selection rule on hand-made results,
the confirm stage's sweep, and every refusal of `orchestrator confirm` (no Ray, no training)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from orchestrator.analysis.selection import select
from orchestrator.store.provenance import PROVENANCE_FILE, effective_config
from orchestrator.store.tables import ResultsWriter, parameter_columns
from orchestrator.sweepfile.errors import SweepError
from orchestrator.sweepfile.loading import load_sweep
from orchestrator.sweepfile.stages import confirm_stage, fresh_seeds, used_seeds
from orchestrator.workflow.confirm import (
    SELECTION_FILE,
    ConfirmError,
    parse_include,
    parse_seeds,
    plan_confirm,
    run_confirm,
)

BASE = """
name: ex
data: {synthetic_count: 64}
model: {g_widths: [32, 16, 8, 8], d_widths: [8, 16, 32, 32], heads: 2}
train: {kimg: 4}
eval: {every_kimg: 1, fid_samples: 16, final_fid_samples: 32, extractor: tiny-conv}
parameters:
  variant: {values: [dcgan, use-gan, cmhsa-gan, use-cmhsa-gan, wgan, vae-gan]}
  seed: {values: [0, 1, 2]}
scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
"""


def sweep_file(tmp_path: Path, text: str = BASE, extra: str = "", name: str = "ex.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text + extra)
    return path


def load(tmp_path: Path, extra: str = "", text: str = BASE):
    return load_sweep(sweep_file(tmp_path, text, extra))


# ---- rules: one line naming the key and the value -------------------------------------------------


@pytest.mark.parametrize(("extra", "key", "words"), [
    ("confirm: {top: 0}", "confirm.top", "must be >= 1"),
    ("confirm: {top: 1.5}", "confirm.top", "integer"),
    ("confirm: {include: [{heads: 2}]}", "confirm.include[0].heads", "unknown parameter 'heads'"),
    ("confirm: {include: [{variant: lsgan}]}", "confirm.include[0].variant", "not among the sweep's values"),
    ("confirm: {include: [{}]}", "confirm.include[0]", "mapping of parameter: value"),
    ("confirm: {include: [{seed: 1}]}", "confirm.include[0].seed", "unknown parameter 'seed'"),
    ("confirm: {seeds: 1}", "confirm.seeds", "must be >= 2"),
    ("confirm: {seeds: [7]}", "confirm.seeds", "at least 2"),
    ("confirm: {seeds: [2, 9]}", "confirm.seeds", "[2] is already used by the sweep's own trials"),
    ("confirm: {seeds: [9, 9]}", "confirm.seeds", "twice"),
    ("confirm: {seeds: [-1, 9]}", "confirm.seeds", ">= 0"),
    ("confirm: {seeds: many}", "confirm.seeds", "a count >= 2 or a list"),
    ("confirm: {kimg: -2}", "confirm.kimg", "> 0"),
    ("confirm: {kimg: 0.5}", "confirm.kimg", "less than eval.every_kimg"),
    ("confirm: {fid_split: holdout}", "confirm.fid_split", "unknown split 'holdout'"),
    ("data: {split: [0.9, 0.1, 0.0]}\nconfirm: {fid_split: test}", "confirm.fid_split", "is empty"),
    ("confirm: {top: 1, bogus: 2}", "confirm.bogus", "unknown key"),
])
def test_bad_confirm_sections_are_one_line_errors(tmp_path, extra, key, words):
    text = BASE.replace("data: {synthetic_count: 64}\n", "") if extra.startswith("data:") else BASE
    with pytest.raises(SweepError) as err:
        load(tmp_path, extra, text)
    assert err.value.key == key and words in err.value.message, str(err.value)
    assert "\n" not in str(err.value) and str(err.value).startswith(str(tmp_path / "ex.yaml"))


def test_include_must_match_a_configuration_the_grid_produces(tmp_path):
    text = BASE.replace("  seed:", "  heads: {values: [1, 2], when: {variant: [cmhsa-gan]}}\n  seed:")
    assert load(tmp_path, "confirm: {include: [{variant: cmhsa-gan, heads: 2}]}", text).confirm.include
    with pytest.raises(SweepError, match=r"confirm.include\[0\]: .* matches no configuration"):
        load(tmp_path, "confirm: {include: [{variant: dcgan, heads: 2}]}", text)


@pytest.mark.parametrize(("extra", "key", "words"), [
    ("configurations: [{lr_g: 2.0e-4}]", "configurations[0].lr_g", "also in parameters"),
    ("configurations: []", "configurations", "at least one"),
    ("configurations: [{beta1: 0.5}, {beta1: 0.5}]", "configurations[1]", "repeats configurations[0]"),
    ("configurations: [{lr_dd: 1.0e-4}]", "configurations[0].lr_dd", "unknown parameter"),
    ("configurations: [{seed: 3}]", "configurations[0].seed", "parameters.seed"),
    ("configurations: [{heads: 3}]", "configurations[0]", "does not divide"),
])
def test_bad_configurations_are_one_line_errors(tmp_path, extra, key, words):
    text = BASE.replace("  variant: {values: [dcgan, use-gan, cmhsa-gan, use-cmhsa-gan, wgan, vae-gan]}\n", "")
    text = text.replace("model: {", "model: {variant: cmhsa-gan, ")
    text = text.replace("  seed:", "  lr_g: {values: [1.0e-4]}\n  seed:")
    with pytest.raises(SweepError) as err:
        load(tmp_path, extra, text)
    assert err.value.key == key and words in err.value.message, str(err.value)


def test_configurations_run_each_listed_configuration_on_every_seed(tmp_path):
    text = BASE.replace("  variant: {values: [dcgan, use-gan, cmhsa-gan, use-cmhsa-gan, wgan, vae-gan]}\n", "")
    sweep = load(tmp_path, "configurations: [{variant: dcgan}, {variant: cmhsa-gan, heads: 4}]", text)
    trials = sweep.trials()
    assert trials == [{"variant": "dcgan", "seed": s} for s in (0, 1, 2)] + [
        {"variant": "cmhsa-gan", "heads": 4, "seed": s} for s in (0, 1, 2)]
    assert parameter_columns(sweep.swept_names()) == ["g_widths", "heads", "seed", "variant"]
    assert sweep.trial_config(trials[-1]).model.heads == 4


def test_the_confirm_section_is_not_part_of_the_first_stages_fingerprint(tmp_path):
    assert load(tmp_path).fingerprint() == load(tmp_path, "confirm: {top: 2, seeds: 4}").fingerprint()


# ---- the confirm stage's sweep ----------------------------------------------------------------------


def test_the_confirm_stage_is_fifo_on_fresh_seeds_and_its_file_runs_as_it_is(tmp_path):
    first = load(tmp_path, "confirm: {top: 2, seeds: 3, fid_split: val}")
    seeds = fresh_seeds(first.confirm.seeds, used_seeds(first))
    assert seeds == [3, 4, 5] and not set(seeds) & used_seeds(first)
    stage = confirm_stage(first, [{"variant": "wgan"}, {"variant": "dcgan"}], seeds, kimg=None, fid_split="val",
                          description="d")
    assert stage.name == "ex-confirm" and stage.scheduler.type == "fifo" and stage.confirm is None
    assert stage.train.kimg == first.train.kimg and stage.eval.fid_split == "val"
    assert stage.eval.final_fid_samples == first.eval.final_fid_samples and stage.data == first.data
    assert [(t["variant"], t["seed"]) for t in stage.trials()] == [
        ("wgan", 3), ("wgan", 4), ("wgan", 5), ("dcgan", 3), ("dcgan", 4), ("dcgan", 5)]
    again = load_sweep(sweep_file(tmp_path, stage.source_text, name="again.yaml"))  # its sweep.yaml
    assert again.fingerprint() == stage.fingerprint() and again.trials() == stage.trials()


def test_a_seed_count_starts_after_the_largest_seed_any_trial_used():
    assert fresh_seeds(2, {0, 1, 7}) == [8, 9]
    assert fresh_seeds([20, 30], {0}) == [20, 30]


# ---- the selection rule ------------------------------------------------------------------------------

WORST = math.inf


def write_first_stage(tmp_path: Path, sweep, outcomes: dict[str, list[tuple]]) -> Path:
    """outcomes: variant -> one (status, final fid or None, {kimg: fid}) per seed."""
    sweep_dir = tmp_path / "results" / sweep.name
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "fingerprint").write_text(sweep.fingerprint() + "\n")
    (sweep_dir / "sweep.yaml").write_text(sweep.source_text)
    writer = ResultsWriter(sweep_dir, sweep.name, parameter_columns(sweep.swept_names()))
    for variant, seeds in outcomes.items():
        for seed, (status, final, curve) in enumerate(seeds):
            tid = f"{variant}-{seed}"
            params = {"variant": variant, "seed": seed, "g_widths": "32-16-8-8"}
            for kimg, fid in sorted(curve.items()):
                writer.add_evaluation({"trial_id": tid, **params, "kimg": kimg, "fid": fid, "final": False,
                                       "extractor": "tiny-conv", "fid_samples": 16})
            if final is not None:
                writer.add_evaluation({"trial_id": tid, **params, "kimg": 4.0, "fid": final, "final": True,
                                       "extractor": "tiny-conv", "fid_samples": 32})
            writer.update_trial(tid, **params, status=status, final_fid=final, kimg=max(curve, default=0.0),
                                kimg_budget=4.0, evaluations=len(curve) + (final is not None))
    writer.close()
    return sweep_dir


def completed(final: float) -> tuple:
    return ("completed", final, {1.0: final + 5, 2.0: final + 3, 3.0: final + 1, 4.0: final})


OUTCOMES = {
    "dcgan": [completed(30.0), completed(34.0), completed(31.0)],
    "use-gan": [completed(20.0), completed(22.0), ("diverged", None, {1.0: 40.0})],  # 1 of 3 diverged
    "cmhsa-gan": [("stopped_early", None, {1.0: 10.0, 2.0: 9.0})] * 3,  # cut at 2 kimg: below completed
    "use-cmhsa-gan": [("stopped_early", None, {1.0: 50.0})] * 3,  # cut at 1 kimg: below cmhsa-gan
    "wgan": [completed(25.0), ("diverged", None, {1.0: 60.0}), ("diverged", None, {1.0: 61.0})],  # unranked
    "vae-gan": [("error", None, {})] * 3,  # nothing measured
}


def test_selection_ranks_completed_then_cut_by_rung_then_unranked(tmp_path):
    sweep = load(tmp_path, "confirm: {top: 2, include: [{variant: vae-gan}], seeds: 2}")
    sweep_dir = write_first_stage(tmp_path, sweep, OUTCOMES)
    candidates = select(sweep_dir, sweep, top=2, include=sweep.confirm.include)
    by = {c.configuration["variant"]: c for c in candidates}
    assert [c.configuration["variant"] for c in candidates] == [
        "use-gan", "dcgan", "cmhsa-gan", "use-cmhsa-gan", "wgan", "vae-gan"]
    assert [c.tier for c in candidates] == ["completed", "completed", "cut", "cut", "unranked", "unmeasured"]
    assert by["use-gan"].value == float(np.median([20.0, 22.0, WORST])) and by["use-gan"].n_diverged == 1
    assert by["use-gan"].seed_mean == 21.0  # over completed seeds only
    assert by["dcgan"].value == float(np.median([30.0, 34.0, 31.0])) and by["dcgan"].rung == 4.0
    assert by["cmhsa-gan"].rung == 2.0 and by["cmhsa-gan"].value == 9.0  # its mean FID there is the best of all
    assert by["use-cmhsa-gan"].rung == 1.0
    assert by["vae-gan"].n_error == 3 and by["vae-gan"].rank is None
    assert [c.configuration["variant"] for c in candidates if c.chosen] == ["use-gan", "dcgan", "vae-gan"]
    assert by["vae-gan"].why == ["include variant=vae-gan"] and by["dcgan"].why == ["top 2"]


def test_top_reaches_into_cut_configurations_when_too_few_completed(tmp_path):
    sweep = load(tmp_path)
    sweep_dir = write_first_stage(tmp_path, sweep, OUTCOMES)
    chosen = [c.configuration["variant"] for c in select(sweep_dir, sweep, top=3, include=[]) if c.chosen]
    assert chosen == ["use-gan", "dcgan", "cmhsa-gan"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["completed", "stopped_early", "diverged", "error"]),
                          st.floats(1, 100), st.sampled_from([1.0, 2.0, 3.0])), min_size=6, max_size=6),
       st.integers(1, 4))
def test_no_cut_configuration_ever_outranks_a_completed_one(tmp_path_factory, seeds, top):
    assume(any(status != "error" for status, _, _ in seeds))  # all errored: nothing to select (a refusal)
    tmp = tmp_path_factory.mktemp("prop")
    sweep = load(tmp)
    outcomes = {}
    for i, variant in enumerate(["dcgan", "use-gan", "cmhsa-gan"]):
        runs = []
        for status, fid, reached in seeds[2 * i: 2 * i + 2]:
            curve = {k: fid + k for k in (1.0, 2.0, 3.0) if k <= reached}
            runs.append(completed(fid) if status == "completed" else (status, None, {} if status == "error" else curve))
        outcomes[variant] = runs
    candidates = select(write_first_stage(tmp, sweep, outcomes), sweep, top=top, include=[])
    tiers = [c.tier for c in candidates]
    assert tiers == sorted(tiers, key=["completed", "cut", "unranked", "unmeasured"].index)
    chosen = [c for c in candidates if c.chosen]
    eligible = [c for c in candidates if c.tier in ("completed", "cut")]
    assert chosen == eligible[:top]
    done = [c.value for c in candidates if c.tier == "completed"]
    assert done == sorted(done)
    cut = [(-c.rung, c.value) for c in candidates if c.tier == "cut"]
    assert cut == sorted(cut)


# ---- orchestrator confirm: the plan and its refusals ---------------------------------------------------


def first_stage(tmp_path: Path, outcomes=None, extra: str = "confirm: {top: 1, seeds: 2}"):
    sweep = load(tmp_path, extra)
    sweep_dir = write_first_stage(tmp_path, sweep, outcomes or OUTCOMES)
    return sweep, sweep_dir, tmp_path / "results"


def test_plan_selects_writes_nothing_and_names_fresh_seeds(tmp_path):
    sweep, sweep_dir, results = first_stage(tmp_path)
    plan = plan_confirm(results, "ex", first=sweep, include=[{"variant": "dcgan"}], seeds=[5, 6])
    assert [c.configuration for c in plan.chosen] == [{"variant": "use-gan"}, {"variant": "dcgan"}]
    assert plan.record["seeds"] == [5, 6] and plan.record["first_stage_fingerprint"] == sweep.fingerprint()
    assert plan.record["first_stage"] == {"trials": 18, "unfinished": 0, "errored": 3, "diverged": 3}
    assert "configurations selected by top 1 on final fid + include variant=dcgan on sweep ex; fresh seeds 5, 6" \
        == plan.sweep.description
    assert not (results / "ex-confirm").exists()


def test_an_unfinished_first_stage_is_refused_unless_allow_partial(tmp_path):
    outcomes = {**OUTCOMES, "dcgan": [completed(30.0), ("interrupted", None, {1.0: 33.0}), completed(31.0)]}
    sweep, _, results = first_stage(tmp_path, outcomes)
    with pytest.raises(ConfirmError, match=r"sweep ex is unfinished \(1 of 18 trials unfinished\).*--allow-partial"):
        plan_confirm(results, "ex", first=sweep)
    plan = plan_confirm(results, "ex", first=sweep, allow_partial=True)
    assert plan.record["allow_partial"] is True and "--allow-partial" in plan.sweep.description


def test_confirm_reads_the_recorded_configuration_and_refuses_changed_data(tmp_path):
    sweep, sweep_dir, results = first_stage(tmp_path)
    record = {"event": "run", "config": effective_config(sweep), "data": {"source": "synthetic",
                                                                          "fingerprint": "0" * 64}}
    (sweep_dir / PROVENANCE_FILE).write_text(json.dumps(record, sort_keys=True) + "\n")
    with pytest.raises(ConfirmError, match="its data changed since it ran"):
        plan_confirm(results, "ex")
    plan = plan_confirm(results, "ex", check_data=False)  # the recorded (sorted) configuration is the sweep
    assert plan.first.fingerprint() == sweep.fingerprint() and plan.sweep.train.kimg == 4.0


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"top": 0}, "--top: must be >= 1"),
    ({"seeds": 1}, "--seeds: must be >= 2"),
    ({"seeds": [1, 9]}, "--seeds: [1] is already used"),
    ({"include": [{"variant": "lsgan"}]}, "--include variant=lsgan: 'lsgan' is not among"),
    ({"include": [{"heads": 2}]}, "--include heads=2: unknown parameter 'heads'"),
])
def test_bad_flags_are_one_line_errors(tmp_path, kwargs, words):
    sweep, _, results = first_stage(tmp_path)
    with pytest.raises(ConfirmError) as err:
        plan_confirm(results, "ex", first=sweep, **kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_unknown_sweeps_and_confirm_stages_are_refused(tmp_path):
    sweep, _, results = first_stage(tmp_path)
    with pytest.raises(ConfirmError, match="no sweep named 'nope'"):
        plan_confirm(results, "nope")
    stage = results / "ex-confirm"
    stage.mkdir()
    (stage / "fingerprint").write_text("x\n")
    (stage / SELECTION_FILE).write_text(json.dumps({"sweep": "ex"}))
    with pytest.raises(ConfirmError, match="is the confirm stage of sweep ex; confirm ex instead"):
        plan_confirm(results, "ex-confirm")


def test_resuming_a_confirm_stage_whose_first_stage_changed_is_refused(tmp_path):
    sweep, _, results = first_stage(tmp_path)
    plan = plan_confirm(results, "ex", first=sweep)
    stage = results / "ex-confirm"
    stage.mkdir()
    for change, words in (({"first_stage_fingerprint": "f" * 64}, "the first stage's sweep file changed"),
                          ({"seeds": [40, 41]}, "the selection changed")):
        (stage / SELECTION_FILE).write_text(json.dumps({**plan.record, **change}))
        with pytest.raises(ConfirmError, match=words):
            run_confirm(plan, results, address=None, resume=True, console=None)


def test_include_flags_and_seed_lists_parse():
    assert parse_include(["variant=dcgan,heads=4", "lr_d=1.0e-4"]) == [{"variant": "dcgan", "heads": 4},
                                                                       {"lr_d": 1.0e-4}]
    assert parse_seeds("5") == 5 and parse_seeds("7,8") == [7, 8] and parse_seeds(None) is None
    for bad in (["variant"], ["=x"]):
        with pytest.raises(ConfirmError, match="KEY=VALUE"):
            parse_include(bad)
    with pytest.raises(ConfirmError, match="a count or a comma-separated list"):
        parse_seeds("two")


# ---- two stages: which stage runs, and the exit code ---------------------------------------------------


class FakeRuns:
    """Stands in for `run_sweep`: records which stage ran (and with which resume), writes what a claim writes."""

    def __init__(self, errors_in: tuple[str, ...] = (), finish=None):
        self.calls: list[tuple[str, bool]] = []
        self.errors_in, self.finish = errors_in, finish

    def __call__(self, sweep, results, *, resume, on_claimed=None, **_):
        from orchestrator.workflow.sweep import SweepErrors

        self.calls.append((sweep.name, resume))
        (results / sweep.name / "tune").mkdir(parents=True, exist_ok=True)
        if on_claimed is not None:
            on_claimed(results / sweep.name)
        if self.finish is not None and not sweep.name.endswith("-confirm"):
            self.finish()
        if sweep.name in self.errors_in:
            raise SweepErrors(3, sweep.trial_count())
        return results / sweep.name


def run_two_stages(monkeypatch, sweep, results, fake: FakeRuns, *, resume: bool):
    import io

    from rich.console import Console

    from orchestrator.workflow import confirm as confirm_module

    monkeypatch.setattr(confirm_module, "run_sweep", fake)
    out = io.StringIO()
    try:
        return confirm_module.run_stages(sweep, results, address=None, resume=resume, console=Console(file=out))
    finally:
        run_two_stages.output = out.getvalue()


def test_a_first_stage_with_errors_is_still_confirmed_and_the_sweep_exits_with_errors(tmp_path, monkeypatch):
    from orchestrator.workflow.sweep import SweepErrors

    sweep, _, results = first_stage(tmp_path)
    fake = FakeRuns(errors_in=("ex",))
    with pytest.raises(SweepErrors) as err:
        run_two_stages(monkeypatch, sweep, results, fake, resume=False)
    assert fake.calls == [("ex", False), ("ex-confirm", False)] and err.value.errored == 3
    record = json.loads((results / "ex-confirm" / SELECTION_FILE).read_text())
    assert record["first_stage"]["errored"] == 3 and record["seeds"] == [3, 4]
    assert "paper table (fresh seeds): orchestrator leaderboard" in run_two_stages.output


def test_resume_continues_whichever_stage_was_interrupted(tmp_path, monkeypatch):
    sweep, sweep_dir, results = first_stage(tmp_path)
    (sweep_dir / "tune").mkdir()
    fake = FakeRuns()  # the first stage finished: the confirm stage starts
    run_two_stages(monkeypatch, sweep, results, fake, resume=True)
    assert fake.calls == [("ex-confirm", False)]
    assert "sweep ex: finished; continuing with its confirm stage ex-confirm" in run_two_stages.output
    fake = FakeRuns()  # the confirm stage had started: it is resumed, on the selection it started with
    run_two_stages(monkeypatch, sweep, results, fake, resume=True)
    assert fake.calls == [("ex-confirm", True)]
    interrupted = {**OUTCOMES, "dcgan": [completed(30.0), ("interrupted", None, {1.0: 33.0}), completed(31.0)]}
    (tmp_path / "b").mkdir()
    sweep, sweep_dir, results = first_stage(tmp_path / "b", interrupted)
    (sweep_dir / "tune").mkdir()

    def finish():  # what the resumed first stage does: its interrupted trial completes
        writer = ResultsWriter(sweep_dir, "ex", parameter_columns(sweep.swept_names()))
        writer.update_trial("dcgan-1", status="completed", final_fid=32.0)
        writer.close()

    fake = FakeRuns(finish=finish)  # the first stage was interrupted: it is resumed, then confirmed
    run_two_stages(monkeypatch, sweep, results, fake, resume=True)
    assert fake.calls == [("ex", True), ("ex-confirm", False)]
