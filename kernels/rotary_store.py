"""Rotary embedding of q and k fused with writing k and v into the paged cache.

Attention needs the new keys rotated in the cache (and, for the dense prefill
kernel, rotated beside the step: ``k_out``), and the queries rotated. Done as two kernels, the rotated keys go through memory once more and
every layer pays one more launch (at decode batch 1 a step is ~320 launches,
each gap ~1 us on an H100); fused, one program per token and role rotates its
queries into a new tensor or its keys straight into their cache slot, copying
the values beside them. The reference is the composition of the two torch
references, so the kernel is checked against exactly what the CPU path runs.
"""

from __future__ import annotations

import torch

from kernels.backend import HAS_TRITON, use_triton
from kernels.cache_ops import store_kv_ref
from kernels.rotary import apply_rotary_ref

if HAS_TRITON:
    from kernels.rotary_store_triton import rotary_and_store_triton


def rotary_and_store_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, kv_scale: float = 1.0,
    k_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotates ``q`` ``[T, Hq, D]`` and ``k`` ``[T, Hk, D]`` by ``positions``, stores the
    rotated ``k`` and ``v`` at ``slot_mapping`` of the caches (an fp8 cache: divided
    by ``kv_scale``, ``kv_quant.py``) and the rotated ``k`` into ``k_out`` if given
    (unquantized: the dense prefill kernel's keys); returns the rotated ``q``."""
    q, k = apply_rotary_ref(q, k, positions, cos_sin_cache)
    store_kv_ref(k, v, k_cache, v_cache, slot_mapping, kv_scale)
    if k_out is not None:
        k_out.copy_(k)
    return q


def rotary_and_store(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, kv_scale: float = 1.0,
    k_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """On CUDA a negative slot skips that token's k/v (padding rows of a CUDA-graph batch)."""
    if use_triton(q):
        return rotary_and_store_triton(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, kv_scale,
                                       k_out)
    return rotary_and_store_ref(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, kv_scale, k_out)
