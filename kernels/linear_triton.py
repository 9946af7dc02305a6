"""Triton matmul for few rows (decode batches): ``out = x @ weight.T``, streaming the weight once.

At decode batch sizes a linear layer is a pass over its weight: the bytes of
``weight`` over memory bandwidth is the whole cost. cuBLAS picks split-K
kernels for these shapes, which add a reduction launch and reach ~92 % of the
H100's copy bandwidth (docs/PERFORMANCE.md). This kernel gives each program
``BLOCK_N`` output columns and walks the whole of ``K`` with software
pipelined loads, so every weight byte is read exactly once, by one program,
with no reduction pass (narrow weights, with fewer column tiles than half
the SMs, split K instead: ``SkinnyTuning.split_k``). Rows are padded to the matrix instructions' 16 in
registers only (nothing padded is loaded or stored).

Fusing the MLP's SiLU-and-multiply into the down projection's operand load
was tried and measured 2.6x slower over a decode step's matmuls (the
elementwise work in the K loop breaks the load pipelining), so the
activation stays its own small kernel. Folding the RMSNorms in (each norm's
scale moved into the next matmul's columns, the residual add and the rows'
sums of squares in the output projection's epilogue, 1/rms applied to the
next matmul's output) removed 64 norm launches per step but made each fused
matmul 0.5-4 % slower; with programmatic dependent launch the norm kernels
already cost almost nothing, so over 32 decode layers the folded chain was
1.7 % slower at 1 row (5.13 against 5.05 ms; 1.5 % faster without PDL) and
the whole batch-1 step 3 % slower: reverted (H100, one run each).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.backend import num_sms, pdl_launch, require, require_device
from kernels.pdl_triton import pdl_prologue

MAX_ROWS = 16
"""Rows (tokens) one launch serves; larger batches go to cuBLAS, which is compute-efficient there."""


@dataclass(frozen=True)
class SkinnyTuning:
    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 4
    split_k: int = 1
    """Programs along K per output tile. >1 for weights with few output columns,
    whose tiles alone would leave SMs idle; partial sums meet in a workspace and
    the last program of a tile adds them in a fixed order (bit-reproducible)."""


@triton.jit
def _load_operands(x_ptrs, w_ptrs, k0, k, k_end, m_mask, n_mask, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    """The (x, weight) tiles at K offset ``k0``: masked where K or N run out."""
    if EVEN_K:
        x_mask = m_mask
        w_mask = n_mask
    else:
        k_in = (k0 + k)[None, :] < k_end
        x_mask = m_mask & k_in
        w_mask = n_mask & k_in
    if EVEN_N and EVEN_K:
        w = tl.load(w_ptrs)
    else:
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
    return x_mask, w


@triton.jit
def _skinny_matmul_kernel(
    x_ptr, w_ptr, out_ptr, ws_ptr, lock_ptr,
    M, N, K, K_PER_SPLIT, x_stride, w_stride, out_stride,
    EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    k = tl.arange(0, BLOCK_K)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    w_ptrs = w_ptr + n[:, None].to(tl.int64) * w_stride + k_start + k[None, :]
    x_ptrs = x_ptr + m[:, None] * x_stride + k_start + k[None, :]
    m_mask = m[:, None] < M
    n_mask = n[:, None] < N
    # The first weight tile is loaded before waiting for the previous kernel (weights
    # are never written during a step), so with PDL the weight stream starts during
    # that kernel's tail; everything else comes after the wait.
    x_mask, w = _load_operands(x_ptrs, w_ptrs, k_start, k, k_end, m_mask, n_mask, EVEN_N, EVEN_K)
    pdl_prologue(USE_PDL)
    x = tl.load(x_ptrs, mask=x_mask, other=0.0)
    acc = tl.dot(x, tl.trans(w), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32))
    for k0 in range(k_start + BLOCK_K, k_end, BLOCK_K):
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        x_mask, w = _load_operands(x_ptrs, w_ptrs, k0, k, k_end, m_mask, n_mask, EVEN_N, EVEN_K)
        x = tl.load(x_ptrs, mask=x_mask, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    out = out_ptr + m[:, None] * out_stride + n[None, :]
    out_mask = m_mask & (n[None, :] < N)
    if SPLIT_K == 1:
        if ACCUMULATE:  # out += x @ w.T: the residual stream, added in float32 before one rounding
            acc += tl.load(out, mask=out_mask, other=0.0).to(tl.float32)
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tile = m[:, None] * N + n[None, :]
        tl.store(ws_ptr + pid_k * BLOCK_M * N + tile, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is written before the release below
        arrived = tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # the last program of this tile: add the partials in split order
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if ACCUMULATE:
                total += tl.load(out, mask=out_mask, other=0.0).to(tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(ws_ptr + s * BLOCK_M * N + tile, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(out, total.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(lock_ptr + pid_n, 0)  # ready for the next launch


_WORKSPACE_ELEMS = 8 << 20  # float32 partials: 32 MiB per device
_LOCKS = 1 << 14
_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K partials and per-tile arrival counters, one pair per device, allocated on
    first use (before any CUDA-graph capture: graphs warm up eagerly first). Launches on
    one stream never overlap, and each leaves its counters at zero. Shared by every launch
    on the device, so split-K launches must not run concurrently on two streams (the
    engine runs one stream per device; give each stream its own pair before using more)."""
    if device not in _workspaces:
        _workspaces[device] = (torch.empty(_WORKSPACE_ELEMS, dtype=torch.float32, device=device),
                               torch.zeros(_LOCKS, dtype=torch.int32, device=device))
    return _workspaces[device]


@functools.lru_cache(maxsize=None)
def default_tuning(n: int, k: int, sms: int = 132) -> SkinnyTuning:
    """Launch parameters by weight shape ``[n, k]``, from the in-graph sweep of
    benchmarks/gpu_linear.py on an H100 at Llama-3-8B shapes (the winners there
    were 2-10 % ahead of the runner-up; split-K never won at those shapes).

    Weights with fewer output tiles than half the ``sms`` split K so that every
    SM streams some of the weight (small models: SmolLM2's 576-wide layers
    have 18 tiles)."""
    if k >= 8192 or n >= 65536:  # long rows (MLP down) or a vocabulary
        t = SkinnyTuning(32, 256, 4, 6)
    elif n >= 16384:  # fused gate/up
        t = SkinnyTuning(32, 128, 4, 3)
    elif n <= 4096:  # o_proj
        t = SkinnyTuning(32, 128, 4, 6)
    else:  # fused qkv
        t = SkinnyTuning(64, 128, 4, 6)
    tiles = -(-n // t.block_n)
    if tiles < sms // 2:
        split = min(8, sms // tiles, max(1, k // (4 * t.block_k)))
        t = SkinnyTuning(t.block_n, t.block_k, t.num_warps, t.num_stages, max(1, split))
    return t


def skinny_matmul_triton(
    x: torch.Tensor, weight: torch.Tensor, tuning: SkinnyTuning | None = None, out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """``x`` ``[M, K]``, ``M <= MAX_ROWS``, unit inner stride;
    ``weight`` ``[N, K]`` contiguous rows. Returns ``[M, N]`` in ``x``'s dtype (``out``, a
    contiguous ``[M, N]`` tensor, if given; with ``accumulate``, ``out += x @ weight.T``,
    the sum taken in float32 and rounded once)."""
    require(x.dim() == 2 and weight.dim() == 2, f"x and weight must be 2-D, got {tuple(x.shape)}, {tuple(weight.shape)}")
    m = x.shape[0]
    n, k = weight.shape
    require(x.shape[1] == k, f"x has {x.shape[1]} columns, weight {tuple(weight.shape)} needs {k}")
    require(k > 0 and n > 0, f"weight must have rows and columns, got {tuple(weight.shape)}")
    require(m <= MAX_ROWS, f"x has {m} rows; this kernel serves at most {MAX_ROWS}")
    require(x.stride(1) == 1 and weight.stride(1) == 1, f"x and weight need unit inner stride, got {x.stride()}, {weight.stride()}")
    require(x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16),
            f"x and weight must share a 16-bit float dtype, got {x.dtype} and {weight.dtype}")
    require_device(x, weight)
    require(out is not None or not accumulate, "accumulate needs out")
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    require(out.shape == (m, n) and out.dtype == x.dtype and out.is_contiguous() and out.device == x.device,
            f"out must be a contiguous [{m}, {n}] {x.dtype} tensor on {x.device}, got {tuple(out.shape)} {out.dtype}")
    if m == 0:
        return out
    t = tuning or default_tuning(n, k, num_sms(x.device))
    tiles = triton.cdiv(n, t.block_n)
    split = max(1, min(t.split_k, triton.cdiv(k, t.block_k)))
    k_per_split = triton.cdiv(triton.cdiv(k, split), t.block_k) * t.block_k
    split = triton.cdiv(k, k_per_split)
    ws = locks = out  # unused unless split
    if split > 1:
        ws, locks = _workspace(x.device)
        require(split * MAX_ROWS * n <= ws.numel() and tiles <= locks.numel(),
                f"split_k={split} for a weight of {n} rows exceeds the split-K workspace")
    _skinny_matmul_kernel[(tiles, split)](
        x, weight, out, ws, locks, m, n, k, k_per_split, x.stride(0), weight.stride(0), out.stride(0),
        EVEN_N=n % t.block_n == 0, EVEN_K=k % k_per_split == 0 and k_per_split % t.block_k == 0, SPLIT_K=split,
        BLOCK_M=MAX_ROWS, BLOCK_N=t.block_n, BLOCK_K=t.block_k, num_warps=t.num_warps, num_stages=t.num_stages,
        ACCUMULATE=accumulate, **pdl_launch(x.device),
    )
    return out
