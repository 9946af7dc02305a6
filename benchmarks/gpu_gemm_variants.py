"""Which matmul PyTorch can give a full decode batch (64-512 rows) at Llama-3-8B shapes.

At 256 rows a decode step's matmuls sit at the H100's ridge point (about as
many FLOPs per weight byte as the card has FLOP/s per byte/s), and cuBLAS's
default pick reaches neither bound (docs/PERFORMANCE.md: 1.4-2.3 TB/s,
<= 545 TFLOP/s). This times the ways PyTorch itself offers for the same
product, each inside one CUDA graph over 32 distinct weights (as in a decode
step: nothing stays in L2), median of ``--replays`` replays:

* ``cublas``: ``F.linear`` (what the engine runs);
* ``cublaslt``: the same with ``torch.backends.cuda.preferred_blas_library("cublaslt")``;
* ``bias``: ``F.linear`` with a zero bias (cuBLASLt's bias epilogue path);
* ``swapped``: ``weight @ x.T`` (the transposed product: the other operand
  order for cuBLAS's heuristics; output ``[N, M]``);
* ``inductor``: ``torch.compile(mode="max-autotune-no-cudagraphs")``, which
  benchmarks its Triton matmul templates against cuBLAS and keeps the fastest.

* ``rows/N`` (``--chunks N,...``): the product in N row chunks, one cuBLAS call each
  into its rows of one output (prefill-sized steps: does a long matmul lose rate?).

Usage: python benchmarks/gpu_gemm_variants.py [--rows 256,128] [--inductor-rows 256] [--chunks 2,4] [--copies 32]
       [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HIDDEN, FFN = 4096, 14336
SHAPES = {"qkv": (6144, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up": (2 * FFN, HIDDEN), "down": (HIDDEN, FFN)}
BF16 = torch.bfloat16
COPIES = 32


def graph_time(fn, xs, ws, replays: int) -> float:
    """Median microseconds of one ``fn(x, w)`` in a graph of ``COPIES`` launches."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for x, w in zip(xs, ws):
            fn(x, w)  # warm: compile, pick algorithms, allocate workspaces
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for x, w in zip(xs, ws):
            fn(x, w)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(ws))
    return statistics.median(times)


def checked_graph_time(fn, xs, ws, want: torch.Tensor, tol: float, replays: int) -> float:
    """``graph_time`` of a candidate kernel after checking ``fn(xs[0], ws[0])`` against
    ``want`` (max error over max ``|want|`` within ``tol``): a wrong one raises, unmeasured."""
    got = fn(xs[0], ws[0]).float()
    err = (got - want).abs().max().item() / want.abs().max().item()
    if err > tol:
        raise AssertionError(f"wrong result: relative error {err:.2e}")
    return graph_time(fn, xs, ws, replays)


def variants(inductor: bool, chunks: list[int]) -> dict:
    def cublas(x, w):
        return F.linear(x, w)

    def swapped(x, w):
        return torch.mm(w, x.t())

    def chunked(parts: int):
        def fn(x, w):
            out = torch.empty((x.shape[0], w.shape[0]), dtype=x.dtype, device=x.device)
            step = -(-x.shape[0] // parts)
            for i in range(0, x.shape[0], step):
                torch.mm(x[i : i + step], w.t(), out=out[i : i + step])
            return out
        return fn

    out = {"cublas": cublas, "cublaslt": cublas, "bias": None, "swapped": swapped}
    if chunks:
        out.update({f"rows/{parts}": chunked(parts) for parts in chunks})
    if inductor:
        out["inductor"] = torch.compile(cublas, mode="max-autotune-no-cudagraphs", dynamic=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="256,128,512")
    parser.add_argument("--replays", type=int, default=30)
    parser.add_argument("--inductor-rows", default="256", help="rows that also try inductor ('' for none)")
    parser.add_argument("--chunks", default="",
                        help="also the product in this many row chunks, one cuBLAS call each, comma-separated")
    parser.add_argument("--copies", type=int, default=COPIES, help="distinct weights and inputs cycled through")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    rows_out = []
    inductor_rows = {int(r) for r in args.inductor_rows.split(",") if r}
    for m in (int(r) for r in args.rows.split(",")):
        fns = variants(m in inductor_rows, [int(c) for c in args.chunks.split(",") if c])
        for name, (n, k) in SHAPES.items():
            ws = [torch.randn(n, k, device="cuda", dtype=BF16) * 0.02 for _ in range(args.copies)]
            xs = [torch.randn(m, k, device="cuda", dtype=BF16) for _ in range(args.copies)]
            bias = torch.zeros(n, device="cuda", dtype=BF16)
            want = F.linear(xs[0], ws[0]).float()
            result = {"rows": m, "shape": name, "n": n, "k": k}
            for label, fn in fns.items():
                if label == "bias":
                    fn = lambda x, w: F.linear(x, w, bias)  # noqa: E731
                torch.backends.cuda.preferred_blas_library("cublaslt" if label == "cublaslt" else "cublas")
                try:
                    began = time.perf_counter()
                    got = fn(xs[0], ws[0]).float()
                    setup = time.perf_counter() - began
                    got = got.t() if label == "swapped" else got
                    err = (got - want).abs().max().item() / want.abs().max().item()
                    us = graph_time(fn, xs, ws, args.replays)
                except Exception as e:  # a variant that cannot run here is reported, not fatal
                    result[label] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                    print(f"M={m} {name} {label}: {result[label]['error']}", flush=True)
                    continue
                flops = 2 * m * n * k
                result[label] = {"us": us, "TFLOPs": flops / us / 1e6, "TBps": 2 * n * k / us / 1e6,
                                 "rel_err": err, "first_call_s": setup}
            torch.backends.cuda.preferred_blas_library("cublas")
            base = result["cublas"]["us"]
            cells = "  ".join(f"{lab} {v['us']:7.1f} ({base / v['us']:.2f}x)" if "us" in v else f"{lab} error"
                              for lab, v in result.items() if isinstance(v, dict))
            print(f"M={m:<4} {name:<8} {cells}", flush=True)
            rows_out.append(result)
            del ws, xs
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(rows_out, indent=2))


if __name__ == "__main__":
    main()
