"""`orchestrator report`: a sweep's self-contained HTML page, checked as text and in headless Chromium."""
from __future__ import annotations

import base64
import io
import re
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision.utils
from browser import open_in_chromium
from PIL import Image

from orchestrator.analysis.leaderboard import LeaderboardError
from orchestrator.analysis.report import write_report
from orchestrator.store.reader import ResultsError
from orchestrator.store.tables import ResultsWriter

SWEEP_YAML = """\
name: variants-demo
description: USE <vs> DCGAN & friends
method: grid
train: {kimg: 80}
eval: {extractor: tiny-conv, every_kimg: 20, fid_samples: 256, final_fid_samples: 256}
parameters:
  variant: {values: [dcgan, use-gan]}
  seed: {values: [0, 1, 2]}
scheduler: {type: asha, grace_period: 40, reduction_factor: 3, max_t: 80}
"""
WIDTHS = "64-32-16"
KIMG_BUDGET = 80.0
# trial id -> (variant, seed, status, FID at kimg 20, 40, ...); final FIDs (at the 80-kimg budget) of the
# completed trials: dcgan 80 (t0), use-gan 50 and 60 (t3, t4); the others have none and are never averaged.
TRIALS = {
    "t0": ("dcgan", 0, "completed", [300.0, 150.0, 100.0, 80.0]),
    "t1": ("dcgan", 1, "stopped_early", [320.0, 90.0]),
    "t2": ("dcgan", 2, "diverged", [310.0, 100.0, 900.0]),
    "t3": ("use-gan", 0, "completed", [250.0, 120.0, 70.0, 50.0]),
    "t4": ("use-gan", 1, "completed", [260.0, 110.0, 75.0, 60.0]),
    "t5": ("use-gan", 2, "stopped_early", [270.0, 70.0]),
}
DIVERGED_REASON = "non-finite loss_d <nan> at step 1200"
MISSING_GRID_TRIAL = "t4"  # among the ranked trials: its latest grid file is deleted


def build_sweep(root: Path, trials: dict = TRIALS, widths: dict[str, str] | None = None) -> Path:
    """A sweep directory as `orchestrator sweep` leaves it, written through ResultsWriter without Ray."""
    sweep_dir = root / "variants-demo"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "sweep.yaml").write_text(SWEEP_YAML)
    (sweep_dir / "fingerprint").write_text("0123abcd\n")
    writer = ResultsWriter(sweep_dir, "variants-demo", ["g_widths", "seed", "variant"])
    start = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
    for i, (trial_id, (variant, seed, status, fids)) in enumerate(trials.items()):
        params = {"g_widths": (widths or {}).get(trial_id, WIDTHS), "seed": seed, "variant": variant}
        grids = sweep_dir / "trials" / trial_id / "grids"
        grids.mkdir(parents=True)
        evaluations = []
        for step, fid in enumerate(fids, start=1):
            kimg = 20.0 * step
            grid = grids / f"grid-kimg{kimg:09.3f}.png"
            torch.manual_seed(i * 100 + step)
            torchvision.utils.save_image(torch.rand(16, 3, 16, 16), grid, nrow=4)
            row = {"trial_id": trial_id, **params, "kimg": kimg, "fid": fid, "is_mean": 2.0 + 0.1 * step,
                   "extractor": "tiny-conv", "fid_samples": 256, "final": kimg == KIMG_BUDGET,
                   "grid_path": str(grid), "data_source": "synthetic", "time": start + timedelta(minutes=step)}
            writer.add_evaluation(row)
            evaluations.append(row)
        best = min(evaluations, key=lambda r: r["fid"])
        last = evaluations[-1]
        writer.update_trial(
            trial_id, **params, status=status, reason=DIVERGED_REASON if status == "diverged" else "",
            best_fid=best["fid"], best_fid_kimg=best["kimg"], best_is=best["is_mean"],
            final_fid=last["fid"] if last["final"] else None, final_is=last["is_mean"] if last["final"] else None,
            final_fid_samples=256 if last["final"] else None, extractor="tiny-conv", kimg=last["kimg"],
            kimg_budget=KIMG_BUDGET, evaluations=len(evaluations), grid_path=last["grid_path"],
            run_dir=str(grids.parent), data_source="synthetic", started=start, ended=start + timedelta(hours=1),
        )
    writer.close()
    return sweep_dir


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """The report of a sweep run on a 'cluster' and copied elsewhere (recorded grid paths no longer exist)."""
    root = tmp_path_factory.mktemp("report")
    cluster_copy = build_sweep(root / "cluster")
    sweep_dir = Path(shutil.move(cluster_copy, root / "laptop" / "variants-demo"))
    (sweep_dir / "trials" / MISSING_GRID_TRIAL / "grids" / "grid-kimg00080.000.png").unlink()
    return write_report(sweep_dir)


def decode_png(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(src[len(prefix):])))
    image.load()
    return image


def test_report_is_written_next_to_the_results_by_default(report):
    assert report.name == "report.html" and (report.parent / "trials.parquet").exists()


def test_header_names_sweep_statuses_data_and_warns_about_tiny_conv(report):
    page = report.read_text()
    assert "Sweep report: variants-demo" in page
    for status, count in {"completed": 3, "stopped_early": 2, "diverged": 1, "error": 0, "running": 0}.items():
        assert f"{status}: {count}</span>" in page
    assert "synthetic (procedurally generated faces" in page
    assert "not comparable to published (Inception) FIDs" in page
    assert "USE &lt;vs&gt; DCGAN &amp; friends" in page  # the sweep's description, escaped


def test_grouped_leaderboard_has_variant_means_with_95_ci_then_ranked_trials(report):
    page = report.read_text()
    groups = page[page.index('<table class="groups">'):page.index('<table class="trials">')]
    # final FIDs 50 and 60: median 55, mean ± t(0.975, 1) * 5 = ± 63.53. dcgan has one completed trial (80)
    # and one diverged: half its key's trials diverged, so it is listed unranked, its mean beside the count.
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", groups.split("<tbody>")[1])
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in rows]
    # columns: rank, variant, n, n in mean, completed, stopped early, diverged, error, median, mean ± CI
    assert [c[:10] for c in cells] == [
        ["1", "use-gan", "3", "2", "2", "1", "0", "0", "55.00", "55.00 ± 63.53"],
        ["-", "dcgan", "3", "1", "1", "1", "1", "0",
         "unranked: diverged on 1 of 2 trials (half or more: its median is the worst outcome)",
         "80.00 (n=1) (1 of 3 diverged)"],
    ]
    assert "over completed and diverged trials" in groups
    assert "final FID at 80 kimg, 256 generated images" in groups
    trials = page[page.index('<table class="trials">'):]
    ranked_ids = re.findall(r"<tr[^>]*><td[^>]*>\d+</td><td>(t\d)</td>", trials)
    assert ranked_ids == ["t3", "t4", "t0"]  # stopped and diverged trials are listed after, unranked
    assert re.search(r"not ranked: no final FID.*t1.*t2.*t5", trials, re.S)
    assert re.search(r"s-diverged.*non-finite loss_d &lt;nan&gt; at step 1200", trials)  # status and reason


def test_fid_curves_are_one_embedded_png_on_a_log_axis_when_fid_spans_10x(report):
    page = report.read_text()
    src = re.search(r'<img id="fid-curves"[^>]*src="([^"]+)"', page).group(1)
    image = decode_png(src)
    assert image.width > 600 and image.height > 300
    assert "is log scale" in page  # FIDs span 50..900


def test_best_trials_show_their_latest_grid_and_a_note_for_a_missing_file(report):
    page = report.read_text()
    grids = re.findall(r'<img alt="samples of trial (t\d)" src="([^"]+)"', page)
    assert [t for t, _ in grids] == ["t3", "t0"]  # the ranked trials are t3 t4 t0; t4's grid is gone
    assert all(decode_png(src).size == (74, 74) for _, src in grids)  # 4x4 grid of 16 px images, 2 px padding
    assert re.search(r"Sample grid file missing for: t4 \(<code>[^<]*grid-kimg00080\.000\.png</code>\)", page)
    assert "#1 t3</strong>" in page and "final FID <strong>50.00</strong> at 80 kimg" in page


def test_sweep_file_is_shown_escaped_and_nothing_is_fetched_from_the_network(report):
    page = report.read_text()
    assert "<pre>name: variants-demo\ndescription: USE &lt;vs&gt; DCGAN &amp; friends\n" in page
    assert "<vs>" not in page
    assert not re.search(r'(src|href)="(https?:)?//', page)


def test_default_grouping_falls_back_to_generator_widths(tmp_path):
    one_variant = {t: ("dcgan", *rest[1:]) for t, rest in TRIALS.items()}
    widths = {"t0": "64-32-16", "t1": "64-32-16", "t2": "64-32-16", "t3": "32-16-8", "t4": "32-16-8", "t5": "32-16-8"}
    page = write_report(build_sweep(tmp_path, one_variant, widths), tmp_path / "out" / "r.html").read_text()
    assert "<h3>By g_widths: ranked on the median final FID" in page
    assert "<td>32-16-8</td><td>3</td>" in page


def test_missing_or_empty_results_raise_a_one_line_error(tmp_path):
    with pytest.raises(LeaderboardError, match="no such sweep results directory"):
        write_report(tmp_path / "nope")
    # The store's reader says there is nothing to read (the leaderboard's errors are a kind of it).
    with pytest.raises(ResultsError, match="no trials recorded yet"):
        write_report(tmp_path)
    writer = ResultsWriter(tmp_path, "empty", ["variant"])
    writer.update_trial("t0", variant="dcgan", status="running")
    writer.close()
    with pytest.raises(ResultsError, match="no trial has an evaluation yet"):
        write_report(tmp_path)


def test_report_renders_in_headless_chromium_with_every_image_decoded(report, tmp_path):
    dom, page_errors = open_in_chromium(report, tmp_path / "profile")
    assert 'data-images-total="3"' in dom and 'data-images-ok="3"' in dom  # the curves and 2 grids decoded
    assert '<table class="groups">' in dom and "55.00 ± 63.53" in dom
    assert not page_errors, page_errors


def test_grid_paths_outside_the_sweep_directory_are_not_embedded(tmp_path):
    """A grid_path in the Parquet is data: the report must not publish an arbitrary file it names."""
    sweep_dir = build_sweep(tmp_path / "results")
    secret = tmp_path / "secret.png"  # a real PNG outside the sweep directory
    torchvision.utils.save_image(torch.rand(1, 3, 8, 8), secret)
    escape = sweep_dir / "trials" / "t4" / "grids" / "escape.png"
    escape.symlink_to(secret)  # inside by name, outside once resolved
    import pyarrow.parquet as pq

    trials = pq.read_table(sweep_dir / "trials.parquet").to_pandas()
    trials.loc[trials.trial_id == "t3", "grid_path"] = str(secret)
    trials.loc[trials.trial_id == "t4", "grid_path"] = str(escape)
    trials.to_parquet(sweep_dir / "trials.parquet", index=False)
    page = write_report(sweep_dir, tmp_path / "r.html").read_text()
    grids = re.findall(r'<img alt="samples of trial (t\d)" src="([^"]+)"', page)
    assert [t for t, _ in grids] == ["t0"]  # ranked: t3 t4 t0; both others point outside
    secret_uri = base64.b64encode(secret.read_bytes()).decode()
    assert secret_uri not in page
    outside = r"Sample grid outside the sweep directory, not embedded, for: ([^<]*<code>[^<]*</code>[^<]*)+"
    note = re.search(outside, page)
    assert note and "t3" in note.group(0) and "t4" in note.group(0)


def test_default_grouping_is_every_varying_parameter_but_the_seed_so_it_never_pools(tmp_path):
    # Both variants ran both widths: grouping by variant alone would average over two configurations.
    widths = {"t0": "64-32-16", "t1": "32-16-8", "t2": "64-32-16", "t3": "32-16-8", "t4": "64-32-16", "t5": "32-16-8"}
    page = write_report(build_sweep(tmp_path, TRIALS, widths), tmp_path / "r.html").read_text()
    assert "<h3>By g_widths, variant: ranked on the median final FID" in page
    assert "mixes" not in page and "configurations</th>" not in page
    # Asked for explicitly, a grouping in which every group mixes widths is refused, or averaged with --pool.
    with pytest.raises(LeaderboardError, match=r"add it \(--group-by variant,g_widths\), or pass --pool"):
        write_report(tmp_path / "variants-demo", tmp_path / "r2.html", group_by=["variant"])
    page = write_report(tmp_path / "variants-demo", tmp_path / "r2.html", group_by=["variant"], pool=True).read_text()
    assert "<td>2 (g_widths)</td>" in page and "averaged over them (--pool)" in page


def test_final_fid_is_its_own_marker_not_joined_to_the_curve(report):
    from orchestrator.analysis.report import split_final

    curve = pd.DataFrame({"kimg": [20.0, 40.0, 80.0], "fid": [90.0, 70.0, 50.0], "final": [False, False, True]})
    steps, final = split_final(curve)
    assert list(steps["kimg"]) == [20.0, 40.0] and list(final["kimg"]) == [80.0]
    assert split_final(curve.drop(columns="final"))[1].empty  # tables without the column: all intermediate
    page = report.read_text()
    assert "the FID during training (FID-256); diamonds: the final FID (FID-256), a separate evaluation, drawn on " \
           "its own and not joined to the line" in page


def test_report_passes_the_interval_method_to_its_tables(tmp_path):
    page = write_report(build_sweep(tmp_path), tmp_path / "r.html", ci="bootstrap").read_text()
    assert "mean ± bootstrap 95% CI" in page and "55.00 [50.00, 60.00]" in page
