"""Two-stage sweeps: the `configurations:` list and the `confirm:` section, their rules, and the confirm stage.

A sweep with `confirm:` explores on its own (tuning) seeds; afterwards its best configurations and declared
baselines run again as the sweep `<name>-confirm`: FIFO, at the full budget, on **fresh** seeds that never
overlap the tuning seeds. `confirm_stage` builds that sweep from the first stage's effective configuration; the
selection itself is `orchestrator.analysis.selection`, the run `orchestrator.workflow.confirm`.

`check_stages` runs after `orchestrator.sweepfile.rules.check_sweep` (it relies on the checked parameters).
"""
from __future__ import annotations

import copy
from typing import Any

import yaml

from gan.config import SPLITS
from orchestrator.sweepfile.errors import SweepError, show
from orchestrator.sweepfile.params import PARAM_TYPES, REPLICATE_PARAMS, plain
from orchestrator.sweepfile.rules import (
    RuleContext,
    check_architectures,
    check_compile,
    check_parameter_name,
    check_sweep,
    coerce_at,
    finite,
    value_problem,
)
from orchestrator.sweepfile.sections import Parameter, Sweep

CONFIRM_SUFFIX = "-confirm"


def confirm_name(name: str) -> str:
    return f"{name}{CONFIRM_SUFFIX}"


def check_stages(file: str, sweep: Sweep) -> None:
    """The rules of `configurations:` and `confirm:` (one-line SweepError naming the key and value)."""
    ctx = RuleContext(file, sweep, overridden=False)
    if sweep.configurations is not None:
        check_configurations(ctx)
    if sweep.confirm is not None:
        check_confirm(ctx)


# ---- configurations ------------------------------------------------------------------------------


def check_configurations(ctx: RuleContext) -> None:
    sweep = ctx.sweep
    if sweep.method != "grid":
        ctx.fail("configurations", f"only with method grid (each configuration runs on every combination of "
                                   f"parameters), got method {sweep.method}")
    if not sweep.configurations:
        ctx.fail("configurations", "must list at least one configuration, got []")
    seen: list[dict[str, Any]] = []
    for i, config in enumerate(sweep.configurations):
        key = f"configurations[{i}]"
        if not isinstance(config, dict) or not config:
            ctx.fail(key, f"must be a mapping of parameter: value with at least one entry, got {show(config)}")
        coerced = {}
        for name, value in config.items():
            check_parameter_name(ctx, f"{key}.{name}", name)
            if name in REPLICATE_PARAMS:
                ctx.fail(f"{key}.{name}", f"{name} is not part of a configuration: list seeds in parameters.seed")
            if name in sweep.parameters:
                ctx.fail(f"{key}.{name}", f"{name!r} is also in parameters; set it in one place")
            c = coerce_at(ctx, f"{key}.{name}", name, value)
            if problem := value_problem(sweep, name, c):
                ctx.fail(f"{key}.{name}", problem)
            coerced[name] = c
        if coerced in seen:
            ctx.fail(key, f"repeats configurations[{seen.index(coerced)}] {show(config)}")
        seen.append(coerced)
        _check_buildable(ctx, key, coerced)
    sweep.configurations = seen


def _check_buildable(ctx: RuleContext, key: str, config: dict[str, Any]) -> None:
    """The architecture and compile rules, applied to one listed configuration with the sweep's parameters."""
    trial = ctx.sweep.model_copy(deep=True)
    trial.configurations = None
    trial.parameters = {**{n: Parameter(value=v) for n, v in config.items()}, **trial.parameters}
    try:
        for rule in (check_architectures, check_compile):
            rule(RuleContext(ctx.file, trial, ctx.overridden))
    except SweepError as e:
        ctx.fail(key, e.message)


# ---- confirm -------------------------------------------------------------------------------------


def check_confirm(ctx: RuleContext) -> None:
    sweep, c = ctx.sweep, ctx.sweep.confirm
    if c.top < 1:
        ctx.fail("confirm.top", f"must be >= 1 (the best configurations to confirm), got {show(c.top)}")
    c.include = [check_include(ctx, f"confirm.include[{i}]", entry) for i, entry in enumerate(c.include)]
    c.seeds = check_seeds(sweep, c.seeds, fail=lambda message: ctx.fail("confirm.seeds", message))
    if c.kimg is not None and not (finite(c.kimg) and c.kimg > 0):
        ctx.fail("confirm.kimg", f"must be a finite number > 0 or null (train.kimg), got {show(c.kimg)}")
    if c.kimg is not None and c.kimg < sweep.eval.every_kimg:
        ctx.fail("confirm.kimg", f"{show(c.kimg)} is less than eval.every_kimg {show(sweep.eval.every_kimg)}")
    if c.fid_split is not None:
        if c.fid_split not in SPLITS:
            ctx.fail("confirm.fid_split", f"unknown split {show(c.fid_split)} (expected one of: {', '.join(SPLITS)})")
        if c.fid_split != "all" and sweep.data.split[SPLITS.index(c.fid_split)] == 0:
            ctx.fail("confirm.fid_split", f"{show(c.fid_split)} is empty: its share in data.split is 0")


def configuration_names(sweep: Sweep) -> list[str]:
    """The parameters that tell configurations apart (every swept one but the seed replicates)."""
    return [n for n in sweep.swept_names() if n not in REPLICATE_PARAMS]


def check_include(ctx: RuleContext, key: str, entry: Any) -> dict[str, Any]:
    """One `include` entry: swept parameters with values the sweep can produce, matching some configuration."""
    sweep = ctx.sweep
    if not isinstance(entry, dict) or not entry:
        ctx.fail(key, f"must be a mapping of parameter: value, e.g. {{variant: dcgan}}, got {show(entry)}")
    names = configuration_names(sweep)
    coerced = {}
    for name, value in entry.items():
        if name not in names:
            known = f"swept: {', '.join(names)}" if names else "the sweep sweeps no parameter"
            ctx.fail(f"{key}.{name}", f"unknown parameter {name!r} ({known})")
        if name not in PARAM_TYPES:
            ctx.fail(f"{key}.{name}", f"unknown parameter {name!r}")
        c = coerce_at(ctx, f"{key}.{name}", name, value)
        spec = sweep.parameters.get(name)
        if spec is not None and not spec.categorical:
            if not (spec.min <= c <= spec.max):
                ctx.fail(f"{key}.{name}", f"{show(value)} is outside the sweep's range [{show(spec.min)}, "
                                          f"{show(spec.max)}]")
        else:
            values = _values_of(sweep, name)
            if c not in values:
                ctx.fail(f"{key}.{name}", f"{show(value)} is not among the sweep's values of {name!r} "
                                          f"{show(plain(values))}")
        coerced[name] = c
    if sweep.method != "optuna" and not any(matches(coerced, t) for t in sweep.trials()):
        ctx.fail(key, f"{show(entry)} matches no configuration of the sweep")
    return coerced


def _values_of(sweep: Sweep, name: str) -> list[Any]:
    spec = sweep.parameters.get(name)
    if spec is not None:
        return spec.choices
    return [c[name] for c in sweep.configurations or [] if name in c]


def matches(include: dict[str, Any], params: dict[str, Any]) -> bool:
    """Whether a configuration's parameters hold every value of an `include` entry."""
    return all(name in params and plain(params[name]) == plain(value) for name, value in include.items())


def used_seeds(sweep: Sweep) -> set[int]:
    """Every seed the sweep's own trials train with (its tuning seeds)."""
    if sweep.method == "optuna":
        return set(sweep.seed_values() or [sweep.train.seed])
    return {sweep.trial_config(t).train.seed for t in sweep.trials()}


def check_seeds(sweep: Sweep, seeds: Any, *, fail, used: set[int] | None = None) -> int | list[int]:
    """A count >= 2, or a list of >= 2 distinct seeds >= 0, none a tuning seed."""
    if isinstance(seeds, bool) or not isinstance(seeds, (int, list)):
        fail(f"must be a count >= 2 or a list of seeds, got {show(seeds)}")
    if isinstance(seeds, int):
        if seeds < 2:
            fail(f"must be >= 2 (a spread needs two seeds), got {show(seeds)}")
        return seeds
    if len(seeds) < 2:
        fail(f"must list at least 2 seeds (a spread needs two), got {show(seeds)}")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        fail(f"seeds must be whole numbers >= 0, got {show(seeds)}")
    if len(set(seeds)) != len(seeds):
        fail(f"lists a seed twice: {show(seeds)}")
    overlap = sorted(set(seeds) & (used if used is not None else used_seeds(sweep)))
    if overlap:
        fail(f"{show(overlap)} {'is' if len(overlap) == 1 else 'are'} already used by the sweep's own trials; "
             "confirm seeds must be fresh (never a tuning seed)")
    return list(seeds)


def fresh_seeds(seeds: int | list[int], used: set[int]) -> list[int]:
    """A count becomes the seeds right after the largest one used; a list is kept as given."""
    if isinstance(seeds, list):
        return list(seeds)
    start = max(used, default=-1) + 1
    return list(range(start, start + seeds))


# ---- the confirm stage ---------------------------------------------------------------------------


def confirm_stage(first: Sweep, configurations: list[dict[str, Any]], seeds: list[int], *, kimg: float | None,
                  fid_split: str | None, description: str) -> Sweep:
    """The confirm stage of `first` (its effective configuration, `--data` resolved): the selected
    configurations on fresh seeds, FIFO, at the full budget, with the same data, split and evaluation."""
    raw = first.model_dump(mode="json", exclude={"confirm", "configurations", "num_samples", "search_seed"})
    raw["name"] = confirm_name(first.name)
    raw["description"] = description
    raw["method"] = "grid"
    raw["scheduler"] = {"type": "fifo"}
    raw["configurations"] = [copy.deepcopy(c) for c in configurations]
    raw["parameters"] = {"seed": {"values": list(seeds)}}
    if kimg is not None:
        raw["train"]["kimg"] = kimg
    if fid_split is not None:
        raw["eval"]["fid_split"] = fid_split
    for key in ("tracking",):
        if raw.get(key) is None:
            raw.pop(key, None)
    text = confirm_file_text(first.name, raw)
    sweep = Sweep.model_validate(raw)
    file = f"{confirm_name(first.name)} (confirm stage of {first.name})"
    check_sweep(file, sweep, overridden=False)
    check_stages(file, sweep)
    sweep._source_path = file
    sweep._source_text = text
    return sweep


def confirm_file_text(first: str, raw: dict[str, Any]) -> str:
    """The confirm stage as a sweep file of its own (its directory's sweep.yaml; runnable as it is)."""
    head = (f"# Confirm stage of sweep {first}, written by orchestrator: the selected configurations on fresh\n"
            f"# seeds, FIFO, at the full budget (see selection.json beside this file).\n")
    return head + yaml.safe_dump(raw, sort_keys=False, default_flow_style=None, width=110)


def grid_configurations(sweep: Sweep) -> list[dict[str, Any]]:
    """A grid or random sweep's distinct configurations (its trials without seed/repeat), in trial order."""
    out: list[dict[str, Any]] = []
    for t in sweep.trials():
        config = {k: v for k, v in t.items() if k not in REPLICATE_PARAMS}
        if config not in out:
            out.append(config)
    return out
