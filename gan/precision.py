"""TF32 on and off through one API, so that `torch.get_float32_matmul_precision()` keeps working.

torch (2.9+) has two ways to ask for TF32 matmuls: `torch.set_float32_matmul_precision` and the per-backend
`torch.backends.*.fp32_precision` attributes. Writing `torch.backends.cuda.matmul.fp32_precision = "tf32"`
leaves the two out of step, and from then on `torch.get_float32_matmul_precision()` raises (torch 2.14), which
Inductor calls when it autotunes (`max-autotune`) and when it keys its cache. `set_float32_matmul_precision`
updates every matmul backend's `fp32_precision` consistently, so matmuls go through it; convolutions, which it
does not cover, go through `torch.backends.cudnn.conv.fp32_precision`. Everything in gan/ and bench/ that
switches TF32 calls this module and nothing else.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PrecisionState = tuple[str, str]  # (matmul precision: highest | high | medium, cuDNN conv: tf32 | ieee | ...)


def _conv_backend():
    """cuDNN's convolution switches: the fp32_precision attribute (torch >= 2.9), else the legacy flag's owner."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    return conv if conv is not None and hasattr(conv, "fp32_precision") else None


def matmul_precision() -> str:
    """torch.get_float32_matmul_precision(); if a caller elsewhere left the two APIs out of step (it raises
    then), the CUDA matmul backend's own setting, in the same words."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return "high" if torch.backends.cuda.matmul.fp32_precision == "tf32" else "highest"


def precision_state() -> PrecisionState:
    conv = _conv_backend()
    if conv is not None:
        return matmul_precision(), conv.fp32_precision
    return matmul_precision(), "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"


def restore_precision(state: PrecisionState) -> None:
    matmul, conv_precision = state
    torch.set_float32_matmul_precision(matmul)
    conv = _conv_backend()
    if conv is not None:
        conv.fp32_precision = conv_precision
    else:
        torch.backends.cudnn.allow_tf32 = conv_precision == "tf32"


def set_tf32(enabled: bool) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions (process-wide), or exact float32 for both."""
    restore_precision(("high", "tf32") if enabled else ("highest", "ieee"))


def tf32_enabled() -> bool:
    """Whether float32 matmuls and convolutions both may run in TF32."""
    return precision_state() == ("high", "tf32")


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """No TF32 in matmuls and convolutions inside the block; the caller's settings come back after."""
    saved = precision_state()
    try:
        set_tf32(False)
        yield
    finally:
        restore_precision(saved)
