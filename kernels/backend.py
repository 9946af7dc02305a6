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

from kernels.kv_quant import FP8_KV_DTYPE, is_fp8

FP8_ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
"""Activation (query, new K/V) dtypes the kernels accept beside an fp8 cache."""

HAS_TRITON = importlib.util.find_spec("triton") is not None
"""Triton is importable (it ships with CUDA builds of PyTorch)."""

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's own switch: kernels run on CPU tensors


def use_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and t.is_cuda


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_paged_inputs(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor
) -> tuple[int, int, int, int, int]:
    """The layout checks every paged-attention launcher needs; returns ``(Hq, D, block_size, Hk, B)``."""
    require(query.dim() == 3 and query.stride(2) == 1,
            f"query must be [N, Hq, D] with unit inner stride, got {tuple(query.shape)} {query.stride()}")
    _, hq, dim = query.shape
    require(k_cache.dim() == 4 and k_cache.shape == v_cache.shape and k_cache.shape[3] == dim,
            f"caches must be equal [blocks, block_size, Hk, {dim}], got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    block_size, hk = k_cache.shape[1], k_cache.shape[2]
    require(hq % hk == 0, f"query heads ({hq}) must be a multiple of KV heads ({hk})")
    require(k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "caches need unit stride along head_dim")
    check_cache_dtype(query.dtype, k_cache, v_cache)
    require(dim >= 16, f"head_dim must be >= 16, got {dim}")
    require(block_tables.dim() == 2 and block_tables.dtype in (torch.int32, torch.int64) and block_tables.stride(1) == 1,
            f"block_tables must be [B, W] int32/int64 with unit inner stride, got {tuple(block_tables.shape)} {block_tables.dtype}")
    return hq, dim, block_size, hk, block_tables.shape[0]


def check_cache_dtype(dtype: torch.dtype, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """The caches hold ``dtype`` (the activations'), or float8_e4m3fn read and written
    by bfloat16, float16 or float32 activations on a GPU that has fp8 (``kv_quant.py``)."""
    require(k_cache.dtype == v_cache.dtype, f"k_cache and v_cache dtypes differ: {k_cache.dtype}, {v_cache.dtype}")
    if not is_fp8(k_cache.dtype):
        require(k_cache.dtype == dtype,
                f"dtypes differ: query {dtype}, cache {k_cache.dtype} (a cache of another dtype than the "
                f"activations must be {FP8_KV_DTYPE})")
        return
    require(dtype in FP8_ACTIVATION_DTYPES,
            f"an fp8 cache needs bfloat16, float16 or float32 activations, got {dtype}")
    if not fp8_supported(k_cache.device):
        raise ValueError(f"an fp8 (e4m3) cache needs compute capability 8.9 or newer (Ada, Hopper), "
                         f"got {torch.cuda.get_device_capability(k_cache.device)}")


@functools.lru_cache(maxsize=None)
def fp8_supported(device: torch.device) -> bool:
    """Triton converts float8_e4m3fn on this device: compute capability 8.9 or newer, or the interpreter."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)


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


@functools.lru_cache(maxsize=None)
def pdl_enabled(device: torch.device) -> bool:
    """Launch the decode path's kernels with programmatic dependent launch
    (``pdl_triton.py``): on Hopper or later, not in the interpreter, unless
    ``KVMESH_PDL=0``."""
    if _INTERPRET or device.type != "cuda" or os.environ.get("KVMESH_PDL", "1") == "0":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def pdl_launch(device: torch.device) -> dict:
    """Keyword arguments of a kernel launch: ``USE_PDL`` for the kernel's prologue, and
    Triton's ``launch_pdl`` where it is on."""
    on = pdl_enabled(device)
    return {"USE_PDL": on, "launch_pdl": True} if on else {"USE_PDL": False}


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
