"""Triton decode attention over the paged KV cache: one query token per sequence.

Grid ``(sequences, kv_heads, splits)``. A program serves all query heads of
one KV head (grouped-query attention reads each K/V tile once for the whole
group, the group padded to 16 rows for the tensor cores) over one slice of
the context. The context is cut into ``num_splits`` equal slices at run time
(``ceil(ctx / splits)`` rounded up to a tile), so a short batch of long
sequences still fills the card. With more than one split, each program writes
its slice's partial softmax state and counts itself in; the last of a
(sequence, KV head) to arrive merges the partials in split order (results do
not depend on arrival order) and resets the counter. No second kernel: at
batch 1 a merge launch per layer cost ~2.4 us plus a launch gap.
``num_splits`` depends only on the batch shape, never on the data, so the
launch can be captured in a CUDA graph.

An fp8 (e4m3) cache (``kv_quant.py``; a compile-time branch, so 16/32-bit
caches run the same code as before) is converted tile by tile to the dot
products' dtype, float16 for 16-bit queries (``kv_quant_triton.py`` says why),
which is exact; V is loaded as int32 words and converted in registers
(``fp8_words_to_f16`` says why), and the scale is applied outside the dot products:
``q.(s k) = s (q.k)`` joins the softmax scale, ``p.(s v) = s (p.v)`` the final
normalisation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.backend import check_paged_inputs, next_pow2, num_sms, pdl_launch, require, require_device
from kernels.kv_quant import is_fp8
from kernels.kv_quant_triton import dot_query, fp8_words_to_f16
from kernels.pdl_triton import pdl_prologue
from kernels.softmax_triton import online_softmax

MAX_SPLITS = 32
_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeTuning:
    """Launch parameters of the decode kernel (``benchmarks/gpu_kernels.py`` sweeps them)."""

    block_n: int = 64
    """Keys per loop iteration."""
    num_warps: int = 4
    num_stages: int = 2
    waves: int = 2
    """Splits are chosen so that about this many waves of programs fill the card."""
    heads_inner: bool = True
    """Launch a sequence's KV heads next to each other (grid ``(heads, batch, splits)``):
    programs running together read neighbouring bytes of the same cache blocks."""


_FLAGS = {"h": ("heads_inner", True)}


def parse_decode_tuning(text: str, base: DecodeTuning) -> DecodeTuning:
    """``BLOCK_N/WARPS/STAGES[+FLAG...]``, e.g. ``32/2/2`` or ``64/4/2+h``: ``base`` with
    those (flag ``h``: heads_inner; without it, off). The benchmarks' way of naming a tuning
    on the command line; ``format_decode_tuning`` writes it."""
    numbers, *flags = text.split("+")
    try:
        block_n, warps, stages = (int(x) for x in numbers.split("/"))
    except ValueError:
        raise ValueError(f"decode tuning {text!r}: expected BLOCK_N/WARPS/STAGES[+FLAG...], e.g. 64/4/2 or 32/2/2+h") from None
    unknown = [f for f in flags if f not in _FLAGS]
    if unknown:
        raise ValueError(f"decode tuning {text!r}: unknown flag(s) {unknown}; allowed: {sorted(_FLAGS)}")
    if block_n < 16 or block_n & (block_n - 1) or warps < 1 or warps & (warps - 1) or stages < 1:
        raise ValueError(f"decode tuning {text!r}: BLOCK_N must be a power of two >= 16, WARPS a power of two, "
                         "STAGES >= 1")
    tuning = dataclasses.replace(base, block_n=block_n, num_warps=warps, num_stages=stages,
                                 **{name: False for name, _ in _FLAGS.values()})
    return dataclasses.replace(tuning, **dict(_FLAGS[f] for f in flags))


def format_decode_tuning(tuning: DecodeTuning) -> str:
    """``tuning`` as ``parse_decode_tuning`` reads it (``waves`` left out)."""
    text = f"{tuning.block_n}/{tuning.num_warps}/{tuning.num_stages}"
    return text + "".join(f"+{flag}" for flag, (name, value) in _FLAGS.items() if getattr(tuning, name) == value)


DEFAULT_TUNING = DecodeTuning()
"""The tuning of a 16-bit cache below 48 and from 112 sequences (``HALF_TUNINGS``), of an fp8
cache for one sequence (``FP8_TUNINGS``) and of a 32-bit cache at every batch size.

Measured as the engine runs the kernel (``gpu_kernels.py --only decode_graph``: 32 layers'
launches in one CUDA graph, tunings replayed in turn; H100, Llama-3-8B layer, 32/8 heads,
d 128, 16-token blocks), us a layer. KV heads innermost in the grid (``heads_inner``; the
eight programs of a sequence run side by side and read neighbouring bytes of the same cache
blocks), 64/4/2 without -> with, fp8: 256 sequences x 256-1152 tokens 158.7 -> 148.5,
256 x 700 152.1 -> 151.5, 192 x 700 115.4 -> 115.3, 128 x 256-1152 97.2 -> 81.1, 64 x 2048
108.2 -> 108.3, 16 x 1024 27.1 -> 26.9; bf16 251.5 -> 243.9, 252.0 -> 248.5, 191.1 -> 190.3,
138.0 -> 131.1, 198.4 -> 198.1, 31.7 -> 31.5.

Small programs (32/2/2+h: 8 an SM) win at 256 x 256-1152 (138.9) and 256 x 700 (143.4) but
lose at 192 x 700 (131.6), 128 x 256-1152 (106.8), 64 x 2048 (133.5) and 16 x 1024 (32.1):
an fp8 cache takes one-warp programs at large batches only (``FP8_TUNINGS``). Measured and not
kept: the block table or fp8 V read a tile ahead (more registers, fewer programs an SM; V
ahead takes K off ``cp.async``); register caps (sessions 10 and 13: a one-warp program
capped at 168 registers fits 3 warps a scheduler quarter instead of 2, yet 143.8 against
139.7 us at 256 sequences)."""

FP8_TUNINGS: tuple[tuple[int, DecodeTuning], ...] = (
    (176, DecodeTuning(block_n=32, num_warps=1, num_stages=5)),
    (136, DecodeTuning(block_n=64, num_warps=2, num_stages=2)),
    (2, DecodeTuning(block_n=64, num_warps=2, num_stages=5)),
    (0, DEFAULT_TUNING),
)
"""An fp8 cache's tuning by batch size: ``(least batch, tuning)``, the first that the batch
reaches (``decode_tuning``). At full batches one-warp programs win: no softmax reduction
or probability tile crosses warps, and the many small programs an SM keep enough loads in
flight; below ~170 sequences too few of them are launched to fill the card.

Five stages (session 18): the K/V loads' addresses come from the block table, loaded in the
same loop, and Triton's pipeliner splits the loop's ``num_stages - 1`` iterations of lead
between the two levels of loads, so with 2-4 stages K and V are issued one iteration ahead
into a single buffer, at the end of the previous iteration, and waited for at the top of the
next: no load overlaps the tile's arithmetic (``benchmarks/decode_sass.py``: one 4 KiB buffer
each for K and V, ``DEPBAR.LE SB0, 0x0`` at the loop's head). From five stages each is issued
two tiles ahead into two buffers (``DEPBAR.LE SB0, 0x3``; 28.9 against 20.5 KiB of shared
memory, 7 programs an SM instead of 8). Measured as the engine runs the kernel
(``gpu_kernels.py --only decode_graph --heads-major``, H100, Llama-3-8B layer, contexts
uniform in 128-1280 unless given; three calls, a figure per call), us a layer, the old table
-> this one: 256 sequences 136.0 / 135.3 -> 133.8 / 133.2 (32/1/2+h -> 32/1/5+h), 224 129.8
-> 125.5, 192 112.8 -> 108.1, 176 110.4 -> 95.2; 144 and 160 keep 64/2/2+h (84.1 against
85.1 for 64/2/5+h; 90.4 against 94.1); 64/2/2+h -> 64/2/5+h at 128 76.9 -> 75.4, 120 73.9 ->
69.4, 112 74.5 -> 67.7; 64/4/2+h -> 64/2/5+h at 104 64.5 -> 59.6, 96 63.5 -> 58.0, 64 x 640
38.4 / 38.3 -> 36.8 / 36.8, 56 x 1024 55.1 -> 49.1, 32 x 1024 39.7 -> 32.3, 16 x 1024 25.7 /
25.7 -> 21.4 / 21.5, 8 x 1024 16.6 -> 14.6, 4 x 2048 17.6 -> 15.7. One sequence keeps the
default: at 1 x 256 (a split of one short tile, where the deeper pipeline only adds its
prologue) 6.3 against 6.7 (1 x 4096: 19.7 against 19.3). 32/1/5+h was fastest at 40-56
sequences of 1,024 tokens (39.8-47.6) but not at 64 x 640 (44.2): not taken. Offline
(``gpu_bench.py --hf none --fp8-only --offline-fp8 --offline-runs 1 --fp8-decode-variants
32/1/2+h@176``): 10,018 / 9,982 against 10,001, within the noise (at 256 sequences the
kernel, ~4.3 ms of a ~12.1 ms decode step, is ~1.6 % faster).

Before (session 13; same command, natural layout), 64/4/2+h -> 32/1/2+h -> 64/2/2+h: 256
sequences 154.8 -> 140.7 -> 147.1, 224: 144.8 -> 134.1 -> 138.9, 192: 125.6 -> 116.2 ->
123.8, 160: 104.1 -> 109.2 -> 93.1, 96: 64.2 -> 89.5 -> 71.5; 64 x 640: 39.1 -> 43.3 ->
42.0; offline (one tuning for every batch) 9,278 / 9,306 (64/4/2+h, before and after) ->
9,489 (32/1/2+h) and 9,406 (64/2/2+h) tok/s. Measured and not kept: the products
transposed, keys as the MMA tiles' rows and the query heads (padded to 8, not 16) as
columns: half the MMAs, fewer registers (32/1/2: 176 against 193; still 2 warps a scheduler
quarter), yet 141.3 against 139.6 us at 256 sequences and offline 9,551 (branch
``exp/decode-keys-as-rows``). Stages do not help the prefill kernel (its packed tunings
with five stages: 256.2-258.0 against 246.6 us at 14 prompts over an fp8 cache)."""

HALF_TUNINGS: tuple[tuple[int, DecodeTuning], ...] = (
    (112, DEFAULT_TUNING),
    (48, DecodeTuning(block_n=64, num_warps=2, num_stages=5)),
    (0, DEFAULT_TUNING),
)
"""A 16-bit cache's tuning by batch size, as ``FP8_TUNINGS``. 48-111 sequences have too few
programs to keep the loads going and gain from the deeper pipeline (``FP8_TUNINGS`` says why
five stages): same command and calls, us a layer, 64/4/2+h -> 64/2/5+h: 104 sequences 103.0
-> 94.3, 96 101.8 -> 92.8, 64 x 640 65.9 / 66.1 -> 63.3 / 63.3, 48 x 1024 85.2 -> 72.3 (but
56 x 1024 91.8 -> 94.0). From 112 sequences the two are within ~3 % (117.3 against 120.7 at
112, 122.2 against 124.9 at 120, 133.3 against 134.2 at 128, equal from 144 to 256; at 256
both read ~2.96 TB/s); the default stays there, the tuning every offline bf16 figure was
measured with. Below 48 the default stays too: other tunings gained 2-6 % at long contexts
(32/2/5+h: 16 x 1024 30.0 against 31.4, 1 x 4096 20.3 against 21.5) but lost 18 % at 1 x 256
(7.8 against 6.6 us; the benchmark's batch-1 decode measured 169.4 tok/s with 32/2/5+h below
48 and 172.3 with the default, on two machines). Measured over bf16 caches; float16 caches
take the same table. A 32-bit cache (float32 models) keeps ``DEFAULT_TUNING``."""


def tuning_table(cache_dtype: torch.dtype) -> tuple[tuple[int, DecodeTuning], ...]:
    """``(least batch, tuning)`` pairs for a cache of ``cache_dtype``, largest batch first."""
    if is_fp8(cache_dtype):
        return FP8_TUNINGS
    if cache_dtype.itemsize == 2:
        return HALF_TUNINGS
    return ((0, DEFAULT_TUNING),)


def decode_tuning(batch: int, cache_dtype: torch.dtype) -> DecodeTuning:
    """The tuning the launcher takes for ``batch`` sequences over a cache of ``cache_dtype``
    when none is given."""
    return next(tuning for least, tuning in tuning_table(cache_dtype) if batch >= least)


@triton.jit
def _paged_decode_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, ctx_ptr, rows_ptr, order_ptr, out_ptr, m_ptr, l_ptr, acc_ptr, lock_ptr,
    q_st, q_sh, kc_sb, kc_st, kc_sh, vc_sb, vc_st, vc_sh, vw_sb, vw_st, vw_sh, bt_sb, o_st, o_sh,
    n_q_heads, n_kv_heads, scale_log2, v_scale,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr, USE_PDL: tl.constexpr, OFFSETS_I32: tl.constexpr, V_WORDS: tl.constexpr,
    ORDERED: tl.constexpr, HEADS_INNER: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    if HEADS_INNER:
        kh = tl.program_id(0)
        seq = tl.program_id(1)
    else:
        seq = tl.program_id(0)
        kh = tl.program_id(1)
    if ORDERED:  # the programs start in grid order: the longest sequences first
        b = tl.load(order_ptr + seq).to(tl.int64)
    else:
        b = seq.to(tl.int64)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    part = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * part
    end = tl.minimum(start + part, ctx)
    row = tl.load(rows_ptr + b).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    qh = kh * GROUP + g
    d = tl.arange(0, BLOCK_D)
    qd_mask = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    if NUM_SPLITS > 1:
        if start >= end:  # an empty slice: it neither writes partials nor counts in
            if ctx == 0 and split == 0:  # a padding row: nobody else writes its zeros
                zeros = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
                tl.store(out_ptr + row * o_st + qh[:, None] * o_sh + d[None, :], zeros.to(out_ptr.dtype.element_ty),
                         mask=qd_mask)
            return
    q = tl.load(q_ptr + row * q_st + qh[:, None] * q_sh + d[None, :], mask=qd_mask, other=0.0)
    if KV_FP8:
        q = dot_query(q)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = bt_ptr + b * bt_sb
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < end
        block = tl.load(table + n // BLOCK_SIZE, mask=n_mask, other=0)
        offset = n % BLOCK_SIZE
        if not OFFSETS_I32:
            block = block.to(tl.int64)
            offset = offset.to(tl.int64)
        k_row = block * kc_sb + offset * kc_st + kh * kc_sh
        kv_mask = n_mask[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(kc_ptr + k_row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if KV_FP8:
            k = k.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new, alpha, p, l_i = online_softmax(s, m_i, l_i)
        if V_WORDS:  # fp8 V read as int32 words, converted in registers (fp8_words_to_f16 says why)
            words = _v_words(vc_ptr, block, n0, end, kh, vw_sb, vw_st, vw_sh, BLOCK_N, BLOCK_SIZE, BLOCK_D, OFFSETS_I32)
            v = fp8_words_to_f16(words, BLOCK_N, BLOCK_D)
        else:
            v_row = block * vc_sb + offset * vc_st + kh * vc_sh
            v = tl.load(vc_ptr + v_row[:, None] + d[None, :], mask=kv_mask, other=0.0)
            if KV_FP8:
                v = v.to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        l_safe = tl.where(l_i > 0, l_i, 1.0)  # an empty context (padding row) gives zeros
        out = acc / l_safe[:, None]
        if KV_FP8:
            out = out * v_scale
        tl.store(out_ptr + row * o_st + qh[:, None] * o_sh + d[None, :], out.to(out_ptr.dtype.element_ty), mask=qd_mask)
    else:
        idx = (b * n_q_heads + qh) * NUM_SPLITS + split
        tl.store(m_ptr + idx, m_i, mask=g < GROUP)
        tl.store(l_ptr + idx, l_i, mask=g < GROUP)
        tl.store(acc_ptr + idx[:, None] * HEAD_DIM + d[None, :], acc, mask=qd_mask)
        tl.debug_barrier()  # every thread's partial is written before the release below
        lock = lock_ptr + b * n_kv_heads + kh
        n_valid = tl.cdiv(ctx, part)  # the non-empty slices: the programs that arrive here
        if tl.atomic_add(lock, 1, sem="acq_rel") == n_valid - 1:
            _merge_splits(m_ptr, l_ptr, acc_ptr, out_ptr, b, qh, row, n_q_heads, n_valid, o_st, o_sh, qd_mask, v_scale,
                          GROUP, BLOCK_G, HEAD_DIM, BLOCK_D, NUM_SPLITS, KV_FP8)
            tl.atomic_xchg(lock, 0)  # ready for the next launch


@triton.jit
def _v_words(vc_ptr, block, n0, end, kh, vw_sb, vw_st, vw_sh, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
             BLOCK_D: tl.constexpr, OFFSETS_I32: tl.constexpr):
    """The tile at ``n0``'s fp8 V rows as ``[BLOCK_N, BLOCK_D // 4]`` int32 words (0 past
    ``end``); ``block`` are its keys' cache blocks. With word strides passed in (the byte
    strides over 4) instead of dividing each row's byte offset, the default tuning compiles
    to 912 instead of 936 instructions (``benchmarks/decode_sass.py``); the loads stay one
    word an instruction (the words' register layout is the conversion's, not the load's)."""
    n = n0 + tl.arange(0, BLOCK_N)
    offset = n % BLOCK_SIZE
    if not OFFSETS_I32:
        block = block.to(tl.int64)
        offset = offset.to(tl.int64)
    w_row = block * vw_sb + offset * vw_st + kh * vw_sh
    w = tl.arange(0, BLOCK_D // 4)
    return tl.load(vc_ptr.to(tl.pointer_type(tl.int32)) + w_row[:, None] + w[None, :], mask=(n < end)[:, None], other=0)


@triton.jit
def _merge_splits(m_ptr, l_ptr, acc_ptr, out_ptr, b, qh, row, n_q_heads, n_valid, o_st, o_sh, qd_mask, v_scale,
                  GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  NUM_SPLITS: tl.constexpr, KV_FP8: tl.constexpr):
    """Combines the ``n_valid`` slices' softmax states of heads ``qh`` (read from L2:
    other programs wrote them) and writes the output rows."""
    g_mask = tl.arange(0, BLOCK_G) < GROUP
    d = tl.arange(0, BLOCK_D)
    base = (b * n_q_heads + qh) * NUM_SPLITS
    m_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
    for s in range(n_valid):
        m_max = tl.maximum(m_max, tl.load(m_ptr + base + s, mask=g_mask, other=float("-inf"), cache_modifier=".cg"))
    denom = tl.zeros([BLOCK_G], tl.float32)
    out = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for s in range(n_valid):
        w = tl.exp2(tl.load(m_ptr + base + s, mask=g_mask, other=float("-inf"), cache_modifier=".cg") - m_max)
        w = tl.where(g_mask, w, 0.0)
        denom += w * tl.load(l_ptr + base + s, mask=g_mask, other=0.0, cache_modifier=".cg")
        part = tl.load(acc_ptr + (base + s)[:, None] * HEAD_DIM + d[None, :], mask=qd_mask, other=0.0,
                       cache_modifier=".cg")
        out += part * w[:, None]
    denom = tl.where(denom > 0, denom, 1.0)
    out = out / denom[:, None]
    if KV_FP8:
        out = out * v_scale
    tl.store(out_ptr + row * o_st + qh[:, None] * o_sh + d[None, :], out.to(out_ptr.dtype.element_ty), mask=qd_mask)


_LOCKS = 1 << 16
_locks: dict[torch.device, torch.Tensor] = {}


def _split_locks(device: torch.device) -> torch.Tensor:
    """Arrival counters, one per (sequence, KV head), zero between launches; one buffer per
    device, allocated on first use (eagerly, before any CUDA-graph capture)."""
    if device not in _locks:
        _locks[device] = torch.zeros(_LOCKS, dtype=torch.int32, device=device)
    return _locks[device]


def offsets_fit_int32(cache: torch.Tensor) -> bool:
    """Whether every element offset within ``cache`` fits int32: the kernel then computes
    its gather addresses in 32-bit arithmetic (fewer instructions and registers per key)."""
    return sum((size - 1) * stride for size, stride in zip(cache.shape, cache.stride())) < 2**31


def readable_as_words(cache: torch.Tensor) -> bool:
    """Whether an fp8 cache can be read as int32 words: 4-byte aligned rows."""
    return cache.data_ptr() % 4 == 0 and all(st % 4 == 0 for st in cache.stride()[:3]) and cache.shape[3] % 4 == 0


def choose_num_splits(
    batch: int, kv_heads: int, max_context_len: int, device: torch.device, tuning: DecodeTuning = DEFAULT_TUNING
) -> int:
    """Splits per sequence: enough programs for ``tuning.waves`` waves of the card, a
    power of two, at most one per tile of ``max_context_len`` and at most ``MAX_SPLITS``."""
    want = (tuning.waves * num_sms(device)) // max(1, batch * kv_heads)
    cap = min(MAX_SPLITS, next_pow2(triton.cdiv(max(max_context_len, 1), tuning.block_n)))
    splits = 1
    while splits * 2 <= min(want, cap):
        splits *= 2
    return splits


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    rows: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    num_splits: int | None = None,
    tuning: DecodeTuning | None = None,
    kv_scale: float = 1.0,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of query row ``rows[i]`` of ``query`` ``[N, Hq, D]`` over the first
    ``context_lens[i]`` cached tokens of sequence ``i`` (its new token already
    written). Writes those rows of ``out`` (same shape as ``query``) and returns it;
    other rows are untouched. A sequence with ``context_lens[i] == 0`` gets zeros.

    ``block_tables`` ``[B, W]`` int32/int64; ``context_lens`` ``[B]`` int32;
    ``rows`` ``[B]`` int32/int64; caches ``[blocks, block_size, Hk, D]``.
    ``num_splits`` defaults to ``choose_num_splits(B, Hk, W * block_size)``. The caches
    hold the query's dtype, or float8_e4m3fn read as ``stored * kv_scale``. ``tuning``
    defaults to ``decode_tuning(B, k_cache.dtype)``: by batch size (``tuning_table``).

    ``order`` ``[B]`` int32, a permutation of ``0..B-1``: the order in which the
    sequences' programs are launched (``worker.models.attention.longest_first`` gives the
    one that pays). The GPU
    starts programs in grid order and a program's time grows with its context, so
    launched in batch order a long sequence that happens to come last runs alone at the
    end; longest first, the short ones fill in behind the long ones. Ignored with more
    than one split: splits are chosen only when the grid fits the card in about
    ``tuning.waves`` waves, there is no tail to shorten, and the order would cost each
    program a dependent load before its first (batch 1 was 1 % slower with it).
    """
    hq, dim, block_size, hk, batch = check_paged_inputs(query, k_cache, v_cache, block_tables)
    require(context_lens.shape == (batch,) and context_lens.dtype == torch.int32,
            f"context_lens must be [{batch}] int32, got {tuple(context_lens.shape)} {context_lens.dtype}")
    require(rows.shape == (batch,) and rows.dtype in (torch.int32, torch.int64),
            f"rows must be [{batch}] int32/int64, got {tuple(rows.shape)} {rows.dtype}")
    require(out.shape == query.shape and out.dtype == query.dtype and out.stride(2) == 1,
            f"out must match query {tuple(query.shape)} {query.dtype}, got {tuple(out.shape)} {out.dtype}")
    require_device(query, k_cache, v_cache, block_tables, context_lens, rows, out)
    if order is not None:
        require(order.shape == (batch,) and order.dtype == torch.int32,
                f"order must be [{batch}] int32, got {tuple(order.shape)} {order.dtype}")
        require_device(query, order)
    if batch == 0:
        return out
    fp8 = is_fp8(k_cache.dtype)
    tuning = tuning or decode_tuning(batch, k_cache.dtype)
    splits = num_splits or choose_num_splits(batch, hk, block_tables.shape[1] * block_size, query.device, tuning)
    require(splits == next_pow2(splits) and splits <= MAX_SPLITS, f"num_splits must be a power of two <= {MAX_SPLITS}, got {splits}")
    require(kv_scale > 0, f"kv_scale must be > 0, got {kv_scale}")
    group = hq // hk
    block_d = next_pow2(dim)
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    k_scale = kv_scale if fp8 else 1.0
    if splits > 1:
        m = torch.empty((batch, hq, splits), dtype=torch.float32, device=query.device)
        l = torch.empty_like(m)
        acc = torch.empty((batch, hq, splits, dim), dtype=torch.float32, device=query.device)
        locks = _split_locks(query.device)
        require(batch * hk <= locks.numel(), f"{batch} sequences x {hk} KV heads exceed the decode kernel's counters")
    else:
        m = l = acc = locks = out  # unused
    v_words = fp8 and query.is_cuda and query.dtype != torch.float32 and block_d == dim and readable_as_words(v_cache)
    heads_inner = tuning.heads_inner and batch <= 65535  # a grid's second dimension holds at most 65,535
    _paged_decode_kernel[(hk, batch, splits) if heads_inner else (batch, hk, splits)](
        query, k_cache, v_cache, block_tables, context_lens, rows, rows if order is None else order, out, m, l, acc,
        locks,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *((v_cache.stride(i) // 4 for i in range(3)) if v_words else (0, 0, 0)),
        block_tables.stride(0), out.stride(0), out.stride(1),
        hq, hk, scale * k_scale * _LOG2E, kv_scale,
        GROUP=group, BLOCK_G=max(16, next_pow2(group)), HEAD_DIM=dim, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, BLOCK_N=tuning.block_n, NUM_SPLITS=splits, PRECISION=precision, KV_FP8=fp8,
        OFFSETS_I32=offsets_fit_int32(k_cache) and offsets_fit_int32(v_cache),
        V_WORDS=v_words, ORDERED=order is not None and splits == 1, HEADS_INNER=heads_inner,
        num_warps=tuning.num_warps, num_stages=tuning.num_stages, **pdl_launch(query.device),
    )
    return out
