"""Triton rotary of q and k fused with the paged K/V store, one launch (see ``rotary_store.py``).

Grid ``(tokens, 2)``: program ``(t, 0)`` rotates token ``t``'s query heads into
the output tensor; program ``(t, 1)`` rotates its key heads straight into the
token's cache slot and copies its value heads beside them (skipped for a
negative slot); with ``k_out`` it also writes the rotated keys there, in the
activation dtype, for every token (negative slots included). Products and sums are rounded to the activation dtype step by
step, exactly as the torch reference computes them in that dtype
(``rounding_triton.py``), so results agree with it bit for bit (but for rare
one-rounding differences where ``x1*cos - x2*sin`` cancels).

An fp8 (e4m3) cache (``kv_quant.py``, a compile-time branch) gets the rotated
keys rounded to the activation dtype as the reference rotates them, and both
keys and values times ``1/kv_scale`` in float32, clamped to +-448, rounded to
nearest even into e4m3.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import check_cache_dtype, next_pow2, pdl_launch, require, require_device
from kernels.kv_quant import inverse_scale, is_fp8
from kernels.kv_quant_triton import to_fp8
from kernels.pdl_triton import pdl_prologue
from kernels.rounding_triton import round_like


@triton.jit
def _rotate(src, dst, src_st, src_sh, dst_st, dst_sh, t, cos, sin, n_heads, inv_scale, dst_ok, copy, copy_sh,
            HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, TO_FP8: tl.constexpr,
            COPY: tl.constexpr):
    """Rotates ``src``'s heads into ``dst`` (where ``dst_ok``; quantized with ``TO_FP8``) and,
    with ``COPY``, into ``copy`` too, in the activation dtype."""
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < n_heads) & (d < HALF)
    s = src + t * src_st + h * src_sh + d
    o = dst + t * dst_st + h * dst_sh + d
    c = copy + h * copy_sh + d
    dtype = dst.dtype.element_ty
    x1 = tl.load(s, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(s + HALF, mask=mask, other=0.0).to(tl.float32)
    for part in tl.static_range(2):
        if part == 0:
            rotated = round_like(round_like(x1 * cos, src) - round_like(x2 * sin, src), src)
        else:
            rotated = round_like(round_like(x2 * cos, src) + round_like(x1 * sin, src), src)
        if TO_FP8:  # the rotated value in the activation dtype, then quantized
            tl.store(o + part * HALF, to_fp8(rotated, inv_scale, dtype), mask=mask & dst_ok)
        else:
            tl.store(o + part * HALF, rotated.to(dtype), mask=mask & dst_ok)
        if COPY:
            tl.store(c + part * HALF, rotated.to(copy.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_store_kernel(
    q_ptr, k_ptr, v_ptr, qo_ptr, kc_ptr, vc_ptr, ko_ptr, pos_ptr, slot_ptr, cs_ptr,
    q_st, q_sh, k_st, k_sh, v_st, qo_st, qo_sh, kc_sb, kc_st, kc_sh, vc_sb, vc_st, vc_sh, ko_st, ko_sh, cs_stride,
    n_q_heads, n_k_heads, n_v_elems, inv_scale,
    HALF: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_V: tl.constexpr, KV_FP8: tl.constexpr, WRITE_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)[None, :]
    cos = round_like(tl.load(cs_ptr + pos * cs_stride + d, mask=d < HALF, other=0.0), qo_ptr)
    sin = round_like(tl.load(cs_ptr + pos * cs_stride + HALF + d, mask=d < HALF, other=0.0), qo_ptr)
    if tl.program_id(1) == 0:
        _rotate(q_ptr, qo_ptr, q_st, q_sh, qo_st, qo_sh, t, cos, sin, n_q_heads, inv_scale, True, qo_ptr, 0,
                HALF, BLOCK_HQ, BLOCK_HALF, False, False)
    else:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if WRITE_K:  # the rotated keys into ko too, whatever the slot (the dense prefill kernel reads them)
            kc = kc_ptr + (tl.maximum(slot, 0) // BLOCK_SIZE) * kc_sb + (tl.maximum(slot, 0) % BLOCK_SIZE) * kc_st
            _rotate(k_ptr + t * k_st, kc, 0, k_sh, 0, kc_sh, 0, cos, sin, n_k_heads, inv_scale, slot >= 0,
                    ko_ptr + t * ko_st, ko_sh, HALF, BLOCK_HK, BLOCK_HALF, KV_FP8, True)
        elif slot >= 0:
            kc = kc_ptr + (slot // BLOCK_SIZE) * kc_sb + (slot % BLOCK_SIZE) * kc_st
            _rotate(k_ptr + t * k_st, kc, 0, k_sh, 0, kc_sh, 0, cos, sin, n_k_heads, inv_scale, True, kc, 0,
                    HALF, BLOCK_HK, BLOCK_HALF, KV_FP8, False)
        if slot >= 0:
            i = tl.arange(0, BLOCK_V)
            value = tl.load(v_ptr + t * v_st + i, mask=i < n_v_elems)
            vc = vc_ptr + (slot // BLOCK_SIZE) * vc_sb + (slot % BLOCK_SIZE) * vc_st + (i // HEAD_DIM) * vc_sh + i % HEAD_DIM
            if KV_FP8:
                tl.store(vc, to_fp8(value.to(tl.float32), inv_scale, vc_ptr.dtype.element_ty), mask=i < n_v_elems)
            else:
                tl.store(vc, value.to(vc_ptr.dtype.element_ty), mask=i < n_v_elems)


def rotary_and_store_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, kv_scale: float = 1.0,
    k_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``q`` ``[T, Hq, D]``, ``k``/``v`` ``[T, Hk, D]`` (unit stride along D, each token's
    value heads contiguous: views of a fused projection are fine); caches
    ``[blocks, block_size, Hk, D]`` with unit stride along D (any other strides: the
    engine's CUDA pool keeps each KV head's rows of a block together); ``positions`` and
    ``slot_mapping`` ``[T]`` int32/int64. The caches hold the activations' dtype, or
    float8_e4m3fn with scale ``kv_scale``. Returns the rotated queries (contiguous).
    ``k_out`` ``[T, Hk, D]`` in the activation dtype (unit stride along D), if given,
    receives the rotated keys too, unquantized, for every token (negative slots included)."""
    require(q.dim() == 3 and k.dim() == 3 and k.shape == v.shape,
            f"q must be [T, Hq, D] and k, v equal [T, Hk, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    t, _, dim = q.shape
    hk = k.shape[1]
    require(k.shape[0] == t and k.shape[2] == dim, f"k {tuple(k.shape)} does not match q {tuple(q.shape)}")
    require(dim % 2 == 0, f"head_dim must be even, got {dim}")
    require(q.stride(2) == 1 and k.stride(2) == 1, f"q and k need unit stride along head_dim, got {q.stride()}, {k.stride()}")
    require(v.stride(2) == 1 and v.stride(1) == dim, f"v must have contiguous heads per token, got strides {v.stride()}")
    require(q.dtype == k.dtype == v.dtype, f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    require(k_cache.dim() == 4 and k_cache.shape == v_cache.shape and tuple(k_cache.shape[2:]) == (hk, dim),
            f"caches must be [blocks, block_size, {hk}, {dim}], got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        require(c.stride(3) == 1, f"{name} must have unit stride along head_dim, got strides {c.stride()}")
    check_cache_dtype(q.dtype, k_cache, v_cache)
    require(kv_scale > 0, f"kv_scale must be > 0, got {kv_scale}")
    for name, x in (("positions", positions), ("slot_mapping", slot_mapping)):
        require(x.shape == (t,) and x.dtype in (torch.int32, torch.int64),
                f"{name} must be [{t}] int32/int64, got {tuple(x.shape)} {x.dtype}")
    require(cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] == dim and cos_sin_cache.stride(1) == 1,
            f"cos_sin_cache must be [positions, {dim}] with unit inner stride, got {tuple(cos_sin_cache.shape)}")
    require_device(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)
    if k_out is not None:
        require(k_out.shape == k.shape and k_out.dtype == k.dtype and k_out.stride(2) == 1,
                f"k_out must be {tuple(k.shape)} {k.dtype} with unit stride along head_dim, "
                f"got {tuple(k_out.shape)} {k_out.dtype} strides {k_out.stride()}")
        require_device(q, k_out)
    ko = k if k_out is None else k_out  # an unused pointer without k_out
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if t == 0:
        return qo
    half = dim // 2
    _rotary_store_kernel[(t, 2)](
        q, k, v, qo, k_cache, v_cache, ko, positions, slot_mapping, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), qo.stride(0), qo.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), ko.stride(0), ko.stride(1), cos_sin_cache.stride(0), q.shape[1], hk, hk * dim, inverse_scale(kv_scale),
        HALF=half, HEAD_DIM=dim, BLOCK_HQ=next_pow2(q.shape[1]), BLOCK_HK=next_pow2(hk), BLOCK_HALF=next_pow2(half),
        BLOCK_SIZE=k_cache.shape[1], BLOCK_V=next_pow2(hk * dim), KV_FP8=is_fp8(k_cache.dtype), WRITE_K=k_out is not None,
        num_warps=4,
        **pdl_launch(q.device),
    )
    return qo
