"""SiLU-and-multiply, the gate of Llama's MLP: ``silu(gate) * up``.

The gate and up projections run as one matmul over one ``[2I, K]`` weight, its rows
either ``[gate; up]`` (``interleave`` 0, the checkpoint's order) or in runs of
``interleave`` rows, gate and up alternating (``interleave_gate_up``). The
interleaved order lets one output tile of a matmul hold matching gate and up
columns, so ``gate_up_silu`` can run the matmul and the gate as one kernel on CUDA
(``gate_up_silu_triton.py``) and never write the ``2I``-wide product: at 8,192 rows of a
Llama-3-8B layer that product is 470 MB written and read back per layer. Every other
case runs the matmul (``linear``), then ``silu_and_mul``, which reads the product once.
A tensor-parallel shard of an interleaved weight must be whole pairs of runs (a contiguous
range of ``2 * interleave`` rows), so that each shard's gate and up columns still match.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backend import HAS_TRITON, use_triton
from kernels.linear import linear

if HAS_TRITON:
    from kernels.activation_triton import silu_and_mul_triton
    from kernels.gate_up_silu_triton import fused_for_rows, fused_gate_up_supported, gate_up_silu_triton


def _halves(x: torch.Tensor, interleave: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not interleave:
        d = x.shape[-1] // 2
        return x[..., :d], x[..., d:]
    runs = x.unflatten(-1, (-1, 2, interleave))
    return runs[..., 0, :].flatten(-2), runs[..., 1, :].flatten(-2)


def silu_and_mul_ref(x: torch.Tensor, interleave: int = 0) -> torch.Tensor:
    gate, up = _halves(x, interleave)
    return F.silu(gate) * up


def silu_and_mul(x: torch.Tensor, interleave: int = 0) -> torch.Tensor:
    """``x`` ``[..., 2I]`` in the layout ``interleave`` names -> ``[..., I]``."""
    if use_triton(x) and x.dim() == 2:
        return silu_and_mul_triton(x, interleave)
    return silu_and_mul_ref(x, interleave)


def interleave_gate_up(weight: torch.Tensor, interleave: int) -> torch.Tensor:
    """A ``[gate; up]`` weight (rows) reordered in runs of ``interleave`` rows: gate
    ``0..n-1``, up ``0..n-1``, gate ``n..2n-1``, ... (a new tensor)."""
    inter, k = weight.shape[0] // 2, weight.shape[1]
    if inter % interleave:
        raise ValueError(f"interleave must divide the intermediate size {inter}, got {interleave}")
    runs = torch.stack([weight[:inter].view(-1, interleave, k), weight[inter:].view(-1, interleave, k)], 1)
    return runs.reshape(weight.shape).contiguous()


def gate_up_silu_ref(x: torch.Tensor, weight: torch.Tensor, interleave: int = 0) -> torch.Tensor:
    return silu_and_mul_ref(F.linear(x, weight), interleave)


def gate_up_silu(x: torch.Tensor, weight: torch.Tensor, interleave: int = 0, fused: bool = True) -> torch.Tensor:
    """``silu(x @ W_gate.T) * (x @ W_up.T)`` for the gate/up ``weight`` in the layout
    ``interleave`` names: with ``fused``, one kernel for CUDA batches ``fused_for_rows`` admits
    over a weight interleaved as it expects; else the matmul and ``silu_and_mul``."""
    if (fused and interleave and use_triton(x) and x.dim() == 2 and fused_for_rows(x.shape[0])
            and fused_gate_up_supported(x, weight, interleave)):
        return gate_up_silu_triton(x, weight)
    return silu_and_mul(linear(x, weight), interleave)
