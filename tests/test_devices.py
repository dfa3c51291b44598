"""Device truth: a trial never trains on the CPU when it was given a GPU, and never borrows an unreserved GPU."""
from __future__ import annotations

import pytest
import torch

from orchestrator.run import devices
from orchestrator.run.devices import DeviceUnavailable, device_used, trial_device


def test_auto_follows_the_trials_reservation():
    assert trial_device("auto", 0.0) == "cpu"  # gpu: 0 means the CPU, whatever GPUs the node has
    assert trial_device("cpu", 1.0) == "cpu"  # an explicit cpu is respected


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("requested, share", [("auto", 0.5), ("auto", 1.0), ("cuda", 0.0), ("cuda:1", 1.0)])
def test_expected_cuda_that_is_missing_is_an_error_naming_the_versions(requested, share):
    with pytest.raises(DeviceUnavailable) as info:
        trial_device(requested, share)
    line = str(info.value)
    assert "\n" not in line and line.startswith("no usable CUDA for cuda")
    assert f"torch {torch.__version__} is built for CUDA {torch.version.cuda}" in line and "NVIDIA driver" in line


def test_a_driver_too_old_for_torchs_cuda_is_an_error(monkeypatch):
    """torch sees a device, but making a tensor there fails (what a driver older than torch's CUDA does)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    real_zeros = torch.zeros

    def zeros(*args, device=None, **kw):
        if device is not None and str(device).startswith("cuda"):
            raise RuntimeError("The NVIDIA driver on your system is too old (found version 12040).\nmore")
        return real_zeros(*args, device=device, **kw)

    monkeypatch.setattr(torch, "zeros", zeros)
    monkeypatch.setattr(devices, "driver_version", lambda: "550.54")
    with pytest.raises(DeviceUnavailable, match=r"driver on your system is too old .*NVIDIA driver 550\.54$"):
        trial_device("auto", 0.25)


def test_device_used_names_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"NVIDIA H200 #{index}")
    assert device_used("cpu") == "cpu"
    assert device_used("cuda") == "cuda:NVIDIA H200 #0"
    assert device_used("cuda:1") == "cuda:NVIDIA H200 #1"


def test_device_used_is_a_fixed_column_never_a_parameter():
    from orchestrator.store.tables import (
        EVALUATION_COLUMNS,
        TRIAL_COLUMNS,
        parameter_types,
    )
    from orchestrator.sweepfile.sections import ModelSection, TrainSection

    assert "device_used" in EVALUATION_COLUMNS and "device_used" in TRIAL_COLUMNS
    assert "device_used" not in {**ModelSection.model_fields, **TrainSection.model_fields}
    with pytest.raises(ValueError, match="not sweep parameters"):
        parameter_types(["device_used"])
