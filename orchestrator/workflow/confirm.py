"""Explore, then confirm: run a sweep's selected configurations again on fresh seeds, as `<name>-confirm`.

`orchestrator sweep FILE` with a `confirm:` section runs both stages (`run_stages`); `orchestrator confirm`
runs the second for a finished sweep (`plan_confirm` + `run_confirm`). The confirm stage is an ordinary sweep
directory beside the first, plus `selection.json`: the first stage's fingerprint, the rule, every candidate
configuration and what was chosen and why (orchestrator.analysis.selection).

The first stage's effective configuration comes from its `provenance.jsonl` (`--data` resolved); data whose
fingerprint changed since is refused, and so is a `--resume` of a confirm stage whose first stage changed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from orchestrator.analysis.selection import (
    Candidate,
    SelectionError,
    first_stage_counts,
    rule_short,
    select,
    selection_record,
)
from orchestrator.store.failures import ENDED
from orchestrator.store.provenance import read_provenance
from orchestrator.store.reader import ResultsError, load_trials
from orchestrator.store.stages import SELECTION_FILE, first_stage_of, read_selection
from orchestrator.sweepfile.errors import SweepError
from orchestrator.sweepfile.loading import load_sweep
from orchestrator.sweepfile.rules import check_sweep
from orchestrator.sweepfile.sections import Confirm, Sweep
from orchestrator.sweepfile.stages import (
    check_include,
    check_seeds,
    check_stages,
    confirm_name,
    confirm_stage,
    fresh_seeds,
    used_seeds,
)
from orchestrator.workflow.sweep import SweepErrors, run_sweep


class ConfirmError(ResultsError):
    """One-line, user-facing reason why a confirm stage cannot run."""


@dataclass
class ConfirmPlan:
    first: Sweep  # the first stage, as it ran
    first_dir: Path
    sweep: Sweep  # the confirm stage
    candidates: list[Candidate]
    record: dict[str, Any]  # selection.json

    @property
    def chosen(self) -> list[Candidate]:
        return [c for c in self.candidates if c.chosen]


# ---- the first stage ------------------------------------------------------------------------------


def first_stage_sweep(first_dir: Path) -> tuple[Sweep, str | None]:
    """The first stage's effective configuration (`--data` resolved) and its data fingerprint, as its last
    run recorded them; a sweep from before provenance was recorded is read from its sweep.yaml."""
    runs = [r for r in read_provenance(first_dir) if r.get("event") == "run" and r.get("config")]
    if not runs:
        return load_sweep(first_dir / "sweep.yaml"), None
    file = str(first_dir / "provenance.jsonl")
    config = dict(runs[-1]["config"])
    # Records written before parameters kept only their given keys list the others as nulls.
    params = config.get("parameters") or {}
    config["parameters"] = {name: {k: v for k, v in params[name].items() if v is not None or k == "value"
                                   and len(params[name]) == 1} for name in _file_order(first_dir, params)}
    try:
        sweep = Sweep.model_validate(config)
    except ValueError as exc:
        raise ConfirmError(f"{file}: the recorded configuration is not a valid sweep ({exc.__class__.__name__})") \
            from None
    check_sweep(file, sweep, overridden=False)
    check_stages(file, sweep)
    return sweep, (runs[-1].get("data") or {}).get("fingerprint")


def _file_order(first_dir: Path, params: dict[str, Any]) -> list[str]:
    """The parameters in the sweep file's order (provenance.jsonl sorts keys; the order is part of a sweep)."""
    import yaml

    try:
        order = list((yaml.safe_load((first_dir / "sweep.yaml").read_text()) or {}).get("parameters") or {})
    except (OSError, yaml.YAMLError, AttributeError):
        order = []
    return [n for n in order if n in params] + [n for n in params if n not in order]


def check_data_unchanged(first: Sweep, recorded: str | None) -> None:
    """The confirm stage measures on the first stage's data: a changed folder is refused."""
    if recorded is None:
        return
    from gan.data import prepare_dataset  # torch: only when there is data to check

    now = prepare_dataset(first.trial_config({}).data).key
    if now != recorded:
        raise ConfirmError(f"sweep {first.name}: its data changed since it ran (fingerprint {recorded[:12]} -> "
                           f"{now[:12]} at {first.data.path or 'the procedural faces'}); a confirm stage must "
                           "measure on the same images")


def unfinished_first_stage(first_dir: Path, first: Sweep) -> str | None:
    """Why the first stage is not finished (None when every trial of it ended)."""
    try:
        trials = load_trials(first_dir)
    except ResultsError:
        return "no trial has reported yet"
    ended = int(trials["status"].isin(ENDED).sum())
    total = first.trial_count()
    return None if ended >= total else f"{total - ended} of {total} trials unfinished"


# ---- the plan -------------------------------------------------------------------------------------


def plan_confirm(results: Path, name: str, *, first: Sweep | None = None, top: int | None = None,
                 include: list[dict[str, Any]] | None = None, seeds: int | list[int] | None = None,
                 allow_partial: bool = False, check_data: bool = True, use_recorded: bool = True) -> ConfirmPlan:
    """Select the configurations of the finished sweep `name` and build its confirm stage (nothing is written).
    `first`: the first stage as this driver just ran it (else read from its directory). The flags override the
    settings of an existing confirm stage (`use_recorded`), else the sweep's `confirm:` section, else defaults."""
    first_dir = results / name
    if not (first_dir / "fingerprint").exists():
        raise ConfirmError(f"{results}: no sweep named '{name}' to confirm")
    if (origin := first_stage_of(first_dir)) is not None:
        raise ConfirmError(f"{first_dir}: is the confirm stage of sweep {origin.name}; confirm {origin.name} instead "
                           f"(--sweep {origin.name})")
    recorded = None
    if first is None:
        first, recorded = first_stage_sweep(first_dir)
    if (first_dir / "fingerprint").read_text().strip() != first.fingerprint():
        raise ConfirmError(f"{first_dir}: holds another sweep named '{name}' than the one given")
    settings = _settings(results, first, top=top, include=include, seeds=seeds, use_recorded=use_recorded)
    if check_data:
        check_data_unchanged(first, recorded)
    unfinished = unfinished_first_stage(first_dir, first)
    if unfinished and not allow_partial:
        raise ConfirmError(f"sweep {name} is unfinished ({unfinished}): continue it with `orchestrator sweep FILE "
                           "--resume`, or confirm what it measured with --allow-partial")
    try:
        candidates = select(first_dir, first, top=settings.top, include=settings.include)
    except (SelectionError, ResultsError) as exc:
        raise ConfirmError(str(exc)) from None
    chosen = [c.configuration for c in candidates if c.chosen]
    if not chosen:
        raise ConfirmError(f"sweep {name}: no configuration measured anything to select (see its trials table)")
    used = used_seeds(first) | _recorded_seeds(first_dir)
    check_seeds(first, settings.seeds, used=used, fail=lambda m: _flag_error("seeds", seeds, m))
    fresh = fresh_seeds(settings.seeds, used)
    kimg = float(settings.kimg if settings.kimg is not None else first.train.kimg)
    fid_split = settings.fid_split or first.eval.fid_split
    short = rule_short(first.metric.name, settings.top, settings.include)
    description = (f"configurations selected by {short} on sweep {name}; fresh seeds {', '.join(map(str, fresh))}"
                   + (" (first stage unfinished: confirmed with --allow-partial)" if unfinished else ""))
    sweep = confirm_stage(first, chosen, fresh, kimg=kimg, fid_split=fid_split, description=description)
    record = selection_record(first, candidates, top=settings.top, include=settings.include, seeds=fresh, kimg=kimg,
                              fid_split=fid_split, allow_partial=bool(unfinished),
                              counts=first_stage_counts(first_dir))
    return ConfirmPlan(first, first_dir, sweep, candidates, record)


def recorded_settings(results: Path, first: Sweep) -> Confirm | None:
    """The settings an existing confirm stage of `first` was selected with (its selection.json), if any: running
    or resuming it again without flags makes the same selection, whatever the sweep file says now."""
    record = read_selection(results / confirm_name(first.name))
    if not record or record.get("sweep") != first.name:
        return None
    try:
        return Confirm(top=record["top"], include=record["include"], seeds=record["seeds"], kimg=record["kimg"],
                       fid_split=record["fid_split"])
    except (KeyError, ValueError):
        return None


def _settings(results: Path, first: Sweep, *, top, include, seeds, use_recorded: bool) -> Confirm:
    """The confirm settings (an existing confirm stage's, else the sweep's section, else the defaults) with the
    command line's flags applied, each checked like the section."""
    recorded = recorded_settings(results, first) if use_recorded else None
    settings = (recorded or first.confirm or Confirm()).model_copy(deep=True)
    if top is not None:
        if top < 1:
            _flag_error("top", top, f"must be >= 1, got {top}")
        settings.top = top
    if include is not None:
        from orchestrator.sweepfile.rules import RuleContext

        ctx = RuleContext("orchestrator confirm", first, overridden=False)
        settings.include = []
        for entry in include:
            try:
                settings.include.append(check_include(ctx, "--include", entry))
            except SweepError as exc:
                shown = ",".join(f"{k}={v}" for k, v in entry.items())
                raise ConfirmError(f"orchestrator confirm: --include {shown}: {exc.message}") from None
    if seeds is not None:
        settings.seeds = seeds
    return settings


def _flag_error(flag: str, given: Any, message: str):
    where = f"--{flag}" if given is not None else f"confirm.{flag}"
    raise ConfirmError(f"orchestrator confirm: {where}: {message}")


def _recorded_seeds(first_dir: Path) -> set[int]:
    try:
        seeds = load_trials(first_dir)["seed"]
    except (ResultsError, KeyError):
        return set()
    return {int(s) for s in seeds.dropna()}


def parse_include(entries: list[str] | None) -> list[dict[str, Any]] | None:
    """`--include variant=dcgan,heads=4` (values read as YAML) -> [{"variant": "dcgan", "heads": 4}]."""
    if not entries:
        return None
    import yaml

    out = []
    for entry in entries:
        pairs = {}
        for part in filter(None, (p.strip() for p in entry.split(","))):
            key, eq, value = part.partition("=")
            if not eq or not key.strip():
                raise ConfirmError(f"orchestrator confirm: --include {entry}: expected KEY=VALUE[,KEY=VALUE]")
            try:
                pairs[key.strip()] = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfirmError(f"orchestrator confirm: --include {entry}: {value!r} is not a value") from None
        if not pairs:
            raise ConfirmError(f"orchestrator confirm: --include {entry!r}: expected KEY=VALUE[,KEY=VALUE]")
        out.append(pairs)
    return out


def parse_seeds(text: str | None) -> int | list[int] | None:
    """`--seeds 5` (a count) or `--seeds 10,11,12` (a list)."""
    if text is None:
        return None
    try:
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfirmError(f"orchestrator confirm: --seeds {text}: expected a count or a comma-separated list of "
                           "seeds") from None
    if not values:
        raise ConfirmError(f"orchestrator confirm: --seeds {text!r}: expected a count or a list of seeds")
    return values[0] if "," not in text else values


# ---- running it -----------------------------------------------------------------------------------


def run_confirm(plan: ConfirmPlan, results: Path, *, address: str | None, resume: bool, console: Console,
                storage: str | None = None) -> Path:
    """Run the confirm stage; `resume` continues one that was interrupted (refused if its first stage changed)."""
    confirm_dir = results / plan.sweep.name
    if resume:
        check_same_selection(plan, confirm_dir)

    def write_selection(directory: Path) -> None:
        if not (resume and (directory / SELECTION_FILE).exists()):  # a resume keeps the record it started with
            write_text_atomic(directory / SELECTION_FILE, json.dumps(plan.record, indent=2) + "\n")

    return run_sweep(plan.sweep, results, address=address, resume=resume, console=console, storage=storage,
                     on_claimed=write_selection)


def write_text_atomic(path: Path, text: str) -> None:
    """A reader (or a crash) sees the old file or the whole new one, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_same_selection(plan: ConfirmPlan, confirm_dir: Path) -> None:
    """A confirm stage continues only on the selection it started with."""
    try:
        before = json.loads((confirm_dir / SELECTION_FILE).read_text())
    except (OSError, ValueError):
        return  # nothing recorded yet: SweepDir.claim says whether there is anything to resume
    why = None
    if before.get("first_stage_fingerprint") != plan.record["first_stage_fingerprint"]:
        why = "the first stage's sweep file changed"
    elif _chosen(before) != _chosen(plan.record) or before.get("seeds") != plan.record["seeds"]:
        why = f"the selection changed ({', '.join(_chosen(before))} -> {', '.join(_chosen(plan.record))})"
    if why:
        raise ConfirmError(f"{confirm_dir}: can't resume this confirm stage: {why} since it started; resume it "
                           "with the settings it started with (selection.json), or move the directory away to "
                           "start it afresh")


def _chosen(record: dict[str, Any]) -> list[str]:
    return [c["label"] for c in record.get("candidates", []) if c.get("chosen")]


def run_stages(spec: Sweep, results: Path, *, address: str | None, resume: bool, console: Console,
               storage: str | None = None) -> Path:
    """`orchestrator sweep` of a file with `confirm:`: the first stage, then its confirm stage. A first stage that
    ended with errors is still confirmed from what it measured (the command still exits 1); `--resume`
    continues whichever stage was interrupted."""
    first_dir, confirm_dir = results / spec.name, results / confirm_name(spec.name)
    errors: list[SweepErrors] = []
    if resume and (first_dir / "tune").exists() and unfinished_first_stage(first_dir, spec) is None:
        console.print(f"sweep {spec.name}: finished; continuing with its confirm stage {confirm_dir.name}")
    else:
        try:
            run_sweep(spec, results, address=address, resume=resume, console=console, storage=storage)
        except SweepErrors as exc:
            errors.append(exc)
    plan = plan_confirm(results, spec.name, first=spec, check_data=False, use_recorded=False)  # the file's section
    print_selection(plan, console)
    try:
        run_confirm(plan, results, address=address, resume=resume and (confirm_dir / "tune").exists(),
                    console=console, storage=storage)
    except SweepErrors as exc:
        errors.append(exc)
    print_leaderboards(plan, results, console)
    if errors:
        raise SweepErrors(sum(e.errored for e in errors), sum(e.total for e in errors))
    return confirm_dir


# ---- what the user sees ---------------------------------------------------------------------------


def print_selection(plan: ConfirmPlan, console: Console) -> None:
    record = plan.record
    table = Table(title=f"selection for {plan.sweep.name}: {record['rule_short']} (rule in {SELECTION_FILE})",
                  title_justify="left")
    for head in ("rank", "configuration", "tier", plan.first.metric.name, "n", "at kimg", "diverged", "error",
                 "chosen"):
        table.add_column(head)
    for c in record["candidates"]:
        value = "-" if c["value"] is None else f"{c['value']:.3f}"
        if c["value"] is None and c["tier"] in ("completed", "unranked", "cut") and c["n_diverged"]:
            value = "diverged"
        table.add_row(str(c["rank"] or "-"), c["label"], c["tier"], value, str(c["n"]),
                      "-" if c["rung"] is None else f"{c['rung']:g}", str(c["n_diverged"]), str(c["n_error"]),
                      c["why"] or "")
    console.print(table)
    seeds = ", ".join(map(str, record["seeds"]))
    n = len(plan.chosen)
    console.print(f"confirm stage {plan.sweep.name}: {n} configuration{'s' if n != 1 else ''} x seeds {seeds} = "
                  f"{plan.sweep.trial_count()} trials, FIFO, {record['kimg']:g} kimg each, "
                  f"{plan.sweep.eval.final_fid_samples} images per final FID on split {record['fid_split']}")


def print_leaderboards(plan: ConfirmPlan, results: Path, console: Console) -> None:
    root = f" --results {results}" if str(results) != "results" else ""
    console.print(f"paper table (fresh seeds): orchestrator leaderboard{root} --sweep {plan.sweep.name}",
                  highlight=False)
    console.print(f"exploration (tuning seeds, selection only): orchestrator leaderboard{root} --sweep "
                  f"{plan.first.name}", highlight=False)
