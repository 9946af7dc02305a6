"""Triton causal attention of cache-free prompts over their own keys, read through TMA.

A prompt with no cached prefix attends only to the keys of its own rows in the
step, which the step has just computed: they are in memory, contiguous, in the
activation dtype. ``paged_prefill_triton`` reads them back from the paged cache
instead: a gather by block table per key tile and, over an fp8 cache, a
conversion of every tile before the dot products. This kernel reads them where
the step has them: the rotated queries and keys (``rotary_and_store``'s outputs)
and the values (a strided view of the fused qkv product), each through one TMA
tensor descriptor. Measured on an H100 (``benchmarks/gpu_prefill_dense.py``, a
16,384-token step's 27 prompts of 128-1,024 tokens, Llama-3-8B layer, session
18): 355.6 us against the paged kernel's 471.7 over an fp8 cache and 450.2 over
a bf16 one; PyTorch's FA2 589.5.

Grid ``(heads, sequences, query tiles)``, each sequence's last (longest) tile
first with ``heavy_first``; a flash-attention loop over key tiles, the tiles
wholly below the diagonal without the causal mask. Sequence ``i`` owns rows
``query_start[i] : query_start[i] + query_lens[i]`` of ``q``, ``k``, ``v`` and
``out``, anywhere in the step's flat batch: tiles reaching past its rows read
other sequences' rows (or TMA's zeros past the last row): their scores are
masked, their values zeroed (an overflowed value elsewhere in the step must not
turn a zero weight into NaN here) and their outputs never stored, so ``out``'s
other rows are left as they are (the decode and paged prefill kernels write
them).

An fp8 engine's prompts attend here to their own keys and values unquantized (decode steps
and later chunks read them back quantized), as vLLM's flash-attention prefill
does: logits move by about the cache's rounding against the all-paged path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.backend import require, require_device
from kernels.softmax_triton import online_softmax

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DenseTuning:
    """Launch parameters (``benchmarks/gpu_prefill_dense.py`` sweeps them)."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    heavy_first: bool = True
    """Launch each sequence's last (longest) query tile first."""
    warp_specialize: bool = False
    """Triton's warp specialisation of the key loop (loads in a producer warp group)."""
    pack_gqa: bool = False
    """A program serves all query heads of one KV head: its ``block_m`` rows are
    ``block_m / group`` positions x ``group`` heads (one 3-D TMA box), so each key tile is
    loaded once per group (as ``PrefillTuning.pack_gqa``)."""


DEFAULT_TUNING = DenseTuning()
"""64-row tiles, 4 warps, 3 stages, unpacked: the fastest of the script's 14 tunings at
the offline benchmark's mixed step (H100, session 18: 355.6 us a layer); 128 x 64 tiles
with 8 warps compile to 254 registers, 4-warp 128-row tiles spill (``--compile-sm90``)."""


SHARED_MEMORY_BYTES = 116 * 1024
"""Shared memory the engine's tuning needs: ``DEFAULT_TUNING`` compiles to 115,712 bytes at
head size 128 for sm_90 (3 stages of 64 x 128 bf16 K and V tiles and the query; some of
the benchmark's other tunings need more, ``gpu_prefill_dense.py --compile-sm90``)."""


DTYPES = (torch.float16, torch.bfloat16)


def head_dim_fits(dim: int) -> bool:
    """A head size the TMA boxes take: a power of two >= 16."""
    return dim >= 16 and dim & (dim - 1) == 0


def dense_prefill_supported(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """The kernel runs for this model here: 16-bit activations (``DTYPES``), a head size its
    descriptors take (``head_dim_fits``), and a GPU of sm_90 or newer (TMA) with the shared
    memory of a datacenter part for the tiles (an H100 or B200 grants 227 KiB a block; a
    consumer Blackwell, sm_120, ~99 KiB)."""
    if dtype not in DTYPES or not head_dim_fits(head_dim):
        return False
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (9, 0):
        return False
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin is None:  # a PyTorch without the field: the datacenter majors
        return props.major in (9, 10)
    return optin >= SHARED_MEMORY_BYTES


@triton.jit
def _attend_dense(q, m_i, l_i, acc, k_desc, v_desc, row0, kcol, n0, pos, hi, scale_log2,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    n = n0 + tl.arange(0, BLOCK_N)
    k = k_desc.load([row0 + n0, kcol])
    s = tl.dot(q, tl.trans(k)) * scale_log2
    if MASKED:
        s = tl.where((n[None, :] <= pos[:, None]) & (n[None, :] < hi), s, float("-inf"))
    m_new, alpha, p, l_i = online_softmax(s, m_i, l_i)
    v = v_desc.load([row0 + n0, kcol])
    if MASKED:  # rows past the prompt are other requests' (weight 0, but 0 * inf is NaN): zeroed
        v = tl.where((n < hi)[:, None], v, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _dense_prefill_kernel(q_desc, k_desc, v_desc, out_ptr, qs_ptr, ql_ptr, o_st, o_sh, scale_log2,
                          GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          HEAVY_FIRST: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, PACK_GQA: tl.constexpr):
    """Grid (heads, sequences, query tiles): query heads (a KV group's side by side, so each
    key tile comes from DRAM about once for the group), or KV heads with ``PACK_GQA``."""
    h = tl.program_id(0)
    b = tl.program_id(1)
    if HEAVY_FIRST:
        tile = tl.num_programs(2) - 1 - tl.program_id(2)
    else:
        tile = tl.program_id(2)
    if PACK_GQA:  # rows are (position, head) pairs of KV head h's group, position-major
        POSITIONS: tl.constexpr = BLOCK_M // GROUP
    else:
        POSITIONS: tl.constexpr = BLOCK_M
    length = tl.load(ql_ptr + b)
    if tile * POSITIONS >= length:
        return
    row0 = tl.load(qs_ptr + b)
    d = tl.arange(0, HEAD_DIM)
    r = tl.arange(0, BLOCK_M)
    if PACK_GQA:
        kcol = h * HEAD_DIM
        q = tl.reshape(q_desc.load([row0 + tile * POSITIONS, h * GROUP, 0]), [BLOCK_M, HEAD_DIM])
        pos = tile * POSITIONS + r // GROUP
        head = h * GROUP + r % GROUP
    else:
        kcol = (h // GROUP) * HEAD_DIM
        q = q_desc.load([row0 + tile * BLOCK_M, h * HEAD_DIM])
        pos = tile * BLOCK_M + r
        head = h + 0 * r
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    hi = tl.minimum(length, (tile + 1) * POSITIONS)  # keys the tile's last row sees
    full = tl.minimum((tile * POSITIONS + 1) // BLOCK_N * BLOCK_N, hi)  # keys every row sees
    for n0 in tl.range(0, full, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        m_i, l_i, acc = _attend_dense(q, m_i, l_i, acc, k_desc, v_desc, row0, kcol, n0, pos, hi, scale_log2,
                                      BLOCK_N, False)
    for n0 in range(full, hi, BLOCK_N):
        m_i, l_i, acc = _attend_dense(q, m_i, l_i, acc, k_desc, v_desc, row0, kcol, n0, pos, hi, scale_log2,
                                      BLOCK_N, True)
    out = acc / l_i[:, None]
    rows = (row0 + pos).to(tl.int64)
    tl.store(out_ptr + rows[:, None] * o_st + head[:, None] * o_sh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(pos < length)[:, None])


def _check_rows(name: str, x: torch.Tensor, tokens: int, heads: int, dim: int, dtype: torch.dtype) -> None:
    """A TMA descriptor's operand: ``[T, H, D]``, rows of heads side by side (D unit stride,
    heads D apart), 16-byte aligned start and row stride."""
    require(x.dim() == 3 and tuple(x.shape) == (tokens, heads, dim),
            f"{name} must be [{tokens}, {heads}, {dim}], got {tuple(x.shape)}")
    require(x.dtype == dtype, f"{name} must be {dtype} like q, got {x.dtype}")
    require(x.stride(2) == 1 and x.stride(1) == dim,
            f"{name} needs unit stride along head_dim and heads side by side, got strides {x.stride()}")
    size = x.element_size()
    require(x.data_ptr() % 16 == 0 and (x.stride(0) * size) % 16 == 0,
            f"{name} needs a 16-byte aligned start and row stride (TMA), got strides {x.stride()}")


def dense_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_start: torch.Tensor,
    query_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor,
    tuning: DenseTuning = DEFAULT_TUNING,
) -> torch.Tensor:
    """Causal attention of each of ``B`` sequences over its own rows.

    ``q``/``out`` ``[T, Hq, D]``, ``k``/``v`` ``[T, Hk, D]`` in float16/bfloat16, each
    row's heads side by side (strided rows are fine: ``v`` may be a view of the fused qkv
    product); ``query_start``/``query_lens`` ``[B]`` int32, ``query_lens[i] >= 1``;
    ``max_query_len`` bounds ``query_lens`` (it sizes the grid). Writes the sequences'
    rows of ``out`` only.
    """
    require(q.dim() == 3, f"q must be [T, Hq, D], got {tuple(q.shape)}")
    tokens, hq, dim = q.shape
    require(q.dtype in DTYPES, f"q must be float16 or bfloat16, got {q.dtype}")
    require(head_dim_fits(dim), f"head_dim must be a power of two >= 16, got {dim}")
    require(k.dim() == 3, f"k must be [T, Hk, D], got {tuple(k.shape)}")
    hk = k.shape[1]
    require(hk >= 1 and hq % hk == 0, f"query heads ({hq}) must be a multiple of KV heads ({hk})")
    for name, x, heads in (("q", q, hq), ("k", k, hk), ("v", v, hk)):
        _check_rows(name, x, tokens, heads, dim, q.dtype)
    require(out.shape == q.shape and out.dtype == q.dtype and out.stride(2) == 1,
            f"out must match q {tuple(q.shape)} {q.dtype} with unit stride along head_dim, "
            f"got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
    require(query_start.dim() == 1, f"query_start must be [B] int32, got {tuple(query_start.shape)}")
    batch = query_start.shape[0]
    for name, x in (("query_start", query_start), ("query_lens", query_lens)):
        require(x.dim() == 1 and x.shape[0] == batch and x.dtype == torch.int32 and (batch <= 1 or x.stride(0) == 1),
                f"{name} must be a contiguous [{batch}] int32 tensor, got {tuple(x.shape)} {x.dtype} "
                f"strides {x.stride()}")
    require(max_query_len >= 1, f"max_query_len must be >= 1, got {max_query_len}")
    require_device(q, k, v, query_start, query_lens, out)
    t, group = tuning, hq // hk
    if batch == 0 or tokens == 0:
        return out
    if t.pack_gqa:
        require(group & (group - 1) == 0 and t.block_m % group == 0,
                f"pack_gqa needs a power-of-two group dividing block_m, got {group} and {t.block_m}")
        q_desc = TensorDescriptor(q, list(q.shape), list(q.stride()), [t.block_m // group, group, dim])
        grid = (hk, batch, triton.cdiv(max_query_len, t.block_m // group))
    else:
        q_desc = TensorDescriptor(q, [tokens, hq * dim], [q.stride(0), 1], [t.block_m, dim])
        grid = (hq, batch, triton.cdiv(max_query_len, t.block_m))
    k_desc, v_desc = (TensorDescriptor(x, [tokens, hk * dim], [x.stride(0), 1], [t.block_n, dim]) for x in (k, v))
    _dense_prefill_kernel[grid](
        q_desc, k_desc, v_desc, out, query_start, query_lens, out.stride(0), out.stride(1), scale * _LOG2E,
        GROUP=group, HEAD_DIM=dim, BLOCK_M=t.block_m, BLOCK_N=t.block_n, HEAVY_FIRST=t.heavy_first,
        WARP_SPECIALIZE=t.warp_specialize, PACK_GQA=t.pack_gqa, num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return out
