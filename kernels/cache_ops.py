"""Writing new keys and values into their slots of the paged KV cache.

A slot is ``block_id * block_size + offset``; the scheduler computes one slot
per new token (``slot_mapping``), so prefill chunks and decode tokens of many
sequences are written in one call.
"""

from __future__ import annotations

import torch

from kernels.backend import HAS_TRITON, use_triton

if HAS_TRITON:
    from kernels.cache_ops_triton import store_kv_triton


def store_kv_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """``key``/``value``: ``[T, Hk, D]``; caches: ``[num_blocks, block_size, Hk, D]``; ``slot_mapping``: ``[T]`` int64."""
    num_blocks, block_size = k_cache.shape[:2]
    k_cache.view(num_blocks * block_size, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(num_blocks * block_size, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """On CUDA a negative slot is skipped (padding rows of a CUDA-graph batch)."""
    if use_triton(key):
        store_kv_triton(key, value, k_cache, v_cache, slot_mapping)
    else:
        store_kv_ref(key, value, k_cache, v_cache, slot_mapping)
