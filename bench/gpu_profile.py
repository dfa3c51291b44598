"""What the GPU does during a training iteration, from a torch.profiler trace: how busy it is, and which
scaled-dot-product-attention kernel ran.

`profile_step` profiles a few iterations of a trial's TrainStep (eager or graph replays) and reads the Chrome
trace torch.profiler exports: the GPU-busy fraction is the union of the kernel, memcpy and memset intervals
per iteration over the wall time of an iteration timed without the profiler (the profiler slows the host
side, not the kernels); the attention backend is read from the aten op that ran (eager: flash, efficient,
cuDNN or math) and from kernel names (graph replays run no host ops). `summarise_trace` is plain JSON
parsing, tested on the CPU.
"""
from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
SDPA_OPS = {  # the aten op each SDPA backend dispatches to
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
}
ATTENTION_KERNEL = re.compile(r"fmha|flash|attention|attn|sdpa", re.IGNORECASE)


def _trace_events(trace: dict | list) -> list[dict]:
    return trace.get("traceEvents", []) if isinstance(trace, dict) else trace


def busy_microseconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals: overlapping kernels (several streams) count once."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def summarise_trace(trace: dict | list) -> dict:
    """GPU-busy microseconds, GPU event count, SDPA backends seen (from aten ops) and attention kernel names."""
    intervals, backends, attention_kernels = [], set(), set()
    for event in _trace_events(trace):
        if event.get("ph") != "X":
            continue
        category, name = event.get("cat", ""), event.get("name", "")
        if category in GPU_CATEGORIES:
            intervals.append((float(event["ts"]), float(event["ts"]) + float(event.get("dur", 0))))
            if category == "kernel" and ATTENTION_KERNEL.search(name):
                attention_kernels.add(name)
        elif category == "cpu_op" and name in SDPA_OPS:
            backends.add(SDPA_OPS[name])
    return {"gpu_busy_us": busy_microseconds(intervals), "gpu_events": len(intervals),
            "sdpa_backends": sorted(backends), "attention_kernels": sorted(attention_kernels)}


def profile_step(step: Callable[[], None], device: torch.device, iterations: int = 10) -> dict:
    """Per iteration: wall ms without the profiler, GPU-busy ms under it, busy fraction, and what attention ran.
    The caller has warmed `step` up (and, for a graph, captured it)."""
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    torch.cuda.synchronize(device)
    wall_us = (time.perf_counter() - start) * 1e6 / iterations
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iterations):
            step()
        torch.cuda.synchronize(device)
    with tempfile.TemporaryDirectory(prefix="gpu-profile-") as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        summary = summarise_trace(json.loads(path.read_text()))
    busy_us = summary["gpu_busy_us"] / iterations
    return {
        "wall_ms": round(wall_us / 1000, 3),
        "gpu_busy_ms": round(busy_us / 1000, 3),
        "gpu_busy_fraction": round(busy_us / wall_us, 3) if wall_us > 0 else None,
        "gpu_events_per_iteration": round(summary["gpu_events"] / iterations, 1),
        "sdpa_backend": ", ".join(summary["sdpa_backends"]) or "-",
        "attention_kernels": "; ".join(name[:60] for name in summary["attention_kernels"][:3]) or "-",
    }
