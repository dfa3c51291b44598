"""The cross-field rules of a sweep file, as a table of small named rule functions.

Each rule takes the `RuleContext` of a pydantic-valid `Sweep` and either passes, fills in an effective
default (paths made absolute, the scheduler's unit and rungs, the metric's goal), or fails with a
`SweepError` naming the key and value. `check_sweep` applies `RULES` in order: later rules may rely on
what earlier ones checked and filled in.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from gan.config import (
    ATTENTION_VARIANTS,
    EXTRACTORS,
    SPLITS,
    USE_VARIANTS,
    VARIANTS,
    DataConfig,
    EvalConfig,
)
from orchestrator.sweepfile.errors import SweepError, show, unknown_value
from orchestrator.sweepfile.expansion import Cycle, dependency_order, expand
from orchestrator.sweepfile.messages import from_validation_error
from orchestrator.sweepfile.params import (
    MODEL_TYPES,
    NO_DISTRIBUTION,
    PARAM_TYPES,
    base_type,
    coerce,
    plain,
)
from orchestrator.sweepfile.sections import METRIC_GOALS, Parameter, Sweep


@dataclass
class RuleContext:
    """What every rule sees: the file (for messages), the sweep (filled in as rules pass) and whether
    data.path came from `--data` rather than the file."""

    file: str
    sweep: Sweep
    overridden: bool

    def fail(self, key: str, message: str) -> typing.NoReturn:
        raise SweepError(self.file, key, message)


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Rules for single values of model/train fields, applied to the fixed sections and to every
# swept value (and distribution bound).
VALUE_RULES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "nz": (lambda v: v >= 1, "must be >= 1"),
    "heads": (lambda v: v >= 1, "must be >= 1"),
    "attn_dropout": (lambda v: finite(v) and 0 <= v < 1, "must be in [0, 1)"),
    "kimg": (lambda v: finite(v) and v > 0, "must be a finite number > 0"),
    "batch_size": (lambda v: v >= 1, "must be >= 1"),
    "lr_d": (lambda v: v is None or (finite(v) and v > 0), "must be a finite number > 0 or null"),
    "lr_g": (lambda v: v is None or (finite(v) and v > 0), "must be a finite number > 0 or null"),
    "beta1": (lambda v: v is None or (finite(v) and 0 <= v < 1), "must be in [0, 1) or null"),
    "beta2": (lambda v: v is None or (finite(v) and 0 <= v < 1), "must be in [0, 1) or null"),
    "d_steps": (lambda v: v is None or v >= 1, "must be >= 1 or null"),
    "gp_weight": (lambda v: finite(v) and v >= 0, "must be a finite number >= 0"),
    "recon_weight": (lambda v: finite(v) and v >= 0, "must be a finite number >= 0"),
    "kl_weight": (lambda v: finite(v) and v >= 0, "must be a finite number >= 0"),
    "seed": (lambda v: v >= 0, "must be >= 0"),
    "device": (lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None, "must be auto, cpu, cuda or cuda:N"),
    "cuda_graph": (lambda v: v in ("auto", "on", "off", True, False), "must be auto, on or off"),
}


def check_data(ctx: RuleContext) -> None:
    data = ctx.sweep.data
    if data.image_size not in (16, 32, 64, 128, 256):
        ctx.fail("data.image_size", f"must be a power of 2 from 16 to 256, got {show(data.image_size)}")
    if data.min_side is not None and data.min_side < 1:
        ctx.fail("data.min_side", f"must be >= 1 or null, got {show(data.min_side)}")
    if any(not finite(s) or s < 0 for s in data.split) or not math.isclose(sum(data.split), 1.0):
        ctx.fail("data.split", f"must be 3 non-negative numbers (train, val, test) summing to 1, "
                                f"got {show(plain(data.split))}")
    if data.split[0] == 0:
        ctx.fail("data.split", f"the train share must be > 0, got {show(plain(data.split))}")
    if data.synthetic_count < 1:
        ctx.fail("data.synthetic_count", f"must be >= 1, got {show(data.synthetic_count)}")
    if data.path is not None:
        resolved = Path(data.path).expanduser().resolve()
        if not resolved.is_dir():
            problem = "not a directory" if resolved.exists() else "directory not found"
            origin = " (from the data override)" if ctx.overridden else ""
            if str(resolved) != data.path:
                origin += f" (relative paths start from the current directory: {str(resolved)!r})"
            ctx.fail("data.path", f"{problem}: {show(data.path)}{origin}")
        data.path = str(resolved)
    if data.cache_dir is not None:
        data.cache_dir = str(Path(data.cache_dir).expanduser().resolve())


def check_eval(ctx: RuleContext) -> None:
    ev = ctx.sweep.eval
    if not (finite(ev.every_kimg) and ev.every_kimg > 0):
        ctx.fail("eval.every_kimg", f"must be a finite number > 0, got {show(ev.every_kimg)}")
    if ev.fid_samples < 2:
        ctx.fail("eval.fid_samples", f"must be >= 2, got {show(ev.fid_samples)}")
    if ev.final_fid_samples < ev.fid_samples:
        ctx.fail("eval.final_fid_samples", f"must be >= eval.fid_samples ({ev.fid_samples}), "
                                            f"got {show(ev.final_fid_samples)}")
    if ev.extractor not in EXTRACTORS:
        ctx.fail("eval.extractor", unknown_value("extractor", ev.extractor, EXTRACTORS))
    if ev.fid_split not in SPLITS:
        ctx.fail("eval.fid_split", unknown_value("split", ev.fid_split, SPLITS))
    if ev.fid_split != "all" and ctx.sweep.data.split[SPLITS.index(ev.fid_split)] == 0:
        ctx.fail("eval.fid_split", f"{show(ev.fid_split)} is empty: its share in data.split is 0")
    if ev.grid_size < 1:
        ctx.fail("eval.grid_size", f"must be >= 1, got {show(ev.grid_size)}")
    if ev.weights_path is not None:
        resolved = Path(ev.weights_path).expanduser().resolve()
        if not resolved.is_file():
            ctx.fail("eval.weights_path", f"file not found: {show(ev.weights_path)} "
                                           f"(resolved from the current directory: {str(resolved)!r})")
        ev.weights_path = str(resolved)
    if ctx.sweep.metric.name == "kid_mean" and not ev.kid:
        ctx.fail("metric.name", "'kid_mean' needs eval.kid: true")


def value_problem(sweep: Sweep, name: str, v: Any) -> str | None:
    size = sweep.data.image_size
    if name == "variant" and v not in VARIANTS:
        return unknown_value("variant", v, VARIANTS)
    if name in ("g_widths", "d_widths"):
        depth = int(math.log2(size)) - 2
        if len(v) != depth or any(w < 1 for w in v):
            return (f"needs {depth} positive widths for {size}x{size} images (log2({size}) - 2), "
                    f"got {show(plain(v))}")
    if name in VALUE_RULES and not VALUE_RULES[name][0](v):
        return f"{VALUE_RULES[name][1]}, got {show(v)}"
    return None


def check_fixed(ctx: RuleContext, section: str, values: BaseModel) -> None:
    for name, v in values:
        if name == "image_size":
            if v is not None and v != ctx.sweep.data.image_size:
                ctx.fail("model.image_size", f"{show(v)} differs from data.image_size "
                                              f"{ctx.sweep.data.image_size}; set it once, in data.image_size")
            ctx.sweep.model.image_size = ctx.sweep.data.image_size
            continue
        problem = value_problem(ctx.sweep, name, v)
        if problem:
            ctx.fail(f"{section}.{name}", problem)


def check_parameters(ctx: RuleContext) -> None:
    params = ctx.sweep.parameters
    for name, spec in params.items():
        key = f"parameters.{name}"
        check_parameter_name(ctx, key, name)
        kinds = [k for k in ("value", "values", "distribution") if k in spec.model_fields_set]
        if len(kinds) != 1:
            ctx.fail(key, f"give exactly one of value, values, distribution; got {', '.join(kinds) or 'none'}")
        if spec.categorical:
            check_categorical(ctx, key, name, spec)
        else:
            check_distribution(ctx, key, name, spec)
    for name, spec in params.items():
        check_when(ctx, f"parameters.{name}.when", name, spec)
    try:
        dependency_order(params)
    except Cycle as cycle:
        ctx.fail(f"parameters.{cycle.args[0]}.when", "conditions refer to each other in a loop")


def check_parameter_name(ctx: RuleContext, key: str, name: str) -> None:
    if name == "kimg":
        ctx.fail(key, "kimg can't be swept: trials are compared at one budget (train.kimg); run one sweep "
                       "per budget, or compare earlier evaluations with `orchestrator leaderboard --at-kimg`")
    if name in PARAM_TYPES:
        return
    for section, cls in (("data", DataConfig), ("eval", EvalConfig)):
        if name in {f.name for f in dataclasses.fields(cls)}:
            ctx.fail(key, f"data and eval settings can't be swept: {name!r} is set once, in {section}.{name}")
    close = difflib.get_close_matches(name, list(PARAM_TYPES), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    ctx.fail(key, f"unknown parameter {name!r}{hint}; parameters are ModelConfig/TrainConfig fields: "
                   f"{', '.join(PARAM_TYPES)}")


def check_categorical(ctx: RuleContext, key: str, name: str, spec: Parameter) -> None:
    for field in ("min", "max"):
        if field in spec.model_fields_set:
            ctx.fail(f"{key}.{field}", "min/max only go with a distribution")
    single = "value" in spec.model_fields_set
    if not single and not spec.values:
        ctx.fail(f"{key}.values", "must list at least one value, got []")
    coerced = []
    for i, v in enumerate(spec.choices):
        vkey = f"{key}.value" if single else f"{key}.values[{i}]"
        c = coerce_at(ctx, vkey, name, v)
        problem = value_problem(ctx.sweep, name, c)
        if problem:
            ctx.fail(vkey, problem)
        if c in coerced:
            ctx.fail(vkey, f"duplicate value {show(v)}")
        coerced.append(c)
    if single:
        spec.value = coerced[0]
    else:
        spec.values = coerced


def check_distribution(ctx: RuleContext, key: str, name: str, spec: Parameter) -> None:
    if ctx.sweep.method == "grid":
        ctx.fail(f"{key}.distribution", f"{spec.distribution} can't be used with method grid "
                                         "(grid needs a finite list: use values)")
    base = base_type(PARAM_TYPES[name])
    if base not in (int, float) or name in NO_DISTRIBUTION:
        ctx.fail(f"{key}.distribution", f"{name!r} can't be sampled from a distribution; list it with values")
    if base is int and spec.distribution != "int_uniform":
        ctx.fail(f"{key}.distribution", f"{name!r} is an integer: use int_uniform, not {spec.distribution}")
    for field in ("min", "max"):
        bound = getattr(spec, field)
        if bound is None:
            ctx.fail(key, f"distribution {spec.distribution} needs min and max")
        if spec.distribution == "int_uniform" and not float(bound).is_integer():
            ctx.fail(f"{key}.{field}", f"int_uniform needs whole numbers, got {show(bound)}")
        problem = value_problem(ctx.sweep, name, coerce(name, int(bound) if base is int else bound))
        if problem:
            ctx.fail(f"{key}.{field}", problem)
    if not spec.min < spec.max:
        ctx.fail(f"{key}.max", f"must be greater than min ({show(spec.min)}), got {show(spec.max)}")
    if spec.distribution == "log_uniform" and spec.min <= 0:
        ctx.fail(f"{key}.min", f"log_uniform needs min > 0, got {show(spec.min)}")


def check_when(ctx: RuleContext, key: str, name: str, spec: Parameter) -> None:
    params = ctx.sweep.parameters
    for ref, allowed in (spec.when or {}).items():
        if ref == name:
            ctx.fail(f"{key}.{ref}", "a parameter can't depend on itself")
        if ref not in params:
            ctx.fail(f"{key}.{ref}", f"refers to {ref!r}, which is not a swept parameter "
                                      f"(swept: {', '.join(params)})")
        if not params[ref].categorical:
            ctx.fail(f"{key}.{ref}", f"refers to {ref!r}, which has a distribution; conditions may only "
                                      "refer to parameters with value/values")
        if not allowed:
            ctx.fail(f"{key}.{ref}", "must list at least one value, got []")
        coerced = [coerce_at(ctx, f"{key}.{ref}[{i}]", ref, v) for i, v in enumerate(allowed)]
        for i, c in enumerate(coerced):
            problem = value_problem(ctx.sweep, ref, c)
            if problem:
                ctx.fail(f"{key}.{ref}[{i}]", problem)
        if not any(c in params[ref].choices for c in coerced):
            ctx.fail(f"{key}.{ref}", f"never holds: none of {show(allowed)} is among the values of {ref!r} "
                                      f"{show(params[ref].choices)}")
        spec.when[ref] = coerced


def check_optuna_seed(ctx: RuleContext) -> None:
    """Optuna runs every configuration it proposes on each listed seed (orchestrator.run.seed_search), so seeds
    are a list, never sampled, conditional, or a condition of another parameter."""
    params = ctx.sweep.parameters
    seed = params.get("seed")
    if ctx.sweep.method != "optuna" or seed is None:
        return
    if not seed.categorical:
        ctx.fail("parameters.seed.distribution", "method optuna runs every configuration on each listed seed: "
                                                  "list the seeds with values (e.g. values: [0, 1, 2])")
    if seed.when:
        ctx.fail("parameters.seed.when", "method optuna runs every configuration on each listed seed, so seeds "
                                          "can't be conditional")
    for name, spec in params.items():
        if "seed" in (spec.when or {}):
            ctx.fail(f"parameters.{name}.when.seed", "method optuna runs every configuration on each listed "
                                                     "seed, so no parameter can depend on the seed")


def coerce_at(ctx: RuleContext, key: str, name: str, value: Any) -> Any:
    try:
        return coerce(name, value)
    except ValidationError as e:
        raise SweepError(ctx.file, key, from_validation_error(ctx.file, e).message) from None


def check_architectures(ctx: RuleContext) -> None:
    """Every generator the sweep can produce: modules at existing resolutions, heads dividing channels."""
    params = ctx.sweep.parameters
    involved = [n for n in ("variant", "g_widths", "heads", "cmhsa_at", "use_at") if n in params]
    needed: set[str] = set()
    while involved:  # add what their conditions refer to, transitively
        n = involved.pop()
        if n not in needed:
            needed.add(n)
            involved.extend(params[n].when or {})
    subset = {n: params[n] for n in params if n in needed}
    model = ctx.sweep.model
    # resolutions of the generator's feature maps, 4x4 up to image_size / 2
    resolutions = [4 * 2**i for i in range(int(math.log2(ctx.sweep.data.image_size)) - 2)]
    for combo in expand(subset, dependency_order(subset)):
        variant = combo.get("variant", model.variant)
        use_at = combo.get("use_at", model.use_at)
        if variant in USE_VARIANTS and use_at not in resolutions[1:]:
            ctx.fail(swept_key(ctx.sweep, combo, ("use_at",), fallback="model.use_at"),
                      f"use_at={use_at} is not a resolution the generator upsamples to "
                      f"(one of {resolutions[1:]} for variant {variant})")
        if variant not in ATTENTION_VARIANTS:
            continue
        at = combo.get("cmhsa_at", model.cmhsa_at)
        if at not in resolutions:
            ctx.fail(swept_key(ctx.sweep, combo, ("cmhsa_at",), fallback="model.cmhsa_at"),
                      f"cmhsa_at={at} is not a generator feature-map resolution "
                      f"(one of {resolutions} for variant {variant})")
        widths = plain(combo.get("g_widths", model.g_widths))
        heads = combo.get("heads", model.heads)
        channels = widths[resolutions.index(at)]
        if channels % heads:
            ctx.fail(swept_key(ctx.sweep, combo, ("heads", "g_widths", "cmhsa_at"), fallback="model.heads"),
                      f"heads={heads} does not divide the {channels} generator channels at cmhsa_at={at} "
                      f"(g_widths {widths}, variant {variant})")


def swept_key(sweep: Sweep, combo: dict[str, Any], names: tuple[str, ...], *, fallback: str) -> str:
    """The key of the first of `names` that this combination took from `parameters`."""
    for n in names:
        if n in combo:
            spec = sweep.parameters[n]
            if "value" in spec.model_fields_set:
                return f"parameters.{n}.value"
            return f"parameters.{n}.values[{spec.choices.index(combo[n])}]"
    return fallback


def possible(sweep: Sweep, name: str) -> list[Any]:
    """Every value a model/train field takes in some trial: its swept values, else the fixed one."""
    spec = sweep.parameters.get(name)
    if spec is not None and spec.categorical:
        return spec.choices
    section = sweep.model if name in MODEL_TYPES else sweep.train
    return [getattr(section, name)]


def check_compile(ctx: RuleContext) -> None:
    # torch.compile's autograd does not support the double backward of WGAN-GP's gradient penalty.
    if ctx.sweep.method == "grid":  # exact: conditions (`when`) may keep the two apart
        clash = any(ctx.sweep.trial_config(t).train.compile and ctx.sweep.trial_config(t).model.variant == "wgan"
                    for t in expand(ctx.sweep.parameters, dependency_order(ctx.sweep.parameters)))
    else:
        clash = True in possible(ctx.sweep, "compile") and "wgan" in possible(ctx.sweep, "variant")
    if clash:
        key = "parameters.compile" if "compile" in ctx.sweep.parameters else "train.compile"
        ctx.fail(key, "compile: true can't train variant 'wgan' (torch.compile does not support the double "
                       "backward of its gradient penalty); set compile: false or sweep compile only for "
                       "the other variants")


def check_kimg_budget(ctx: RuleContext) -> None:
    every, shortest = ctx.sweep.eval.every_kimg, ctx.sweep.train.kimg
    if every > shortest:
        ctx.fail("eval.every_kimg", f"{show(every)} is more than the training budget of {show(shortest)} "
                                     "kimg, so no evaluation would run")


def check_scheduler(ctx: RuleContext) -> None:
    s = ctx.sweep.scheduler
    if s.type == "fifo":
        extra = sorted(s.model_fields_set - {"type"})
        s.unit = None
        if extra:
            ctx.fail(f"scheduler.{extra[0]}", "only used with type asha")
        return
    if s.unit is None:
        s.unit = "config" if ctx.sweep.replicates_seeds() else "trial"
    kimg, every = ctx.sweep.train.kimg, ctx.sweep.eval.every_kimg
    s.max_t = kimg if s.max_t is None else s.max_t
    s.grace_period = every if s.grace_period is None else s.grace_period
    if not (finite(s.grace_period) and s.grace_period > 0):
        ctx.fail("scheduler.grace_period", f"must be a finite number > 0, got {show(s.grace_period)}")
    if not (finite(s.reduction_factor) and s.reduction_factor >= 2):
        ctx.fail("scheduler.reduction_factor", f"must be >= 2, got {show(s.reduction_factor)}")
    if not (finite(s.max_t) and s.max_t > 0):
        ctx.fail("scheduler.max_t", f"must be a finite number > 0, got {show(s.max_t)}")
    if s.max_t > kimg:
        ctx.fail("scheduler.max_t", f"{show(s.max_t)} is more than train.kimg {show(kimg)}")
    if s.grace_period > s.max_t:
        ctx.fail("scheduler.grace_period", f"{show(s.grace_period)} is more than scheduler.max_t "
                                            f"{show(s.max_t)}")
    if s.grace_period < every:
        ctx.fail("scheduler.grace_period", f"{show(s.grace_period)} is less than eval.every_kimg "
                                            f"{show(every)}: ASHA would have no {ctx.sweep.metric.name} "
                                            "at its first rung")


def check_run_settings(ctx: RuleContext) -> None:
    sweep = ctx.sweep
    if sweep.method == "grid":
        sweep.num_samples = sweep.num_samples or 1
        if sweep.num_samples > 1 and "seed" in sweep.parameters:
            ctx.fail("num_samples", f"{sweep.num_samples} repeats give each repeat its own seed (train.seed + "
                                     "repeat), which would override the swept seeds: list more seeds in "
                                     "parameters.seed instead")
    elif sweep.num_samples is None:
        ctx.fail("num_samples", f"required for method {sweep.method}: the number of trials to run")
    right_goal = METRIC_GOALS[sweep.metric.name]
    if sweep.metric.goal not in (None, right_goal):
        better = "lower" if right_goal == "minimize" else "higher"
        ctx.fail("metric.goal", f"{show(sweep.metric.goal)} is wrong for {sweep.metric.name} "
                                 f"({better} is better): use {right_goal}")
    sweep.metric.goal = right_goal
    cpu, gpu = sweep.resources.cpu, sweep.resources.gpu
    if not (finite(cpu) and cpu > 0):
        ctx.fail("resources.cpu", f"must be > 0, got {show(cpu)}")
    # A trial trains on one device: a second reserved GPU would idle while other trials wait for it.
    if not (finite(gpu) and 0 <= gpu <= 1):
        ctx.fail("resources.gpu", f"must be in [0, 1] (a trial trains on one GPU; 0.5 packs two trials "
                                   f"per GPU), got {show(gpu)}")
    hang = sweep.hang_timeout_min
    if not (finite(hang) and hang > 0):
        ctx.fail("hang_timeout_min", f"must be a number of minutes > 0, got {show(hang)}")


def check_model_section(ctx: RuleContext) -> None:
    check_fixed(ctx, "model", ctx.sweep.model)


def check_train_section(ctx: RuleContext) -> None:
    check_fixed(ctx, "train", ctx.sweep.train)


# In order: each rule may rely on what the ones before it checked and filled in.
RULES: tuple[typing.Callable[[RuleContext], None], ...] = (
    check_data,
    check_model_section,
    check_train_section,
    check_eval,
    check_parameters,
    check_optuna_seed,
    check_architectures,
    check_kimg_budget,
    check_compile,
    check_scheduler,
    check_run_settings,
)


def check_sweep(file: str, sweep: Sweep, *, overridden: bool) -> None:
    """Apply every rule to a pydantic-valid sweep (which they complete with its effective defaults)."""
    ctx = RuleContext(file, sweep, overridden)
    for rule in RULES:
        rule(ctx)
