"""Rounding to the activation dtype inside Triton kernels, as torch's step-by-step ops round.

``x.to(tl.bfloat16).to(tl.float32)`` can be folded away by the compiler
(measured on an H100: rotary then differed from the torch reference by one
bf16 step on ~20% of elements). For bf16 the rounding is therefore done on
the bits (round to nearest, ties to even), which nothing folds. Not a kernel
of its own: a helper the elementwise kernels call.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """``x`` (float32) rounded to ``dtype``, returned as float32."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def round_like(x, ptr):
    """``x`` (float32) rounded to the element type of ``ptr``, returned as float32."""
    return round_to(x, ptr.dtype.element_ty)
