"""Triton store of new keys/values into their paged-cache slots (one program per token).

A negative slot means "no token" (padding rows of a CUDA-graph batch) and is
skipped; the torch reference has no padding and accepts no negative slot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import next_pow2, pdl_launch, require, require_device
from kernels.pdl_triton import pdl_prologue


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    k_st, v_st, kc_sb, kc_st, vc_sb, vc_st,
    n_elems,
    BLOCK_SIZE: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    i = tl.arange(0, BLOCK)
    mask = i < n_elems
    key = tl.load(k_ptr + t * k_st + i, mask=mask)
    value = tl.load(v_ptr + t * v_st + i, mask=mask)
    tl.store(kc_ptr + block * kc_sb + offset * kc_st + i, key.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + block * vc_sb + offset * vc_st + i, value.to(vc_ptr.dtype.element_ty), mask=mask)


def store_kv_triton(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """``key``/``value`` ``[T, Hk, D]`` (each token's heads contiguous: views of a fused
    projection are fine); caches ``[num_blocks, block_size, Hk, D]`` with each slot's
    heads contiguous; ``slot_mapping`` ``[T]`` int32/int64, negative = skip."""
    require(key.dim() == 3 and key.shape == value.shape, f"key/value must be equal [T, Hk, D], got {tuple(key.shape)}, {tuple(value.shape)}")
    t, hk, d = key.shape
    require(k_cache.dim() == 4 and k_cache.shape == v_cache.shape and tuple(k_cache.shape[2:]) == (hk, d),
            f"caches must be [blocks, block_size, {hk}, {d}], got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    for name, x in (("key", key), ("value", value)):
        require(x.stride(2) == 1 and x.stride(1) == d, f"{name} must have contiguous heads per token, got strides {x.stride()}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        require(c.stride(3) == 1 and c.stride(2) == d, f"{name} must have contiguous heads per slot, got strides {c.stride()}")
    require(slot_mapping.shape == (t,) and slot_mapping.dtype in (torch.int32, torch.int64),
            f"slot_mapping must be [{t}] int32/int64, got {tuple(slot_mapping.shape)} {slot_mapping.dtype}")
    require_device(key, value, k_cache, v_cache, slot_mapping)
    if t == 0:
        return
    n = hk * d
    _store_kv_kernel[(t,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), value.stride(0), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        n, BLOCK_SIZE=k_cache.shape[1], BLOCK=next_pow2(n), num_warps=4, **pdl_launch(key.device),
    )
