"""Triton rotary embedding (rotate-half layout) of queries and keys in one launch.

One program rotates every head of one token's queries (``axis 1 == 0``) or
keys (``axis 1 == 1``), gathering its cos/sin row by position. Products and
the sum are rounded to the activation dtype step by step, exactly as the
reference computes them in that dtype (``rounding_triton.py``), so results
agree with it bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import next_pow2, pdl_launch, require, require_device
from kernels.pdl_triton import pdl_prologue
from kernels.rounding_triton import round_like


@triton.jit
def _rotate(src, dst, src_st, src_sh, dst_st, dst_sh, t, cos, sin, n_heads,
            HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < n_heads) & (d < HALF)
    s = src + t * src_st + h * src_sh + d
    o = dst + t * dst_st + h * dst_sh + d
    dtype = dst.dtype.element_ty
    x1 = tl.load(s, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(s + HALF, mask=mask, other=0.0).to(tl.float32)
    a = round_like(x1 * cos, dst)
    b = round_like(x2 * sin, dst)
    tl.store(o, (a - b).to(dtype), mask=mask)
    a = round_like(x2 * cos, dst)
    b = round_like(x1 * sin, dst)
    tl.store(o + HALF, (a + b).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, cs_ptr,
    q_st, q_sh, k_st, k_sh, qo_st, qo_sh, ko_st, ko_sh, cs_stride,
    n_q_heads, n_k_heads,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)[None, :]
    cos = round_like(tl.load(cs_ptr + pos * cs_stride + d, mask=d < HALF, other=0.0), qo_ptr)
    sin = round_like(tl.load(cs_ptr + pos * cs_stride + HALF + d, mask=d < HALF, other=0.0), qo_ptr)
    if tl.program_id(1) == 0:
        _rotate(q_ptr, qo_ptr, q_st, q_sh, qo_st, qo_sh, t, cos, sin, n_q_heads, HALF, BLOCK_HQ, BLOCK_HALF)
    else:
        _rotate(k_ptr, ko_ptr, k_st, k_sh, ko_st, ko_sh, t, cos, sin, n_k_heads, HALF, BLOCK_HK, BLOCK_HALF)


def apply_rotary_triton(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` ``[T, Hq, D]``, ``k`` ``[T, Hk, D]`` (unit stride along D; views of a fused
    projection are fine), ``positions`` ``[T]`` int32/int64, ``cos_sin_cache``
    ``[P, D]`` float32. Returns new contiguous rotated tensors."""
    require(q.dim() == 3 and k.dim() == 3, f"q and k must be [tokens, heads, head_dim], got {tuple(q.shape)}, {tuple(k.shape)}")
    t, _, dim = q.shape
    require(k.shape[0] == t and k.shape[2] == dim, f"k {tuple(k.shape)} does not match q {tuple(q.shape)}")
    require(dim % 2 == 0, f"head_dim must be even, got {dim}")
    require(q.stride(2) == 1 and k.stride(2) == 1, f"q and k need unit stride along head_dim, got {q.stride()}, {k.stride()}")
    require(q.dtype == k.dtype, f"q and k dtypes differ: {q.dtype} vs {k.dtype}")
    require(positions.shape == (t,) and positions.dtype in (torch.int32, torch.int64),
            f"positions must be [{t}] int32/int64, got {tuple(positions.shape)} {positions.dtype}")
    require(cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] == dim and cos_sin_cache.stride(1) == 1,
            f"cos_sin_cache must be [positions, {dim}] with unit inner stride, got {tuple(cos_sin_cache.shape)}")
    require_device(q, k, positions, cos_sin_cache)
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if t == 0:
        return qo, ko
    half = dim // 2
    _rotary_kernel[(t, 2)](
        q, k, qo, ko, positions, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1),
        cos_sin_cache.stride(0), q.shape[1], k.shape[1],
        HALF=half, BLOCK_HQ=next_pow2(q.shape[1]), BLOCK_HK=next_pow2(k.shape[1]), BLOCK_HALF=next_pow2(half),
        num_warps=4, **pdl_launch(q.device),
    )
    return qo, ko
