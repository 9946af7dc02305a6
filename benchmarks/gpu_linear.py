"""Decode-batch matmuls at Llama-3-8B shapes: cuBLAS (``F.linear``) against the Triton skinny kernel.

Three parts, one table each:

1. the card's ceilings: device-to-device copy (read + write counted) and a
   pure read (a reduction over 4 GiB);
2. a sweep of ``SkinnyTuning`` per weight shape at 1 row (the winner then
   also at 16 rows): one matmul's time inside a CUDA graph of 32 launches over
   32 distinct weights, as in a decode step (nothing stays in L2), each config
   first checked against ``F.linear`` (three launches, equal results);
3. every matmul of one decode step (32 layers of qkv, o, gate_up, SiLU, down,
   then lm_head: 15.0 GB of weights) captured in one CUDA graph, cuBLAS against
   the Triton kernel with the swept tunings, at 1, 2, 4, 8, 16 rows; median of
   30 replays.

Usage: python benchmarks/gpu_linear.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from kernels.activation_triton import silu_and_mul_triton
from kernels.linear_triton import SkinnyTuning, default_tuning, skinny_matmul_triton

HIDDEN, FFN, VOCAB, LAYERS = 4096, 14336, 128256, 32
SHAPES = {"qkv": (6144, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up": (2 * FFN, HIDDEN), "down": (HIDDEN, FFN),
          "lm_head": (VOCAB, HIDDEN)}
BF16 = torch.bfloat16
OUT: dict = {"ceilings": {}, "sweep": [], "step": []}


def ceilings() -> None:
    n = 2 << 30  # elements: 4 GiB of bf16
    src = torch.randn(n, dtype=BF16, device="cuda")
    dst = torch.empty_like(src)
    copy = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    read = do_bench(lambda: src.sum(dtype=torch.float32), warmup=50, rep=300, return_mode="median")
    OUT["ceilings"] = {"copy_TBps": 2 * 2 * n / copy / 1e9, "read_TBps": 2 * n / read / 1e9}
    print(f"copy {OUT['ceilings']['copy_TBps']:.3f} TB/s (read+write), read {OUT['ceilings']['read_TBps']:.3f} TB/s",
          flush=True)
    del src, dst
    torch.cuda.empty_cache()


def candidates(name: str, quick: bool) -> list[SkinnyTuning]:
    splits = (1, 2, 4) if name in ("qkv", "o", "down") else (1,)
    if quick:
        return [SkinnyTuning(bn, 256, 4, 4, sk) for bn in (16, 32, 64) for sk in splits]
    grid = [SkinnyTuning(bn, bk, w, st, sk) for bn in (16, 32, 64) for bk in (128, 256)
            for w, st in ((4, 3), (4, 4), (4, 6)) for sk in splits]
    return [t for t in grid if (t.block_n + 16) * t.block_k * 2 * t.num_stages <= 200 << 10]  # shared memory


def graph_ms(fn, replays: int = 12) -> float:
    """Median milliseconds of one replay of a CUDA graph of ``fn`` (after an eager warm-up)."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for i in range(replays + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        if i >= 3:
            times.append(a.elapsed_time(b))
    del graph
    return statistics.median(times)


def sweep(quick: bool) -> dict[str, SkinnyTuning]:
    """Per weight shape, the time of one matmul inside a graph of 32 (distinct weights, as
    32 layers are: nothing stays in L2), cuBLAS against each Triton tuning."""
    best: dict[str, SkinnyTuning] = {}
    for name, (n, k) in SHAPES.items():
        copies = 4 if name == "lm_head" else LAYERS
        ws = [torch.randn(n, k, device="cuda", dtype=BF16) for _ in range(copies)]
        nbytes = n * k * 2
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=BF16)
            cublas = graph_ms(lambda: [F.linear(x, w) for w in ws]) / copies
            ref = F.linear(x.float(), ws[0].float())
            results = []
            tunings = candidates(name, quick) if m == 1 else [best[name], default_tuning(n, k)]
            for t in tunings:
                try:
                    errs = []
                    for _ in range(3):  # split-K's arrival counters must reset between launches
                        got = skinny_matmul_triton(x, ws[0], tuning=t).float()
                        errs.append(((got - ref).norm() / ref.norm()).item())
                except Exception as exc:  # e.g. OutOfResources: this config does not fit the card
                    print(f"  {name} M={m} {t}: {type(exc).__name__}", flush=True)
                    continue
                if not max(errs) < 1e-2 or len(set(errs)) != 1:
                    print(f"  {name} M={m} {t}: WRONG rel err {errs}", flush=True)
                    continue
                us = graph_ms(lambda: [skinny_matmul_triton(x, w, tuning=t) for w in ws]) / copies
                results.append((us, t, errs[0]))
            results.sort(key=lambda r: r[0])
            us, t, err = results[0]
            row = {"shape": name, "m": m, "cublas_us": 1e3 * cublas, "triton_us": 1e3 * us, "tuning": t.__dict__,
                   "rel_err": err, "cublas_TBps": nbytes / cublas / 1e9, "triton_TBps": nbytes / us / 1e9,
                   "default_us": 1e3 * next((r[0] for r in results if r[1] == default_tuning(n, k)), float("nan"))}
            OUT["sweep"].append(row)
            print(f"{name:<8} M={m:<3} cuBLAS {row['cublas_us']:7.1f} us {row['cublas_TBps']:.2f} TB/s | best Triton "
                  f"{row['triton_us']:7.1f} us {row['triton_TBps']:.2f} TB/s {t} | default {row['default_us']:.1f} us",
                  flush=True)
            if m == 1:
                best[name] = t
        del ws
        torch.cuda.empty_cache()
    return best


def step_graphs(best: dict[str, SkinnyTuning] | None, profile: bool = False) -> None:
    torch.manual_seed(0)
    layers = [{name: torch.randn(*SHAPES[name], device="cuda", dtype=BF16) * 0.02 for name in ("qkv", "o", "gate_up", "down")}
              for _ in range(LAYERS)]
    lm_head = torch.randn(*SHAPES["lm_head"], device="cuda", dtype=BF16) * 0.02
    total = sum(w.numel() * 2 for layer in layers for w in layer.values()) + lm_head.numel() * 2

    def tune(name):
        return best.get(name) if best else None

    def cublas_step(x):
        for w in layers:
            F.linear(x, w["qkv"])
            F.linear(x, w["o"])
            h = F.linear(x, w["gate_up"])
            F.linear(silu_and_mul_triton(h), w["down"])
        return F.linear(x, lm_head)

    def triton_step(x):
        for w in layers:
            skinny_matmul_triton(x, w["qkv"], tuning=tune("qkv"))
            skinny_matmul_triton(x, w["o"], tuning=tune("o"))
            h = skinny_matmul_triton(x, w["gate_up"], tuning=tune("gate_up"))
            skinny_matmul_triton(silu_and_mul_triton(h), w["down"], tuning=tune("down"))
        return skinny_matmul_triton(x, lm_head, tuning=tune("lm_head"))

    def timed(fn, x) -> float:
        return graph_ms(lambda: fn(x), replays=30)

    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        x = torch.randn(1, HIDDEN, device="cuda", dtype=BF16)
        for fn in (cublas_step, triton_step):
            fn(x)
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn(x)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60), flush=True)

    for m in (1, 2, 4, 8, 16):
        x = torch.randn(m, HIDDEN, device="cuda", dtype=BF16)
        c = timed(cublas_step, x)
        t = timed(triton_step, x)
        c2 = timed(cublas_step, x)
        row = {"m": m, "cublas_ms": min(c, c2), "cublas_ms_runs": [c, c2], "triton_ms": t, "weights_GB": total / 1e9,
               "cublas_TBps": total / min(c, c2) / 1e9, "triton_TBps": total / t / 1e9}
        OUT["step"].append(row)
        print(f"step matmuls M={m:<3} cuBLAS {c:.3f}/{c2:.3f} ms ({row['cublas_TBps']:.2f} TB/s)  Triton {t:.3f} ms "
              f"({row['triton_TBps']:.2f} TB/s)  ratio {t / min(c, c2):.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller tuning sweep")
    parser.add_argument("--no-sweep", action="store_true", help="use default_tuning everywhere")
    parser.add_argument("--profile", action="store_true", help="profile one step of each variant")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    ceilings()
    best = None if args.no_sweep else sweep(args.quick)
    step_graphs(best, args.profile)
    if args.json:
        Path(args.json).write_text(json.dumps(OUT, indent=2, default=str))


if __name__ == "__main__":
    main()
