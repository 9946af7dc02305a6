"""Linear layers, ``x @ weight.T``: the one place that picks the matmul for the model.

Decode steps of a few sequences are weight streams (every byte of the weight
read once per step, almost no arithmetic), and there the Triton skinny kernel
(``linear_triton.py``) beats cuBLAS: over a Llama-3-8B decode step's matmuls
on an H100, 5.42 against 5.63 ms at 1 row (benchmarks/gpu_linear.py). Larger
batches are compute-shaped and go to cuBLAS: through the cuBLASLt algorithm
``linear_tuning`` timed fastest for that exact shape where it found one (a full
decode batch, a full prefill step), else through ``F.linear``, as does every CPU
tensor (the reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import linear_tuning
from kernels.backend import HAS_TRITON, require, use_triton

if HAS_TRITON:
    from kernels.linear_triton import MAX_ROWS, skinny_matmul_triton
else:
    MAX_ROWS = 0

_SKINNY_DTYPES = (torch.bfloat16, torch.float16)


def linear(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None,
           accumulate: bool = False) -> torch.Tensor:
    """``x`` ``[T, K]``, ``weight`` ``[N, K]`` -> ``[T, N]``, written to ``out`` if given
    (contiguous ``[T, N]``, ``x``'s dtype: a CUDA graph's static output buffer).

    With ``accumulate``, ``out`` (required) becomes ``out + x @ weight.T``: the residual
    stream's add done by the matmul itself (its epilogue reads ``out`` once), so the
    RMSNorm after it reads one tensor and writes one instead of adding two and writing
    two; at a prefill step of 8,192 rows of a Llama-3-8B layer that is 134 of the
    norm's 268 MB.

    ``weight`` must not be written by a kernel of the same step: with programmatic
    dependent launch the skinny kernel reads its first weight tile before waiting for
    the previous kernel (``pdl_triton.py``); model weights are constant."""
    if (
        use_triton(x)
        and x.dim() == 2
        and 0 < x.shape[0] <= MAX_ROWS
        and x.dtype in _SKINNY_DTYPES
        and weight.dtype == x.dtype
        and x.stride(1) == 1
        and weight.is_contiguous()
    ):
        return skinny_matmul_triton(x, weight, out=out, accumulate=accumulate)  # which checks ``out`` itself
    require(out is not None or not accumulate, "accumulate needs out")
    if out is not None:  # torch.mm would resize a wrong one (with a warning) and write it anyway
        shape = (x.shape[0], weight.shape[0])
        require(out.shape == shape and out.dtype == x.dtype and out.is_contiguous() and out.device == x.device,
                f"out must be a contiguous {list(shape)} {x.dtype} tensor on {x.device}, "
                f"got {tuple(out.shape)} {out.dtype}")
    tuned = linear_tuning.lookup(x, weight, out) if x.is_cuda else None
    if tuned is not None:
        return linear_tuning.run(tuned, x, weight, out, accumulate)
    if accumulate:
        return out.addmm_(x, weight.t())
    if out is not None:
        return torch.mm(x, weight.t(), out=out)
    return F.linear(x, weight)
