"""RMSNorm, and RMSNorm fused with the residual add that precedes it.

The fused form saves one full read and write of the hidden state per layer on
the GPU; the reference below defines the exact semantics the kernel matches.
The Llama model no longer needs it on one GPU: its o and down projections add
into the residual stream themselves (``linear(accumulate=True)``), which saves
another read and write. The kernel (``rms_norm_triton(..., residual)``) stays,
tested against ``add_rms_norm_ref``, for an add no matmul can take (a
tensor-parallel all-reduce's output); no dispatcher until a caller needs one.
"""

from __future__ import annotations

import torch

from kernels.backend import HAS_TRITON, use_triton

if HAS_TRITON:
    from kernels.rmsnorm_triton import rms_norm_triton


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x) * weight``, computed in float32 and cast back to x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(rms_norm(x + residual), x + residual)``; the sum is the next residual."""
    summed = x + residual
    return rms_norm_ref(summed, weight, eps), summed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_triton(x):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_ref(x, weight, eps)
