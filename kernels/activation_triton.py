"""Triton SiLU-and-multiply: reads the fused gate/up activation once, writes half.

Rounds like the reference: ``silu(gate)`` is rounded to the activation dtype
before the product, which is rounded again. The gate and up columns are the two
halves of a row, or alternate in runs of ``interleave`` (``activation.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import pdl_launch, require, require_device
from kernels.pdl_triton import pdl_prologue
from kernels.rounding_triton import round_to

_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, out_stride, d, BLOCK: tl.constexpr, INTERLEAVE: tl.constexpr,
                         USE_PDL: tl.constexpr):
    pdl_prologue(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    if INTERLEAVE:
        gate_cols = cols // INTERLEAVE * (2 * INTERLEAVE) + cols % INTERLEAVE
        up_cols = gate_cols + INTERLEAVE
    else:
        gate_cols = cols
        up_cols = d + cols
    gate = tl.load(x_ptr + row * x_stride + gate_cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + up_cols, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + row * out_stride + cols, gated(gate, up, dtype).to(dtype), mask=mask)


@triton.jit
def gated(gate, up, dtype: tl.constexpr):
    """``silu(gate) * up`` (float32 in and out) rounded as the torch form rounds:
    ``silu(gate)`` to ``dtype`` before the product. The one definition this kernel and the
    fused gate/up kernel (``gate_up_silu_triton.py``) share, so the two agree bit for bit."""
    return round_to(gate / (1.0 + tl.exp(-gate)), dtype) * up


def silu_and_mul_triton(x: torch.Tensor, interleave: int = 0) -> torch.Tensor:
    """``x``: ``[T, 2d]`` with unit stride along the last dim; returns ``[T, d]``."""
    require(x.dim() == 2 and x.shape[1] % 2 == 0, f"x must be [tokens, 2 * d], got shape {tuple(x.shape)}")
    require(x.stride(1) == 1, f"x must have unit stride along its last dim, got strides {x.stride()}")
    d = x.shape[1] // 2
    require(interleave >= 0 and (interleave == 0 or d % interleave == 0),
            f"interleave must be 0 or divide {d}, got {interleave}")
    require_device(x)
    out = torch.empty((x.shape[0], d), dtype=x.dtype, device=x.device)
    grid = (x.shape[0], triton.cdiv(d, _BLOCK))
    _silu_and_mul_kernel[grid](x, out, x.stride(0), out.stride(0), d, BLOCK=_BLOCK, INTERLEAVE=interleave, num_warps=4,
                               **pdl_launch(x.device))
    return out
