"""SiLU-and-multiply, the gate of Llama's MLP: ``silu(x[..., :d]) * x[..., d:]``.

The gate and up projections run as one matmul whose output is split here, so
the fused kernel reads the intermediate activation once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


silu_and_mul = silu_and_mul_ref
