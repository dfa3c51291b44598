"""The leaderboard as text: terminal tables, CSV, JSON, Markdown and LaTeX (a paper's table in one command).

`sections(board)` turns a Board into titled tables of display strings; every human format
(rich, Markdown, LaTeX, the HTML report) renders those, so they all show the same numbers.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from typing import Any

from orchestrator.analysis.leaderboard import Board, block_title, ranking_title, stopped_text
from orchestrator.analysis.statistics import BOOTSTRAP_MIN_N


@dataclass
class Section:
    title: str
    headers: list[str]
    rows: list[list[str]]
    first_is_best: bool = True


def fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 0.01 and value != 0 else f"{value:.2f}"
    return str(value)


def param(value: Any) -> str:
    if value is None:
        return "-"
    return format(value, ".4g") if isinstance(value, float) else str(value)


def mean_ci(mean: float | None, ci: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f} ± {ci:.2f}" if ci is not None else f"{mean:.2f} (n=1)"


def interval(row: dict[str, Any], name: str, method: str) -> str:
    """'31.00 ± 1.20' (Student t, symmetric) or '31.00 [29.80, 32.60]' (bootstrap); 'n=1' without an interval."""
    mean, low, high = row.get(f"{name}_mean"), row.get(f"{name}_ci95_low"), row.get(f"{name}_ci95_high")
    if method != "bootstrap":
        return mean_ci(mean, row.get(f"{name}_ci95"))
    if mean is None:
        return "-"
    if low is None:
        return f"{mean:.2f} (n=1)"
    return f"{mean:.2f} [{low:.2f}, {high:.2f}]"


def p_text(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.2g}" if p >= 1e-4 else "<1e-4"


def _blocks(rows: list[dict[str, Any]]) -> list[tuple[tuple, list[dict[str, Any]]]]:
    out: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r.get("extractor"), r.get("fid_kimg"), r.get("fid_samples")), []).append(r)
    return list(out.items())


def family_sizes(board: Board) -> list[dict[str, Any]]:
    """The comparisons of each block: the family its p-values are Holm-adjusted in."""
    if not board.grouped:
        return []
    return [{"extractor": key[0], "fid_kimg": key[1], "fid_samples": key[2],
             "baseline": next((r["baseline"] for r in rows if r.get("baseline")), None),
             "comparisons": sum(r.get("p_value") is not None for r in rows)} for key, rows in _blocks(board.rows)]


SMALL_BOOTSTRAP = "†"  # marks a bootstrap interval from fewer values than statistics.BOOTSTRAP_MIN_N


def sections(board: Board, by: list[str] | None, params: list[str]) -> list[Section]:
    label = board.label
    p = "final_" if label == "final FID" else ""
    if board.grouped:
        return [_group_section(board, by or [], rows, p) for _, rows in _blocks(board.rows)]
    ranked = [r for r in board.rows if r["rank"] is not None]
    others = [r for r in board.rows if r["rank"] is None]
    out = []
    for _, rows in _blocks(ranked):
        headers = ["rank", "trial", *params, "status", "FID", "IS", "kimg", "G steps"]
        body = [[str(r["rank"]), r["trial_id"], *(param(r[c]) for c in params), r["status"], fmt(r[f"{p}fid"]),
                 fmt(r[f"{p}is"]), fmt(r["kimg"]), param(r["g_steps"])] for r in rows]
        out.append(Section(block_title(rows[0], label, board.at_kimg), headers, body))
    if others:
        headers = ["trial", *params, "status", "kimg reached", "why"]
        body = [[r["trial_id"], *(param(r[c]) for c in params), r["status"], fmt(r["kimg"]), why(r)] for r in others]
        out.append(Section(f"not ranked: no {label} (never in a mean)", headers, body, first_is_best=False))
    return out


def _group_section(board: Board, by: list[str], rows: list[dict[str, Any]], p: str) -> Section:
    label, ci = board.label, board.ci
    baseline = any("baseline" in r for r in rows)
    unfinished = any(r["n_unfinished"] for r in rows)
    mixed = any(r["n_configs"] > 1 for r in rows)
    ci_name = "bootstrap 95% CI" if ci == "bootstrap" else "95% CI"
    over = "completed" if board.at_kimg is None else "measured there"
    headers = ["rank", *by, "n", "n in mean", "completed", "stopped early", "diverged", "error",
               *(["unfinished"] if unfinished else []), *(["configurations"] if mixed else []),
               f"{label} median (ranking key)", f"{label} (mean ± {ci_name} of {over})",
               f"IS (mean ± {ci_name})", "stopped by ASHA (FID there)"]
    family = sum(r.get("p_value") is not None for r in rows)
    if baseline:
        headers += [f"Δ FID vs {rows[0]['baseline']} [95% CI]", "p (raw)", f"p (Holm, {family} comparisons)",
                    "P(better) [95% CI]", "Hedges' g", "test (or why none)"]
    body = []
    for r in rows:
        diverged = f" ({r['n_diverged']} of {r['n']} diverged)" if r["n_diverged"] else ""
        small = SMALL_BOOTSTRAP if r.get("ci_warning") else ""
        median = fmt(r[f"{p}fid_median"]) if r["rank"] is not None else f"unranked: {r['unranked_reason']}"
        configs = [f"{r['n_configs']} ({r['pooled_over']})" if r["n_configs"] > 1 else "1"] if mixed else []
        cells = [fmt(r["rank"]), *(param(r[c]) for c in by), str(r["n"]), str(r["n_measured"]),
                 str(r["n_completed"]), str(r["n_stopped_early"]), str(r["n_diverged"]), str(r["n_error"]),
                 *([str(r["n_unfinished"])] if unfinished else []), *configs, median,
                 interval(r, f"{p}fid", ci) + small + diverged, interval(r, f"{p}is", ci), stopped_text(r)]
        if baseline:
            cells += _comparison_cells(r)
        body.append(cells)
    notes = [f"groups {ranking_title(board)}",
             f"mean ± {ci_name} over {'completed trials' if board.at_kimg is None else 'trials measured there'}"]
    if any(r.get("ci_warning") for r in rows):
        notes.append(f"{SMALL_BOOTSTRAP} bootstrap interval from fewer than {BOOTSTRAP_MIN_N} values: likely "
                     "narrower than 95%")
    if baseline and family:
        notes.append(f"{family} comparison{'s' if family > 1 else ''} with {rows[0]['baseline']}, Holm-adjusted; "
                     "P(better): probability of a lower FID than the baseline, percentile bootstrap 95% CI")
    elif baseline:
        notes.append(f"no comparison with {rows[0]['baseline']} could be tested (the last column says why)")
    if mixed:
        notes.append("rows with several configurations are averaged over them (--pool)" if board.pool else
                     "rows with several configurations get no mean, rank or test (add the parameters named to "
                     "--group-by, or --pool)")
    return Section(f"{block_title(rows[0], label, board.at_kimg)} ({'; '.join(notes)})", headers, body)


def _comparison_cells(r: dict[str, Any]) -> list[str]:
    if r.get("diff_fid") is None:
        return ["baseline" if r.get("is_baseline") else "-", "-", "-", "-", "-",
                r.get("no_comparison_reason") or r.get("test") or "-"]
    ci = f" [{r['diff_ci95_low']:+.2f}, {r['diff_ci95_high']:+.2f}]" if r["diff_ci95_low"] is not None else ""
    pi = (f"{r['prob_improvement']:.2f} [{r['prob_improvement_ci95_low']:.2f}, "
          f"{r['prob_improvement_ci95_high']:.2f}]")
    return [f"{r['diff_fid']:+.2f}{ci}", p_text(r["p_value"]), p_text(r["p_holm"]), pi, fmt(r["hedges_g"]),
            r["test"]]


def why(row: dict[str, Any]) -> str:
    if row.get("stopped_at_kimg") is not None:
        return f"stopped by ASHA on {stopped_text(row)}"
    if row.get("reason"):
        return str(row["reason"])
    return {"stopped_early": "stopped by ASHA", "pending": "never started", "running": "still running",
            "interrupted": "interrupted; --resume continues it"}.get(row["status"], "-")


# ---- formats ------------------------------------------------------------------------------------


def as_json(board: Board) -> str:
    return json.dumps(board.rows, indent=2) + "\n"


def as_csv(board: Board) -> str:
    fields: list[str] = []
    for r in board.rows:
        fields += [k for k in r if k not in fields]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    writer.writerows(board.rows)
    return out.getvalue()


def as_text(secs: list[Section], note: str | None) -> str:
    """Plain aligned columns (what the terminal shows, without colour): the `table` format of --save."""
    parts = []
    for s in secs:
        widths = [max(len(str(c)) for c in column) for column in zip(s.headers, *s.rows, strict=True)]
        line = "  ".join("-" * w for w in widths)
        parts += [s.title, line, "  ".join(str(h).ljust(w) for h, w in zip(s.headers, widths, strict=True)), line]
        parts += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in s.rows]
        parts.append("")
    if note:
        parts.append(note)
    return "\n".join(parts) + "\n"


def as_markdown(secs: list[Section], note: str | None) -> str:
    parts = []
    for s in secs:
        parts.append(f"**{s.title}**\n")
        parts.append("| " + " | ".join(_md(h) for h in s.headers) + " |")
        parts.append("|" + "|".join("---" for _ in s.headers) + "|")
        parts += ["| " + " | ".join(_md(c) for c in row) + " |" for row in s.rows]
        parts.append("")
    if note:
        parts.append(f"_{note}_\n")
    return "\n".join(parts)


def _md(text: str) -> str:
    return str(text).replace("|", "\\|")


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 "±": r"$\pm$", "Δ": r"$\Delta$", "<": r"$<$",
                 "†": r"$^\dagger$"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def as_latex(secs: list[Section], note: str | None) -> str:
    """booktabs tables (\\usepackage{booktabs}), one per section, captioned with what the FIDs are."""
    parts = []
    for s in secs:
        parts += [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(s.title)}}}",
                  r"\begin{tabular}{" + "l" * len(s.headers) + "}", r"\toprule",
                  " & ".join(latex_escape(h) for h in s.headers) + r" \\", r"\midrule"]
        parts += [" & ".join(latex_escape(c) for c in row) + r" \\" for row in s.rows]
        parts += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    if note:
        parts.append(f"% {note}")
    return "\n".join(parts) + "\n"
