"""Each Triton kernel against its torch reference (and PyTorch's own kernels), at Llama-3-8B shapes.

Prints one table: time (median of ``triton.testing.do_bench``) and achieved
bandwidth (bytes each kernel must move at least, over its time) or TFLOP/s,
next to the torch reference and, for prefill attention, SDPA's flash kernel.
Decode attention runs over a bf16 and an fp8 cache (``--sweep``: over a grid of
its launch parameters, ``DecodeTuning``, too). The matmul shapes of a step
(cuBLAS through ``F.linear``) run at 1, 64 and 256 rows (decode: bandwidth
bounds batch 1) and at 2048 and 8192 rows (prefill: compute-bound; the
TFLOP/s an engine's prefill can reach at most).

Usage: python benchmarks/gpu_kernels.py [--sweep] [--only gemm,decode,decode_graph,prefill,elementwise]
       [--decode-cases 256x700,256x256-1152,64x2048] [--decode-splits 1,2,4] [--kv-layout heads-major|kv-heads|...] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from kernels.activation import silu_and_mul_ref
from kernels.activation_triton import silu_and_mul_triton
from kernels.paged_attention import paged_attention_ref
from kernels.paged_decode_triton import (
    DecodeTuning,
    decode_tuning,
    format_decode_tuning,
    paged_decode_attention,
    parse_decode_tuning,
)
from kernels.paged_prefill_triton import LONG_QUERY, PrefillTuning, default_prefill_tuning, paged_prefill_attention
from kernels.rmsnorm import add_rms_norm_ref
from kernels.rmsnorm_triton import rms_norm_triton
from kernels.rotary import build_cos_sin_cache
from kernels.rotary_store import rotary_and_store_ref
from kernels.rotary_store_triton import rotary_and_store_triton
from worker.models.attention import longest_first

HQ, HK, D, HIDDEN, FFN, VOCAB, BS = 32, 8, 128, 4096, 14336, 128256, 16
DEV = "cuda"
BF16 = torch.bfloat16
ROWS: list[dict] = []


def ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def row(kernel: str, shape: str, t: float, *, nbytes: float = 0, flops: float = 0, ref: float | None = None, note: str = ""):
    r = {"kernel": kernel, "shape": shape, "us": 1e3 * t, "GBps": nbytes / t / 1e6 if nbytes else None,
         "TFLOPs": flops / t / 1e9 if flops else None, "ref_us": 1e3 * ref if ref else None, "note": note}
    ROWS.append(r)
    rate = f"{r['GBps']:.0f} GB/s" if r["GBps"] else f"{r['TFLOPs']:.0f} TFLOP/s"
    refs = f"  ref {r['ref_us']:.1f} us" if ref else ""
    print(f"{kernel:<22} {shape:<28} {r['us']:>9.1f} us  {rate:>13}{refs}  {note}", flush=True)


def bench_gemm() -> None:
    shapes = {"qkv": (6144, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up": (2 * FFN, HIDDEN), "down": (HIDDEN, FFN),
              "lm_head": (VOCAB, HIDDEN)}
    for m in (1, 64, 256, 2048, 8192):
        for name, (n, k) in shapes.items():
            if m > 256 and name == "lm_head":
                continue  # prefill computes logits for the last token of each prompt only
            copies = max(1, (200 << 20) // (n * k * 2))  # rotate weights so that L2 cannot hold them
            ws = [torch.randn(n, k, device=DEV, dtype=BF16) for _ in range(min(copies, 4))]
            x = torch.randn(m, k, device=DEV, dtype=BF16)
            it = iter(range(1 << 30))
            t = ms(lambda: F.linear(x, ws[next(it) % len(ws)]))
            row("F.linear (cuBLAS)", f"M={m} {name} {n}x{k}", t, nbytes=n * k * 2 + m * (n + k) * 2 if m <= 256 else 0,
                flops=0 if m == 1 else 2 * m * n * k)
            del ws


def parse_case(case: str) -> tuple[int, int, int]:
    """``BxC`` (every context C tokens) or ``BxLO-HI`` (contexts uniform in [LO, HI], seeded):
    (batch, shortest, longest)."""
    batch, ctx = case.split("x")
    lo, _, hi = ctx.partition("-")
    return int(batch), int(lo), int(hi or lo)


KV_LAYOUTS = ("natural", "heads-major", "kv-blocks", "kv-heads")
KV_LAYOUT = "natural"
"""``--kv-layout``: how the decode/prefill caches lie in memory. ``natural``: ``[blocks,
block_size, heads, dim]``; ``heads-major``: the engine's CUDA pool (``ModelRunner._allocate_kv``:
each KV head's rows of a block together, K and V in separate halves of the pool);
``kv-blocks``: a block's K (all heads) followed by its V; ``kv-heads``: per block and head,
its K rows followed by its V rows. All are strided views the kernels read as
``[blocks, block_size, heads, dim]``."""


def paged_setup(batch: int, ctx: int, dtype: torch.dtype = BF16):
    blocks_per = -(-ctx // BS)
    num_blocks = max(batch * blocks_per + 8, 4096)
    # the same block table for every dtype of a case
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(batch * 100_003 + ctx))
    perm = perm[: batch * blocks_per].view(batch, blocks_per)
    if KV_LAYOUT == "natural":
        k = torch.randn((num_blocks, BS, HK, D), device=DEV, dtype=BF16).to(dtype)
        return k, torch.randn_like(k, dtype=BF16).to(dtype), perm.to(DEV, torch.int32)
    if KV_LAYOUT == "heads-major":
        storage = torch.randn((2, num_blocks, HK, BS, D), device=DEV, dtype=BF16).to(dtype)
        k, v = storage[0], storage[1]
    elif KV_LAYOUT == "kv-blocks":
        storage = torch.randn((num_blocks, 2, HK, BS, D), device=DEV, dtype=BF16).to(dtype)
        k, v = storage[:, 0], storage[:, 1]
    else:
        storage = torch.randn((num_blocks, HK, 2, BS, D), device=DEV, dtype=BF16).to(dtype)
        k, v = storage[:, :, 0], storage[:, :, 1]
    return k.transpose(1, 2), v.transpose(1, 2), perm.to(DEV, torch.int32)


DECODE_CASES = "1x256,1x4096,16x1024,64x640,64x2048,256x700"


def decode_case(batch: int, lo: int, ctx: int):
    """A decode case's contexts (uniform in [lo, ctx], seeded by the batch size) as a list and
    as the kernel's lengths, its query rows and its label."""
    rng = random.Random(batch)
    ctx_list = [rng.randint(lo, ctx) for _ in range(batch)]
    lens = torch.tensor(ctx_list, dtype=torch.int32, device=DEV)
    rows = torch.arange(batch, device=DEV, dtype=torch.int32)
    shape = f"B={batch} ctx={ctx}" if lo == ctx else f"B={batch} ctx={lo}-{ctx}"
    return ctx_list, lens, rows, shape


def bench_decode(sweep: bool, cases_arg: str = DECODE_CASES, splits_arg: str = "") -> None:
    """Decode attention over a bf16 and an fp8 (e4m3) cache, each with its default tuning
    (``--sweep``: the best three of a grid, and the default; ``--decode-splits``: the default
    tuning at each of these split counts too). Single launches: small batches read slow here
    (launch-bound); ``decode_graph`` times the kernel as the engine runs it."""
    cases = [parse_case(case) for case in cases_arg.split(",")]
    split_counts = [int(x) for x in splits_arg.split(",") if x]
    for cache_dtype in (BF16, torch.float8_e4m3fn):
        fp8 = cache_dtype != BF16
        for batch, lo, ctx in cases:
            default = decode_tuning(batch, cache_dtype)
            tunings = [default]
            if sweep:
                tunings = [DecodeTuning(b, w, s, heads_inner=True) for b in (32, 64, 128) for w in (2, 4, 8)
                           for s in (2, 3)]
                tunings += [dataclasses.replace(default, waves=waves) for waves in (4, 8)]
            k, v, table = paged_setup(batch, ctx, cache_dtype)
            q = torch.randn(batch, HQ, D, device=DEV, dtype=BF16)
            out = torch.empty_like(q)
            ctx_list, lens, rows, shape = decode_case(batch, lo, ctx)
            nbytes = sum(ctx_list) * HK * D * 2 * k.element_size()
            ref = None
            if batch * ctx <= 64 * 1024 and not fp8:
                ref = ms(lambda: paged_attention_ref(q, k, v, table.long(), ctx_list, [1] * batch, D**-0.5))
            results = []
            for tuning in tunings:
                t = ms(lambda: paged_decode_attention(q, k, v, table, lens, rows, D**-0.5, out, tuning=tuning))
                results.append((t, tuning))
            results.sort(key=lambda x: x[0])
            name = f"paged decode {'fp8' if fp8 else 'bf16'}"
            for t, tuning in results[: 3 if sweep else 1]:
                row(name, shape, t, nbytes=nbytes, ref=ref,
                    note=f"tuning={format_decode_tuning(tuning)} waves={tuning.waves}")
            if sweep:
                row(name, shape, next(t for t, tu in results if tu == default), nbytes=nbytes, note="default tuning")
            if lo < ctx:  # what the engine's launch order gains over batch order
                order = torch.from_numpy(longest_first(ctx_list)).to(DEV)
                t = ms(lambda: paged_decode_attention(q, k, v, table, lens, rows, D**-0.5, out, order=order))
                row(name, shape, t, nbytes=nbytes, note="default tuning, launched longest first (one split only)")
            for splits in split_counts:
                t = ms(lambda: paged_decode_attention(q, k, v, table, lens, rows, D**-0.5, out, num_splits=splits))
                row(name, shape, t, nbytes=nbytes, note=f"default tuning, {splits} splits")
            del k, v


def bench_decode_graph(cases_arg: str, variants_arg: str = "", rounds: int = 20) -> None:
    """Decode attention as the engine runs it: 32 launches, one per layer's own cache, inside
    one CUDA graph (no launch overhead, nothing left in L2); default tuning and
    ``--decode-variants`` (``BLOCK_N/WARPS/STAGES[+h]``, comma-separated,
    ``parse_decode_tuning``). The tunings' graphs are
    replayed in turn, ``rounds`` times after a warm-up, and each gets the median of its
    replays: measured one after the other, whichever came first ran slower (~7 %)."""
    for batch, lo, ctx in (parse_case(c) for c in cases_arg.split(",")):
        ctx_list, lens, rows, shape = decode_case(batch, lo, ctx)
        order = torch.from_numpy(longest_first(ctx_list)).to(DEV)
        for cache_dtype in (BF16, torch.float8_e4m3fn):
            fp8 = cache_dtype != BF16
            layers = [paged_setup(batch, ctx, cache_dtype) for _ in range(32)]
            q = torch.randn(batch, HQ, D, device=DEV, dtype=BF16)
            out = torch.empty_like(q)
            default = decode_tuning(batch, cache_dtype)
            tunings = list(dict.fromkeys([default] + [parse_decode_tuning(v, default) for v in variants_arg.split(",") if v]))
            graphs = []
            for tuning in list(tunings):
                def step():
                    for k, v, t in layers:
                        paged_decode_attention(q, k, v, t, lens, rows, D**-0.5, out, tuning=tuning, order=order)
                try:
                    step()
                except Exception as e:  # a variant that does not compile: the others still run
                    print(f"decode tuning {tuning}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    tunings.remove(tuning)
                    continue
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
                graphs.append(graph)
            for graph in graphs * 5:
                graph.replay()
            times: list[list[float]] = [[] for _ in graphs]
            for _ in range(rounds):
                for i, graph in enumerate(graphs):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    graph.replay()
                    end.record()
                    end.synchronize()
                    times[i].append(start.elapsed_time(end) / 32)
            for tuning, ts in zip(tunings, times):
                row(f"paged decode {'fp8' if fp8 else 'bf16'} (graph)", shape, sorted(ts)[len(ts) // 2],
                    nbytes=sum(ctx_list) * HK * D * 2 * (1 if fp8 else 2),
                    note=f"tuning={format_decode_tuning(tuning)}"
                         + (" (default)" if tuning == default else ""))
            del layers, graphs


def bench_prefill(sweep: bool) -> None:
    """One prompt of 512 and of 2,048 tokens against SDPA; then a mixed step's prefill (14
    prompts uniform in [128, 1024], ~8k tokens, as the offline benchmark's steps) and one
    2,048-token prompt over a bf16 and an fp8 cache, against PyTorch's varlen flash attention,
    at a few tunings (``--sweep``: a grid too, its best three)."""
    for n in (512, 2048):
        k, v, table = paged_setup(1, n)
        q = torch.randn(n, HQ, D, device=DEV, dtype=BF16)
        out = torch.empty_like(q)
        i32 = dict(dtype=torch.int32, device=DEV)
        args = (table, torch.zeros(1, **i32), torch.tensor([n], **i32), torch.tensor([n], **i32), n, D**-0.5, out)
        t = ms(lambda: paged_prefill_attention(q, k, v, *args))
        flops = 4 * n * n * HQ * D / 2
        qs = q.transpose(0, 1)[None].contiguous()
        ks = torch.randn(1, HK, n, D, device=DEV, dtype=BF16)
        vs = torch.randn_like(ks)
        sdpa = ms(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True))
        row("paged prefill (Triton)", f"1 x {n} causal", t, flops=flops, ref=sdpa, note="ref = SDPA (contiguous K/V, no paging)")
    rng = random.Random(14)
    mixed = [rng.randint(128, 1024) for _ in range(14)]
    for lens in (mixed, [2048]):
        prefill_tunings(lens, sweep)


def prefill_tunings(lens: list[int], sweep: bool) -> None:
    total = sum(lens)
    shape = f"{len(lens)} x 128-1024 ({total} tok)" if len(lens) > 1 else f"1 x {total}"
    _, _, table = paged_setup(len(lens), max(lens))
    q = torch.randn(total, HQ, D, device=DEV, dtype=BF16)
    out = torch.empty_like(q)
    i32 = dict(dtype=torch.int32, device=DEV)
    starts = torch.tensor([sum(lens[:i]) for i in range(len(lens))], **i32)
    q_lens = torch.tensor(lens, **i32)
    flops = sum(4 * n * n * HQ * D / 2 for n in lens)
    # PyTorch's flash attention (varlen, GQA) on the same prompts with contiguous K/V: what a
    # cache-free prefill could run instead of reading its own K/V back from the paged cache
    kf, vf = torch.randn(total, HK, D, device=DEV, dtype=BF16), torch.randn(total, HK, D, device=DEV, dtype=BF16)
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), **i32)
    try:
        t = ms(lambda: torch.ops.aten._flash_attention_forward(q, kf, vf, cu, cu, max(lens), max(lens), 0.0, True, False,
                                                               scale=D**-0.5))
        row("flash varlen (torch)", shape, t, flops=flops,
            note="aten._flash_attention_forward, contiguous K/V")
    except Exception as e:  # not in every PyTorch build
        print(f"flash varlen (torch): {type(e).__name__}: {str(e)[:200]}", flush=True)
    for cache_dtype in (BF16, torch.float8_e4m3fn):
        fp8 = cache_dtype != BF16
        kc, vc, _ = paged_setup(len(lens), max(lens), cache_dtype)
        default = default_prefill_tuning(BF16, fp8, D, max(lens))
        other = default_prefill_tuning(BF16, fp8, D, 1 if max(lens) >= LONG_QUERY else LONG_QUERY)
        tunings = [default, other, dataclasses.replace(default, heavy_first=not default.heavy_first),
                   PrefillTuning(64, 64, 4, 3), PrefillTuning(64, 64, 4, 2), PrefillTuning(128, 64, 8, 2),
                   PrefillTuning(128, 64, 4, 3)]
        # a program per GQA group (rows = positions x heads)
        tunings += [PrefillTuning(bm, bn, w, st, hf, pack_gqa=True)
                    for bm, bn, w, st in ((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 2), (128, 64, 4, 3),
                                          (128, 64, 8, 2), (128, 32, 4, 3), (128, 128, 8, 2), (256, 64, 8, 2))
                    for hf in (False, True)]
        # five stages: with the block table's load one level of indirection ahead of K/V, Triton's
        # pipeliner gives each load (stages - 1) // 2 iterations of lead, so K/V are prefetched a
        # tile ahead (two buffers) only from five stages
        tunings += [PrefillTuning(bm, bn, w, 5, True, pack_gqa=True) for bm, bn, w in ((128, 32, 4), (128, 64, 4),
                                                                                         (128, 64, 8))]
        tunings = list(dict.fromkeys(tunings))
        named = len(tunings)
        if sweep:
            tunings += [PrefillTuning(bm, bn, w, st, hf) for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8)
                        for st in (2, 3) for hf in (False, True) if not (bm == 128 and bn == 128 and st == 3)]
        results = []
        for i, tuning in enumerate(tunings):
            try:
                t = ms(lambda: paged_prefill_attention(q, kc, vc, table, starts, q_lens, q_lens, max(lens), D**-0.5, out,
                                                       tuning=tuning))
            except Exception as e:  # out of shared memory, say
                print(f"prefill tuning {tuning}: {type(e).__name__}", flush=True)
                continue
            results.append((t, tuning, i < named))
        keep = [r for r in results if r[2]] + sorted((r for r in results if not r[2]), key=lambda r: r[0])[:3]
        for t, tuning, _ in keep:
            row(f"paged prefill {'fp8' if fp8 else 'bf16'}", shape, t, flops=flops,
                note=f"bm={tuning.block_m} bn={tuning.block_n} w={tuning.num_warps} st={tuning.num_stages} "
                     f"heavy_first={tuning.heavy_first}" + (" pack_gqa" if tuning.pack_gqa else "")
                     + (" (default)" if tuning == default else ""))


def bench_elementwise() -> None:
    t_ = 4096
    x = torch.randn(t_, HIDDEN, device=DEV, dtype=BF16)
    r = torch.randn_like(x)
    w = torch.randn(HIDDEN, device=DEV, dtype=BF16)
    row("add+rmsnorm (Triton)", f"{t_} x {HIDDEN}", ms(lambda: rms_norm_triton(x, w, 1e-5, r)), nbytes=4 * x.numel() * 2,
        ref=ms(lambda: add_rms_norm_ref(x, r, w, 1e-5)))
    g = torch.randn(t_, 2 * FFN, device=DEV, dtype=BF16)
    row("silu_and_mul (Triton)", f"{t_} x 2*{FFN}", ms(lambda: silu_and_mul_triton(g)), nbytes=1.5 * g.numel() * 2,
        ref=ms(lambda: silu_and_mul_ref(g)))
    qkv = torch.randn(t_, (HQ + 2 * HK) * D, device=DEV, dtype=BF16)
    q = qkv[:, : HQ * D].view(t_, HQ, D)
    kk = qkv[:, HQ * D : (HQ + HK) * D].view(t_, HK, D)
    vv = qkv[:, (HQ + HK) * D :].view(t_, HK, D)
    cache = build_cos_sin_cache(D, 8192, 500000.0, None, torch.float32, torch.device(DEV))
    pos = torch.randint(0, 8192, (t_,), device=DEV)
    kc = torch.zeros(8192, BS, HK, D, device=DEV, dtype=BF16)
    vc = torch.zeros_like(kc)
    slots = torch.randperm(8192 * BS, device=DEV)[:t_]
    row("rotary q+k, store k+v", f"{t_} tokens", ms(lambda: rotary_and_store_triton(q, kk, vv, pos, cache, kc, vc, slots)),
        nbytes=2 * (HQ + 2 * HK) * D * t_ * 2, ref=ms(lambda: rotary_and_store_ref(q, kk, vv, pos, cache, kc, vc, slots)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="sweep the decode kernel's launch parameters")
    parser.add_argument("--only", default="gemm,decode,prefill,elementwise")
    parser.add_argument("--decode-cases", default=DECODE_CASES,
                        help="batch x context of the decode rows: BxC, or BxLO-HI for contexts uniform in [LO, HI]")
    parser.add_argument("--decode-splits", default="", help="also time the default tuning at these split counts")
    parser.add_argument("--decode-variants", default="",
                        help="decode_graph: also these tunings, BLOCK_N/WARPS/STAGES[+h] comma-separated "
                             "(parse_decode_tuning)")
    parser.add_argument("--kv-layout", default="natural", help=f"decode/prefill caches' layout: {', '.join(KV_LAYOUTS)} "
                        "(KV_LAYOUT says what each is; the engine's CUDA pool is heads-major)")
    parser.add_argument("--heads-major", action="store_true", help="the same as --kv-layout heads-major")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    global KV_LAYOUT
    KV_LAYOUT = "heads-major" if args.heads_major else args.kv_layout
    if KV_LAYOUT not in KV_LAYOUTS:
        parser.error(f"--kv-layout: {KV_LAYOUT!r}; allowed: {', '.join(KV_LAYOUTS)}")
    torch.manual_seed(0)
    random.seed(0)
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    parts = {"gemm": bench_gemm, "decode": lambda: bench_decode(args.sweep, args.decode_cases, args.decode_splits), "prefill": lambda: bench_prefill(args.sweep),
             "decode_graph": lambda: bench_decode_graph(args.decode_cases, args.decode_variants),
             "elementwise": bench_elementwise}
    for name in args.only.split(","):
        parts[name]()
    if args.json:
        Path(args.json).write_text(json.dumps(ROWS, indent=2))


if __name__ == "__main__":
    main()
