"""`orchestrator sweep FILE --dry-run --estimate`: what a sweep will cost, before it runs.

Three parts, kept apart so that the arithmetic can be checked by hand:

- the arithmetic (`estimate`): from per-iteration and per-evaluation seconds of each trial's model, the
  images, iterations and seconds of every trial, their total without early stopping, and with ASHA the
  best case: the least ASHA can spend when it stops as much as its reduction factor allows;
- the measurement (`measure_sweep`): time every distinct model of the sweep with `gan.cost` (torch, never
  Ray);
- the report (`print_estimate`).

The formulas are in README ("Cost estimate").
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gan.config import TrialConfig, optimiser_settings
from orchestrator.results import REPLICATE_KEYS
from orchestrator.rungs import rung_milestones  # noqa: F401  (also imported from here)



class EstimateError(ValueError):
    """The sweep's models could not be timed here; str() is one line."""


# --- the arithmetic ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCost:
    """What one model costs on the measuring device."""

    seconds_per_iteration: float
    images_per_iteration: int  # d_steps x batch_size real images per iteration
    eval_seconds_per_sample: float | None = None  # generation + feature extraction; None: not measured
    eval_seconds_fixed: float = 0.0  # FID/IS statistics, once per evaluation


@dataclass(frozen=True)
class Budget:
    kimg: float
    every_kimg: float
    fid_samples: int
    final_fid_samples: int


@dataclass(frozen=True)
class Asha:
    grace_period: float
    reduction_factor: float
    max_t: float


@dataclass(frozen=True)
class Run:
    """A trial trained up to an evaluation point."""

    images: int  # the evaluation point it trains to: kimg x 1000 for the whole budget
    iterations: int  # ceil(images / images per iteration): the loop runs whole iterations
    train_seconds: float
    evaluations: int
    eval_seconds: float | None  # None when the evaluation was not measured

    @property
    def seconds(self) -> float:
        """Training plus evaluation (training only when the evaluation was not measured)."""
        return self.train_seconds + (self.eval_seconds or 0.0)


@dataclass(frozen=True)
class TrialEstimate:
    full: Run  # the whole budget, no early stopping
    asha: Run | None  # ASHA's best case; None without ASHA
    stopped_at: float | None  # the rung (kimg) ASHA stops it at in the best case; None: it runs to max_t


@dataclass(frozen=True)
class Estimate:
    trials: list[TrialEstimate]
    rungs: list[float]  # ASHA's rungs below max_t (kimg); [] without ASHA
    kept: list[int]  # units continuing past each rung in the best case
    units: int  # what ASHA culls: configurations (unit config) or trials

    @property
    def images(self) -> int:
        return sum(t.full.images for t in self.trials)

    @property
    def full_seconds(self) -> float:
        return sum(t.full.seconds for t in self.trials)

    @property
    def full_train_seconds(self) -> float:
        return sum(t.full.train_seconds for t in self.trials)

    @property
    def full_eval_seconds(self) -> float | None:
        if any(t.full.eval_seconds is None for t in self.trials):
            return None
        return sum(t.full.eval_seconds for t in self.trials)

    @property
    def asha_seconds(self) -> float | None:
        if any(t.asha is None for t in self.trials) or not self.trials:
            return None
        return sum(t.asha.seconds for t in self.trials)


def evaluation_points(budget: Budget) -> list[int]:
    """Images at which the training loop evaluates: every every_kimg below the budget, then the budget."""
    total, every = round(budget.kimg * 1000), max(1, round(budget.every_kimg * 1000))
    return [every * j for j in range(1, math.ceil(total / every))] + [total]


def first_point_at_or_past(points: Sequence[int], kimg: float) -> int:
    """The evaluation at which a trial reports `kimg` (ASHA decides on reports): the first point >= it."""
    target = round(kimg * 1000)
    return next((p for p in points if p >= target), points[-1])


def run_to(cost: ModelCost, budget: Budget, end: int) -> Run:
    """The trial trained up to (and evaluated at) the evaluation point `end` (images)."""
    points = evaluation_points(budget)
    final = points[-1]
    iterations = math.ceil(end / cost.images_per_iteration)
    evals = [p for p in points if p <= end]
    eval_seconds = None
    if cost.eval_seconds_per_sample is not None:
        eval_seconds = sum(
            cost.eval_seconds_fixed
            + (budget.final_fid_samples if p == final else budget.fid_samples) * cost.eval_seconds_per_sample
            for p in evals
        )
    return Run(end, iterations, iterations * cost.seconds_per_iteration, len(evals), eval_seconds)


def kept_per_rung(units: int, reduction_factor: float, rungs: int) -> list[int]:
    """Units continuing past rung i = 1..rungs in the best case: max(1, floor(units / reduction_factor^i)).

    ASHA keeps the best 1/reduction_factor at a rung; the first unit to reach a rung always continues."""
    return [max(1, math.floor(units / reduction_factor**i + 1e-9)) for i in range(1, rungs + 1)]


def estimate(costs: Sequence[ModelCost], groups: Sequence[Any], budget: Budget, asha: Asha | None) -> Estimate:
    """Per-trial and total cost of trials whose models cost `costs` (one per trial).

    `groups[i]` is what ASHA culls trial i with: its configuration (unit config: seed replicates share
    one) or the trial itself (unit trial). With `asha`, the best case: at rung i only
    max(1, floor(N / reduction_factor^i)) of the N units continue, those kept being the cheapest (by their
    cost up to max_t); a stopped unit's trials train to the first evaluation at or past the rung, the kept
    ones to the first at or past max_t.
    """
    if len(costs) != len(groups):
        raise ValueError("one group per trial")
    points = evaluation_points(budget)
    full = [run_to(c, budget, points[-1]) for c in costs]
    if asha is None:
        return Estimate([TrialEstimate(f, None, None) for f in full], [], [], 0)

    rungs = rung_milestones(asha.grace_period, asha.max_t, asha.reduction_factor)
    units: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        units.setdefault(g, []).append(i)
    kept = kept_per_rung(len(units), asha.reduction_factor, len(rungs))
    end = first_point_at_or_past(points, asha.max_t)
    to_end = [run_to(c, budget, end) for c in costs]
    order = sorted(units, key=lambda g: sum(to_end[i].seconds for i in units[g]))  # stable: sweep order on ties
    runs: dict[int, tuple[Run, float | None]] = {}
    for rank, g in enumerate(order):
        stop = next((r for r, k in enumerate(kept) if rank >= k), None)
        for i in units[g]:
            if stop is None:
                runs[i] = (to_end[i], None)
            else:
                runs[i] = (run_to(costs[i], budget, first_point_at_or_past(points, rungs[stop])), rungs[stop])
    trials = [TrialEstimate(full[i], *runs[i]) for i in range(len(costs))]
    return Estimate(trials, rungs, kept, len(units))


# --- measuring a sweep ---------------------------------------------------------------------------


def cost_key(cfg: TrialConfig) -> str:
    """Trials with the same key train the same computation: the model, the batch, the variant's D steps and
    the speed switches. Seeds, learning rates, betas and loss weights change numbers, not the cost."""
    t = cfg.train
    return json.dumps({
        "model": dataclasses.asdict(cfg.model),
        "batch_size": t.batch_size,
        "d_steps": optimiser_settings(cfg.model.variant, t)["d_steps"],
        **{k: getattr(t, k) for k in ("device", "amp", "channels_last", "compile", "cuda_graph")},
    }, sort_keys=True, default=str)


@dataclass
class Measured:
    """One distinct model, timed."""

    name: str  # M1, M2, ... in order of first appearance
    cfg: TrialConfig
    iteration: Any  # gan.cost.IterationCost
    evaluation: Any  # gan.cost.EvalCost

    @property
    def cost(self) -> ModelCost:
        e = self.evaluation
        return ModelCost(self.iteration.seconds_per_iteration, self.iteration.images_per_iteration,
                         e.seconds_per_sample if e.measured else None, e.seconds_fixed or 0.0)


@dataclass
class SweepEstimate:
    spec: Any
    trials: list[dict[str, Any]]  # the parameters of every trial costed
    model_of: list[str]  # trial -> model name
    models: dict[str, Measured]
    result: Estimate
    notes: list[str] = field(default_factory=list)
    load_average: float | None = None

    @property
    def device(self) -> str:
        return next(iter(self.models.values())).iteration.device_label

    @property
    def on_cuda(self) -> bool:
        return next(iter(self.models.values())).iteration.peak_memory_bytes is not None


def threads_of(spec) -> int:
    return max(1, int(spec.resources.cpu))  # what runner.train_trial gives torch


def reachable_trials(spec) -> list[dict[str, Any]]:
    """For optuna: every combination of the categorical values, with each distribution at its min and max
    (the cost grows with batch_size, d_steps, nz; never with learning rates), conditions respected."""
    from orchestrator.schema import Parameter, _coerce, _dependency_order, _expand

    params = {}
    for name, p in spec.parameters.items():
        if p.categorical:
            params[name] = p
        else:
            ends = [int(p.min), int(p.max)] if p.distribution == "int_uniform" else [p.min, p.max]
            params[name] = Parameter(values=[_coerce(name, v) for v in ends], when=p.when)
    return [spec._in_file_order(t) for t in _expand(params, _dependency_order(params))]


def measure_sweep(spec, *, time_iterations: Callable | None = None, time_evaluation: Callable | None = None,
                  say: Callable[[str], None] = lambda _: None) -> SweepEstimate:
    """Time every distinct model of `spec` and estimate the sweep. The timing functions default to
    gan.cost's (tests pass stand-ins)."""
    if time_iterations is None or time_evaluation is None:
        from gan import cost as gan_cost

        time_iterations = time_iterations or gan_cost.time_iterations
        time_evaluation = time_evaluation or gan_cost.time_evaluation
    notes = []
    if spec.method == "optuna":
        candidates = reachable_trials(spec)
    else:
        candidates = spec.trials()
    configs = [spec.trial_config(t) for t in candidates]
    keys = [cost_key(c) for c in configs]
    distinct: dict[str, TrialConfig] = {}
    for k, c in zip(keys, configs):
        distinct.setdefault(k, c)
    names = {k: f"M{i + 1}" for i, k in enumerate(distinct)}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    threads = threads_of(spec)
    models: dict[str, Measured] = {}
    for k, cfg in distinct.items():
        say(f"timing {names[k]} ({cfg.model.variant}, batch {cfg.train.batch_size}) ...")
        try:
            iteration = time_iterations(cfg, threads=threads)
            evaluation = time_evaluation(cfg, threads=threads)
        except (RuntimeError, AssertionError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EstimateError(f"cannot time {names[k]} ({cfg.model.variant}) on train.device "
                                f"{cfg.train.device!r} here: {first}") from None
        models[names[k]] = Measured(names[k], cfg, iteration, evaluation)

    if spec.method == "optuna":
        budget = budget_of(spec)
        full = {n: run_to(m.cost, budget, evaluation_points(budget)[-1]).seconds for n, m in models.items()}
        dearest = max(full, key=full.get)
        cheapest = min(full, key=full.get)
        trials = [{} for _ in range(spec.num_samples or 1)]  # their parameters are proposed at run time
        model_of = [dearest] * len(trials)
        groups: list[Any] = list(range(len(trials)))  # Optuna proposes a new configuration every trial
        which = (f"its one reachable model ({dearest})" if len(models) == 1 else
                 f"the most expensive of the {len(models)} reachable models ({dearest}; the cheapest, {cheapest}, "
                 f"would cost {full[cheapest] / full[dearest]:.0%} as much)")
        notes.append(f"method optuna proposes its {len(trials)} trials at run time: each is costed as {which}, "
                     "and each is its own configuration for ASHA")
    else:
        trials = candidates
        model_of = [names[k] for k in keys]
        groups = [config_group(spec, t, i) for i, t in enumerate(trials)]
    result = estimate([models[n].cost for n in model_of], groups, budget_of(spec), asha_of(spec))
    return SweepEstimate(spec, trials, model_of, models, result, notes, load)


def budget_of(spec) -> Budget:
    return Budget(spec.train.kimg, spec.eval.every_kimg, spec.eval.fid_samples, spec.eval.final_fid_samples)


def asha_of(spec) -> Asha | None:
    s = spec.scheduler
    return Asha(s.grace_period, s.reduction_factor, s.max_t) if s.type == "asha" else None


def config_group(spec, params: dict[str, Any], index: int) -> Any:
    """What ASHA culls this trial with: its configuration (unit config) or itself (unit trial)."""
    if spec.scheduler.unit == "config":
        return json.dumps({k: v for k, v in params.items() if k not in REPLICATE_KEYS}, sort_keys=True, default=str)
    return index


# --- the report ----------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h"


def _also(seconds: float) -> str:
    """' = 7.2 min' where hours alone read badly; nothing from 2 h on."""
    return f" = {duration(seconds)}" if seconds < 7200 else ""


def mib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def print_estimate(spec, console: Console, *, measure: Callable[..., SweepEstimate] = measure_sweep) -> None:
    """Time the sweep's models here and print the per-trial table, the totals and the memory figures."""
    say = (lambda line: console.print(escape(line), style="dim")) if console.is_terminal else (lambda _: None)
    est = measure(spec, say=say)
    res, hours = est.result, ("gpu-h" if est.on_cuda else "cpu-h")
    h = lambda s: f"{s / 3600:.3g}"  # noqa: E731
    device = est.device
    threads = threads_of(spec)
    budget = budget_of(spec)
    asha = asha_of(spec)
    console.print(escape(f"cost estimate, measured on {device}"
                         + (f" (1-min load average {est.load_average:.2f} on {os.cpu_count()} cores)"
                            if est.load_average is not None and not est.on_cuda else "")), soft_wrap=True)

    # the models ------------------------------------------------------------------------------
    varying = _varying_fields(est.models)
    table = Table(title=f"{len(est.models)} distinct model(s) timed", title_justify="left")
    for col in ["model", *varying, "s/iteration", "images/iteration", "s/kimg",
                f"eval s ({budget.fid_samples} / {budget.final_fid_samples} samples)", "peak memory (train + eval)"]:
        table.add_column(col)
    for m in est.models.values():
        c, it, ev = m.cost, m.iteration, m.evaluation
        values = _fields(m.cfg)
        eval_s = (f"{ev.seconds(budget.fid_samples):.3g} / {ev.seconds(budget.final_fid_samples):.3g}"
                  if ev.measured else "not included")
        if it.peak_memory_bytes is None:
            memory = f"n/a on {it.device_label.split(' ')[0]}"
        else:
            memory = f"{mib(it.peak_memory_bytes)} + {mib(ev.peak_memory_bytes or 0)}"
        table.add_row(m.name, *[escape(str(values[f])) for f in varying], f"{c.seconds_per_iteration:.4g}",
                      str(c.images_per_iteration), f"{c.seconds_per_iteration * 1000 / c.images_per_iteration:.3g}",
                      eval_s, memory)
    console.print(table)

    # the trials ------------------------------------------------------------------------------
    names = [n for n in dict.fromkeys(k for t in est.trials for k in t) if n != "repeat"]
    what = "hours of one trial on this GPU" if est.on_cuda else f"hours of one trial on {threads} core(s), resources.cpu"
    table = Table(title=f"{spec.name}: cost per trial ({hours}: {what})", title_justify="left")
    for col in ["#", *names, "model", "images", "iterations", f"train {hours}", f"eval {hours}", f"total {hours}"]:
        table.add_column(col)
    if asha is not None:
        table.add_column("ASHA best case: trains to kimg")
        table.add_column(f"ASHA best case {hours}")
    for i, (params, model, t) in enumerate(zip(est.trials, est.model_of, res.trials)):
        row = [str(i), *[escape(str(params.get(n, "-"))) for n in names], model, f"{t.full.images:,}",
               f"{t.full.iterations:,}", h(t.full.train_seconds),
               h(t.full.eval_seconds) if t.full.eval_seconds is not None else "n/a", h(t.full.seconds)]
        if t.asha is not None:
            stop = f"{t.asha.images / 1000:g} (stopped at rung {t.stopped_at:g})" if t.stopped_at is not None \
                else f"{t.asha.images / 1000:g} (kept)"
            row += [stop, h(t.asha.seconds)]
        table.add_row(*row)
    console.print(table)

    # totals ------------------------------------------------------------------------------------
    lines = []
    eval_total = res.full_eval_seconds
    split = f"training {h(res.full_train_seconds)}" + (f", evaluation {h(eval_total)}" if eval_total is not None
                                                         else ", evaluation not included")
    lines.append(f"total without early stopping: {len(res.trials)} trials, {res.images:,} images to train "
                 f"({res.images / 1000:g} kimg): {h(res.full_seconds)} {hours}{_also(res.full_seconds)} ({split})")
    if asha is not None:
        unit = "configurations" if spec.scheduler.unit == "config" else "trials"
        if res.rungs:
            kept = ", ".join(f"{k} after {r:g} kimg" for k, r in zip(res.kept, res.rungs))
            saved = 1 - res.asha_seconds / res.full_seconds if res.full_seconds else 0.0
            lines.append(
                f"ASHA best case (unit {spec.scheduler.unit}): of {res.units} {unit}, keeping "
                f"max(1, floor({res.units} / {asha.reduction_factor:g}^i)) past rung i: {kept}; the cheapest kept: "
                f"{h(res.asha_seconds)} {hours}{_also(res.asha_seconds)}, at most {saved:.0%} saved"
            )
        else:
            lines.append(f"ASHA: no rung below max_t {asha.max_t:g} kimg (grace_period {asha.grace_period:g}): "
                         "nothing can be stopped early")
    lines.append(_based_on(est, budget))
    lines.append(_memory_line(est))
    lines.append(_per_gpu_line(est))
    lines.extend(est.notes)
    if not est.on_cuda and (spec.resources.gpu > 0 or str(spec.train.device).startswith("cuda")):
        lines.append("warning: measured on a CPU for a sweep that trains on GPUs: these hours do not predict "
                     "GPU-hours; run the estimate on the GPU machine")
    elif not est.on_cuda:
        lines.append("caveat: timed on this machine's CPU; another CPU, a busy machine, or a GPU gives other figures")
    for line in lines:
        console.print(escape(line), soft_wrap=True)  # one line each, whatever the width: greppable


def _fields(cfg: TrialConfig) -> dict[str, Any]:
    key = json.loads(cost_key(cfg))
    return {**key.pop("model"), **key}


def _varying_fields(models: dict[str, Measured]) -> list[str]:
    rows = [_fields(m.cfg) for m in models.values()]
    varying = [k for k in rows[0] if any(json.dumps(r[k]) != json.dumps(rows[0][k]) for r in rows)]
    return ["variant", *[k for k in varying if k != "variant"]]


def _based_on(est: SweepEstimate, budget: Budget) -> str:
    its = [m.iteration for m in est.models.values()]
    evals = [m.evaluation for m in est.models.values()]
    counts = sorted({i.iterations for i in its})
    shown = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    warm = sorted({i.warmup for i in its})
    text = (f"based on: {shown} timed iteration{'s' if counts[-1] != 1 else ''} per model after "
            f"{'-'.join(str(w) for w in warm)} warm-up iteration(s), on random images of the trial's shape; "
            "iterations = ceil(images / images per iteration)")
    measured = [e for e in evals if e.measured]
    if measured:
        e = measured[0]
        text += (f"; each evaluation = generation + {e.extractor} features timed on {e.samples_timed} samples and "
                 f"scaled linearly to {budget.fid_samples} (intermediate, every {budget.every_kimg:g} kimg) or "
                 f"{budget.final_fid_samples} (final), plus the FID/IS statistics timed once")
        text += ("; not included: data preparation, the real-statistics pass (once per dataset, then cached), "
                 "sample grids, checkpoints, Ray start-up")
    else:
        text += f"; evaluation time not included: {evals[0].note}"
    return text


def _memory_line(est: SweepEstimate) -> str:
    if not est.on_cuda:
        return "peak memory: n/a on cpu (only a GPU's allocator can measure it; RSS of a CPU run would not tell it)"
    name, m = max(est.models.items(), key=lambda kv: _trial_peak(kv[1]))
    text = (f"peak GPU memory of the largest model ({name}): {mib(m.iteration.peak_memory_bytes)} training + "
            f"{mib(m.evaluation.peak_memory_bytes or 0)} evaluation (measured apart; their sum is an upper bound), ")
    from gan.cost import bytes_per_training_image, training_split_bytes

    split = training_split_bytes(m.cfg)
    if split is not None:
        text += f"plus {mib(split)} for the training split held on the device"
    else:
        text += (f"plus {bytes_per_training_image(m.cfg) // 1024} KiB per training image held on the device "
                 "(the folder's image count is not known before it is prepared)")
    return text


def _trial_peak(m: Measured) -> int:
    from gan.cost import training_split_bytes

    return (m.iteration.peak_memory_bytes or 0) + (m.evaluation.peak_memory_bytes or 0) + (
        training_split_bytes(m.cfg) or 0)


def _per_gpu_line(est: SweepEstimate) -> str:
    gpu = est.spec.resources.gpu
    if gpu == 0:
        return (f"trials per GPU: none (resources.gpu is 0: each trial trains on {threads_of(est.spec)} CPU "
                f"core(s), resources.cpu)")
    by_share = math.floor(1 / gpu + 1e-9)
    text = f"trials per GPU: floor(1 / resources.gpu {gpu:g}) = {by_share} by the sweep's share"
    if not est.on_cuda:
        return text + "; whether they fit in its memory needs a GPU to measure (measured on cpu)"
    largest = max(est.models.values(), key=_trial_peak)
    need, total = _trial_peak(largest), largest.iteration.device_memory_bytes
    fit = math.floor(total / need) if need else by_share
    return (text + f"; memory fits floor({mib(total)} / {mib(need)}) = {fit} of the largest model: "
            f"{min(by_share, fit)} fit on one {largest.iteration.device_label}")
