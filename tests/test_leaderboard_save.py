"""`orchestrator leaderboard --save DIR`: the table in every format and analysis.json, enough to regenerate it."""
from __future__ import annotations

import json
import shlex
import subprocess
from importlib import metadata

from test_leaderboard_pooling import CLI, PARAMS, REPO, heads_sweep

from orchestrator.analysis.formats import sections
from orchestrator.analysis.leaderboard import build_board
from orchestrator.analysis.saved import ANALYSIS_FILE, TABLE_FILES


def test_save_writes_every_format_and_the_analysis_record(tmp_path):
    sweep_dir = heads_sweep(tmp_path)
    out = tmp_path / "paper" / "table1"
    flags = ["--results", str(tmp_path / "results"), "--group-by", "variant,heads", "--baseline", "variant=dcgan",
             "--ci", "bootstrap", "--format", "json", "--save", str(out)]
    proc = subprocess.run([*CLI, "leaderboard", *flags], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([*TABLE_FILES.values(), ANALYSIS_FILE])
    assert json.loads((out / "leaderboard.json").read_text()) == json.loads(proc.stdout)  # a list of rows
    assert (out / "leaderboard.csv").read_text().startswith("rank,variant,heads,n,")
    assert r"\begin{tabular}" in (out / "leaderboard.tex").read_text()
    assert "| rank | variant | heads |" in (out / "leaderboard.md").read_text()
    text = (out / "leaderboard.txt").read_text()
    assert "cmhsa-gan" in text and "n in mean" in text and "\x1b[" not in text  # plain text, no colour codes

    record = json.loads((out / ANALYSIS_FILE).read_text())
    assert shlex.split(record["command"]) == ["orchestrator", "leaderboard", *flags]
    assert record["flags"]["group_by"] == ["variant", "heads"] and record["flags"]["ci"] == "bootstrap"
    assert record["flags"]["baseline"] == "variant=dcgan" and record["flags"]["pool"] is False
    board = build_board(sweep_dir, group_by=["variant", "heads"], baseline="variant=dcgan", ci="bootstrap")
    assert record["captions"] == [s.title for s in sections(board, ["variant", "heads"], PARAMS)]
    assert record["families"] == [{"extractor": "tiny-conv", "fid_kimg": 4.0, "fid_samples": 512,
                                   "baseline": "variant=dcgan", "comparisons": 3}]
    assert record["sweep"]["fingerprint"] == "f00d" and record["sweep"]["name"] == "s"
    versions = record["versions"]
    assert versions["gan-sweeps"] == metadata.version("gan-sweeps")
    assert versions["scipy"] == metadata.version("scipy")
    assert versions["torch-fidelity"] == metadata.version("torch-fidelity")
    assert record["statistics"]["bootstrap"] == {"resamples": 10000, "seed": 0, "min_n": 10}
    assert any("bootstrap intervals from 3 values" in w for w in record["warnings"])


def test_save_into_an_unwritable_place_is_one_line(tmp_path):
    heads_sweep(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = subprocess.run([*CLI, "leaderboard", "--results", str(tmp_path / "results"), "--group-by",
                           "variant,heads", "--save", str(blocker / "out")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--save" in proc.stderr, \
        proc.stderr
