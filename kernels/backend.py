"""Which implementation the kernels' public functions run.

Tensors on a CUDA device go to the Triton kernels (``*_triton.py``, one kernel
and its launcher per file, beside the torch reference it replaces); every
other tensor goes to the pure-torch reference, so the CPU path never touches
Triton. Launchers validate what they assume (shapes, strides, dtypes) with
``require``, which raises ``ValueError`` naming the argument.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
"""Triton is importable (it ships with CUDA builds of PyTorch)."""

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's own switch: kernels run on CPU tensors


def use_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and t.is_cuda


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def require_device(*tensors: torch.Tensor) -> None:
    device = tensors[0].device
    for t in tensors:
        require(t.device == device, f"all tensors must be on one device; got {t.device} and {device}")
        require(t.is_cuda or _INTERPRET, f"Triton kernels need CUDA tensors, got one on {t.device}")


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a nominal 8 for the CPU interpreter)."""
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
