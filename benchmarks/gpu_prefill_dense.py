"""The dense prefill kernel (``kernels/prefill_dense_triton.py``) against the paged one and FA2, per tuning.

In the offline benchmark's mixed steps (16,384 rows, ~27 fresh prompts of 128-1,024 tokens)
prefill attention took ~18 ms of the ~357 ms a step (docs/PERFORMANCE.md, session 17),
~160 TFLOP/s, with every prompt's keys read back from the paged cache
(``kernels/paged_prefill_triton.py``: a gather by block table per key tile and, with an fp8
cache, a conversion of each tile before the dot products). A prompt with no cached prefix
has all its keys in the step itself; the dense kernel reads q, k and v from there through
TMA descriptors (here strided views of one qkv product: no copy). This script checks every
tuning against a float32 reference, then times it against the engine's paged kernel over a
bf16 and an fp8 cache holding the same tokens and against PyTorch's varlen flash attention
(FA2). Session 18 ran it as an experiment (the kernel then lived here); since session 19 the
engine sends a step's cache-free prompts to the kernel (``EngineConfig.dense_prefill``).

Usage: python benchmarks/gpu_prefill_dense.py [--tokens 16384] [--prompts 128-1024] [--json out.json]
       python benchmarks/gpu_prefill_dense.py --compile-sm90   (resources of each tuning; no GPU needed)
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

import torch
import triton

from kernels.prefill_dense_triton import DenseTuning, _dense_prefill_kernel, dense_prefill_attention


TUNINGS = [DenseTuning(), DenseTuning(block_m=128, num_warps=8, num_stages=2),
           DenseTuning(block_m=128, block_n=128, num_warps=8, num_stages=2), DenseTuning(block_m=128, num_warps=8),
           DenseTuning(block_m=128, num_stages=2), DenseTuning(num_stages=2),
           DenseTuning(block_m=128, block_n=128, num_warps=8), DenseTuning(heavy_first=False),
           DenseTuning(block_m=128, num_warps=8, num_stages=2, warp_specialize=True),
           DenseTuning(block_m=128, num_warps=8, warp_specialize=True),
           DenseTuning(block_m=128, num_warps=8, num_stages=2, pack_gqa=True),
           DenseTuning(block_m=128, num_warps=8, pack_gqa=True),
           DenseTuning(block_m=128, block_n=128, num_warps=8, num_stages=2, pack_gqa=True),
           DenseTuning(block_m=128, block_n=32, pack_gqa=True)]
"""Session 18's 14 tunings but one (its 128/64/8-warp/2-stage default first there; the
engine's default, 64/64/4/3, first here, and the one without ``heavy_first`` now that
default's variant instead of 128/64/8/2's)."""


def qkv_views(qkv: torch.Tensor, heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q ``[T, Hq, D]`` and k, v ``[T, Hk, D]`` as strided views of the fused product (no copy)."""
    dim = qkv.shape[1] // (heads + 2 * kv_heads)
    x = qkv.view(qkv.shape[0], heads + 2 * kv_heads, dim)
    return x[:, :heads], x[:, heads: heads + kv_heads], x[:, heads + kv_heads:]


def dense_args(qkv: torch.Tensor, heads: int, kv_heads: int, cu_seqlens: torch.Tensor) -> tuple:
    """The kernel's tensors over the views of ``qkv`` (sequence ``i``: rows
    ``cu_seqlens[i]:cu_seqlens[i + 1]``): q, k, v, query starts and lengths, and ``out``."""
    q, k, v = qkv_views(qkv, heads, kv_heads)
    starts = cu_seqlens[:-1].contiguous()
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).contiguous()
    return q, k, v, starts, lens, torch.empty(q.shape, dtype=q.dtype, device=q.device)


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
             "v_desc": f"tensordesc<bf16[{t.block_n}, {dim}]>", "out_ptr": "*bf16", "qs_ptr": "*i32",
             "ql_ptr": "*i32", "scale_log2": "fp32"}
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

    q_d, k_d, v_d, starts_d, lens_d, out_d = dense_args(qkv, hq, hk, cu)  # set up once: the launch alone is
    # timed (session 19's first figures also timed the set-up, ~3 small kernels)
    for tuning in TUNINGS:
        try:
            def launch():
                return dense_prefill_attention(q_d, k_d, v_d, starts_d, lens_d, max(lens), scale, out_d, tuning)

            err = ((launch().float() - want).abs().max() / want.abs().max()).item()
            if err > 2e-2:
                print(f"dense {tuning}: wrong, relative error {err:.2e}", flush=True)
                continue
            us = 1e3 * do_bench(launch,
                                warmup=25, rep=100, return_mode="median")
        except Exception as e:  # out of shared memory, say: the others still run
            print(f"dense {tuning}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        report("dense TMA (kernels/prefill_dense_triton.py)", us, f"{tuning} err {err:.1e}")
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
        k_cache = v_cache = None  # freed before the next cache's allocation
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
