"""Writing new keys and values into their slots of the paged KV cache.

A slot is ``block_id * block_size + offset``; the scheduler computes one slot
per new token (``slot_mapping``), so prefill chunks and decode tokens of many
sequences are written in one call. The model stores through
``rotary_store.py`` (rotation and store in one kernel on CUDA); this is the
torch reference of the store.
"""

from __future__ import annotations

import torch


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

