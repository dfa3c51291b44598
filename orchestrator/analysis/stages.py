"""The report's view of explore-then-confirm: on the first stage's page, which configurations went on to the
confirm stage and why; on the confirm stage's page, where its configurations came from.

Both read the confirm stage's selection.json (orchestrator.store.stages). A malformed file degrades to
dashes, never to a failed report: the rest of the page is still worth having.
"""
from __future__ import annotations

import html
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import quote

from orchestrator.analysis.formats import fmt
from orchestrator.store.stages import Stage, stage_of

REPORT_FILE = "report.html"  # report.REPORT_FILE; not imported, report imports this module
CHOSEN_STYLE = "background:#e3f4e8;font-weight:600"
TIER_MEANING = {
    "completed": "ranked on the median final value of its completed seeds",
    "unranked": "half or more of its seeds diverged: never ranked on its survivors",
    "cut": "stopped by ASHA or unfinished: ranked on its seed mean at the rung shown",
    "unmeasured": "no evaluation to rank it on",
}
HEADS = ("rank", "configuration", "tier", "value", "seed mean", "n", "rung (kimg)", "diverged", "error",
         "chosen", "why")


def stage_html(sweep_dir: Path) -> str:
    """The confirm-stage part of `sweep_dir`'s report: "" for a sweep that is neither stage."""
    stage = stage_of(Path(sweep_dir), REPORT_FILE)  # read once: the rest only formats it
    if stage is None:
        return ""
    return confirm_header(stage) if stage.role == "confirm" else selection_section(stage)


def confirm_header(stage: Stage) -> str:
    """Near the top of the confirm stage's page: what it confirms, and the way back to the exploration."""
    selection, first = stage.selection, stage.other
    sentence = (f"configurations selected by {text(selection.get('rule_short'))} on sweep {first}; "
                f"fresh seeds {seeds_text(selection.get('seeds'))}")
    if selection.get("allow_partial") is True:
        sentence += " (first stage unfinished: confirmed with --allow-partial)"
    link = sibling_link(stage, "the first stage's report")
    parts = [f'<div class="note" id="confirm-stage">This is a confirm stage: {esc(sentence)}. {link}</div>']
    if isinstance(selection.get("rule"), str) and selection["rule"]:
        parts.append(f'<p class="muted">Selection rule: {esc(selection["rule"])}</p>')
    return "\n".join(parts)


def selection_section(stage: Stage) -> str:
    """On the first stage's page: the link to the confirm stage and the ranking it was chosen from."""
    selection = stage.selection
    link = sibling_link(stage, f"the confirm stage's report ({stage.other})")
    metric = selection.get("metric") if isinstance(selection.get("metric"), dict) else {}
    goal = {"min": "lower is better", "max": "higher is better"}.get(metric.get("mode"), "")
    facts = [f"metric {text(metric.get('name'))}" + (f" ({goal})" if goal else ""),
             f"fresh seeds {seeds_text(selection.get('seeds'))}",
             f"budget {text(selection.get('kimg'))} kimg"]
    if selection.get("fid_split") is not None:
        facts.append(f"FID split {text(selection.get('fid_split'))}")
    parts = [
        '<h2 id="confirm">Confirm stage</h2>',
        f"<p>The best configurations of this sweep ran again on fresh seeds at the full budget: {link}</p>",
        f'<p class="muted">{esc(" · ".join(facts))}</p>',
    ]
    if isinstance(selection.get("rule"), str) and selection["rule"]:
        parts.append(f"<p>Selection rule: {esc(selection['rule'])}</p>")
    if selection.get("allow_partial") is True:
        parts.append('<div class="warn">This sweep was confirmed before it finished (--allow-partial).</div>')
    parts.append(candidates_table(selection.get("candidates")))
    return "\n".join(parts)


def candidates_table(candidates: Any) -> str:
    rows = [c for c in candidates if isinstance(c, dict)] if isinstance(candidates, list) else []
    if not rows:
        return '<div class="note">selection.json lists no candidates.</div>'
    body = []
    for c in rows:
        chosen = c.get("chosen") is True
        cells = [text(c.get("rank")), text(c.get("label")), text(c.get("tier")), fmt_number(c.get("value")),
                 fmt_number(c.get("seed_mean")), text(c.get("n")), text(c.get("rung")),
                 text(c.get("n_diverged")), text(c.get("n_error")), "chosen" if chosen else "", text(c.get("why"))]
        tier_title = TIER_MEANING.get(c.get("tier"), "")
        tds = "".join(
            f'<td title="{esc(tier_title)}">{esc(v)}</td>' if i == 2 and tier_title else f"<td>{esc(v)}</td>"
            for i, v in enumerate(cells)
        )
        # Marked twice: a highlighted row, and the word in its own column (survives copy-paste and print).
        mark = f' class="chosen" style="{CHOSEN_STYLE}"' if chosen else ""
        body.append(f"<tr{mark}>{tds}</tr>")
    head = "".join(f"<th>{esc(h)}</th>" for h in HEADS)
    legend = "; ".join(f"{tier}: {meaning}" for tier, meaning in TIER_MEANING.items())
    return (
        '<div class="scroll"><table class="selection"><caption class="muted" style="text-align:left">'
        "Every configuration of this sweep, best first (highlighted: sent to the confirm stage)</caption>"
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
        f'<p class="muted">Tiers: {esc(legend)}.</p>'
    )


def sibling_link(stage: Stage, words: str) -> str:
    """A relative link to the other stage's report (both stages live under the same results root, each
    report in its own directory), with the command that writes it when it is not there yet."""
    href = f"../{quote(stage.other)}/{REPORT_FILE}"
    link = f'<a href="{esc(href)}">{esc(words)}</a>'
    if stage.other_report:
        return link
    command = f"orchestrator report --results {shlex.quote(stage.results)} --sweep {stage.other}"
    return f"{link} (not written yet: run <code>{esc(command)}</code>)"


def seeds_text(seeds: Any) -> str:
    return ", ".join(text(s) for s in seeds) if isinstance(seeds, list) and seeds else "-"


def fmt_number(value: Any) -> str:
    return fmt(float(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) else text(value)


def text(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def esc(value: Any) -> str:
    return html.escape(str(value))
