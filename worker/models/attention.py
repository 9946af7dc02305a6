"""The attention layer's view of one step's batch, and the layer itself.

The model runner builds one ``AttentionMetadata`` per step; every layer reads
it. The model writes the step's new (rotated) K/V into the paged cache first
(``kernels.rotary_store``) and the layer then attends over the cache, so
cached prefix blocks and the new tokens are read the same way (but for a
``DenseBatch``'s prompts, below, which have no cached prefix).

On CUDA the runner also describes the batch as device tensors, split into
the sequences with one new token (``DecodeBatch``, the decode kernel) and
those with more (``PrefillBatch``, the prefill kernel), and the layer runs the
Triton kernels. Without that description it runs the torch reference. On an
sm_90+ GPU, prompts with no cached prefix may instead come as a ``DenseBatch``:
they attend to the step's own rotated keys and values, not to the cache
(``kernels/prefill_dense_triton.py``); the model then has rotary write the
rotated keys out as well (``rotary_and_store``'s ``k_out``).

The cache may hold a narrower dtype than the model (float8_e4m3fn,
``kernels/kv_quant.py``); every kernel reads "is it fp8" from the cache
tensor's dtype, and the one number that goes with it, the cache's scale,
lives on each ``PagedAttention`` (``kv_scale``: the model's writer passes it
to the K/V store, the layer to the attention kernels). The model runner sets
it with ``set_kv_cache_scale`` before the first step; CUDA graphs capture it
as a constant.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kernels.backend import HAS_TRITON
from kernels.paged_attention import paged_attention
from kernels.prefill_dense import dense_prefill_attention

if HAS_TRITON:
    from kernels.paged_decode_triton import paged_decode_attention
    from kernels.paged_prefill_triton import paged_prefill_attention


@dataclass
class DecodeBatch:
    """Sequences with exactly one query row this step (device tensors)."""

    rows: torch.Tensor            # [Bd] int32: the flat query row of each
    block_tables: torch.Tensor    # [Bd, W] int32
    context_lens: torch.Tensor    # [Bd] int32; 0 marks a padding row (output zeros)
    num_splits: int | None = None
    """Context splits of the decode kernel; None: chosen from the batch shape."""
    order: torch.Tensor | None = None
    """[Bd] int32: the order in which the kernel takes the sequences (``longest_first``); None: batch order."""


def block_table_width(max_blocks: int) -> int:
    """Columns of a step's block table for sequences of at most ``max_blocks`` blocks: a
    multiple of 16. Triton compiles a kernel once per divisibility of its integer arguments
    (by 16, or equal to 1); with every table's row stride a multiple of 16, the attention
    kernels compiled at start-up serve every step, eager or in a CUDA graph."""
    return -(-max(max_blocks, 1) // 16) * 16


def longest_first(context_lens) -> np.ndarray:
    """The decode kernel's launch order: indices of ``context_lens`` by decreasing length
    (ties in batch order; padding rows, length 0, last), int32. The GPU starts programs
    in grid order and a program's time grows with its context, so in batch order a long
    sequence that comes last runs alone at the end of the launch; longest first, the
    short ones fill in behind the long ones. Measured on an H100 (``gpu_kernels.py
    --only decode``, 256 sequences, Llama-3-8B layer): contexts uniform in 256-1152
    tokens 178.2 -> 171.6 us (fp8 cache), 264.8 -> 262.7 (bf16); in 128-2048,
    262.5 -> 254.0 (fp8)."""
    return np.argsort(-np.asarray(context_lens, dtype=np.int64), kind="stable").astype(np.int32)


@dataclass
class PrefillBatch:
    """Sequences with several query rows this step, read from the cache (device tensors):
    all of them, or those a ``DenseBatch`` does not take."""

    query_start: torch.Tensor     # [Bp] int32: first flat query row
    query_lens: torch.Tensor      # [Bp] int32
    context_lens: torch.Tensor    # [Bp] int32
    block_tables: torch.Tensor    # [Bp, W] int32
    max_query_len: int


@dataclass
class DenseBatch:
    """Prompts with no cached prefix (context = this step's rows), several rows each: they
    attend to the step's own K/V, not the cache (device tensors)."""

    query_start: torch.Tensor     # [Bn] int32: first flat query row
    query_lens: torch.Tensor      # [Bn] int32
    max_query_len: int


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor   # [T] int64 (int32 on CUDA): cache slot of each new token; < 0: skip (CUDA only)
    block_tables: torch.Tensor   # [B, max_blocks] int64, padded with 0 (reference path)
    context_lens: list[int]      # [B]: tokens in cache after this step (reference path)
    query_lens: list[int]        # [B]: new tokens of this step (reference path)
    decode: DecodeBatch | None = None
    prefill: PrefillBatch | None = None
    dense: DenseBatch | None = None

    @property
    def on_gpu_kernels(self) -> bool:
        return self.decode is not None or self.prefill is not None or self.dense is not None


class PagedAttention(torch.nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.kv_scale = 1.0
        """An fp8 cache stores ``value / kv_scale`` (``set_kv_cache_scale``); unused by other caches."""

    def forward(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        k: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of ``q`` ``[T, Hq, D]`` over the cache, whose slots already hold this
        step's K/V; ``meta.dense``'s prompts over the step's rotated keys ``k`` and values
        ``v`` ``[T, Hk, D]`` instead (required with it)."""
        if not meta.on_gpu_kernels:
            return paged_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.query_lens, self.scale,
                                   self.kv_scale)
        out = torch.empty_like(q)
        if meta.prefill is not None:
            p = meta.prefill
            paged_prefill_attention(q, k_cache, v_cache, p.block_tables, p.query_start, p.query_lens,
                                    p.context_lens, p.max_query_len, self.scale, out, self.kv_scale)
        if meta.dense is not None:
            if k is None or v is None:
                raise ValueError("a DenseBatch needs the step's rotated keys and values (k, v)")
            n = meta.dense
            dense_prefill_attention(q, k, v, n.query_start, n.query_lens, n.max_query_len, self.scale, out)
        if meta.decode is not None:
            d = meta.decode
            paged_decode_attention(q, k_cache, v_cache, d.block_tables, d.context_lens, d.rows, self.scale, out,
                                   d.num_splits, kv_scale=self.kv_scale, order=d.order)
        return out


def set_kv_cache_scale(model: torch.nn.Module, kv_scale: float) -> None:
    """Gives every ``PagedAttention`` of ``model`` the fp8 cache's scale (one for K and V, all layers)."""
    if not kv_scale > 0:
        raise ValueError(f"kv_scale must be > 0, got {kv_scale}")
    for module in model.modules():
        if isinstance(module, PagedAttention):
            module.kv_scale = float(kv_scale)
