"""Every Triton kernel against its torch reference, on random inputs, over a sweep of shapes.

Run on CUDA (marked ``gpu``; skipped where there is none). With
``TRITON_INTERPRET=1`` the same tests run the kernels on CPU through Triton's
interpreter (float32 only, slow): a cheap check of indexing before a GPU run.

Tolerances, stated per dtype:
* elementwise kernels (RMSNorm, rotary, SiLU-and-mul) round like the
  reference step by step, so bf16 results differ from it by at most one bf16
  rounding (``rtol=2**-7``), float32 by summation order only; rotary has no
  reduction, so at most 0.1% of its elements may differ at all, by one
  rounding at the scale of the inputs (``2**-7 * max|x|``: ``x1*cos - x2*sin``
  can cancel);
* the K/V store is a copy: exact;
* attention against a float32 reference on the same (bf16-rounded) inputs:
  ``|out - ref| / |ref|`` (Frobenius) below 1e-2 for bf16 (probabilities are
  rounded to bf16 before the P·V product, as in flash attention) and below
  1e-5 for float32 (IEEE dot products).

Every K/V-cache kernel also runs over an fp8 (e4m3) cache with scale
``FP8_SCALE`` (``kv_cache`` parameter "fp8"; needs compute capability 8.9):
* attention against the float32 reference over the dequantized cache, with
  the same tolerances (the kernels convert fp8 to the query dtype exactly and
  apply the scale outside the dot products);
* the store against the reference's quantization: values byte for byte;
  keys but for at most 0.1% of elements one e4m3
  step apart (the rotary's rare one-rounding differences above, or float32
  contractions, rounded on).
  Triton's interpreter (3.6) rounds to fp8 in its own way: it drops the
  carry when rounding overflows the mantissa (storing half the value) and
  truncates subnormals; there the store is only checked to one e4m3 step
  or a lost carry.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from kernels.activation import silu_and_mul_ref
from kernels.backend import HAS_TRITON
from kernels.kv_quant import FP8_KV_DTYPE, dequantize_ref, quantize_ref
from kernels.paged_attention import paged_attention_ref
from kernels.rmsnorm import add_rms_norm_ref, rms_norm_ref
from kernels.rotary import build_cos_sin_cache
from kernels.rotary_store import rotary_and_store_ref

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_TRITON or not (torch.cuda.is_available() or INTERPRET), reason="needs CUDA and Triton"),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] if INTERPRET else [torch.bfloat16, torch.float32]
ATTN_TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-5}
FP8_SCALE = 0.37
KV_CACHES = [
    "model",
    pytest.param("fp8", marks=pytest.mark.skipif(
        torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9), reason="fp8 needs sm_89 or newer")),
]


def _rtol(dtype: torch.dtype) -> float:
    return 2**-7 if dtype == torch.bfloat16 else 1e-5


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(hash(request.node.name) % 2**31)
    random.seed(request.node.name)


# ---- elementwise -------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 64), (7, 576), (130, 4096), (3, 1000)])
def test_rms_norm(dtype, tokens, hidden):
    from kernels.rmsnorm_triton import rms_norm_triton

    x = torch.randn(tokens, hidden, device=DEVICE).to(dtype)
    res = torch.randn(tokens, hidden, device=DEVICE).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(dtype)
    torch.testing.assert_close(rms_norm_triton(x, w, 1e-5), rms_norm_ref(x, w, 1e-5), rtol=_rtol(dtype), atol=1e-5)
    out, summed = rms_norm_triton(x, w, 1e-5, res)
    ref_out, ref_sum = add_rms_norm_ref(x, res, w, 1e-5)
    assert torch.equal(summed, ref_sum)
    torch.testing.assert_close(out, ref_out, rtol=_rtol(dtype), atol=1e-5)
    # a strided view (rows of a wider buffer) reads the same
    wide = torch.randn(tokens, hidden + 64, device=DEVICE).to(dtype)[:, :hidden]
    torch.testing.assert_close(rms_norm_triton(wide, w, 1e-5), rms_norm_ref(wide, w, 1e-5), rtol=_rtol(dtype), atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,d", [(1, 128), (5, 1536), (64, 2000), (2, 14336)])
def test_silu_and_mul(dtype, tokens, d):
    from kernels.activation_triton import silu_and_mul_triton

    x = (2 * torch.randn(tokens, 2 * d, device=DEVICE)).to(dtype)
    torch.testing.assert_close(silu_and_mul_triton(x), silu_and_mul_ref(x), rtol=_rtol(dtype), atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleave", [1, 32, 128])
def test_silu_and_mul_interleaved(dtype, interleave):
    """Gate and up columns alternating in runs (the fused gate kernel's weight layout)."""
    from kernels.activation_triton import silu_and_mul_triton

    x = (2 * torch.randn(9, 2 * 256, device=DEVICE)).to(dtype)
    torch.testing.assert_close(silu_and_mul_triton(x, interleave), silu_and_mul_ref(x, interleave),
                               rtol=_rtol(dtype), atol=1e-5)


FUSED_ONLY = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available()
                                or torch.cuda.get_device_capability()[0] < 9, reason="TMA needs an sm_90+ GPU")


@FUSED_ONLY
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,k,inter", [(257, 576, 1536), (1000, 4096, 1024), (300, 256, 256), (4096, 512, 512),
                                          (129, 64, 384), (200, 4096, 512), (256, 576, 1536), (128, 4096, 1024),
                                          (193, 256, 256), (1600, 4096, 1024)])
def test_gate_up_silu_fused(dtype, rows, k, inter):
    """The fused gate/up matmul + SiLU gate against the two-pass reference over the same
    interleaved weight (products rounded to the dtype first, as both do); row counts that
    are not multiples of the tile, each of ``tuning_for_rows``' three tunings (up to 192,
    193-1,536 and more rows), a CUDA graph replay equal to the eager launch."""
    from kernels.activation import gate_up_silu_ref, interleave_gate_up
    from kernels.gate_up_silu_triton import FUSED_HALF, gate_up_silu_triton

    x = torch.randn(rows, k, device=DEVICE, dtype=dtype)
    w = interleave_gate_up(torch.randn(2 * inter, k, device=DEVICE, dtype=dtype) * k**-0.5, FUSED_HALF)
    want = gate_up_silu_ref(x.float(), w.float(), FUSED_HALF)
    got = gate_up_silu_triton(x, w)
    assert got.shape == (rows, inter) and got.dtype == dtype
    assert _rel(got, want) < SKINNY_TOL
    out = torch.full_like(got, float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gate_up_silu_triton(x, w, out=out)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, got)


@FUSED_ONLY
def test_gate_up_silu_compiles_once_per_tuning():
    """Row counts that fill fewer tiles than the card has SMs (a small model's batches) must
    not compile variants of their own: only the tuning picks the variant, so start-up
    (``rows_per_tuning``) compiles every one serving will run."""
    from kernels.activation import interleave_gate_up
    from kernels.gate_up_silu_triton import FUSED_HALF, _gate_up_silu_kernel, gate_up_silu_triton, rows_per_tuning

    def variants() -> int:
        return sum(len(cache[0]) for cache in _gate_up_silu_kernel.device_caches.values())

    w = interleave_gate_up(torch.randn(2 * 1536, 576, device=DEVICE, dtype=torch.bfloat16) * 0.04, FUSED_HALF)
    x = torch.randn(1600, 576, device=DEVICE, dtype=torch.bfloat16)
    for rows in rows_per_tuning():
        gate_up_silu_triton(x[:rows], w)
    compiled = variants()
    for rows in range(128, 1600, 61):  # 12 column tiles: 24 to 156 tiles, the program count varies
        gate_up_silu_triton(x[:rows], w)
    assert variants() == compiled


def test_fused_gate_up_fits_only_what_the_kernel_takes():
    """What the runner interleaves for: 16-bit, whole runs of rows, 16-byte rows, a TMA GPU."""
    from kernels.gate_up_silu_triton import fused_gate_up_fits

    dev = torch.device(DEVICE)
    tma = dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 9
    assert fused_gate_up_fits(4096, 14336, torch.bfloat16, dev) == tma
    assert fused_gate_up_fits(576, 1536, torch.float16, dev) == tma
    assert not fused_gate_up_fits(4096, 14336 + 64, torch.bfloat16, dev)  # not whole runs of 128
    assert not fused_gate_up_fits(4100, 14336, torch.bfloat16, dev)  # 8,200-byte rows
    assert not fused_gate_up_fits(4096, 14336, torch.float32, dev)
    assert not fused_gate_up_fits(4096, 14336, torch.bfloat16, torch.device("cpu"))


@pytest.mark.skipif(not INTERPRET, reason="the launcher needs a TMA GPU; this calls the kernel in the interpreter")
@pytest.mark.parametrize("rows,k,inter,programs", [(130, 64, 384, 2), (70, 64, 256, 3), (200, 128, 512, 5),
                                                   (260, 64, 256, 4)])
def test_gate_up_silu_kernel_walks_every_tile(rows, k, inter, programs):
    """The fused kernel's persistent loop in Triton's interpreter, launched directly (the
    launcher refuses a CPU tensor): fewer programs than tiles, each stepping by the launch's
    program count, cover every output tile once. float16: the interpreter mishandles the
    bit-level bfloat16 rounding of ``rounding_triton``."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from kernels.activation import gate_up_silu_ref, interleave_gate_up
    from kernels.gate_up_silu_triton import FUSED_HALF, _gate_up_silu_kernel, tuning_for_rows

    torch.manual_seed(rows)
    x = torch.randn(rows, k, dtype=torch.float16)
    w = interleave_gate_up(torch.randn(2 * inter, k, dtype=torch.float16) * k**-0.5, FUSED_HALF)
    out = torch.full((rows, inter), float("nan"), dtype=torch.float16)
    t = tuning_for_rows(rows)
    _gate_up_silu_kernel[(programs,)](
        TensorDescriptor.from_tensor(x, [t.block_m, t.block_k]), TensorDescriptor.from_tensor(w, [2 * FUSED_HALF, t.block_k]),
        TensorDescriptor.from_tensor(out, [t.block_m, FUSED_HALF]), rows, w.shape[0], k, BLOCK_M=t.block_m,
        BLOCK_N=2 * FUSED_HALF, BLOCK_K=t.block_k, GROUP_M=t.group_m)
    assert not out.isnan().any()
    assert _rel(out, gate_up_silu_ref(x.float(), w.float(), FUSED_HALF)) < SKINNY_TOL


def test_gate_up_tuning_bands():
    """Each row count start-up compiles for (``rows_per_tuning``) lands in a different band, and
    together they cover every tuning a fused batch can take."""
    from kernels.gate_up_silu_triton import (DEFAULT_TUNING, FUSED_MIN_ROWS, fused_for_rows, rows_per_tuning,
                                             tuning_for_rows)

    rows = rows_per_tuning()
    assert rows[0] == FUSED_MIN_ROWS and rows == sorted(rows) and all(map(fused_for_rows, rows))
    assert not fused_for_rows(FUSED_MIN_ROWS - 1)
    reachable = {tuning_for_rows(n) for n in range(FUSED_MIN_ROWS, 20_000)}
    assert {tuning_for_rows(n) for n in rows} == reachable and len(reachable) == len(rows)
    assert tuning_for_rows(1537) == tuning_for_rows(16_384) == DEFAULT_TUNING
    assert tuning_for_rows(193) == tuning_for_rows(1536)
    assert tuning_for_rows(192) != tuning_for_rows(193) != tuning_for_rows(1537)
    # an engine whose steps stay smaller compiles only the bands it can reach
    assert rows_per_tuning(1536) == rows[:-1] and rows_per_tuning(FUSED_MIN_ROWS) == rows[:1]
    assert rows_per_tuning(FUSED_MIN_ROWS - 1) == []


@FUSED_ONLY
def test_gate_up_silu_dispatch(monkeypatch):
    """``gate_up_silu`` takes the fused kernel for an interleaved weight from
    ``FUSED_MIN_ROWS`` rows on only; below, a plain weight, or an unaligned view: the matmul
    and ``silu_and_mul``. Every path equals the reference."""
    from kernels import activation
    from kernels.activation import gate_up_silu, gate_up_silu_ref, interleave_gate_up
    from kernels.gate_up_silu_triton import FUSED_HALF, FUSED_MIN_ROWS

    fused = []
    real = activation.gate_up_silu_triton
    monkeypatch.setattr(activation, "gate_up_silu_triton", lambda *a, **kw: fused.append(1) or real(*a, **kw))
    plain = torch.randn(2 * 512, 576, device=DEVICE, dtype=torch.bfloat16) * 576**-0.5
    w = interleave_gate_up(plain, FUSED_HALF)
    for rows, weight, interleave, expect in [(FUSED_MIN_ROWS, w, FUSED_HALF, 1), (FUSED_MIN_ROWS - 1, w, FUSED_HALF, 0),
                                             (1024, plain, 0, 0), (16, w, FUSED_HALF, 0)]:
        fused.clear()
        x = torch.randn(rows, 576, device=DEVICE, dtype=torch.bfloat16)
        assert _rel(gate_up_silu(x, weight, interleave), gate_up_silu_ref(x.float(), weight.float(), interleave)) \
            < SKINNY_TOL
        assert len(fused) == expect, (rows, interleave)
    fused.clear()
    wide = torch.randn(1025, 576, device=DEVICE, dtype=torch.bfloat16)
    shifted = wide.view(-1)[4:4 + 1024 * 576].view(1024, 576)  # contiguous, 8 bytes off 16-byte alignment
    assert _rel(gate_up_silu(shifted, w, FUSED_HALF), gate_up_silu_ref(shifted.float(), w.float(), FUSED_HALF)) \
        < SKINNY_TOL
    assert fused == []


@pytest.mark.parametrize("kv_cache", KV_CACHES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("tokens", [1, 9, 100])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 64), (9, 3, 64), (32, 8, 128)])
@pytest.mark.parametrize("heads_major", [False, True], ids=["natural", "heads_major"])
@pytest.mark.parametrize("with_k_out", [False, True], ids=["", "k_out"])
def test_rotary_and_store(dtype, block_size, tokens, heads, kv_heads, head_dim, kv_cache, heads_major, with_k_out):
    """Rotated queries returned, rotated keys and the values in their cache slots, against
    the composition of the torch references; negative slots leave the cache alone. Also into
    caches laid out as the engine's CUDA pool is (``heads_major``: each KV head's rows of a
    block together, a strided view). ``k_out``: the rotated keys written out as well,
    unquantized, for every token (skipped slots too: the dense prefill kernel reads them)."""
    from kernels.rotary_store_triton import rotary_and_store_triton

    if heads_major and block_size == 1:
        pytest.skip("one-slot blocks: both layouts are the same")
    if with_k_out and not heads_major:
        pytest.skip("k_out does not depend on the cache layout: run with the engine's")

    cache = build_cos_sin_cache(head_dim, 4096, 500000.0, None, torch.float32, torch.device(DEVICE))
    # q, k and v as views of one fused projection, as the model passes them
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=DEVICE).to(dtype)
    fp8 = kv_cache == "fp8"
    cache_dtype, kv_scale = (FP8_KV_DTYPE, FP8_SCALE) if fp8 else (dtype, 1.0)
    if fp8:  # the first token's values past 448 * scale: saturated
        qkv[0, (heads + kv_heads) * head_dim :] *= 1000
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    pos = torch.randint(0, 4096, (tokens,), device=DEVICE)
    num_blocks = tokens // block_size + 3
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:tokens]
    skipped = torch.rand(tokens, device=DEVICE) < 0.2  # padding rows of a graph batch
    caches = [torch.randn(num_blocks, block_size, kv_heads, head_dim, device=DEVICE).to(cache_dtype) for _ in range(4)]
    if heads_major:
        caches = [_heads_major(c) for c in caches]
    caches[2].copy_(caches[0])
    caches[3].copy_(caches[1])
    k_out, k_ref = (torch.full(k.shape, float("nan"), dtype=dtype, device=DEVICE) if with_k_out else None
                    for _ in range(2))
    q_out = rotary_and_store_triton(q, k, v, pos, cache, caches[0], caches[1], torch.where(skipped, -1, slots).to(torch.int32),
                                    kv_scale, k_out)
    q_ref = rotary_and_store_ref(q, k, v, pos, cache, caches[2], caches[3], slots, kv_scale, k_ref)
    if skipped.any():  # the reference has no padding: undo its writes of the skipped tokens
        raw = [c.view(torch.uint8) if fp8 else c for c in caches]
        where = (slots[skipped] // block_size, slots[skipped] % block_size)
        raw[2][where] = raw[0][where]
        raw[3][where] = raw[1][where]
    if fp8:
        _assert_fp8_close(caches[1], caches[3], 0.0)
        _assert_fp8_close(caches[0], caches[2], 1e-3)
        stored = caches[1].float()
        assert not stored.isnan().any() and stored.abs().max() <= 448, "large values saturate, never NaN"
    else:
        assert torch.equal(caches[1], caches[3]), "values are a copy"
    pairs = ((q_out, q_ref, q),) + (() if fp8 else ((caches[0], caches[2], k),)) + \
        (((k_out, k_ref, k),) if with_k_out else ())
    for out, ref, x in pairs:
        if dtype == torch.float32:
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            continue
        diff = (out.float() - ref.float()).abs()
        assert diff.max() <= 2**-7 * x.float().abs().max()
        assert (diff > 0).float().mean() < 1e-3


def _assert_fp8_close(out: torch.Tensor, ref: torch.Tensor, max_fraction: float) -> None:
    """Two fp8 caches equal but for at most ``max_fraction`` of elements one e4m3 step
    apart. The interpreter's rounding to fp8 is not IEEE (module docstring): there
    any element may be one step off, or half the reference (a lost carry)."""
    a, b = out.float(), ref.float()
    differ = a != b
    near = (a - b).abs() <= b.abs() * 2**-3 + 2**-9  # e4m3: 3 mantissa bits; subnormal step 2**-9
    if INTERPRET:
        assert (near | (b == 2 * a)).all()
        return
    assert differ.float().mean().item() <= max_fraction, f"{differ.sum().item()} of {differ.numel()} elements differ"
    assert near[differ].all()


# ---- attention -------------------------------------------------------------------


def _paged_setup(ctx_lens, block_size, kv_heads, head_dim, dtype, kv_cache="model"):
    """Random caches and shuffled block tables holding each sequence's context; ``kv_cache``
    "fp8": the caches hold random values quantized with ``FP8_SCALE``. The slots past each
    context in its last block hold NaN, as a block's stale slots may (a reused block): kernels
    must not let them into any output (a zero weight is not enough: 0 * NaN is NaN)."""
    needed = [(c + block_size - 1) // block_size for c in ctx_lens]
    num_blocks = sum(needed) + 5
    perm = torch.randperm(num_blocks).tolist()
    tables, at = [], 0
    for n in needed:
        tables.append(perm[at : at + n])
        at += n
    width = max(needed) + 2  # tables wider than needed, padded with garbage ids
    table = torch.tensor([t + [random.randrange(num_blocks) for _ in range(width - len(t))] for t in tables])
    k_cache, v_cache = (torch.randn(num_blocks, block_size, kv_heads, head_dim, device=DEVICE) for _ in range(2))
    for blocks, ctx in zip(tables, ctx_lens):
        if ctx % block_size:
            k_cache[blocks[-1], ctx % block_size :] = float("nan")
            v_cache[blocks[-1], ctx % block_size :] = float("nan")
    if kv_cache == "fp8":
        return quantize_ref(k_cache, FP8_KV_DTYPE, FP8_SCALE), quantize_ref(v_cache, FP8_KV_DTYPE, FP8_SCALE), table.to(DEVICE)
    return k_cache.to(dtype), v_cache.to(dtype), table.to(DEVICE)


def _heads_major(cache: torch.Tensor) -> torch.Tensor:
    """``cache`` ``[blocks, block_size, Hk, D]`` as the engine's CUDA pool holds it: a view of
    ``[blocks, Hk, block_size, D]`` storage (``ModelRunner._allocate_kv``)."""
    return cache.transpose(1, 2).contiguous().transpose(1, 2)


def _reference(q, k_cache, v_cache, table, ctx_lens, q_lens, scale):
    """The torch reference in float32 on the same (rounded) inputs; an fp8 cache dequantized with ``FP8_SCALE``."""
    k, v = (dequantize_ref(c, torch.float32, FP8_SCALE).float() for c in (k_cache, v_cache))
    return paged_attention_ref(q.float(), k, v, table, ctx_lens, q_lens, scale)


def _kv_scale(k_cache: torch.Tensor) -> dict:
    return {"kv_scale": FP8_SCALE} if k_cache.dtype == FP8_KV_DTYPE else {}


DECODE_CASES = [
    # (block_size, heads, kv_heads, head_dim, context lengths)
    (16, 4, 4, 64, [1]),
    (16, 32, 8, 128, [1, 15, 16, 17, 100]),
    (8, 9, 3, 64, [7, 64, 65, 200]),
    (32, 8, 2, 128, [1000, 3, 2049]),
    (1, 4, 2, 64, [1, 5, 33]),
    (16, 32, 8, 128, [3000]),
    (128, 8, 2, 64, [1, 127, 129, 700]),
]


@pytest.mark.parametrize("kv_cache", KV_CACHES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [None, 1, 4, 32])
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"bs{c[0]}-h{c[1]}/{c[2]}-d{c[3]}-n{len(c[4])}")
def test_paged_decode(dtype, splits, case, kv_cache):
    _check_decode(dtype, splits, case, kv_cache)


@pytest.mark.parametrize("kv_cache", KV_CACHES)
@pytest.mark.parametrize("fallback", ["offsets_fit_int32", "readable_as_words"])
def test_paged_decode_fallback_paths(monkeypatch, kv_cache, fallback):
    """The launcher's other paths, which the caches above never take: 64-bit gather offsets (a
    cache of more than 2**31 elements) and an fp8 V read as fp8 tiles (not 4-byte aligned)."""
    import kernels.paged_decode_triton as decode

    monkeypatch.setattr(decode, fallback, lambda cache: False)
    for splits in (1, 4):
        _check_decode(DTYPES[0], splits, (16, 8, 2, 128, [1, 17, 300]), kv_cache)


@pytest.mark.parametrize("kv_cache", KV_CACHES)
@pytest.mark.parametrize("tuning", ["64/4/2", "32/2/2+h", "32/4/3+h", "128/8/2+h", "32/1/2+h", "64/2/2+h", "32/1/5+h",
                                    "64/2/5+h", "32/2/5+h", "64/4/5+h", "16/1/8+h"])
def test_paged_decode_tunings(kv_cache, tuning):
    """Tunings besides the default (``parse_decode_tuning``): sequences innermost in the grid
    (no ``+h``), other tiles, warps and stages; contexts that end inside, at and just past a
    tile."""
    from kernels.paged_decode_triton import DEFAULT_TUNING, parse_decode_tuning

    parsed = parse_decode_tuning(tuning, DEFAULT_TUNING)
    for splits in (1, 4):
        _check_decode(DTYPES[0], splits, (16, 32, 8, 128, [1, 31, 63, 64, 65, 200, 300]), kv_cache, parsed)


TABLE_BATCHES = [1, 16, 64, 140, 180]
"""Batch sizes that between them select every entry of both decode tuning tables."""


def test_decode_table_batches_reach_every_entry():
    from kernels.paged_decode_triton import decode_tuning, tuning_table

    for cache_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        assert {decode_tuning(b, cache_dtype) for b in TABLE_BATCHES} == {t for _, t in tuning_table(cache_dtype)}, \
            "pick batch sizes that select each entry of the table"


@pytest.mark.parametrize("kv_cache", KV_CACHES)
@pytest.mark.parametrize("batch", TABLE_BATCHES)
def test_paged_decode_default_tuning_by_batch(monkeypatch, kv_cache, batch):
    """Without a tuning the launcher takes ``decode_tuning(batch, cache dtype)``, the entry of
    its cache's batch table (``tuning_table``: ``FP8_TUNINGS``, ``HALF_TUNINGS``) that the
    batch reaches: checked here through the default path at batch sizes that select every
    entry (the launcher is watched asking for exactly that batch's tuning)."""
    import kernels.paged_decode_triton as decode

    cache_dtype = torch.float8_e4m3fn if kv_cache == "fp8" else DTYPES[0]
    asked = []
    real = decode.decode_tuning
    monkeypatch.setattr(decode, "decode_tuning", lambda b, d: asked.append((b, d)) or real(b, d))
    rng = random.Random(batch)
    ctx_lens = [rng.randint(1, 90) for _ in range(batch)]
    _check_decode(DTYPES[0], None, (16, 8, 2, 128, ctx_lens), kv_cache)
    assert asked and set(asked) == {(batch, cache_dtype)}


@pytest.mark.parametrize("kv_cache", KV_CACHES)
@pytest.mark.parametrize("tuning", ["64/4/2+h", "64/2/2+h", "32/1/5+h", "64/2/5+h"])
def test_paged_decode_heads_major_pool(kv_cache, tuning):
    """Caches laid out as the engine's CUDA pool (each KV head's rows of a block together, a
    strided view): each tuning of the batch tables (``FP8_TUNINGS``, ``HALF_TUNINGS``), split
    and not, over both caches."""
    from kernels.paged_decode_triton import DEFAULT_TUNING, FP8_TUNINGS, HALF_TUNINGS, parse_decode_tuning

    parsed = parse_decode_tuning(tuning, DEFAULT_TUNING)
    assert parsed in {t for _, t in FP8_TUNINGS + HALF_TUNINGS}, "keep this list to the tables' tunings"
    for splits in (1, 4):
        _check_decode(DTYPES[0], splits, (16, 32, 8, 128, [1, 31, 64, 65, 300]), kv_cache, parsed, heads_major=True)


def _check_decode(dtype, splits, case, kv_cache, tuning=None, heads_major=False):
    from kernels.paged_decode_triton import paged_decode_attention

    block_size, heads, kv_heads, head_dim, ctx_lens = case
    if INTERPRET and max(ctx_lens) > 1100:
        pytest.skip("long contexts are too slow in the interpreter")
    k_cache, v_cache, table = _paged_setup(ctx_lens, block_size, kv_heads, head_dim, dtype, kv_cache)
    if heads_major:
        k_cache, v_cache = _heads_major(k_cache), _heads_major(v_cache)
    batch = len(ctx_lens)
    # query rows of the sequences sit among other rows, in a shuffled order
    n_rows = batch + 3
    rows = torch.randperm(n_rows)[:batch]
    q_all = torch.randn(n_rows, heads, head_dim, device=DEVICE).to(dtype)
    out = torch.full_like(q_all, float("nan"))
    scale = head_dim**-0.5
    paged_decode_attention(q_all, k_cache, v_cache, table.to(torch.int32), torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE),
                           rows.to(DEVICE), scale, out, splits, tuning=tuning, **_kv_scale(k_cache))
    got = out[rows]
    assert not got.isnan().any(), "some output rows were not written"
    untouched = torch.ones(n_rows, dtype=torch.bool)
    untouched[rows] = False
    assert out[untouched].isnan().all(), "rows outside `rows` were written"
    ref = _reference(q_all[rows], k_cache, v_cache, table, ctx_lens, [1] * batch, scale)
    assert _rel(got, ref) < ATTN_TOL[dtype]
    # the split merge's arrival counters are back at zero, and the merge order is fixed
    again = torch.full_like(q_all, float("nan"))
    paged_decode_attention(q_all, k_cache, v_cache, table.to(torch.int32), torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE),
                           rows.to(DEVICE), scale, again, splits, tuning=tuning, **_kv_scale(k_cache))
    assert torch.equal(again[rows], got)


@pytest.mark.parametrize("heads_inner", [True, False])
def test_paged_decode_launch_order_changes_nothing(heads_inner):
    """The engine launches the decode kernel's sequences longest first (``order``, used with
    one split): every sequence's output is bit for bit what batch order gives, padding rows
    included; with either grid order (KV heads or sequences innermost)."""
    import dataclasses

    from kernels.paged_decode_triton import DEFAULT_TUNING, paged_decode_attention
    from worker.models.attention import longest_first

    tuning = dataclasses.replace(DEFAULT_TUNING, heads_inner=heads_inner)
    ctx_lens = [17, 300, 0, 64, 129, 1]
    k_cache, v_cache, table = _paged_setup([max(c, 1) for c in ctx_lens], 16, 2, 128, DTYPES[0])
    q = torch.randn(len(ctx_lens), 8, 128, device=DEVICE).to(DTYPES[0])
    lens = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    rows = torch.arange(len(ctx_lens), device=DEVICE)
    splits = 1
    plain = paged_decode_attention(q, k_cache, v_cache, table.to(torch.int32), lens, rows, 0.1, torch.full_like(q, float("nan")),
                                   splits, tuning=tuning)
    order = longest_first(ctx_lens)
    assert order.tolist() == [1, 4, 3, 0, 5, 2]
    ordered = paged_decode_attention(q, k_cache, v_cache, table.to(torch.int32), lens, rows, 0.1, torch.full_like(q, float("nan")),
                                     splits, tuning=tuning, order=torch.from_numpy(order).to(DEVICE))
    assert torch.equal(plain, ordered)
    with pytest.raises(ValueError, match="order must be"):
        paged_decode_attention(q, k_cache, v_cache, table.to(torch.int32), lens, rows, 0.1, torch.empty_like(q), splits,
                               order=torch.from_numpy(order).long().to(DEVICE))


@pytest.mark.parametrize("heads_inner", [True, False])
def test_paged_decode_empty_context_gives_zeros(heads_inner):
    import dataclasses

    from kernels.paged_decode_triton import DEFAULT_TUNING, paged_decode_attention

    tuning = dataclasses.replace(DEFAULT_TUNING, heads_inner=heads_inner)
    k_cache, v_cache, table = _paged_setup([5, 1], 16, 2, 64, DTYPES[0])
    q = torch.randn(2, 4, 64, device=DEVICE).to(DTYPES[0])
    for splits in (1, 4):
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q, k_cache, v_cache, table, torch.tensor([5, 0], dtype=torch.int32, device=DEVICE),
                               torch.arange(2, device=DEVICE), 0.125, out, splits, tuning=tuning)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert not out[0].isnan().any()


PREFILL_CASES = [
    # (block_size, heads, kv_heads, head_dim, [(query_len, context_len), ...])
    (16, 4, 4, 64, [(1, 1)]),
    (16, 9, 3, 64, [(5, 5), (17, 40), (1, 50), (128, 128)]),
    (16, 32, 8, 128, [(200, 333), (2, 2), (64, 100)]),
    (8, 8, 2, 128, [(300, 300), (130, 131)]),
    (32, 4, 1, 64, [(33, 33), (70, 1000)]),
]


@pytest.mark.parametrize("kv_cache", KV_CACHES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: f"bs{c[0]}-h{c[1]}/{c[2]}-d{c[3]}-n{len(c[4])}")
def test_paged_prefill(dtype, case, kv_cache):
    _check_prefill(dtype, case, kv_cache)


@pytest.mark.parametrize("kv_cache", KV_CACHES)
@pytest.mark.parametrize("variant", ["packed", "short", "long", "heavy_first", "small_tiles"])
def test_paged_prefill_tunings(kv_cache, variant):
    """Every launch configuration the engine can pick (the 16-bit tunings, whatever the
    dtype under test: GQA-packed, and the short- and long-prompt tunings of models without
    packing) and the other paths: the heavy-first grid order alone, smaller tiles with other
    warps and stages."""
    import dataclasses

    from kernels.paged_prefill_triton import LONG_QUERY, PrefillTuning, default_prefill_tuning

    dtype = DTYPES[0]
    fp8 = kv_cache == "fp8"
    packed = default_prefill_tuning(torch.bfloat16, fp8, 128, 1, group=4)
    assert packed.pack_gqa and packed == default_prefill_tuning(torch.bfloat16, fp8, 128, LONG_QUERY, group=4)
    short = default_prefill_tuning(torch.bfloat16, fp8, 128, 1)
    long = default_prefill_tuning(torch.bfloat16, fp8, 128, LONG_QUERY)
    assert long != short
    tuning = {"packed": packed, "short": short, "long": long,
              "heavy_first": dataclasses.replace(short, heavy_first=True),
              "small_tiles": PrefillTuning(64, 32, 4, 3, heavy_first=True)}[variant]
    _check_prefill(dtype, (16, 32, 8, 128, [(200, 333), (2, 2), (64, 100), (129, 129)]), kv_cache, tuning)


@pytest.mark.parametrize("kv_cache", KV_CACHES)
@pytest.mark.parametrize("case", [PREFILL_CASES[1], PREFILL_CASES[2], PREFILL_CASES[3], PREFILL_CASES[4],
                                  (16, 32, 8, 128, [(200, 333), (2, 2), (64, 100), (129, 129)]),
                                  (16, 8, 4, 64, [(50, 70), (17, 17)]),  # groups of 2
                                  (16, 16, 2, 64, [(40, 90), (33, 33)])],  # groups of 8: 16 positions a tile
                         ids=lambda c: f"bs{c[0]}-h{c[1]}/{c[2]}-d{c[3]}-n{len(c[4])}")
@pytest.mark.parametrize("tuning", ["64/32/4/2", "128/64/4/2+hf"])
def test_paged_prefill_packed_gqa(kv_cache, case, tuning):
    """Programs serving a whole GQA group (rows = positions x heads, the group padded to a
    power of two: SmolLM2's 3 heads a KV head take 4 rows a position) equal the reference."""
    from kernels.paged_prefill_triton import PrefillTuning

    numbers, _, flag = tuning.partition("+")
    bm, bn, w, st = (int(x) for x in numbers.split("/"))
    _check_prefill(DTYPES[0], case, kv_cache, PrefillTuning(bm, bn, w, st, heavy_first=flag == "hf", pack_gqa=True))


@pytest.mark.parametrize("kv_cache", KV_CACHES)
@pytest.mark.parametrize("max_query", ["short", "long"])
def test_paged_prefill_heads_major_pool(kv_cache, max_query):
    """Caches laid out as the engine's CUDA pool (a strided view); both prompt tunings."""
    seqs = [(200, 333), (2, 2), (64, 100)] + ([(1600, 1700)] if max_query == "long" else [])
    if INTERPRET and max_query == "long":
        pytest.skip("long prompts are too slow in the interpreter")
    _check_prefill(DTYPES[0], (16, 32, 8, 128, seqs), kv_cache, heads_major=True)


def _check_prefill(dtype, case, kv_cache, tuning=None, heads_major=False):
    from kernels.paged_prefill_triton import paged_prefill_attention

    block_size, heads, kv_heads, head_dim, seqs = case
    q_lens = [q for q, _ in seqs]
    ctx_lens = [c for _, c in seqs]
    k_cache, v_cache, table = _paged_setup(ctx_lens, block_size, kv_heads, head_dim, dtype, kv_cache)
    if heads_major:
        k_cache, v_cache = _heads_major(k_cache), _heads_major(v_cache)
    total = sum(q_lens)
    q = torch.randn(total, heads, head_dim, device=DEVICE).to(dtype)
    out = torch.full_like(q, float("nan"))
    starts = [sum(q_lens[:i]) for i in range(len(q_lens))]
    i32 = dict(dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    paged_prefill_attention(q, k_cache, v_cache, table.to(torch.int32), torch.tensor(starts, **i32), torch.tensor(q_lens, **i32),
                            torch.tensor(ctx_lens, **i32), max(q_lens), scale, out, **_kv_scale(k_cache), tuning=tuning)
    assert not out.isnan().any(), "some output rows were not written"
    ref = _reference(q, k_cache, v_cache, table, ctx_lens, q_lens, scale)
    assert _rel(out, ref) < ATTN_TOL[dtype]


def test_launchers_reject_bad_inputs():
    from kernels.paged_decode_triton import paged_decode_attention
    from kernels.rmsnorm_triton import rms_norm_triton

    x = torch.randn(4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="weight must be contiguous"):
        rms_norm_triton(x, torch.ones(32, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="unit stride"):
        rms_norm_triton(x.t(), torch.ones(4, device=DEVICE), 1e-5)
    k_cache, v_cache, table = _paged_setup([5], 16, 2, 64, torch.float32)
    q = torch.randn(1, 4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="context_lens must be"):
        paged_decode_attention(q, k_cache, v_cache, table, torch.tensor([5], device=DEVICE), torch.zeros(1, device=DEVICE, dtype=torch.int32),
                               0.1, torch.empty_like(q))
    with pytest.raises(ValueError, match="multiple of KV heads"):
        paged_decode_attention(torch.randn(1, 3, 64, device=DEVICE), k_cache, v_cache, table,
                               torch.tensor([5], dtype=torch.int32, device=DEVICE), torch.zeros(1, device=DEVICE, dtype=torch.int32),
                               0.1, torch.empty(1, 3, 64, device=DEVICE))


# ---- skinny matmul (decode-batch linear layers) -------------------------------
# 16-bit only; the interpreter has no bfloat16, so it checks float16. Against a
# float32 product of the same inputs: the output is rounded once to 16 bits
# (relative error ~2**-9 per element), the sum order differs (float32).
SKINNY_DTYPES = [torch.float16] if INTERPRET else [torch.bfloat16, torch.float16]
SKINNY_TOL = 1e-2


@pytest.mark.parametrize("dtype", SKINNY_DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("n,k,split", [(64, 256, 1), (50, 200, 1), (96, 512, 3), (40, 300, 2), (576, 576, None),
                                       (960, 576, None), (1000, 1000, 8)])
def test_skinny_matmul(dtype, m, n, k, split):
    from kernels.linear_triton import SkinnyTuning, default_tuning, skinny_matmul_triton

    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    w = torch.randn(n, k, device=DEVICE, dtype=dtype)
    tuning = None
    if split is not None:
        base = default_tuning(n, k)
        tuning = SkinnyTuning(32, 64, 4, 2, split) if INTERPRET else SkinnyTuning(base.block_n, 64, 4, 3, split)
    ref = x.float() @ w.float().t()
    outs = [skinny_matmul_triton(x, w, tuning) for _ in range(3)]
    assert outs[0].shape == (m, n) and outs[0].dtype == dtype
    assert _rel(outs[0], ref) < SKINNY_TOL
    # split-K's arrival counters reset after every launch, and partials are added in a fixed order
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    # accumulate: out += x @ w.T (the residual stream), the same tiles and split
    residual = torch.randn(m, n, device=DEVICE, dtype=dtype) * 8
    into = residual.clone()
    assert skinny_matmul_triton(x, w, tuning, out=into, accumulate=True).data_ptr() == into.data_ptr()
    assert _rel(into, ref + residual.float()) < SKINNY_TOL


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_skinny_matmul_graph_replay_equals_eager():
    from kernels.linear_triton import SkinnyTuning, skinny_matmul_triton

    x = torch.randn(2, 2048, device=DEVICE, dtype=torch.bfloat16)
    ws = [torch.randn(n, 2048, device=DEVICE, dtype=torch.bfloat16) for n in (576, 4096, 960)]
    tunings = [SkinnyTuning(32, 128, 4, 3, s) for s in (4, 1, 2)]
    eager = [skinny_matmul_triton(x, w, t) for w, t in zip(ws, tunings)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [skinny_matmul_triton(x, w, t) for w, t in zip(ws, tunings)]
    for _ in range(3):
        for out in outs:  # a replay whose counters did not reset would leave these unwritten
            out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(outs, eager))


@pytest.mark.parametrize("dtype", SKINNY_DTYPES)
def test_linear_dispatch(dtype):
    import torch.nn.functional as F

    from kernels.linear import linear
    from kernels.linear_triton import MAX_ROWS

    w = torch.randn(96, 128, device=DEVICE, dtype=dtype)
    for m in (1, MAX_ROWS, MAX_ROWS + 1):
        x = torch.randn(m, 128, device=DEVICE, dtype=dtype)
        got = linear(x, w)
        assert _rel(got, F.linear(x.float(), w.float())) < SKINNY_TOL
        # into the first rows of a given buffer (a CUDA graph's shared logits): the same
        # product, written there and nowhere else
        buffer = torch.full((MAX_ROWS + 2, 96), float("nan"), device=DEVICE, dtype=dtype)
        into = linear(x, w, out=buffer[:m])
        assert into.data_ptr() == buffer.data_ptr() and torch.equal(buffer[:m], got)
        assert buffer[m:].isnan().all()
    with pytest.raises(ValueError, match="out must be a contiguous"):
        linear(x, w, out=torch.empty(x.shape[0], 95, device=DEVICE, dtype=dtype))
    for m in (1, MAX_ROWS, MAX_ROWS + 1):  # accumulate, on the skinny and the cuBLAS paths
        x = torch.randn(m, 128, device=DEVICE, dtype=dtype)
        residual = torch.randn(m, 96, device=DEVICE, dtype=dtype)
        into = residual.clone()
        assert linear(x, w, out=into, accumulate=True).data_ptr() == into.data_ptr()
        assert _rel(into, F.linear(x.float(), w.float()) + residual.float()) < SKINNY_TOL
    with pytest.raises(ValueError, match="accumulate needs out"):
        linear(x, w, accumulate=True)


def test_skinny_matmul_rejects_bad_inputs():
    from kernels.linear_triton import MAX_ROWS, skinny_matmul_triton

    w = torch.randn(32, 64, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="at most 16"):
        skinny_matmul_triton(torch.randn(MAX_ROWS + 1, 64, device=DEVICE, dtype=torch.float16), w)
    with pytest.raises(ValueError, match="needs 64"):
        skinny_matmul_triton(torch.randn(2, 65, device=DEVICE, dtype=torch.float16), w)
    with pytest.raises(ValueError, match="16-bit float"):
        skinny_matmul_triton(torch.randn(2, 64, device=DEVICE), w.float())
    with pytest.raises(ValueError, match="unit inner stride"):
        skinny_matmul_triton(torch.randn(64, 2, device=DEVICE, dtype=torch.float16).t(), w)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        skinny_matmul_triton(torch.randn(2, 64, device=DEVICE, dtype=torch.float16), w,
                             out=torch.empty(2, 31, device=DEVICE, dtype=torch.float16))


CUDA_ONLY = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="cuBLASLt needs CUDA")


@CUDA_ONLY
@pytest.mark.parametrize("m,n,k", [(17, 96, 128), (256, 576, 576), (64, 1000, 264)])
def test_cublaslt_candidates_match_reference(m, n, k):
    """Every algorithm the tuner may pick, split-K variants included, computes the product."""
    from kernels.cublaslt import WORKSPACE_BYTES, LtMatmul

    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16)
    ref = x.float() @ w.float().t()
    mm = LtMatmul(m, n, k, torch.bfloat16)
    found = mm.candidates()
    assert found, "cuBLASLt offered no algorithm"
    found += mm.variants(found, (2, 4))  # split-K and the other swizzling
    workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE)
    residual = torch.randn(m, n, device=DEVICE, dtype=torch.bfloat16) * 4
    for cand in found:
        out = torch.full((m, n), float("nan"), device=DEVICE, dtype=torch.bfloat16)
        mm.run(x, w, out, cand, workspace)
        assert _rel(out, ref) < SKINNY_TOL, cand.config
        into = residual.clone()  # accumulate: beta 1, C and D the same matrix
        mm.run(x, w, into, cand, workspace, accumulate=True)
        assert _rel(into, ref + residual.float()) < SKINNY_TOL, cand.config


@CUDA_ONLY
@pytest.mark.parametrize("accumulate", [False, True])
def test_tuned_linear_is_used_and_replays_in_a_graph(accumulate, monkeypatch):
    """A shape the tuner kept runs its cuBLASLt algorithm through ``linear`` (eagerly and
    captured; as an accumulating o/down projection when tuned as one), other row counts,
    other weights and misaligned views keep ``F.linear``; all equal the reference."""
    from kernels import cublaslt, linear_tuning
    from kernels.linear import linear

    ws = [torch.randn(576, 576, device=DEVICE, dtype=torch.bfloat16) for _ in range(3)]
    other = torch.randn(576, 576, device=DEVICE, dtype=torch.bfloat16)  # same shape, not tuned
    calls = []
    real_run = cublaslt.LtMatmul.run

    def spy(self, *args, **kwargs):
        calls.append(self.m)
        return real_run(self, *args, **kwargs)

    try:
        tuned = linear_tuning.tune({(576, 576): ws}, [32], min_gain=-1.0,  # keep the fastest, whatever it gains
                                   accumulate=frozenset({(576, 576)}) if accumulate else frozenset())
        assert len(tuned) == 1 and tuned[0].choice is not None and tuned[0].tried >= 1
        monkeypatch.setattr(cublaslt.LtMatmul, "run", spy)
        x = torch.randn(32, 576, device=DEVICE, dtype=torch.bfloat16)
        assert linear_tuning.lookup(x, ws[1]) is not None
        assert linear_tuning.lookup(x[:31], ws[1]) is None and linear_tuning.lookup(x, other) is None
        ref = x.float() @ ws[1].float().t()
        residual = torch.randn(32, 576, device=DEVICE, dtype=torch.bfloat16)
        want = ref + residual.float() if accumulate else ref

        def product(out=None):
            if accumulate:
                return linear(x, ws[1], out=out if out is not None else residual.clone(), accumulate=True)
            return linear(x, ws[1], out=out)

        eager = product()
        assert calls == [32] and _rel(eager, want) < SKINNY_TOL
        buffer = residual.clone() if accumulate else torch.full((32, 576), float("nan"), device=DEVICE,
                                                                 dtype=torch.bfloat16)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            product(buffer)
        if accumulate:
            buffer.copy_(residual)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(buffer, eager)
        calls.clear()
        assert _rel(linear(x[:20], ws[1]), ref[:20]) < SKINNY_TOL  # untuned row count: F.linear
        assert _rel(linear(x, other), x.float() @ other.float().t()) < SKINNY_TOL  # untuned weight
        wide = torch.randn(33, 576, device=DEVICE, dtype=torch.bfloat16)  # 1,152-byte rows:
        shifted = wide[1:]  # a contiguous view 1,152 bytes in, not 256-aligned
        assert linear_tuning.lookup(shifted, ws[1]) is None
        assert _rel(linear(shifted, ws[1]), shifted.float() @ ws[1].float().t()) < SKINNY_TOL
        assert calls == []
    finally:
        linear_tuning.forget(ws)


@CUDA_ONLY
def test_tuning_cache_restores_without_timing(tmp_path, monkeypatch):
    """Outcomes saved by one tuning are restored by the next without a single timing (the
    same algorithms, and ``linear`` runs them correctly); an entry cuBLASLt no longer accepts
    is timed again."""
    import json

    from kernels import linear_tuning
    from kernels.linear import linear
    from kernels.tuning_cache import TuningCache

    ws = [torch.randn(576, 576, device=DEVICE, dtype=torch.bfloat16) for _ in range(3)]
    path = tmp_path / "tuning.json"
    shapes, rows = {(576, 576): ws}, [32, 64]
    try:
        cache = TuningCache(path, "test-env")
        first = linear_tuning.tune(shapes, rows, min_gain=-1.0, cache=cache)  # keeps the fastest, whatever it gains
        cache.save()
        assert all(t.choice is not None and not t.cached for t in first)
        linear_tuning.forget(ws)
        timed = []
        real = linear_tuning._interleaved
        monkeypatch.setattr(linear_tuning, "_interleaved", lambda *a, **kw: timed.append(1) or real(*a, **kw))
        second = linear_tuning.tune(shapes, rows, min_gain=-1.0, cache=TuningCache(path, "test-env"))
        assert timed == [] and all(t.cached for t in second)
        assert [t.choice for t in second] == [t.choice for t in first]
        x = torch.randn(32, 576, device=DEVICE, dtype=torch.bfloat16)
        assert linear_tuning.lookup(x, ws[2]) is not None
        assert _rel(linear(x, ws[2]), x.float() @ ws[2].float().t()) < SKINNY_TOL
        data = json.loads(path.read_text())
        for entry in data["environments"]["test-env"].values():
            entry["algo"] = "ff" * 64  # no algorithm cuBLASLt accepts
        path.write_text(json.dumps(data))
        linear_tuning.forget(ws)
        third = linear_tuning.tune(shapes, rows, min_gain=-1.0, cache=TuningCache(path, "test-env"))
        assert timed and not any(t.cached for t in third) and all(t.choice is not None for t in third)
    finally:
        linear_tuning.forget(ws)
