"""Triton gate/up matmul with the SiLU gate in its epilogue: ``silu(x @ Wg.T) * (x @ Wu.T)`` in one kernel.

At prefill sizes the engine's MLP ran the gate/up matmul (cuBLAS), which writes a
``[T, 2I]`` product, then ``silu_and_mul``, which reads it back and writes ``[T, I]``:
at 8,192 rows of a Llama-3-8B layer 705 MB of traffic and ~0.2 ms a layer, 7.6 ms of a
mixed step. cuBLAS has no gated epilogue. Here the weight's rows are interleaved in runs
of ``FUSED_HALF`` (``activation.interleave_gate_up``), so the left half of each
``BLOCK_M x 2*FUSED_HALF`` output tile is gate and the right half the matching up
columns: one accumulator, an ordinary matmul main loop (TMA loads, wgmma), and an
epilogue that writes only the gated ``BLOCK_M x FUSED_HALF`` tile. Persistent programs,
one an SM, walk the output tiles in groups of ``GROUP_M`` row tiles, so a weight tile
is read from DRAM about once per group.

Measured on an H100 (``benchmarks/gpu_mlp_fusions.py --only gate_up_il``, µs a layer,
Llama-3-8B gate/up): 8,192 rows 2,696.8 against cuBLAS + ``silu_and_mul`` 2,856.1 /
2,884.0 (before / after; cuBLAS's matmul alone 2,671.7); 2,048 rows 683.8 against
709.3 / 805.7. Warp specialisation, 128-wide tiles (runs of 64) and 256-row tiles were
no better. Decode batches of 128-256 rows gain as well, with their own tunings
(``tuning_for_rows``; ``FUSED_MIN_ROWS`` has the figures): there the kernel saves the
``silu_and_mul`` launch and its pass, and a deeper pipeline than cuBLAS's keeps the weight
stream going. Between 257 and ~768 rows cuBLAS + ``silu_and_mul`` is faster (with the
algorithm ``linear_tuning`` keeps, by 1-16 % in two H100 runs; with ``F.linear``'s pick
where it picks well), except where cuBLAS's heuristic picks badly (448 rows: ``F.linear``
+ ``silu_and_mul`` 314 µs, this kernel 182-191). The kernel still takes those
batches: a mixed step's row count is arbitrary, and ``linear_tuning`` times only the decode
graphs' sizes. An earlier form with two accumulators (gate and up weight tiles loaded
separately) was ~20 % behind cuBLAS (docs/PERFORMANCE.md).

Rounds as the two-pass form does: both products to the activation dtype, then
``silu(gate)``, then the product.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.activation_triton import gated
from kernels.backend import num_sms, require, require_device
from kernels.rounding_triton import round_to

FUSED_HALF = 128
"""Rows of a run of the interleaved weight: half the output tile's columns."""
FUSED_MIN_ROWS = 128
"""Batches of at least this many rows take the fused kernel. Measured on an H100
(``benchmarks/gpu_mlp_fusions.py --only gate_up_il --rows 256,192,128,64``, µs a Llama-3-8B
layer, cuBLAS + ``silu_and_mul`` against the fused kernel at ``tuning_for_rows``): 256 rows
110.8 / 111.4 against 103.8, 192 rows 102.1 / 102.5 against 99.0, 128 rows 95.0 / 94.7
against 88.7; at 64 rows 90.6 / 90.8 against 89.3-92.6, no gain, so smaller decode
batches keep the matmul ``linear_tuning`` timed for them and ``silu_and_mul``. A batch that
cannot take it (an unaligned view) would need the ``[T, 2I]`` product the KV budget's
activation profile no longer counts: the engine's own activations never are."""
_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class GateUpTuning:
    """Launch parameters (``benchmarks/gpu_mlp_fusions.py --only gate_up_il`` sweeps them);
    the tile is ``block_m x 2 * FUSED_HALF``."""

    block_m: int = 128
    block_k: int = 64
    num_stages: int = 3
    num_warps: int = 8
    group_m: int = 8
    """Row tiles a program group walks per weight tile."""


DEFAULT_TUNING = GateUpTuning()
"""Prefill-sized batches (over 1,536 rows): 2,048-16,384 rows measured (module docstring)."""
_SMALL_TUNING = GateUpTuning(block_m=64, num_warps=4, num_stages=5)
"""Up to 192 rows: one warpgroup's 64-row tiles, five stages (µs a Llama-3-8B layer: 99.0
against the prefill tuning's 110.0 at 192 rows, 88.7 against 92.3 at 128)."""
_MID_TUNING = GateUpTuning(num_stages=4)
"""193-1,536 rows: few row tiles, so each program streams weight tiles with little compute
between them; a deeper pipeline keeps more loads in flight. µs a Llama-3-8B layer against
the prefill tuning (``benchmarks/gpu_mlp_fusions.py --only gate_up_il``, H100): 103.8 against
111.5 at 256 rows (session 16); in session 17's call 7 101.7 / 110.0 at 208, 103.4 / 112.3 at
256, 138.8 / 143.4 at 272, 149.0 / 156.2 at 384, 195.0 / 200.6 at 512, 234.5 / 246.4 at 640,
283.6 / 290.0 at 768, 346.7 / 347.6 at 1,024 and 534.5 / 549.5 at 1,536 (at 448 190.8 / 182.0);
at 2,048 the prefill tuning wins, 665.6 against 730.1. Calls 6 and 8 mostly agreed (4 stages
behind only at 272 rows in call 6, tied at 1,024 in all three; docs/PERFORMANCE.md, session
17); the band ends at 1,536, the largest count measured twice with 4 stages ahead. These
batches are mixed steps of a few short prompts, and decode graphs of ``max_num_seqs`` over
256."""
_TUNINGS_BY_ROWS = ((192, _SMALL_TUNING), (1536, _MID_TUNING))
"""(most rows, tuning), ascending; larger batches take ``DEFAULT_TUNING``."""


def fused_for_rows(rows: int) -> bool:
    """Whether a batch of ``rows`` takes the fused kernel (where its weight and operands can):
    the one rule the MLP's dispatch and the start-up matmul tuning (which leaves these sizes
    untimed) both follow."""
    return rows >= FUSED_MIN_ROWS


def tuning_for_rows(rows: int) -> GateUpTuning:
    """The launch parameters for a batch of ``rows``."""
    return next((tuning for most, tuning in _TUNINGS_BY_ROWS if rows <= most), DEFAULT_TUNING)


def rows_per_tuning(largest: int | None = None) -> list[int]:
    """One batch size for each tuning a fused batch can take (of at most ``largest`` rows, if
    given): what start-up runs so that no step waits for Triton's compiler, and no more. For
    one model on one device each tuning is exactly one compiled variant (neither the row count
    nor the program count is specialised on)."""
    rows = [FUSED_MIN_ROWS] + [most + 1 for most, _ in _TUNINGS_BY_ROWS]
    return [n for n in rows if largest is None or n <= largest]


@triton.jit(do_not_specialize=["M"])  # one compile for every row count: no compile in the middle of a run
def _gate_up_silu_kernel(x_desc, w_desc, out_desc, M, N2, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # the program count is read at run time, not passed as a constant: with fewer tiles than SMs
    # (a small model's decode batch) it follows the row count, and a constant would make a
    # compiled variant of its own for each such count, compiled in the middle of serving
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N2, BLOCK_N)
    per_group = GROUP_M * num_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0), flatten=True):
        first_m = (tile // per_group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        m0 = (first_m + (tile % per_group) % size_m) * BLOCK_M
        n0 = ((tile % per_group) // size_m) * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for kk in range(k_tiles):
            acc = tl.dot(x_desc.load([m0, kk * BLOCK_K]), w_desc.load([n0, kk * BLOCK_K]).T, acc)
        # [BLOCK_M, BLOCK_N] -> [BLOCK_M, 2, BLOCK_N / 2]: index 0 the tile's left (gate) half
        halves = tl.reshape(round_to(acc, out_desc.dtype), [BLOCK_M, 2, BLOCK_N // 2])
        gate, up = tl.split(tl.permute(halves, (0, 2, 1)))
        out_desc.store([m0, n0 // 2], gated(gate, up, out_desc.dtype).to(out_desc.dtype))


def fused_gate_up_fits(hidden: int, intermediate: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a model's gate/up weight (``[2 * intermediate, hidden]``) can take the kernel:
    16-bit, rows of whole runs of ``FUSED_HALF``, 16-byte rows (TMA), on a CUDA GPU with TMA
    (sm_90+). The runner interleaves the weight only then."""
    return (dtype in _DTYPES and intermediate % FUSED_HALF == 0 and (hidden * dtype.itemsize) % 16 == 0
            and device.type == "cuda" and _has_tma(device.index))


def fused_gate_up_supported(x: torch.Tensor, weight: torch.Tensor, interleave: int) -> bool:
    """Whether ``gate_up_silu_triton`` takes these operands: a weight that fits
    (``fused_gate_up_fits``) interleaved in runs of ``FUSED_HALF``, ``x`` of its dtype and
    width, both contiguous and 16-byte aligned (TMA)."""
    return (interleave == FUSED_HALF and x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1]
            and weight.dtype == x.dtype and x.device == weight.device and x.is_contiguous() and weight.is_contiguous()
            and x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0
            and fused_gate_up_fits(weight.shape[1], weight.shape[0] // 2, weight.dtype, weight.device))


@functools.lru_cache(maxsize=None)
def _has_tma(device_index: int | None) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def gate_up_silu_triton(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None,
                        tuning: GateUpTuning | None = None) -> torch.Tensor:
    """``x`` ``[T, K]``, ``weight`` ``[2I, K]`` interleaved in runs of ``FUSED_HALF`` ->
    ``[T, I]`` (into ``out`` if given), launched with ``tuning`` (by default
    ``tuning_for_rows(T)``)."""
    require(fused_gate_up_supported(x, weight, FUSED_HALF),
            f"x {tuple(x.shape)} {x.dtype} and weight {tuple(weight.shape)} {weight.dtype}: need 16-bit, contiguous, "
            f"16-byte aligned operands with equal K, weight rows a multiple of {2 * FUSED_HALF}, and sm_90+")
    require_device(x, weight)
    m, k = x.shape
    inter = weight.shape[0] // 2
    if out is None:
        out = torch.empty((m, inter), dtype=x.dtype, device=x.device)
    require(out.shape == (m, inter) and out.dtype == x.dtype and out.is_contiguous() and out.data_ptr() % 16 == 0,
            f"out must be a contiguous, 16-byte aligned [{m}, {inter}] {x.dtype} tensor, "
            f"got {tuple(out.shape)} {out.dtype}")
    if m == 0:
        return out
    t, block_n = tuning or tuning_for_rows(m), 2 * FUSED_HALF
    programs = min(num_sms(x.device), triton.cdiv(m, t.block_m) * (weight.shape[0] // block_n))
    _gate_up_silu_kernel[(programs,)](
        TensorDescriptor.from_tensor(x, [t.block_m, t.block_k]),
        TensorDescriptor.from_tensor(weight, [block_n, t.block_k]),
        TensorDescriptor.from_tensor(out, [t.block_m, FUSED_HALF]), m, weight.shape[0], k,
        BLOCK_M=t.block_m, BLOCK_N=block_n, BLOCK_K=t.block_k, GROUP_M=t.group_m, num_warps=t.num_warps,
        num_stages=t.num_stages,
    )
    return out
