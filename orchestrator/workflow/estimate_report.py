"""The printed part of `orchestrator sweep FILE --dry-run --estimate`: what was timed, each trial's images
and device-hours, the totals without early stopping and in ASHA's best case, the memory and packing lines."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gan.config import TrialConfig
from orchestrator.workflow.estimate import (
    Budget,
    Measured,
    SweepEstimate,
    asha_of,
    budget_of,
    cost_key,
    evaluation_points,
    measure_sweep,
    run_to,
    threads_of,
)


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
    what = (
        "hours of one trial on this GPU" if est.on_cuda else f"hours of one trial on {threads} core(s), resources.cpu"
    )
    table = Table(title=f"{spec.name}: cost per trial ({hours}: {what})", title_justify="left")
    for col in ["#", *names, "model", "images", "iterations", f"train {hours}", f"eval {hours}", f"total {hours}"]:
        table.add_column(col)
    if asha is not None:
        table.add_column("ASHA best case: trains to kimg")
        table.add_column(f"ASHA best case {hours}")
    for i, (params, model, t) in enumerate(zip(est.trials, est.model_of, res.trials, strict=False)):
        row = [
            str(i),
            *[escape(str(params.get(n, "-"))) for n in names],
            model,
            f"{t.full.images:,}",
            f"{t.full.iterations:,}",
            h(t.full.train_seconds),
            h(t.full.eval_seconds) if t.full.eval_seconds is not None else "n/a",
            h(t.full.seconds),
        ]
        if t.asha is not None:
            stop = (
                f"{t.asha.images / 1000:g} (stopped at rung {t.stopped_at:g})"
                if t.stopped_at is not None
                else f"{t.asha.images / 1000:g} (kept)"
            )
            row += [stop, h(t.asha.seconds)]
        table.add_row(*row)
    console.print(table)

    # totals ------------------------------------------------------------------------------------
    lines = []
    eval_total = res.full_eval_seconds
    split = f"training {h(res.full_train_seconds)}" + (
        f", evaluation {h(eval_total)}" if eval_total is not None else ", evaluation not included"
    )
    lines.append(
        f"total without early stopping: {len(res.trials)} trials, {res.images:,} images to train "
        f"({res.images / 1000:g} kimg): {h(res.full_seconds)} {hours}{_also(res.full_seconds)} ({split})"
    )
    if asha is not None:
        unit = "configurations" if spec.scheduler.unit == "config" else "trials"
        if res.rungs:
            kept = ", ".join(f"{k} after {r:g} kimg" for k, r in zip(res.kept, res.rungs, strict=False))
            saved = 1 - res.asha_seconds / res.full_seconds if res.full_seconds else 0.0
            lines.append(
                f"ASHA best case (unit {spec.scheduler.unit}): of {res.units} {unit}, keeping "
                f"max(1, floor({res.units} / {asha.reduction_factor:g}^i)) past rung i: {kept}; the cheapest kept: "
                f"{h(res.asha_seconds)} {hours}{_also(res.asha_seconds)}, at most {saved:.0%} saved"
            )
        else:
            lines.append(
                f"ASHA: no rung below max_t {asha.max_t:g} kimg (grace_period {asha.grace_period:g}): "
                "nothing can be stopped early"
            )
    if spec.confirm is not None:
        lines.append(_confirm_line(est, res.full_seconds, hours))
    lines.append(_based_on(est, budget))
    lines.append(_memory_line(est))
    lines.append(_disk_line(est, budget))
    lines.append(_per_gpu_line(est))
    lines.extend(est.notes)
    if not est.on_cuda and (spec.resources.gpu > 0 or str(spec.train.device).startswith("cuda")):
        lines.append(
            "warning: measured on a CPU for a sweep that trains on GPUs: these hours do not predict "
            "GPU-hours; run the estimate on the GPU machine"
        )
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
    text = (
        f"based on: {shown} timed iteration{'s' if counts[-1] != 1 else ''} per model after "
        f"{'-'.join(str(w) for w in warm)} warm-up iteration(s), on random images of the trial's shape; "
        "iterations = ceil(images / images per iteration)"
    )
    measured = [e for e in evals if e.measured]
    if measured:
        e = measured[0]
        text += (
            f"; each evaluation = generation + {e.extractor} features timed on {e.samples_timed} samples and "
            f"scaled linearly to {budget.fid_samples} (intermediate, every {budget.every_kimg:g} kimg) or "
            f"{budget.final_fid_samples} (final), plus the FID/IS statistics timed once"
        )
        text += (
            "; not included: data preparation, the real-statistics pass (once per dataset, then cached), "
            "sample grids, checkpoints, Ray start-up"
        )
    else:
        text += f"; evaluation time not included: {evals[0].note}"
    return text


def _memory_line(est: SweepEstimate) -> str:
    if not est.on_cuda:
        return "peak memory: n/a on cpu (only a GPU's allocator can measure it; RSS of a CPU run would not tell it)"
    name, m = max(est.models.items(), key=lambda kv: _trial_peak(kv[1]))
    text = (
        f"peak GPU memory of the largest model ({name}): {mib(m.iteration.peak_memory_bytes)} training + "
        f"{mib(m.evaluation.peak_memory_bytes or 0)} evaluation (measured apart; their sum is an upper bound), "
    )
    from gan.cost import bytes_per_training_image, training_split_bytes

    split = training_split_bytes(m.cfg)
    if split is not None:
        text += f"plus {mib(split)} for the training split held on the device"
    else:
        text += (
            f"plus {bytes_per_training_image(m.cfg) // 1024} KiB per training image held on the device "
            "(the folder's image count is not known before it is prepared)"
        )
    return text


def _trial_peak(m: Measured) -> int:
    from gan.cost import training_split_bytes

    return (
        (m.iteration.peak_memory_bytes or 0)
        + (m.evaluation.peak_memory_bytes or 0)
        + (training_split_bytes(m.cfg) or 0)
    )


def _per_gpu_line(est: SweepEstimate) -> str:
    gpu = est.spec.resources.gpu
    if gpu == 0:
        return (
            f"trials per GPU: none (resources.gpu is 0: each trial trains on {threads_of(est.spec)} CPU "
            f"core(s), resources.cpu)"
        )
    by_share = math.floor(1 / gpu + 1e-9)
    text = f"trials per GPU: floor(1 / resources.gpu {gpu:g}) = {by_share} by the sweep's share"
    if not est.on_cuda:
        return text + "; whether they fit in its memory needs a GPU to measure (measured on cpu)"
    largest = max(est.models.values(), key=_trial_peak)
    need, total = _trial_peak(largest), largest.iteration.device_memory_bytes
    fit = math.floor(total / need) if need else by_share
    return (
        text + f"; memory fits floor({mib(total)} / {mib(need)}) = {fit} of the largest model: "
        f"{min(by_share, fit)} fit on one {largest.iteration.device_label}"
    )


def checkpoint_bytes(cfg: TrialConfig) -> int:
    """A trial's checkpoint: the float32 weights and both Adam moments of its networks (built on the meta
    device: no memory, no time), plus their buffers."""
    import torch

    from gan.models import build_models

    with torch.device("meta"):
        models = build_models(cfg.model)
    params = sum(p.numel() for m in models.values() for p in m.parameters())
    buffers = sum(b.numel() for m in models.values() for b in m.buffers())
    return 4 * (3 * params + buffers)


def _disk_line(est: SweepEstimate, budget: Budget) -> str:
    """What the sweep writes to disk: each trial keeps one checkpoint (Tune keeps the latest), so while it runs
    at most one per trial; after it, `keep_checkpoints` decides; and one sample grid per evaluation."""
    per_model = {name: checkpoint_bytes(m.cfg) for name, m in est.models.items()}
    per_trial = [per_model[name] for name in est.model_of]
    grids = len(evaluation_points(budget)) * len(per_trial)
    cfg = next(iter(est.models.values())).cfg
    grid_bytes = grids * cfg.eval.grid_size**2 * cfg.data.image_size**2 * 3  # raw RGB: a PNG is no larger
    keep = getattr(est.spec, "keep_checkpoints", "completed")
    kept = {"all": "all of them stay", "none": "none stay",
            "completed": "those of completed trials stay (at most the total above, without early stopping)"}[keep]
    return (f"disk: checkpoints {mib(min(per_trial))}"
            + (f" to {mib(max(per_trial))}" if max(per_trial) != min(per_trial) else "")
            + f" per trial (float32 weights and Adam moments), at most {mib(sum(per_trial))} for all "
            f"{len(per_trial)} trials while the sweep runs; after it, keep_checkpoints: {keep}: {kept}; sample "
            f"grids at most {mib(grid_bytes)} ({grids} evaluations)")


def _confirm_line(est: SweepEstimate, first_seconds: float, hours: str) -> str:
    """The confirm stage's cost, an upper bound (which configurations win is known only afterwards): the `top`
    most expensive configurations plus every included one, each on every fresh seed at the confirm budget."""
    from orchestrator.sweepfile.params import REPLICATE_PARAMS
    from orchestrator.sweepfile.stages import confirm_name, matches

    spec, c = est.spec, est.spec.confirm
    budget = budget_of(spec)
    kimg = c.kimg if c.kimg is not None else spec.train.kimg
    budget = Budget(kimg, budget.every_kimg, budget.fid_samples, budget.final_fid_samples)
    end = evaluation_points(budget)[-1]
    per_config: dict[str, float] = {}  # configuration -> seconds of one seed at the confirm budget
    configs: dict[str, dict[str, Any]] = {}
    for params, model in zip(est.trials, est.model_of, strict=False):
        config = {k: v for k, v in params.items() if k not in REPLICATE_PARAMS}
        key = json.dumps(config, sort_keys=True, default=str)
        configs[key] = config
        per_config[key] = max(per_config.get(key, 0.0), run_to(est.models[model].cost, budget, end).seconds)
    included = [k for k in configs if any(matches(e, configs[k]) for e in c.include)]
    others = sorted((k for k in per_config if k not in included), key=per_config.get, reverse=True)
    chosen = included + others[: c.top]
    seeds = c.seeds if isinstance(c.seeds, int) else len(c.seeds)
    seconds = seeds * sum(per_config[k] for k in chosen)
    what = f"top {c.top}" + (f" + {len(included)} included" if included else "")
    return (f"confirm stage {confirm_name(spec.name)} (FIFO, {kimg:g} kimg, {spec.eval.final_fid_samples} images per "
            f"final FID): at most {len(chosen)} configurations ({what}) x {seeds} fresh seeds = {len(chosen) * seeds} "
            f"trials: at most {seconds / 3600:.3g} {hours}{_also(seconds)} (the most expensive "
            f"configurations); both stages without early stopping: {(first_seconds + seconds) / 3600:.3g} {hours}")

