"""Triton RMSNorm, optionally fused with the residual add before it (one pass).

Matches ``rmsnorm.py``'s reference rounding: the sum ``x + residual`` is
rounded to the activation dtype (it is the next residual) before it is
normalised in float32; the result is rounded once at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import next_pow2, pdl_launch, require, require_device
from kernels.pdl_triton import pdl_prologue
from kernels.rounding_triton import round_like


@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr,
    x_stride, r_stride, out_stride, sum_stride,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * r_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x = round_like(x + r, sum_ptr)
        tl.store(sum_ptr + row * sum_stride + cols, x.to(sum_ptr.dtype.element_ty), mask=mask)
    var = tl.sum(x * x, axis=0) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``x``: ``[T, N]`` with unit stride along N; ``weight``: ``[N]``.

    Without ``residual`` returns ``rms_norm(x)``; with it returns
    ``(rms_norm(x + residual), x + residual)`` like ``add_rms_norm_ref``.
    """
    require(x.dim() == 2, f"x must be [tokens, hidden], got shape {tuple(x.shape)}")
    n = x.shape[1]
    require(x.stride(1) == 1, f"x must have unit stride along hidden, got strides {x.stride()}")
    require(weight.shape == (n,) and weight.is_contiguous(), f"weight must be contiguous [{n}], got {tuple(weight.shape)}")
    require(x.dtype in (torch.float32, torch.bfloat16, torch.float16), f"unsupported dtype {x.dtype}")
    require_device(x, weight)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    block = next_pow2(n)
    warps = 8 if block >= 4096 else 4
    if residual is None:
        _rms_norm_kernel[(x.shape[0],)](
            x, x, weight, out, out, x.stride(0), 0, out.stride(0), 0, n, eps,
            HAS_RESIDUAL=False, BLOCK=block, num_warps=warps, **pdl_launch(x.device),
        )
        return out
    require(residual.shape == x.shape and residual.dtype == x.dtype,
            f"residual must match x ({tuple(x.shape)}, {x.dtype}), got {tuple(residual.shape)}, {residual.dtype}")
    require(residual.stride(1) == 1, f"residual must have unit stride along hidden, got strides {residual.stride()}")
    require_device(x, residual)
    summed = torch.empty_like(out)
    _rms_norm_kernel[(x.shape[0],)](
        x, residual, weight, out, summed, x.stride(0), residual.stride(0), out.stride(0), summed.stride(0), n, eps,
        HAS_RESIDUAL=True, BLOCK=block, num_warps=warps, **pdl_launch(x.device),
    )
    return out, summed
