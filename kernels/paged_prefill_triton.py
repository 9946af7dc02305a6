"""Triton attention for prefill and chunked prefill, reading K/V from the paged cache.

Variable-length sequences in one launch: sequence ``i`` owns query rows
``query_start[i] : query_start[i] + query_lens[i]``, which are the last
``query_lens[i]`` of its ``context_lens[i]`` cached tokens (new K/V already
written). So a chunk after cached prefix blocks attends to the prefix and
causally to itself, the same rule as the torch reference.

Grid ``(query tiles, query heads, sequences)``; a flash-attention loop over
key tiles with an online softmax. Key tiles wholly below the diagonal run
without the causal mask; only the tiles crossing it pay for it. With
``PrefillTuning.heavy_first`` the grid is ``(heads, sequences, tiles)`` and
the tiles go last tile first (the GPU starts programs in grid order): a causal
tile's work grows with its index, so the long tiles of every sequence start
first and the short ones fill in behind them instead of one long tile
running alone at the end of the launch.

An fp8 (e4m3) cache: tiles converted to the dot products' dtype (float16 for
16-bit queries; exact), the scale folded into the softmax scale and the final
normalisation (a compile-time branch). Unlike the decode kernel, V is not
loaded as int32 words: Triton feeds these dot products with ``wgmma`` from
shared memory, and the words path measured slower here (14 prompts of
128-1024 tokens 280 against 277 us a layer, one of 2,048 tokens 140 against
132 us, H100, session 10; removed since).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.backend import check_paged_inputs, next_pow2, require, require_device
from kernels.kv_quant import is_fp8
from kernels.kv_quant_triton import dot_query
from kernels.softmax_triton import online_softmax

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class PrefillTuning:
    """Launch parameters of the prefill kernel (``benchmarks/gpu_kernels.py`` times them)."""

    block_m: int = 128
    """Query rows per program."""
    block_n: int = 64
    """Keys per loop iteration."""
    num_warps: int = 8
    num_stages: int = 2
    heavy_first: bool = False
    """Launch each sequence's last (longest) query tile first."""
    pack_gqa: bool = False
    """A program serves all query heads of one KV head: its ``block_m`` rows are
    ``block_m / group`` positions x ``group`` heads (the group padded to a power of two),
    so each K/V tile is loaded (and, from an fp8 cache, converted) once per group instead
    of once per query head, and the causal diagonal costs ``group`` times fewer keys."""


LONG_QUERY = 1536
"""Without GQA packing (one query head a KV head, or groups over 8), launches whose longest
sequence has this many query rows take the long-prompt tuning: bigger tiles, last tile first.
Below, several shorter prompts fill the card with smaller tiles. Measured on an H100
(``gpu_kernels.py --only prefill``, Llama-3-8B layer): 14 prompts uniform in 128-1024 tokens
(8,568) 305 -> 253 us (bf16 cache) and 316 -> 277 us (fp8) with the short tuning; one
2,048-token prompt 162 -> 135 us and 196 -> 132 us with the long one (before: one tuning for both)."""

PACKED_TUNINGS = {False: PrefillTuning(128, 32, 4, 3, heavy_first=True, pack_gqa=True),
                  True: PrefillTuning(128, 64, 4, 3, heavy_first=True, pack_gqa=True)}
"""By fp8 cache: the tuning of grouped-query models (2-8 query heads a KV head), for short
and long prompts alike. H100, Llama-3-8B layer (32/8 heads), ``gpu_kernels.py --only
prefill``, us, unpacked default -> this: 14 prompts of 128-1024 tokens bf16 257.9 -> 230.7,
fp8 281.5 -> 250.8; one 2,048-token prompt bf16 135.5 -> 121.0, fp8 131.3 -> 125.5 (each
pair from one call; the best packed tuning of the sweep, within 3 % of the best at every
shape)."""


def default_prefill_tuning(query_dtype: torch.dtype, kv_fp8: bool, head_dim: int, max_query_len: int,
                           group: int = 1) -> PrefillTuning:
    """``group``: query heads a KV head."""
    if query_dtype == torch.float32:
        return PrefillTuning(64, 32, 4, 2)
    if 2 <= group <= 8:
        return PACKED_TUNINGS[kv_fp8]
    if max_query_len >= LONG_QUERY:
        if kv_fp8:
            return PrefillTuning(128, 64, 4, 3, heavy_first=True)
        return PrefillTuning(128, 64, 8 if head_dim >= 128 else 4, 2, heavy_first=True)
    return PrefillTuning(64, 64, 4, 2 if kv_fp8 else 3)


@triton.jit
def _attend(q, m_i, l_i, acc, n0, pos, hi, table, kc_ptr, vc_ptr, kh,
            kc_sb, kc_st, kc_sh, vc_sb, vc_st, vc_sh, scale_log2,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
            MASKED: tl.constexpr, PRECISION: tl.constexpr, KV_FP8: tl.constexpr):
    n = n0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    if MASKED:
        n_mask = n < hi
        block = tl.load(table + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        kv_mask = n_mask[:, None] & (d < HEAD_DIM)[None, :]
    else:
        block = tl.load(table + n // BLOCK_SIZE).to(tl.int64)
        kv_mask = (n >= 0)[:, None] & (d < HEAD_DIM)[None, :]
    offset = (n % BLOCK_SIZE).to(tl.int64)
    k = tl.load(kc_ptr + block[:, None] * kc_sb + offset[:, None] * kc_st + kh * kc_sh + d[None, :], mask=kv_mask, other=0.0)
    if KV_FP8:
        k = k.to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    if MASKED:
        s = tl.where((n[None, :] <= pos[:, None]) & n_mask[None, :], s, float("-inf"))
    m_new, alpha, p, l_i = online_softmax(s, m_i, l_i)
    v = tl.load(vc_ptr + block[:, None] * vc_sb + offset[:, None] * vc_st + kh * vc_sh + d[None, :], mask=kv_mask,
                other=0.0)
    if KV_FP8:
        v = v.to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _paged_prefill_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, qs_ptr, ql_ptr, ctx_ptr, out_ptr,
    q_st, q_sh, kc_sb, kc_st, kc_sh, vc_sb, vc_st, vc_sh, bt_sb, o_st, o_sh,
    scale_log2, v_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
    HEAVY_FIRST: tl.constexpr, PACK_GQA: tl.constexpr, GROUP_P: tl.constexpr,
):
    if HEAVY_FIRST:  # grid (heads, sequences, tiles), the last tile first
        h = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        tile = tl.num_programs(2) - 1 - tl.program_id(2)
    else:  # grid (tiles, heads, sequences)
        tile = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
    if PACK_GQA:  # rows are (position, head) pairs of KV head h's group, position-major
        POSITIONS: tl.constexpr = BLOCK_M // GROUP_P
    else:
        POSITIONS: tl.constexpr = BLOCK_M
    q_len = tl.load(ql_ptr + b)
    if tile * POSITIONS >= q_len:
        return
    q0 = tl.load(qs_ptr + b).to(tl.int64)
    ctx = tl.load(ctx_ptr + b)
    prefix = ctx - q_len
    d = tl.arange(0, BLOCK_D)
    if PACK_GQA:
        kh = h
        r = tl.arange(0, BLOCK_M)
        m = tile * POSITIONS + r // GROUP_P
        head = kh * GROUP + r % GROUP_P
        row_ok = (m < q_len) & (r % GROUP_P < GROUP)
    else:
        kh = h // GROUP
        m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        head = h + 0 * m
        row_ok = m < q_len
    qd_mask = row_ok[:, None] & (d < HEAD_DIM)[None, :]
    q_rows = (q0 + m)[:, None] * q_st + head[:, None] * q_sh
    q = tl.load(q_ptr + q_rows + d[None, :], mask=qd_mask, other=0.0)
    if KV_FP8:
        q = dot_query(q)
    pos = prefix + m  # absolute position of each query row

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = bt_ptr + b * bt_sb
    hi = tl.minimum(ctx, prefix + (tile + 1) * POSITIONS)  # keys the tile's last row sees
    full = tl.minimum((prefix + tile * POSITIONS + 1) // BLOCK_N * BLOCK_N, hi)  # keys every row sees
    for n0 in range(0, full, BLOCK_N):
        m_i, l_i, acc = _attend(q, m_i, l_i, acc, n0, pos, hi, table, kc_ptr, vc_ptr, kh,
                                kc_sb, kc_st, kc_sh, vc_sb, vc_st, vc_sh, scale_log2,
                                HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, False, PRECISION, KV_FP8)
    for n0 in range(full, hi, BLOCK_N):
        m_i, l_i, acc = _attend(q, m_i, l_i, acc, n0, pos, hi, table, kc_ptr, vc_ptr, kh,
                                kc_sb, kc_st, kc_sh, vc_sb, vc_st, vc_sh, scale_log2,
                                HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, True, PRECISION, KV_FP8)
    out = acc / l_i[:, None]
    if KV_FP8:
        out = out * v_scale
    tl.store(out_ptr + (q0 + m)[:, None] * o_st + head[:, None] * o_sh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=qd_mask)


def paged_prefill_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor,
    kv_scale: float = 1.0,
    tuning: PrefillTuning | None = None,
) -> torch.Tensor:
    """Causal attention of the query rows of ``B`` sequences over their paged contexts.

    ``query``/``out`` ``[N, Hq, D]``; ``block_tables`` ``[B, W]`` int32/int64;
    ``query_start``/``query_lens``/``context_lens`` ``[B]`` int32 with
    ``1 <= query_lens[i] <= context_lens[i]``; ``max_query_len`` bounds
    ``query_lens`` (it sizes the grid). Writes the sequences' rows of ``out``. The
    caches hold the query's dtype, or float8_e4m3fn read as ``stored * kv_scale``.
    ``tuning`` defaults to ``default_prefill_tuning`` (which depends on ``max_query_len``
    and the GQA group).
    """
    hq, dim, block_size, hk, batch = check_paged_inputs(query, k_cache, v_cache, block_tables)
    for name, t in (("query_start", query_start), ("query_lens", query_lens), ("context_lens", context_lens)):
        require(t.shape == (batch,) and t.dtype == torch.int32, f"{name} must be [{batch}] int32, got {tuple(t.shape)} {t.dtype}")
    require(out.shape == query.shape and out.dtype == query.dtype and out.stride(2) == 1,
            f"out must match query {tuple(query.shape)} {query.dtype}, got {tuple(out.shape)} {out.dtype}")
    require(max_query_len >= 1, f"max_query_len must be >= 1, got {max_query_len}")
    require(kv_scale > 0, f"kv_scale must be > 0, got {kv_scale}")
    require_device(query, k_cache, v_cache, block_tables, query_start, query_lens, context_lens, out)
    if batch == 0:
        return out
    fp8 = is_fp8(k_cache.dtype)
    tuning = tuning or default_prefill_tuning(query.dtype, fp8, dim, max_query_len, hq // hk)
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    block_d = next_pow2(dim)
    k_scale = kv_scale if fp8 else 1.0
    group = hq // hk
    group_p = next_pow2(group)
    pack = tuning.pack_gqa and group > 1 and tuning.block_m >= 16 * group_p
    heads = hk if pack else hq
    tiles = triton.cdiv(max_query_len, tuning.block_m // group_p if pack else tuning.block_m)
    grid = (heads, batch, tiles) if tuning.heavy_first else (tiles, heads, batch)
    _paged_prefill_kernel[grid](
        query, k_cache, v_cache, block_tables, query_start, query_lens, context_lens, out,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        scale * k_scale * _LOG2E, kv_scale,
        GROUP=group, HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_SIZE=block_size,
        BLOCK_M=tuning.block_m, BLOCK_N=tuning.block_n, PRECISION=precision, KV_FP8=fp8,
        HEAVY_FIRST=tuning.heavy_first, PACK_GQA=pack, GROUP_P=group_p, num_warps=tuning.num_warps, num_stages=tuning.num_stages,
    )
    return out
