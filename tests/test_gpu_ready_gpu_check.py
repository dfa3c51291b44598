"""bench/gpu_check.py and its helpers on a machine without CUDA: it says it needs CUDA and exits 0, imports
nothing of Ray, pydantic or the orchestrator, and its profiler summary reads a torch.profiler trace right."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import gpu_profile  # noqa: E402


def run(args, **env):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **env})


def test_without_cuda_it_says_it_needs_cuda_and_exits_0(tmp_path):
    out = tmp_path / "gpu_check.md"
    done = run(["bench/gpu_check.py", "--out", str(out)])
    assert done.returncode == 0, done.stderr
    assert "needs CUDA" in done.stdout
    assert not out.exists()  # nothing measured, nothing written


def test_the_gpu_scripts_import_nothing_of_ray_pydantic_or_the_orchestrator():
    code = (
        "import sys\n"
        "sys.path.insert(0, 'bench')\n"
        "import gpu_check, graph_check, gpu_profile, bench_train, bench_fid\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'pydantic', 'orchestrator'))\n"
        "print(bad)\n"
        "assert not bad, bad\n"
    )
    done = run(["-c", code])
    assert done.returncode == 0, done.stdout + done.stderr


def test_graph_check_script_without_cuda_exits_0():
    done = run(["bench/graph_check.py", "--variants", "dcgan"])
    assert done.returncode == 0 and "need CUDA" in done.stdout, done.stderr


def trace(events):
    return {"traceEvents": [{"ph": "X", **e} for e in events] + [{"ph": "M", "name": "process_name"}]}


def test_trace_summary_counts_overlapping_gpu_time_once_and_names_the_attention_backend():
    summary = gpu_profile.summarise_trace(trace([
        {"cat": "kernel", "name": "void cutlass_gemm", "ts": 0, "dur": 10},
        {"cat": "kernel", "name": "fmha_cutlassF_f32_aligned_64x64", "ts": 5, "dur": 10},  # overlaps: 0-15
        {"cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 20, "dur": 5},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 0, "dur": 100},  # host side: not GPU time
        {"cat": "cpu_op", "name": "aten::_scaled_dot_product_efficient_attention", "ts": 1, "dur": 3},
        {"cat": "cpu_op", "name": "aten::conv2d", "ts": 0, "dur": 3},
    ]))
    assert summary["gpu_busy_us"] == 20 and summary["gpu_events"] == 3
    assert summary["sdpa_backends"] == ["efficient"]
    assert summary["attention_kernels"] == ["fmha_cutlassF_f32_aligned_64x64"]
    assert gpu_profile.summarise_trace([])["gpu_busy_us"] == 0  # a bare list of events is a trace too


@pytest.mark.parametrize("intervals, busy", [([], 0), ([(0, 5), (5, 7)], 7), ([(0, 10), (2, 3), (9, 12)], 12),
                                             ([(4, 6), (0, 1)], 3)])
def test_busy_time_is_the_union_of_intervals(intervals, busy):
    assert gpu_profile.busy_microseconds(intervals) == busy


def test_report_sections_are_on_disk_as_soon_as_written(tmp_path):
    import gpu_check

    report = gpu_check.Report(tmp_path / "r.md")
    report.section("first", "| a |\n|---|\n| 1 |")
    assert "## first" in (tmp_path / "r.md").read_text()
    report.section("second", "text")
    text = (tmp_path / "r.md").read_text()
    assert text.index("## first") < text.index("## second")
