"""Writing new keys and values into their slots of the paged KV cache.

A slot is ``block_id * block_size + offset``; the scheduler computes one slot
per new token (``slot_mapping``), so prefill chunks and decode tokens of many
sequences are written in one call. The model stores through
``rotary_store.py`` (rotation and store in one kernel on CUDA); this is the
torch reference of the store. An fp8 cache stores each value divided by
``kv_scale`` (``kv_quant.py``).
"""

from __future__ import annotations

import torch

from kernels.kv_quant import is_fp8, quantize_ref


def store_kv_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: float = 1.0,
) -> None:
    """``key``/``value``: ``[T, Hk, D]``; caches: ``[num_blocks, block_size, Hk, D]`` (any
    strides: a strided view of another layout is written in place); ``slot_mapping``: ``[T]``
    int64; ``kv_scale``: the fp8 cache's scale (unused by other cache dtypes)."""
    block_size = k_cache.shape[1]
    for new, cache in ((key, k_cache), (value, v_cache)):
        stored = quantize_ref(new, cache.dtype, kv_scale)
        if is_fp8(cache.dtype):  # index_copy_ and index_put_ have no float8 kernels: copy the bytes
            stored, cache = stored.view(torch.uint8), cache.view(torch.uint8)
        if cache.is_contiguous():
            cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, stored)
        else:
            cache[slot_mapping // block_size, slot_mapping % block_size] = stored

