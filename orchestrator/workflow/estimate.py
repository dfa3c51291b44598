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

from gan.config import TrialConfig, optimiser_settings
from orchestrator.run.rungs import rung_milestones  # noqa: F401  (also imported from here)
from orchestrator.sweepfile.params import REPLICATE_PARAMS as REPLICATE_KEYS


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
    from orchestrator.sweepfile.expansion import dependency_order as _dependency_order
    from orchestrator.sweepfile.expansion import expand as _expand
    from orchestrator.sweepfile.params import coerce as _coerce
    from orchestrator.sweepfile.sections import Parameter

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
    for k, c in zip(keys, configs, strict=False):
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
        # Their parameters are proposed at run time: num_samples configurations, each on every swept seed.
        seeds = spec.seed_values() or [None]
        trials = [{} if s is None else {"seed": s} for _ in range(spec.num_samples or 1) for s in seeds]
        model_of = [dearest] * len(trials)
        # Every proposal is a new configuration; ASHA per configuration culls its seeds together.
        per_group = len(seeds) if spec.scheduler.unit == "config" else 1
        groups: list[Any] = [i // per_group for i in range(len(trials))]
        which = (f"its one reachable model ({dearest})" if len(models) == 1 else
                 f"the most expensive of the {len(models)} reachable models ({dearest}; the cheapest, {cheapest}, "
                 f"would cost {full[cheapest] / full[dearest]:.0%} as much)")
        replicated = f" ({spec.num_samples} configurations x {len(seeds)} seeds)" if len(seeds) > 1 else ""
        unit = "the seeds of a configuration are culled together by ASHA" if per_group > 1 else \
            "each is its own configuration for ASHA"
        notes.append(f"method optuna proposes its {len(trials)} trials{replicated} at run time: each is costed as "
                     f"{which}, and {unit}")
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
