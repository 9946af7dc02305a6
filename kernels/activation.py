"""SiLU-and-multiply, the gate of Llama's MLP: ``silu(x[..., :d]) * x[..., d:]``.

The gate and up projections run as one matmul whose output is split here, so
the fused kernel reads the intermediate activation once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backend import HAS_TRITON, use_triton

if HAS_TRITON:
    from kernels.activation_triton import silu_and_mul_triton


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if use_triton(x) and x.dim() == 2:
        return silu_and_mul_triton(x)
    return silu_and_mul_ref(x)
