"""The attention layer's view of one step's batch, and the layer itself.

The model runner builds one ``AttentionMetadata`` per step; every layer reads
it. The layer writes the step's new K/V into the paged cache first and then
attends over the cache, so cached prefix blocks and the new tokens are read
the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.cache_ops import store_kv
from kernels.paged_attention import paged_attention


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor   # [T] int64: cache slot of each new token
    block_tables: torch.Tensor   # [B, max_blocks] int64, padded with 0
    context_lens: list[int]      # [B]: tokens in cache after this step
    query_lens: list[int]        # [B]: new tokens of this step


class PagedAttention(torch.nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return paged_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.query_lens, self.scale)
