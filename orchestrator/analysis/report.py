"""`orchestrator report`: one self-contained HTML page that summarises a sweep.

Everything the page shows lives inside the file: the FID curves and the sample grids
are PNGs embedded as base64 data URIs and the CSS is inline, so the page opens
offline, from a mail attachment or on a laptop that has no copy of the results.
A few lines of inline script record on <body> how many images the browser decoded
(data-images-ok / data-images-total), so anyone can check the page in a real browser.
"""
from __future__ import annotations

import base64
import html
import io
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from gan.config import TINY_CONV
from orchestrator.analysis.formats import Section, fmt, sections
from orchestrator.analysis.groups import REPLICATES
from orchestrator.analysis.leaderboard import Board, LeaderboardError, build_board, ranking_title
from orchestrator.analysis.plan import samples_label
from orchestrator.analysis.stages import stage_html
from orchestrator.store.reader import load_evaluations, load_trials, parameter_names

REPORT_FILE = "report.html"
SWEEP_FILE = "sweep.yaml"
HEADER_STATUSES = ("completed", "stopped_early", "diverged", "error", "running")
LOG_SCALE_RATIO = 10.0  # a y range wider than this is drawn on a log axis
MAX_LEGEND_GROUPS = 20
FINAL_MARKER = "D"  # the final FID: its own marker, never joined to the intermediate curve
GRID_KIMG = re.compile(r"grid-kimg(\d+(?:\.\d+)?)\.png$")

# How each status draws its curve: line style, marker at the last point, marker size, legend text.
CURVE_STYLE: dict[str, tuple[str, str, float, str]] = {
    "completed": ("-", "", 0, "completed (solid; its final FID: diamond)"),
    "running": ("-", ">", 6, "running / pending (arrow: latest)"),
    "stopped_early": ("--", "x", 9, "stopped early by ASHA (dashed, x)"),
    "diverged": (":", "*", 12, "diverged (dotted, star)"),
    "error": (":", "s", 7, "error (dotted, square)"),
}

CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f5f6f8;color:#1d2430;
  font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
main{max-width:1200px;margin:0 auto;padding:18px 24px 48px}
h1{font-size:23px;margin:4px 0 2px}
h2{font-size:17px;margin:30px 0 10px;padding-bottom:4px;border-bottom:1px solid #d5dae1}
h3{font-size:14px;margin:14px 0 4px;color:#3b4654}
p{margin:6px 0}
nav a{margin-right:14px;color:#2457a6;text-decoration:none}
.muted{color:#5f6b7a}
.facts{display:grid;grid-template-columns:max-content 1fr;gap:3px 18px;margin:12px 0;background:#fff;
  padding:10px 14px;border:1px solid #e3e7ec;border-radius:6px}
.facts dt{color:#5f6b7a}.facts dd{margin:0}
.warn{margin:12px 0;padding:9px 14px;background:#fff4db;border-left:5px solid #d98c00;border-radius:4px}
.note{margin:8px 0;padding:6px 12px;background:#eef2f7;border-radius:4px}
.scroll{overflow-x:auto}
table{border-collapse:collapse;background:#fff;margin:4px 0 10px;font-variant-numeric:tabular-nums;
  border:1px solid #e3e7ec}
th,td{padding:4px 10px;border-bottom:1px solid #e8ebef;text-align:left;white-space:nowrap}
th{background:#eef1f5;font-weight:600;font-size:13px}
td.num{text-align:right}
tbody tr:nth-child(even){background:#fafbfc}
tbody tr.first{font-weight:600}
.badge{display:inline-block;padding:0 7px;border-radius:9px;font-size:12px;background:#e9ecf0}
.s-completed{background:#dff3e5;color:#15632d}.s-stopped_early{background:#fff0d2;color:#875600}
.s-diverged{background:#fde0df;color:#a11d1a}.s-error{background:#f2ddf6;color:#74208a}
.s-running,.s-pending{background:#e0eafa;color:#1f4f9e}
figure{margin:0;background:#fff;padding:8px;border:1px solid #e3e7ec;border-radius:6px}
figure img{display:block;max-width:100%;height:auto}
figcaption{font-size:12.5px;margin-top:6px}
.grids{display:grid;grid-template-columns:repeat(auto-fill,minmax(270px,1fr));gap:14px}
pre{background:#15202b;color:#e6edf3;padding:12px 14px;border-radius:6px;overflow:auto;font-size:12.5px;line-height:1.4}
"""

IMAGE_CHECK_JS = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  document.body.dataset.imagesTotal = images.length;
  document.body.dataset.imagesOk = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
});
"""


def write_report(sweep_dir: Path, out: Path | None = None, *, group_by: list[str] | None = None, top: int = 4,
                 at_kimg: float | None = None, baseline: str | None = None, failures: str = "include",
                 ci: str = "t", pool: bool = False) -> Path:
    """Write the sweep's HTML report (default `<sweep_dir>/report.html`) and return its path."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise LeaderboardError(f"{sweep_dir}: no such sweep results directory")
    all_trials = load_trials(sweep_dir)  # raises when no trial has an evaluation yet
    ranked_df = all_trials[all_trials["evaluations"].fillna(0).astype(int) > 0]
    evaluations = load_evaluations(sweep_dir)  # compacted rows and a running sweep's parts, as one table
    by = group_by if group_by is not None else default_group_by(ranked_df)
    if baseline is not None and not by:
        raise LeaderboardError(
            "--baseline needs a grouping: pass --group-by (this sweep varies no parameter but the seed, the "
            "default grouping being every parameter that varies)"
        )
    # The same tables as `orchestrator leaderboard` (final FID by default, never pooled across blocks).
    groups = (build_board(sweep_dir, group_by=by, at_kimg=at_kimg, baseline=baseline, failures=failures, ci=ci,
                          pool=pool) if by else None)
    trials_board = build_board(sweep_dir, at_kimg=at_kimg)
    ranked = [r for r in trials_board.rows if r["rank"] is not None]
    sweep_text = (sweep_dir / SWEEP_FILE).read_text() if (sweep_dir / SWEEP_FILE).exists() else None
    name = str(all_trials["sweep"].dropna().iloc[0]) if all_trials["sweep"].notna().any() else sweep_dir.name

    body = [
        header(name, sweep_dir, all_trials, sweep_text),
        stage_html(sweep_dir),  # explore, then confirm: the other stage and the selection ("" for neither)
        leaderboard_section(groups, trials_board, by, parameter_names(all_trials)),
        curves_section(
            evaluations,
            all_trials,
            by,
            [group_label(r, by or ["trial_id"]) for r in (groups.rows if groups else trials_board.rows)],
        ),
        grids_section(sweep_dir, ranked_df, ranked, parameter_names(all_trials), top, trials_board.label),
        sweep_file_section(sweep_text),
    ]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Sweep report: {esc(name)}</title><style>{CSS}</style>"
        f"<script>{IMAGE_CHECK_JS}</script></head>\n<body><main>\n" + "\n".join(body) + "\n</main></body></html>\n"
    )
    out = Path(out) if out is not None else sweep_dir / REPORT_FILE
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
    except OSError as exc:  # --out under a regular file, in /proc, a directory, a read-only disk
        reason = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else (exc.strerror or str(exc))
        raise LeaderboardError(f"{out}: cannot write the report ({reason})") from None
    return out


def default_group_by(df: pd.DataFrame) -> list[str] | None:
    """Every swept parameter that varies, other than seed and repeat: one group per configuration, so the
    report never averages over configurations; None (rank single trials) when only the seeds vary."""
    columns = [c for c in parameter_names(df) if c not in REPLICATES
               and df[c].map(lambda v: repr(None if pd.isna(v) else v)).nunique() > 1]
    return columns or None


# ---- header -------------------------------------------------------------------------------------


def header(name: str, sweep_dir: Path, trials: pd.DataFrame, sweep_text: str | None) -> str:
    counts = trials["status"].value_counts()
    shown = list(HEADER_STATUSES) + [s for s in counts.index if s not in HEADER_STATUSES]
    status_line = " ".join(f'<span class="badge s-{esc(s)}">{esc(s)}: {int(counts.get(s, 0))}</span>' for s in shown)
    sources = sorted(str(s) for s in trials["data_source"].dropna().unique())
    extractors = sorted(str(e) for e in trials["extractor"].dropna().unique())
    devices = trials["device_used"].dropna().value_counts() if "device_used" in trials else pd.Series(dtype=int)
    facts = {
        "trials": f"{len(trials)} &nbsp; {status_line}",
        "ran": run_period(trials),
        "report written": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "data": ", ".join(data_label(s) for s in sources) or "unknown (no evaluation reported it)",
        "feature extractor": ", ".join(esc(e) for e in extractors) or "unknown",
        # What actually ran (a trial that found no usable CUDA ends in error instead of training on the CPU).
        "device used": ", ".join(f"{esc(d)} ({n} trials)" for d, n in devices.items()) or "unknown",
        "results": f"<code>{esc(sweep_dir.resolve())}</code>",
    }
    parts = [f"<h1>Sweep report: {esc(name)}</h1>"]
    description = sweep_description(sweep_text)
    if description:
        parts.append(f'<p class="muted">{esc(description)}</p>')
    parts.append(
        '<nav><a href="#leaderboard">Leaderboard</a><a href="#curves">FID curves</a>'
        '<a href="#samples">Samples</a><a href="#sweep-file">Sweep file</a></nav>'
    )
    parts.append('<dl class="facts">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts.items()) + "</dl>")
    if TINY_CONV in extractors:
        parts.append(
            '<div class="warn"><strong>Warning: FIDs measured with the tiny-conv extractor.</strong> '
            "tiny-conv is a random-weight offline stand-in for InceptionV3: its FIDs rank trials of this sweep "
            "against each other, but are <strong>not comparable to published (Inception) FIDs</strong>.</div>"
        )
    if len(extractors) > 1:
        parts.append('<div class="note">Several feature extractors: each is ranked and plotted separately.</div>')
    if int(counts.get("running", 0)) + int(counts.get("pending", 0)):
        parts.append('<div class="note">The sweep is still running: this report is a snapshot.</div>')
    return "\n".join(parts)


def run_period(trials: pd.DataFrame) -> str:
    started, ended = trials["started"].dropna(), trials["ended"].dropna()
    if started.empty:
        return "not started"
    text = f"{started.min():%Y-%m-%d %H:%M}"
    return text + (f" &rarr; {ended.max():%Y-%m-%d %H:%M} UTC" if not ended.empty else " UTC &rarr; (running)")


def data_label(source: str) -> str:
    if source == "synthetic":
        return "synthetic (procedurally generated faces, not a real dataset)"
    return f"<code>{esc(source)}</code>"


def sweep_description(sweep_text: str | None) -> str | None:
    if not sweep_text:
        return None
    try:
        spec = yaml.safe_load(sweep_text)
    except yaml.YAMLError:
        return None
    description = spec.get("description") if isinstance(spec, dict) else None
    return str(description) if description else None


# ---- leaderboard --------------------------------------------------------------------------------


def leaderboard_section(groups: Board | None, trials: Board, by: list[str] | None, params: list[str]) -> str:
    parts = [
        '<h2 id="leaderboard">Leaderboard</h2>',
        f'<p class="muted">Ranked on the {esc(trials.label)} (lower is better): numbers with another extractor, '
        "kimg or sample count are never pooled; trials without one are listed after the ranking and never "
        "enter a mean; groups are never averaged over configurations unless --pool.</p>",
    ]
    if trials.partial_note:
        parts.append(f'<div class="warn">{esc(trials.partial_note)}</div>')
    if groups is not None:
        parts.append(f"<h3>By {esc(', '.join(by))}: {esc(ranking_title(groups))}</h3>")
        parts += [section_html(sec, "groups") for sec in sections(groups, by, params)]
    parts.append(f"<h3>Trials by {esc(trials.label)}</h3>")
    parts += [section_html(sec, "trials") for sec in sections(trials, None, params)]
    return "\n".join(parts)


def section_html(sec: Section, kind: str) -> str:
    """A leaderboard table; status cells get their badge, the best row (rank 1) is highlighted."""
    status_at = sec.headers.index("status") if "status" in sec.headers else None
    body = []
    for row in sec.rows:
        cells = [
            f"<td>{status_badge(c, None)}</td>" if i == status_at else f"<td>{esc(c)}</td>" for i, c in enumerate(row)
        ]
        body.append(row_html(cells, first=sec.first_is_best and row[0] == "1"))
    return table_html(esc(sec.title), [esc(h) for h in sec.headers], body, kind)


def status_badge(status: str, reason: Any) -> str:
    title = f' title="{esc(reason)}"' if has_text(reason) else ""
    text = esc(status) + (f": {esc(reason)}" if title and status in ("diverged", "error") else "")
    return f'<span class="badge s-{esc(status)}"{title}>{text}</span>'


def has_text(value: Any) -> bool:
    """A non-empty string (Parquet nulls arrive as None or NaN)."""
    return isinstance(value, str) and bool(value)


def table_html(caption: str, heads: list[str], body: list[str], kind: str) -> str:
    head = "".join(f"<th>{h}</th>" for h in heads)
    return (
        f'<div class="scroll"><table class="{kind}"><caption class="muted" style="text-align:left">{caption}'
        f"</caption><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
    )


def row_html(cells: list[str], first: bool) -> str:
    return f"<tr{' class=first' if first else ''}>{''.join(cells)}</tr>"


def kimg_text(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


# ---- FID curves ---------------------------------------------------------------------------------


def curves_section(
    evaluations: pd.DataFrame, trials: pd.DataFrame, by: list[str] | None, legend_order: list[str]
) -> str:
    parts = ['<h2 id="curves">FID during training</h2>']
    if evaluations.empty or evaluations["fid"].notna().sum() == 0:
        parts.append('<div class="note">No evaluations recorded yet.</div>')
        return "\n".join(parts)
    png, log_axes, (during, final) = fid_curves_png(evaluations, trials, by, legend_order)
    scale = ""
    if log_axes:
        scale = f" The FID axis of {', '.join(log_axes)} is log scale (its range spans more than 10x)."
    what = f"the FID during training ({', '.join(during) or 'none yet'})"
    if final:
        apart = "measured with another sample count" if final != during else "a separate evaluation"
        what += f"; diamonds: the final FID ({', '.join(final)}), {apart}, drawn on its own and not joined to the line"
    parts.append(
        f'<figure><img id="fid-curves" alt="FID against kimg for every trial" src="{data_uri(png)}">'
        f"<figcaption>One line per trial, coloured by {esc(', '.join(by) if by else 'trial')}: {esc(what)}. "
        f"Line style and end marker show how the trial ended.{esc(scale)}</figcaption></figure>"
    )
    return "\n".join(parts)


def split_final(curve: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A trial's intermediate evaluations (one curve) and its final one (measured with eval.final_fid_samples:
    a different number, never joined to the curve)."""
    final = curve["final"].fillna(False).astype(bool) if "final" in curve else pd.Series(False, index=curve.index)
    return curve[~final], curve[final]


def _sample_labels(part: pd.DataFrame) -> list[str]:
    return [samples_label(n) for n in sorted({int(n) for n in part["fid_samples"].dropna()})] \
        if "fid_samples" in part else []


def fid_curves_png(
    evaluations: pd.DataFrame, trials: pd.DataFrame, by: list[str] | None, legend_order: list[str]
) -> tuple[bytes, list[str], tuple[list[str], list[str]]]:
    """All trials' FID against kimg, one axis per feature extractor; returns the PNG, the log-scale axes and
    the FIDs drawn (e.g. ['FID-2k'] on the curves, ['FID-10k'] as final markers).

    Colours follow the grouping (trial when there is none), listed in leaderboard order."""
    evaluations = evaluations[evaluations["fid"].notna()].sort_values(["trial_id", "kimg"])
    # pending trials (not started) draw like running ones
    status = {
        t: s if s in CURVE_STYLE else "running" for t, s in zip(trials["trial_id"], trials["status"], strict=False)
    }
    key_columns = by or ["trial_id"]
    present_keys = {group_label(r, key_columns) for r in evaluations[key_columns].to_dict("records")}
    keys = [k for k in dict.fromkeys(legend_order) if k in present_keys] + sorted(present_keys - set(legend_order))
    colours = colour_map(keys)
    extractors = sorted(str(e) for e in evaluations["extractor"].fillna("unknown").unique())
    during, final = split_final(evaluations)

    fig = Figure(figsize=(6.2 * len(extractors) + 3.0, 4.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(extractors), squeeze=False)[0]
    log_axes = []
    for ax, extractor in zip(axes, extractors, strict=False):
        part = evaluations[evaluations["extractor"].fillna("unknown") == extractor]
        for trial_id, curve in part.groupby("trial_id", sort=True):
            line, marker, size, _ = CURVE_STYLE[status.get(trial_id, "running")]
            colour = colours[group_label(curve.iloc[0], key_columns)]
            steps, last = split_final(curve)
            ax.plot(steps["kimg"], steps["fid"], linestyle=line, color=colour, linewidth=1.6, alpha=0.9)
            if marker and not steps.empty:
                ax.plot(steps["kimg"].iloc[-1:], steps["fid"].iloc[-1:], linestyle="none", marker=marker,
                        markersize=size, color=colour, markeredgewidth=2 if marker == "x" else 1,
                        markeredgecolor="black" if marker in "*s" else colour)
            ax.plot(last["kimg"], last["fid"], linestyle="none", marker=FINAL_MARKER, markersize=7, color=colour,
                    markeredgecolor="black")
        low, high = part["fid"].min(), part["fid"].max()
        if low > 0 and high / low > LOG_SCALE_RATIO:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            log_axes.append(extractor)
        ax.set_title(f"FID ({extractor}); lower is better", fontsize=10)
        ax.set_xlabel("kimg (thousands of real images shown to D)")
        ax.set_ylabel("FID")
        ax.grid(True, which="both", alpha=0.3)

    handles = [Line2D([], [], color=colours[k], linewidth=2.5, label=k) for k in keys[:MAX_LEGEND_GROUPS]]
    if len(keys) > MAX_LEGEND_GROUPS:
        handles.append(Line2D([], [], linestyle="none", label=f"... {len(keys) - MAX_LEGEND_GROUPS} more"))
    present = {status.get(t, "running") for t in evaluations["trial_id"].unique()}
    handles.append(Line2D([], [], linestyle="none", label=""))
    for name, (line, marker, size, label) in CURVE_STYLE.items():
        if name in present:
            handles.append(Line2D([], [], color="#444", linestyle=line, marker=marker or None,
                                  markersize=size * 0.8, markeredgecolor="black", label=label))
    if not final.empty:
        handles.append(Line2D([], [], color="#444", linestyle="none", marker=FINAL_MARKER, markeredgecolor="black",
                              label=f"final {'/'.join(_sample_labels(final))} (not joined)"))
    fig.legend(handles=handles, loc="outside right upper", title=", ".join(key_columns), fontsize=8.5,
               title_fontsize=9, frameon=False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue(), log_axes, (_sample_labels(during), _sample_labels(final))


def group_label(row: Any, columns: list[str]) -> str:
    return ", ".join("-" if pd.isna(row[c]) else str(row[c]) for c in columns)


def colour_map(keys: list[str]) -> dict[str, Any]:
    palette = colormaps["tab10" if len(keys) <= 10 else "tab20"]
    return {k: palette(i % palette.N) for i, k in enumerate(keys)}


# ---- sample grids -------------------------------------------------------------------------------


def grids_section(
    sweep_dir: Path, df: pd.DataFrame, ranked: list[dict[str, Any]], params: list[str], top: int, label: str
) -> str:
    parts = [f'<h2 id="samples">Latest samples of the best {top} trials</h2>']
    grid_paths = dict(zip(df["trial_id"], df["grid_path"], strict=False))
    figures, missing, outside = [], [], []
    for row in ranked:
        if row["rank"] is None or row["rank"] > top:
            continue
        recorded = grid_paths.get(row["trial_id"])
        path = find_grid(sweep_dir, row["trial_id"], recorded)
        if path is None:
            entry = f"{esc(row['trial_id'])} (<code>{esc(recorded or 'no grid recorded')}</code>)"
            (outside if grid_outside(sweep_dir, recorded) else missing).append(entry)
            continue
        match = GRID_KIMG.search(path.name)
        at = f" &middot; grid at {float(match.group(1)):g} kimg" if match else ""
        settings = " &middot; ".join(f"{esc(p)}={esc('-' if row[p] is None else row[p])}" for p in params)
        figures.append(
            f'<figure><img alt="samples of trial {esc(row["trial_id"])}" src="{data_uri(path.read_bytes())}">'
            f"<figcaption><strong>#{row['rank']} {esc(row['trial_id'])}</strong> "
            f"({esc(row['extractor'])}) {esc(label)} <strong>{esc(fmt(row.get('final_fid', row.get('fid'))))}</strong> "
            f"at {esc(kimg_text(row['fid_kimg']))} kimg{at} &middot; {status_badge(row['status'], None)}"
            f"<br>{settings}</figcaption></figure>"
        )
    if figures:
        parts.append('<div class="grids">' + "".join(figures) + "</div>")
    if missing:
        parts.append(f'<div class="note">Sample grid file missing for: {", ".join(missing)}</div>')
    if outside:
        parts.append(
            f'<div class="note">Sample grid outside the sweep directory, not embedded, for: {", ".join(outside)}</div>'
        )
    return "\n".join(parts)


def find_grid(sweep_dir: Path, trial_id: str, recorded: Any) -> Path | None:
    """The recorded grid, or the same file under this sweep directory (results copied from a cluster).

    Only files inside the sweep directory are read: a Parquet file is data, and a `grid_path` it names
    must not make the report embed (and so publish) an arbitrary file of the machine."""
    if not isinstance(recorded, str) or not recorded:
        return None
    for path in (Path(recorded), sweep_dir / "trials" / trial_id / "grids" / Path(recorded).name):
        if _inside(sweep_dir, path) and path.is_file():
            return path
    return None


def grid_outside(sweep_dir: Path, recorded: Any) -> bool:
    """A recorded grid that exists but lies outside the sweep directory (skipped with a note)."""
    return (
        isinstance(recorded, str)
        and bool(recorded)
        and not _inside(sweep_dir, Path(recorded))
        and Path(recorded).is_file()
    )


def _inside(sweep_dir: Path, path: Path) -> bool:
    # resolve(): neither `..` nor a symlink may lead out of the sweep directory.
    return path.resolve().is_relative_to(sweep_dir.resolve())


# ---- sweep file ---------------------------------------------------------------------------------


def sweep_file_section(sweep_text: str | None) -> str:
    head = f'<h2 id="sweep-file">Sweep file ({SWEEP_FILE})</h2>'
    if sweep_text is None:
        return head + f'<div class="note">{SWEEP_FILE} is missing from the results directory.</div>'
    return head + f"<pre>{esc(sweep_text)}</pre>"


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def esc(value: Any) -> str:
    return html.escape(str(value))
