"""Device truth: the device a trial trains on, refused when CUDA is expected and unusable.

- `train.device: auto` in a sweep means what the trial reserved: CUDA with a GPU share, the CPU with
  `resources.gpu: 0` (Ray 2.60 no longer hides the GPUs of a node from workers that reserved none, and a
  trial must not borrow a GPU the scheduler gave to another).
- A trial whose device resolves to CUDA (`cuda`, `cuda:N`, or `auto` with a GPU share) and finds no usable
  CUDA (no device, or a driver older than torch's CUDA) is an infrastructure error, never a silent CPU run.
- What ran is recorded: `device_used` is `cpu` or `cuda:<device name>`.

Ray-free (torch only).
"""
from __future__ import annotations

import torch

from orchestrator.store.provenance import driver_version


class DeviceUnavailable(RuntimeError):
    """CUDA was expected and is not usable; str() is one line that names CUDA, torch's and the driver's."""


def cuda_problem(device: str) -> str | None:
    """Why `device` (cuda or cuda:N) cannot train here, or None when a tensor can be made on it."""
    torch_cuda = torch.version.cuda or "none (a CPU build of torch)"
    driver = driver_version() or "unreadable"
    versions = f"torch {torch.__version__} is built for CUDA {torch_cuda}; NVIDIA driver {driver}"
    if not torch.cuda.is_available():
        return f"no usable CUDA for {device}: {versions}"
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        return f"no usable CUDA for {device}: this node has {torch.cuda.device_count()} CUDA device(s); {versions}"
    try:
        torch.zeros(1, device=f"cuda:{index}")
    except RuntimeError as exc:  # e.g. a driver too old for torch's CUDA
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        return f"no usable CUDA for {device}: {first}; {versions}"
    return None


def trial_device(requested: str, gpu_share: float) -> str:
    """The device a sweep trial trains on ('cpu' or 'cuda[:N]'); DeviceUnavailable when CUDA is unusable."""
    device = ("cuda" if gpu_share > 0 else "cpu") if requested == "auto" else requested
    if device.startswith("cuda"):
        problem = cuda_problem(device)
        if problem is not None:
            raise DeviceUnavailable(problem)
    return device


def device_used(device: str) -> str:
    """What a trial recorded as having run on: `cpu`, or `cuda:<device name>`."""
    if not device.startswith("cuda"):
        return "cpu"
    index = int(device.partition(":")[2] or 0)
    return f"cuda:{torch.cuda.get_device_name(index)}"
