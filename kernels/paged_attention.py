"""Attention over the paged KV cache: the torch reference used on CPU.

On CUDA, ``paged_decode_triton.py`` (one query per sequence) and
``paged_prefill_triton.py`` (prefill and chunked prefill) replace it; kernel
tests compare both against this function.

Every sequence's keys and values live in blocks named by its block table.
Queries of one step are laid out flat (``[T, Hq, D]``), sequence after
sequence; sequence ``i`` owns query rows ``cu_q[i]:cu_q[i+1]`` and attends
causally to its first ``context_lens[i]`` cached tokens (which include the
step's own new tokens, already written). The query rows are the *last*
``q_len`` positions of the context, so one rule covers prefill, chunked
prefill over cached prefix blocks, and decode.

Decode-only batches (every ``q_len == 1``) take a batched path: gather all
contexts padded to the longest and run one masked SDPA call. Other batches run
one SDPA call per sequence. Grouped-query attention never copies KV heads.

An fp8 cache (``kv_quant.py``) is read back as ``stored * kv_scale`` in the
query's dtype, gathered blocks only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.kv_quant import dequantize_ref


def _gather_context(
    cache: torch.Tensor, block_table: torch.Tensor, length: int, dtype: torch.dtype, kv_scale: float
) -> torch.Tensor:
    """``[length, Hk, D]`` for one sequence, as ``dtype``."""
    block_size = cache.shape[1]
    n_blocks = (length + block_size - 1) // block_size
    return dequantize_ref(cache.index_select(0, block_table[:n_blocks]).flatten(0, 1)[:length], dtype, kv_scale)


def paged_attention_ref(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: list[int],
    query_lens: list[int],
    scale: float,
    kv_scale: float = 1.0,
) -> torch.Tensor:
    """Causal attention of ``query`` ``[T, Hq, D]`` over paged K/V; returns ``[T, Hq, D]``.

    ``block_tables``: ``[B, max_blocks]`` int64 (padding entries unused);
    ``context_lens``/``query_lens``: per sequence, ``q_len <= ctx_len``. The caches
    hold the query's dtype, or float8_e4m3fn read as ``stored * kv_scale``.
    """
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    if all(q == 1 for q in query_lens):
        return _decode_batched(query, k_cache, v_cache, block_tables, context_lens, scale, group, kv_scale)
    out = torch.empty_like(query)
    start = 0
    for i, (q_len, ctx_len) in enumerate(zip(query_lens, context_lens)):
        q = query[start : start + q_len].transpose(0, 1)  # [Hq, q, D]
        k = _gather_context(k_cache, block_tables[i], ctx_len, query.dtype, kv_scale).transpose(0, 1)
        v = _gather_context(v_cache, block_tables[i], ctx_len, query.dtype, kv_scale).transpose(0, 1)
        gqa = group > 1
        if q_len == 1:
            o = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
        elif q_len == ctx_len:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            # query row r sits at position ctx_len - q_len + r and sees keys 0..that position
            rows = torch.arange(ctx_len - q_len, ctx_len, device=query.device)[:, None]
            cols = torch.arange(ctx_len, device=query.device)[None, :]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=cols <= rows, scale=scale, enable_gqa=gqa)
        out[start : start + q_len] = o.transpose(0, 1)
        start += q_len
    return out


def _decode_batched(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: list[int],
    scale: float,
    group: int,
    kv_scale: float,
) -> torch.Tensor:
    batch = query.shape[0]
    block_size = k_cache.shape[1]
    max_len = max(context_lens)
    n_blocks = (max_len + block_size - 1) // block_size
    table = block_tables[:, :n_blocks]
    k = dequantize_ref(k_cache[table].flatten(1, 2)[:, :max_len], query.dtype, kv_scale)  # [B, L, Hk, D]
    v = dequantize_ref(v_cache[table].flatten(1, 2)[:, :max_len], query.dtype, kv_scale)
    lens = torch.tensor(context_lens, device=query.device)
    mask = torch.arange(max_len, device=query.device)[None, :] < lens[:, None]  # [B, L]
    # A shorter sequence's gathered rows past its length are other blocks' bytes or stale
    # slots, which may hold anything (NaN included): masked scores give them zero weight,
    # but 0 * NaN is NaN, so they are zeroed too.
    k = k.masked_fill(~mask[:, :, None, None], 0).transpose(1, 2)  # [B, Hk, L, D]
    v = v.masked_fill(~mask[:, :, None, None], 0).transpose(1, 2)
    # the query heads sharing one KV head become that head's query rows, so no
    # KV head is ever copied: q [B, Hk, group, D] against k [B, Hk, L, D]
    q = query.view(batch, -1, group, query.shape[-1])
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], scale=scale)
    return o.reshape(batch, *query.shape[1:])


paged_attention = paged_attention_ref
