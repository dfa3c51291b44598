"""Does CUDA-graph training agree with eager training? A check that can tell a bug from noise.

Three runs of one trial from one seed, each built as training_loop builds it (its seeding, DeviceBatches and
its own constructor `gan.training.build_trainer`): eager, graph, and eager again. All three run with
deterministic algorithms (CUBLAS_WORKSPACE_CONFIG set before cuBLAS starts,
`torch.use_deterministic_algorithms(True, warn_only=False)`, cudnn.benchmark off), so two eager runs are
bitwise equal and a graph-vs-eager difference is the graph's doing:

1. the losses of each of the first `exact` iterations (50) must be bitwise equal;
2. at that iteration, the device RNG state, the data position (host and device counters, permutation and
   epoch generator), each optimiser's step, exp_avg and exp_avg_sq, and every parameter and buffer (BatchNorm's
   running statistics and num_batches_tracked) must be equal;
3. after all `iterations` (200), every floating tensor must agree within `rtol`, relative, per tensor
   (||graph - eager|| / ||eager||), and every integer one exactly.

Verdict: AGREE; DISAGREE, with each difference found; or FAIL when nothing can be concluded: the graph run did
not use a graph, a loss was not finite, or the two eager runs differ (the machine is not deterministic here).
`compare` is plain tensor code: the tests run it on the CPU against an emulated graph, including broken ones.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_common import (
    BATCH,
    BCE_VARIANTS,
    DEFAULT_DATA,
    WIDTHS,
    device_name,
    markdown_table,
    run_metadata,
    write_results,
)

from gan.config import DataConfig, ModelConfig, TrainConfig, TrialConfig
from gan.data import prepare_dataset
from gan.step import DeviceBatches
from gan.training import Trainer, build_trainer, set_training_backends

EXACT_ITERATIONS = 50
CUBLAS_WORKSPACE = ":4096:8"  # a fixed cuBLAS workspace: what cuBLAS needs to be deterministic
State = dict[str, Any]  # name -> CPU tensor or int


def require_cublas_workspace() -> None:
    """Call before the first CUDA matmul of the process: cuBLAS reads the variable once, when it starts."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic kernels or an error (never a silent non-deterministic one); the caller's settings after."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    require_cublas_workspace()
    try:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False  # benchmark picks convolution algorithms by timing them
        torch.backends.cudnn.deterministic = True
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]


def build_run(cfg: TrialConfig, images: np.ndarray, device: torch.device) -> Trainer:
    """A trial's models, optimisers and TrainStep as training_loop makes them, with cudnn.benchmark off."""
    torch.manual_seed(cfg.train.seed)
    set_training_backends(device)
    torch.backends.cudnn.benchmark = False  # set_training_backends turns it on; determinism needs it off
    batches = DeviceBatches(images, cfg.train.batch_size, device, seed=cfg.train.seed)
    return build_trainer(cfg, device, batches)


def device_rng_state(device: torch.device) -> torch.Tensor:
    """The generator a training iteration draws from: the device's (noise, dropout masks)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def training_state(trainer: Trainer) -> State:
    """Everything an iteration changes, copied to the CPU, by name."""
    step, batches = trainer.step, trainer.step.batches
    state: State = {
        "rng.device": device_rng_state(step.device).clone(),
        "data.pos": batches.pos,
        "data.pos_t": batches.pos_t.detach().cpu().clone(),
        "data.perm": batches.perm.detach().cpu().clone(),
        "data.epoch_rng": batches.rng.get_state().clone(),
    }
    names: dict[int, str] = {}
    for model_name, model in trainer.models.items():
        for key, tensor in model.state_dict().items():  # parameters and buffers (BatchNorm statistics, counters)
            state[f"{model_name}.{key}"] = tensor.detach().cpu().clone()
        names.update({id(p): f"{model_name}.{key}" for key, p in model.named_parameters()})
    for opt_name, opt in (("opt_d", trainer.opt_d), ("opt_g", trainer.opt_g)):
        for group in opt.param_groups:
            for p in group["params"]:
                for key, value in opt.state.get(p, {}).items():  # step, exp_avg, exp_avg_sq
                    value = value.detach().cpu().clone() if torch.is_tensor(value) else value
                    state[f"{opt_name}[{names[id(p)]}].{key}"] = value
    return state


@dataclass
class RunRecord:
    losses: list[dict[str, float]] = field(default_factory=list)  # per iteration, every iteration
    at_exact: State = field(default_factory=dict)  # training_state after `exact` iterations
    final: State = field(default_factory=dict)  # training_state at the end
    uses_graph: bool = False
    note: str = ""
    finite: bool = True


def record_run(trainer: Trainer, iterations: int, exact: int = EXACT_ITERATIONS) -> RunRecord:
    """Train `iterations`, reading each iteration's losses (a host sync between iterations, never inside one)."""
    record = RunRecord()
    step = trainer.step
    for i in range(1, iterations + 1):
        step()
        record.losses.append(step.take_losses())
        if i == exact:
            record.at_exact = training_state(trainer)
    record.final = training_state(trainer)
    record.uses_graph, record.note, record.finite = step.uses_graph, step.graph_note, step.all_finite()
    return record


@dataclass
class Verdict:
    status: str  # AGREE | DISAGREE | FAIL
    reasons: list[str]
    first_loss_mismatch: int | None = None  # 1-based iteration
    state_mismatches: list[str] = field(default_factory=list)  # at the exact-phase mark
    worst_final: tuple[str, float] = ("", 0.0)  # the floating tensor with the largest relative difference at the end

    def line(self) -> str:
        return f"{self.status}: " + "; ".join(self.reasons)


def _same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def state_differences(a: State, b: State) -> list[str]:
    """Names whose values are not exactly equal (or present in one state only)."""
    return sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not _same(a[k], b[k]))


def relative_differences(a: State, b: State) -> tuple[dict[str, float], list[str]]:
    """(floating tensors: ||a - b|| / ||b|| per name, integer values that differ)."""
    relative, exact_mismatch = {}, []
    for key in sorted(a.keys() | b.keys()):
        x, y = a.get(key), b.get(key)
        if torch.is_tensor(x) and torch.is_tensor(y) and x.is_floating_point() and x.shape == y.shape:
            x, y = x.double(), y.double()
            scale = y.norm().item()
            diff = (x - y).norm().item()
            relative[key] = diff / scale if scale > 0 else diff
        elif x is None or y is None or not _same(x, y):
            exact_mismatch.append(key)
    return relative, exact_mismatch


def first_loss_mismatch(a: list[dict[str, float]], b: list[dict[str, float]], upto: int) -> int | None:
    """The first iteration (1-based, up to `upto`) whose losses are not bitwise equal, or None."""
    a, b = a[:upto], b[:upto]
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:  # Python floats read from float32 sums: equal only when bitwise equal
            return i + 1
    return None if len(a) == len(b) else min(len(a), len(b)) + 1


def compare(eager: RunRecord, graph: RunRecord, again: RunRecord | None = None, *,
            exact: int = EXACT_ITERATIONS, rtol: float = 1e-4) -> Verdict:
    """The verdict on a graph run against an eager one (and a second eager run, the determinism control)."""
    if not graph.uses_graph:
        return Verdict("FAIL", [f"the graph run did not use a CUDA graph ({graph.note or 'no note'}), "
                                "so nothing was compared"])
    runs = [eager, graph] + ([again] if again is not None else [])
    if not all(r.finite for r in runs):
        return Verdict("FAIL", ["a run produced a non-finite loss"])
    if again is not None:
        noise = first_loss_mismatch(eager.losses, again.losses, len(eager.losses))
        differs = state_differences(eager.at_exact, again.at_exact) + state_differences(eager.final, again.final)
        if noise is not None or differs:
            where = f"losses at iteration {noise}" if noise is not None else ", ".join(differs[:5])
            return Verdict("FAIL", [f"two eager runs differ ({where}) even with deterministic algorithms: "
                                    "graph-vs-eager differences cannot be told from noise here"])
    verdict = Verdict("AGREE", [])
    mismatch = first_loss_mismatch(eager.losses, graph.losses, exact)
    if mismatch is not None:
        e = eager.losses[mismatch - 1] if mismatch <= len(eager.losses) else {}
        g = graph.losses[mismatch - 1] if mismatch <= len(graph.losses) else {}
        shown = ", ".join(f"{k} {e.get(k)!r} vs {g.get(k)!r}" for k in sorted(e.keys() | g.keys())
                          if e.get(k) != g.get(k))
        verdict.first_loss_mismatch = mismatch
        verdict.reasons.append(f"losses differ bitwise at iteration {mismatch} (eager vs graph: {shown})")
    verdict.state_mismatches = state_differences(eager.at_exact, graph.at_exact)
    if verdict.state_mismatches:
        shown = ", ".join(verdict.state_mismatches[:6]) + (" ..." if len(verdict.state_mismatches) > 6 else "")
        count = len(verdict.state_mismatches)
        verdict.reasons.append(f"{count} state entries differ after {exact} iterations: {shown}")
    relative, integers = relative_differences(graph.final, eager.final)
    if relative:
        verdict.worst_final = max(relative.items(), key=lambda kv: (kv[1] != kv[1], kv[1]))  # NaN counts as worst
    worst_name, worst = verdict.worst_final
    if not worst <= rtol:  # NaN fails too
        verdict.reasons.append(f"after {len(eager.losses)} iterations {worst_name} differs by {worst:.3g} relative "
                               f"(> rtol {rtol:g})")
    if integers:
        verdict.reasons.append(f"after {len(eager.losses)} iterations these differ: {', '.join(integers[:6])}")
    if verdict.reasons:
        verdict.status = "DISAGREE"
    else:
        verdict.reasons = [f"losses bitwise equal for {exact} iterations, state equal at iteration {exact}, "
                           f"largest relative difference after {len(eager.losses)} iterations {worst:.3g} "
                           f"({worst_name or '-'}) <= rtol {rtol:g}"]
    return verdict


def loss_curve(records: dict[str, RunRecord], points: int) -> list[dict]:
    """Mean losses per segment of the run (about `points` segments) for each run, side by side."""
    n = len(next(iter(records.values())).losses)
    every = max(1, n // max(1, points))
    rows, start = [], 0
    for end in sorted({*range(every, n + 1, every), n}):
        row: dict[str, Any] = {"iterations": f"{start + 1}-{end}"}
        for label, record in records.items():
            segment = record.losses[start:end]
            for key in sorted(segment[0]):
                row[f"{key} {label}"] = round(sum(s[key] for s in segment) / len(segment), 6)
        rows.append(row)
        start = end
    return rows


def check(cfg: TrialConfig, images: np.ndarray, device: torch.device, *, iterations: int = 200,
          exact: int = EXACT_ITERATIONS, rtol: float = 1e-4, repeat_eager: bool = True
          ) -> tuple[Verdict, dict[str, RunRecord]]:
    """Eager, graph (train.cuda_graph on) and, with repeat_eager, eager again, deterministically; the verdict."""
    if iterations < exact:
        raise ValueError(f"iterations ({iterations}) must be at least exact ({exact})")
    records: dict[str, RunRecord] = {}
    runs = [("eager", "off"), ("graph", "on")] + ([("eager again", "off")] if repeat_eager else [])
    with deterministic():
        for label, mode in runs:
            run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, cuda_graph=mode))
            records[label] = record_run(build_run(run_cfg, images, device), iterations, exact)
    verdict = compare(records["eager"], records["graph"], records.get("eager again"), exact=exact, rtol=rtol)
    return verdict, records


def summary(verdict: Verdict, records: dict[str, RunRecord]) -> list[str]:
    """The lines printed under the loss curve: what was compared, and the verdict."""
    graph = records["graph"]
    lines = [f"graph in use: {graph.uses_graph}" + (f" ({graph.note})" if graph.note else "")]
    if verdict.first_loss_mismatch is not None:
        lines.append(f"first iteration whose losses differ bitwise: {verdict.first_loss_mismatch}")
    if verdict.state_mismatches:
        lines.append(f"state entries that differ at the end of the bitwise phase: {len(verdict.state_mismatches)}")
    name, worst = verdict.worst_final
    lines.append(f"largest relative difference at the end: {worst:.3g}" + (f" ({name})" if name else ""))
    lines.append(f"verdict: {verdict.line()}")
    return lines


def run_from_args(args, device: torch.device) -> int:
    """bench_train.py --check-graph: exit status 0 only for AGREE (and on a machine without CUDA, with a note)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        print(f"--check-graph: CUDA graphs need CUDA; this run is on {device.type}, so there is nothing to compare. "
              "Run it on a machine with a GPU.")
        return 0
    require_cublas_workspace()
    dataset = prepare_dataset(DataConfig(path=str(args.data)))
    cfg = trial_config(args.variant, args.width, dataset.source, device, args.seed)
    print(f"check-graph: {args.variant} {list(WIDTHS[args.width])}, batch {BATCH}, {args.iterations} iterations "
          f"({args.exact} compared bitwise), seed {args.seed}, deterministic algorithms, on {device_name(device)}",
          flush=True)
    verdict, records = check(cfg, dataset.split("train"), device, iterations=args.iterations, exact=args.exact,
                             rtol=args.rtol)
    rows = loss_curve(records, args.points)
    columns = list(rows[0])
    print()
    print(markdown_table(rows, columns))
    print()
    print("\n".join(summary(verdict, records)))
    meta = run_metadata(device_name(device), variant=args.variant, g_widths=list(WIDTHS[args.width]),
                        batch_size=BATCH, iterations=args.iterations, bitwise_iterations=args.exact, rtol=args.rtol,
                        seed=args.seed, data=args.data.name, graph_used=records["graph"].uses_graph,
                        worst_final=list(verdict.worst_final), verdict=verdict.line())
    write_results(Path(args.out_dir), "graph-check", meta, {"mean losses per segment": (rows, columns)})
    return 0 if verdict.status == "AGREE" else 1


def trial_config(variant: str, width: str, data: str, device: torch.device, seed: int) -> TrialConfig:
    return TrialConfig(model=ModelConfig(variant=variant, g_widths=WIDTHS[width]), data=DataConfig(path=data),
                       train=TrainConfig(batch_size=BATCH, device=str(device), seed=seed))


def main(argv: list[str] | None = None) -> int:
    """Several variants in one process (bench/gpu_check.py runs this in a subprocess, so deterministic settings
    and CUBLAS_WORKSPACE_CONFIG never reach its speed measurements); one JSON row per variant, written as each
    finishes. Exit status 0 only when every variant agrees (or there is no CUDA, with a note)."""
    p = argparse.ArgumentParser(description="graph vs eager training, deterministically, for several variants")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--variants", nargs="+", choices=BCE_VARIANTS, default=list(BCE_VARIANTS))
    p.add_argument("--width", choices=list(WIDTHS), default="512")
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--exact", type=int, default=EXACT_ITERATIONS)
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results here (rewritten after each variant)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("graph_check: CUDA graphs need CUDA; nothing to compare on this machine.")
        return 0
    require_cublas_workspace()
    device = torch.device("cuda")
    dataset = prepare_dataset(DataConfig(path=str(args.data)))
    results = []
    for variant in args.variants:
        start = time.perf_counter()
        try:
            cfg = trial_config(variant, args.width, dataset.source, device, args.seed)
            verdict, records = check(cfg, dataset.split("train"), device, iterations=args.iterations,
                                     exact=args.exact, rtol=args.rtol)
            row = {"variant": variant, "verdict": verdict.status, "why": "; ".join(verdict.reasons),
                   "first_loss_mismatch": verdict.first_loss_mismatch,
                   "state_mismatches": len(verdict.state_mismatches),
                   "worst_final": f"{verdict.worst_final[1]:.3g} ({verdict.worst_final[0] or '-'})",
                   "graph_note": records["graph"].note}
        except Exception as exc:  # a crash (a non-deterministic op without a fallback, ...) is a result too
            row = {"variant": variant, "verdict": "FAIL", "why": f"{type(exc).__name__}: {str(exc)[:300]}"}
        row["seconds"] = round(time.perf_counter() - start, 1)
        results.append(row)
        print(json.dumps(row), flush=True)
        if args.json:  # whole or not at all: a caller may stop this process at any moment
            partial = args.json.with_suffix(".partial")
            partial.write_text(json.dumps({"width": args.width, "iterations": args.iterations, "exact": args.exact,
                                           "rtol": args.rtol, "results": results}, indent=2))
            os.replace(partial, args.json)
    return 0 if all(r["verdict"] == "AGREE" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
