"""Could a mixed step's prefill attention read its prompts' K/V straight from the step's own qkv product?

In the offline benchmark's mixed steps (16,384 rows, ~27 fresh prompts of 128-1,024 tokens)
prefill attention takes ~18 ms of the ~357 ms a step (docs/PERFORMANCE.md, session 17),
~160 TFLOP/s. The engine's kernel (``kernels/paged_prefill_triton.py``) reads every key
back from the paged cache: a gather by block table per key tile and, with an fp8 cache, a
conversion of each tile before the dot products. A prompt with no cached prefix has all
its keys in the step's own qkv product, contiguous and in bf16. This kernel reads them from
there with TMA tensor descriptors (one descriptor each for q, k and v, strided views of
the qkv product: no copy), one program per (query tile, query head, sequence), a
flash-attention loop without gathers or conversions; it times it against the engine's
kernel over a bf16 and an fp8 cache holding the same number of tokens and against PyTorch's
varlen flash attention (FA2), after checking it against a float32 reference.

An experiment: nothing in the engine uses this kernel. If it is much faster, the engine
would have rotary write the rotated keys back into the qkv product (as it does the
queries) and send a step's cache-free prompts here, the chunks with a cached prefix to the
paged kernel; with an fp8 cache the prompt would then attend to its own keys unquantized
(the decode steps read them quantized), which moves logits by about the cache's rounding.

Usage: python benchmarks/gpu_prefill_dense.py [--tokens 16384] [--prompts 128-1024] [--json out.json]
       python benchmarks/gpu_prefill_dense.py --compile-sm90   (resources of each tuning; no GPU needed)
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DenseTuning:
    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 2
    heavy_first: bool = True
    """Launch each sequence's last (longest) query tile first."""
    warp_specialize: bool = False
    """Triton's warp specialisation of the key loop (loads in a producer warp group)."""
    pack_gqa: bool = False
    """A program serves all query heads of one KV head: its ``block_m`` rows are
    ``block_m / group`` positions x ``group`` heads (one 3-D TMA box), so each key tile is
    loaded once per group, as the engine's ``PrefillTuning.pack_gqa``."""


TUNINGS = [DenseTuning(), DenseTuning(block_n=128), DenseTuning(num_stages=3), DenseTuning(num_warps=4),
           DenseTuning(block_m=64, num_warps=4), DenseTuning(block_m=64, num_warps=4, num_stages=3),
           DenseTuning(block_n=128, num_stages=3), DenseTuning(heavy_first=False),
           DenseTuning(warp_specialize=True), DenseTuning(num_stages=3, warp_specialize=True),
           DenseTuning(pack_gqa=True), DenseTuning(num_stages=3, pack_gqa=True),
           DenseTuning(block_n=128, pack_gqa=True),
           DenseTuning(num_warps=4, block_n=32, num_stages=3, pack_gqa=True)]


@triton.jit
def _attend_dense(q, m_i, l_i, acc, k_desc, v_desc, row0, kcol, n0, pos, hi, scale_log2,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    k = k_desc.load([row0 + n0, kcol])
    s = tl.dot(q, tl.trans(k)) * scale_log2
    if MASKED:
        n = n0 + tl.arange(0, BLOCK_N)
        s = tl.where((n[None, :] <= pos[:, None]) & (n[None, :] < hi), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = v_desc.load([row0 + n0, kcol])
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _dense_prefill_kernel(q_desc, k_desc, v_desc, out_ptr, cu_ptr, o_st, o_sh, scale_log2,
                          GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          HEAVY_FIRST: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, PACK_GQA: tl.constexpr):
    """Grid (heads, sequences, query tiles): query heads (a KV group's side by side, so each
    key tile comes from DRAM about once for the group), or KV heads with ``PACK_GQA``. Tiles
    reaching past a sequence read the next one's rows (or TMA's zeros past the last): masked
    off, never stored."""
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
    row0 = tl.load(cu_ptr + b)
    length = tl.load(cu_ptr + b + 1) - row0
    if tile * POSITIONS >= length:
        return
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
    tl.store(out_ptr + (row0 + pos)[:, None] * o_st + head[:, None] * o_sh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(pos < length)[:, None])


def dense_prefill_attention(qkv: torch.Tensor, heads: int, kv_heads: int, cu_seqlens: torch.Tensor, max_len: int,
                            scale: float, tuning: DenseTuning = DenseTuning()) -> torch.Tensor:
    """Causal attention of each sequence over its own rows of ``qkv`` ``[T, (Hq + 2 Hk) D]``
    (q, then k, then v columns, as the engine's fused projection writes them); sequence ``i``
    owns rows ``cu_seqlens[i]:cu_seqlens[i + 1]``. Returns ``[T, Hq, D]``."""
    tokens, width = qkv.shape
    dim = width // (heads + 2 * kv_heads)
    if qkv.stride(1) != 1 or (qkv.stride(0) * qkv.element_size()) % 16 or dim * (heads + 2 * kv_heads) != width:
        raise ValueError(f"qkv must be a row-major [T, (Hq + 2 Hk) D] tensor with 16-byte rows, got {tuple(qkv.shape)}")
    q2 = qkv[:, : heads * dim]
    k2 = qkv[:, heads * dim: (heads + kv_heads) * dim]
    v2 = qkv[:, (heads + kv_heads) * dim:]
    out = torch.empty((tokens, heads, dim), dtype=qkv.dtype, device=qkv.device)
    t, group = tuning, heads // kv_heads
    if t.pack_gqa:
        if group & (group - 1) or t.block_m % group:
            raise ValueError(f"pack_gqa needs a power-of-two group dividing block_m, got {group} and {t.block_m}")
        q_desc = TensorDescriptor.from_tensor(q2.unflatten(1, (heads, dim)), [t.block_m // group, group, dim])
        grid = (kv_heads, cu_seqlens.numel() - 1, triton.cdiv(max_len, t.block_m // group))
    else:
        q_desc = TensorDescriptor.from_tensor(q2, [t.block_m, dim])
        grid = (heads, cu_seqlens.numel() - 1, triton.cdiv(max_len, t.block_m))
    _dense_prefill_kernel[grid](
        q_desc, TensorDescriptor.from_tensor(k2, [t.block_n, dim]),
        TensorDescriptor.from_tensor(v2, [t.block_n, dim]), out, cu_seqlens, out.stride(0), out.stride(1),
        scale * _LOG2E, GROUP=group, HEAD_DIM=dim, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
        HEAVY_FIRST=t.heavy_first, WARP_SPECIALIZE=t.warp_specialize, PACK_GQA=t.pack_gqa, num_warps=t.num_warps,
        num_stages=t.num_stages,
    )
    return out


def reference(qkv: torch.Tensor, heads: int, kv_heads: int, lens: list[int], scale: float) -> torch.Tensor:
    """float32, one causal SDPA per sequence (GQA by repeating K/V heads)."""
    dim = qkv.shape[1] // (heads + 2 * kv_heads)
    x = qkv.float().view(qkv.shape[0], heads + 2 * kv_heads, dim)
    outs = []
    for start, n in zip(itertools.accumulate([0] + lens[:-1]), lens):
        q, k, v = (x[start: start + n, a:b].transpose(0, 1) for a, b in
                   ((0, heads), (heads, heads + kv_heads), (heads + kv_heads, heads + 2 * kv_heads)))
        k, v = (t.repeat_interleave(heads // kv_heads, 0) for t in (k, v))
        outs.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
                    .transpose(0, 1))
    return torch.cat(outs)


def prompt_lengths(tokens: int, lo: int, hi: int, seed: int = 17) -> list[int]:
    """Prompt lengths uniform in [lo, hi] (seeded) until ``tokens`` are used; the last one
    takes the rest, as a full step's last chunk does."""
    rng, lens = random.Random(seed), []
    while sum(lens) < tokens:
        lens.append(min(rng.randint(lo, hi), tokens - sum(lens)))
    return lens


def compile_sm90(tuning: DenseTuning, heads: int = 32, kv_heads: int = 8, dim: int = 128):
    """The kernel compiled for an H100 (sm_90) at Llama-3-8B's attention shape, on any machine
    with Triton's NVIDIA backend (no GPU needed; ``decode_sass.py`` says how)."""
    from benchmarks.decode_sass import compile_for_sm90

    t, group = tuning, heads // kv_heads
    q_box = f"[{t.block_m // group}, {group}, {dim}]" if t.pack_gqa else f"[{t.block_m}, {dim}]"
    kinds = {"q_desc": f"tensordesc<bf16{q_box}>", "k_desc": f"tensordesc<bf16[{t.block_n}, {dim}]>",
             "v_desc": f"tensordesc<bf16[{t.block_n}, {dim}]>", "out_ptr": "*bf16", "cu_ptr": "*i32",
             "scale_log2": "fp32"}
    constexprs = dict(GROUP=group, HEAD_DIM=dim, BLOCK_M=t.block_m, BLOCK_N=t.block_n, HEAVY_FIRST=t.heavy_first,
                      WARP_SPECIALIZE=t.warp_specialize, PACK_GQA=t.pack_gqa)
    return compile_for_sm90(_dense_prefill_kernel, kinds, constexprs, ("o_st", "o_sh"), t.num_warps, t.num_stages)


def report_sm90() -> None:
    """Registers, shared memory, spills and programs an SM of every tuning, compiled for sm_90."""
    from benchmarks.decode_sass import histogram, programs_per_sm, registers, sass

    print(f"# sm_90 compile, triton {triton.__version__}", flush=True)
    for t in TUNINGS:
        compiled = compile_sm90(t)
        regs, shared = registers(compiled.asm["cubin"]), compiled.metadata.shared
        ops = histogram(sass(compiled.asm["cubin"]))
        print(f"{t}: {regs} registers, {shared} bytes of shared memory, {ops.get('STL', 0)} spill stores, "
              f"{programs_per_sm(regs, shared, t.num_warps)} programs an SM", flush=True)


def main() -> None:
    from triton.testing import do_bench

    from benchmarks import gpu_kernels
    from kernels.paged_prefill_triton import paged_prefill_attention

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--prompts", default="128-1024", help="prompt lengths uniform in LO-HI")
    parser.add_argument("--compile-sm90", action="store_true",
                        help="only compile every tuning for an H100 and report its resources (no GPU needed)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.compile_sm90:
        report_sm90()
        return
    lo, hi = (int(x) for x in args.prompts.split("-"))
    hq, hk, dim = 32, 8, 128
    lens = prompt_lengths(args.tokens, lo, hi)
    total, scale = sum(lens), dim**-0.5
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}; "
          f"{len(lens)} prompts, {total} tokens", flush=True)
    qkv = torch.randn(total, (hq + 2 * hk) * dim, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device="cuda")
    flops = sum(4 * n * n * hq * dim / 2 for n in lens)
    want = reference(qkv, hq, hk, lens, scale)
    results = []

    def report(name: str, us: float, note: str = "") -> None:
        results.append({"kernel": name, "us": us, "TFLOPs": flops / us / 1e6, "note": note})
        print(f"{name:<34} {us:8.1f} us  {flops / us / 1e6:5.0f} TFLOP/s  {note}", flush=True)

    for tuning in TUNINGS:
        try:
            got = dense_prefill_attention(qkv, hq, hk, cu, max(lens), scale, tuning)
            err = ((got.float() - want).abs().max() / want.abs().max()).item()
            if err > 2e-2:
                print(f"dense {tuning}: wrong, relative error {err:.2e}", flush=True)
                continue
            us = 1e3 * do_bench(lambda: dense_prefill_attention(qkv, hq, hk, cu, max(lens), scale, tuning),
                                warmup=25, rep=100, return_mode="median")
        except Exception as e:  # out of shared memory, say: the others still run
            print(f"dense {tuning}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        report("dense TMA (this script)", us, f"{tuning} err {err:.1e}")
    q = qkv[:, : hq * dim].reshape(total, hq, dim)
    out = torch.empty_like(q)
    i32 = dict(dtype=torch.int32, device="cuda")
    starts, q_lens = cu[:-1].contiguous(), torch.tensor(lens, **i32)
    gpu_kernels.KV_LAYOUT = "heads-major"  # the engine's pool
    for cache_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        k_cache, v_cache, table = gpu_kernels.paged_setup(len(lens), max(lens), cache_dtype)
        us = 1e3 * do_bench(lambda: paged_prefill_attention(q, k_cache, v_cache, table, starts, q_lens, q_lens,
                                                           max(lens), scale, out), warmup=25, rep=100,
                            return_mode="median")
        report(f"paged, engine's kernel ({'fp8' if cache_dtype != torch.bfloat16 else 'bf16'} cache)", us,
               "default tuning, K/V from the cache")
        del k_cache, v_cache
    k = qkv[:, hq * dim: (hq + hk) * dim].reshape(total, hk, dim).contiguous()
    v = qkv[:, (hq + hk) * dim:].reshape(total, hk, dim).contiguous()
    qc = q.contiguous()
    try:
        us = 1e3 * do_bench(lambda: torch.ops.aten._flash_attention_forward(qc, k, v, cu, cu, max(lens), max(lens), 0.0,
                                                                          True, False, scale=scale),
                            warmup=25, rep=100, return_mode="median")
        report("flash varlen (torch, FA2)", us, "contiguous q/k/v")
    except Exception as e:  # not in every PyTorch build
        print(f"flash varlen (torch): {type(e).__name__}: {str(e)[:200]}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"lens": lens, "rows": results}, indent=2))


if __name__ == "__main__":
    main()
