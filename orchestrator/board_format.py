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

from orchestrator.leaderboard import Board, block_title, ranking_title


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


def p_text(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.2g}" if p >= 1e-4 else "<1e-4"


def _blocks(rows: list[dict[str, Any]]) -> list[tuple[tuple, list[dict[str, Any]]]]:
    out: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r.get("extractor"), r.get("fid_kimg"), r.get("fid_samples")), []).append(r)
    return list(out.items())


def sections(board: Board, by: list[str] | None, params: list[str]) -> list[Section]:
    label = board.label
    p = "final_" if label == "final FID" else ""
    if board.grouped:
        out = []
        for _, rows in _blocks(board.rows):
            baseline = any("baseline" in r for r in rows)
            unfinished = any(r["n_unfinished"] for r in rows)
            headers = ["rank", *by, "n", "completed", "stopped early", "diverged", "error",
                       *(["unfinished"] if unfinished else []), f"{label} median (ranking key)",
                       f"{label} (mean ± 95% CI of completed)",
                       "IS (mean ± 95% CI)", "stopped by ASHA at kimg (FID there)"]
            if baseline:
                headers += [f"Δ FID vs {rows[0]['baseline']} [95% CI]", "p", "test"]
            body = []
            for r in rows:
                stopped = ("-" if r["stopped_at_kimg"] is None
                           else f"{r['stopped_at_kimg']:g} ({fmt(r['stopped_metric'])})")
                diverged = f" ({r['n_diverged']} of {r['n']} diverged)" if r["n_diverged"] else ""
                median = fmt(r[f"{p}fid_median"]) if r["rank"] is not None else f"unranked: {r['unranked_reason']}"
                cells = [fmt(r["rank"]), *(param(r[c]) for c in by), str(r["n"]), str(r["n_completed"]),
                         str(r["n_stopped_early"]), str(r["n_diverged"]), str(r["n_error"]),
                         *([str(r["n_unfinished"])] if unfinished else []), median,
                         mean_ci(r[f"{p}fid_mean"], r[f"{p}fid_ci95"]) + diverged,
                         mean_ci(r[f"{p}is_mean"], r[f"{p}is_ci95"]), stopped]
                if baseline:
                    if r.get("diff_fid") is None:
                        cells += ["baseline" if r.get("is_baseline") else "-", "-", r.get("test") or "-"]
                    else:
                        ci = (f" [{r['diff_ci95_low']:+.2f}, {r['diff_ci95_high']:+.2f}]"
                              if r["diff_ci95_low"] is not None else "")
                        cells += [f"{r['diff_fid']:+.2f}{ci}", p_text(r["p_value"]), r["test"]]
                body.append(cells)
            out.append(Section(f"{block_title(rows[0], label)} (groups {ranking_title(board)}; mean ± 95% CI over "
                               "completed trials)", headers, body))
        return out
    ranked = [r for r in board.rows if r["rank"] is not None]
    others = [r for r in board.rows if r["rank"] is None]
    out = []
    for _, rows in _blocks(ranked):
        headers = ["rank", "trial", *params, "status", "FID", "IS", "kimg", "G steps"]
        body = [[str(r["rank"]), r["trial_id"], *(param(r[c]) for c in params), r["status"], fmt(r[f"{p}fid"]),
                 fmt(r[f"{p}is"]), fmt(r["kimg"]), param(r["g_steps"])] for r in rows]
        out.append(Section(block_title(rows[0], label), headers, body))
    if others:
        headers = ["trial", *params, "status", "kimg reached", "why"]
        body = [[r["trial_id"], *(param(r[c]) for c in params), r["status"], fmt(r["kimg"]), why(r)] for r in others]
        out.append(Section(f"not ranked: no {label} (never in a mean)", headers, body, first_is_best=False))
    return out


def why(row: dict[str, Any]) -> str:
    if row.get("stopped_at_kimg") is not None:
        return f"stopped by ASHA at {row['stopped_at_kimg']:g} kimg (FID there {fmt(row.get('stopped_metric'))})"
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
                 "±": r"$\pm$", "Δ": r"$\Delta$", "<": r"$<$"}


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
