"""The fp8 KV cache's number format inside Triton kernels (``kv_quant.py`` is the reference).

Writing: ``to_fp8`` scales, saturates and rounds to nearest even, as
``quantize_ref`` does. Reading: attention converts each fp8 tile to the dtype
of its dot products. e4m3 -> float16 is one instruction per two elements on
sm_89+ (``cvt.rn.f16x2.e4m3x2``) and exact; e4m3 -> bfloat16 is not a single
instruction on Hopper and made decode attention slower than a bf16 cache
(measured on an H200, batch 256 x 700 tokens: 210 us against 188 us a layer).
So with 16-bit queries the dot products of an fp8 cache run in float16:
``dot_query`` converts the query tile once per program (saturated to
float16's +-65504; float16 has 3 more mantissa bits than bf16, so only
elements below 2**-14 lose bits, negligible beside a head's larger ones),
and the probabilities go to float16 too. float32 queries stay float32 (tests and the CPU interpreter).

Not a kernel of its own: helpers the kernels call, like ``rounding_triton.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.kv_quant import FP8_MAX

_FP8_MAX = tl.constexpr(FP8_MAX)
_F16_MAX = tl.constexpr(65504.0)


@triton.jit
def to_fp8(x, inv_scale, dtype):
    """``x`` (float32) times ``inv_scale``, saturated to +-448 (NaN stays NaN), as ``dtype`` (e4m3)."""
    x = tl.maximum(x * inv_scale, -_FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    x = tl.minimum(x, _FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    return x.to(dtype, fp_downcast_rounding="rtne")


@triton.jit
def dot_query(q):
    """The query tile as the dot operand against fp8 K/V: float16 for 16-bit queries, float32 as is."""
    if q.dtype == tl.float32:
        return q
    else:
        q = q.to(tl.float32)
        q = tl.minimum(tl.maximum(q, -_F16_MAX, propagate_nan=tl.PropagateNan.ALL), _F16_MAX,
                       propagate_nan=tl.PropagateNan.ALL)
        return q.to(tl.float16)


@triton.jit
def fp8_words_to_f16(words, ROWS: tl.constexpr, COLS: tl.constexpr):
    """A ``[ROWS, COLS // 4]`` int32 tile, each word four e4m3 elements of a row (lowest
    byte first), as the ``[ROWS, COLS]`` float16 tile they hold (exact).

    Why not ``load(fp8).to(float16)``: Triton moves that conversion behind the shared
    memory read of the dot operand, and an 8-bit operand whose reduction runs along the
    rows (V in ``p @ v``) has no transposing ``ldmatrix``: it is read a byte per
    instruction (128 ``LDS.U8`` per thread per 128-key tile of decode attention).
    Converted in registers, the tile goes to shared memory as float16 and is read back
    with ``ldmatrix.trans``. An inline-asm op with a join after it is not moved.
    Needs sm_89+ (``cvt.rn.f16x2.e4m3x2``), as the fp8 cache does."""
    e0, e1, e2, e3 = tl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; .reg .b32 r0, r1; mov.b32 {lo, hi}, $4; cvt.rn.f16x2.e4m3x2 r0, lo; "
        "cvt.rn.f16x2.e4m3x2 r1, hi; mov.b32 {$0, $1}, r0; mov.b32 {$2, $3}, r1; }",
        "=h,=h,=h,=h,r", [words], dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=1)
    # join(join(e0, e2), join(e1, e3))[..., i, j] is element 2 * i + j of the word
    return tl.reshape(tl.join(tl.join(e0, e2), tl.join(e1, e3)), (ROWS, COLS))
