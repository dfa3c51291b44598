"""Out of memory on a shared GPU (`resources.gpu` < 1): retried once on a whole GPU, from the last checkpoint.

A real Ray cluster on this machine whose worker declares one GPU to Ray (torch finds no CUDA device, so the
sweep says `train.device: cpu`: with `auto`, a GPU share means CUDA, and a trial without it would end in
error). Two trials share that GPU at 0.5 each:
- `lucky` runs out of memory at its second evaluation only while it shares the GPU (GAN_SWEEPS_INJECT_SHARED_GPU_OOM,
  as a neighbour's memory would make it), is moved to the whole GPU and finishes there, from its checkpoint;
- `huge` has a generator too large to allocate anywhere (a real allocation failure): retried once on the whole
  GPU, it fails again and is recorded as `error` with both reasons.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_multinode import LocalCluster, finish, log_tail, start_sweep  # noqa: E402

from orchestrator.run.trainable import INJECT_OOM_ENV  # noqa: E402

pytestmark = pytest.mark.slow

SWEEP = """\
name: oom
method: grid
metric: {name: fid, goal: minimize}
data: {path: null, image_size: 64, synthetic_count: 200}
model: {d_widths: [8, 16, 32, 32], heads: 2}
train: {kimg: 1, batch_size: 32, device: cpu}
eval: {every_kimg: 0.5, fid_samples: 64, final_fid_samples: 64, extractor: tiny-conv, grid_size: 2}
parameters:
  g_widths: {values: [[32, 16, 8, 8], [268435456, 8, 8, 8]]}
scheduler: {type: fifo}
resources: {cpu: 1, gpu: 0.5}
max_failures: 0
"""


def test_out_of_memory_on_a_gpu_share_is_retried_once_on_a_whole_gpu(tmp_path):
    logs = tmp_path / "ray-logs"
    logs.mkdir()
    cluster = LocalCluster(logs)
    cluster.env[INJECT_OOM_ENV] = "1"
    try:
        cluster.start(("worker",), worker_cpus=2, worker_gpus=1)
        sweep_file = tmp_path / "oom.yaml"
        sweep_file.write_text(SWEEP)
        cwd = tmp_path / "cwd"
        cwd.mkdir()
        proc, log = start_sweep(cluster, sweep_file, tmp_path / "results", cwd)
        finish(proc, log, returncode=1)  # `huge` ends in error: the sweep says so and exits 1
    finally:
        cluster.shutdown()
    sweep_dir = tmp_path / "results" / "oom"
    trials = {r["g_widths"]: r for r in pq.read_table(sweep_dir / "trials.parquet").to_pylist()}
    lucky, huge = trials["32-16-8-8"], trials["268435456-8-8-8"]

    assert lucky["status"] == "completed", (lucky, log_tail(log))
    assert lucky["reason"].startswith("finished on a whole GPU after: out of memory: CUDA out of memory (injected")
    evals = [
        r for r in pq.read_table(sweep_dir / "evaluations.parquet").to_pylist() if r["trial_id"] == lucky["trial_id"]
    ]
    # Each evaluation once: the retry's result is not one, and the evaluation that ran out of memory was redone.
    assert [r["kimg"] for r in evals] == [0.512, 1.024]
    # The restart went on from the first evaluation's checkpoint, not from scratch: the run directory's own log
    # shows the first evaluation once and the second twice (the attempt that ran out of memory, then the retry).
    stats = (Path(lucky["run_dir"]) / "stats.jsonl").read_text().splitlines()
    assert [json.loads(s)["kimg"] for s in stats] == [0.512, 1.024, 1.024]

    assert huge["status"] == "error"
    assert huge["reason"].startswith("out of memory: ") and "on a whole GPU, after: out of memory: " in huge["reason"]
    assert huge["evaluations"] == 0
    assert "done with errors: 1 of 2 trials ended in error" in log.read_text()
