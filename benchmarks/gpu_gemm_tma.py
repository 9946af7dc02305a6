"""Can a Triton matmul with TMA loads beat cuBLAS on a full decode batch (256 rows) at Llama-3-8B shapes?

At 256 rows a decode step's matmuls sit at the H100's ridge point and cuBLAS
reaches neither bound (204 us a layer, 2.1-2.2 TB/s, 540-560 TFLOP/s:
``gpu_gemm_variants.py``). This times a plain Triton kernel that loads both
operands through tensor descriptors (TMA: one instruction a tile, no address
arithmetic in the loop) over a small grid of tile shapes, against ``F.linear``,
each inside one CUDA graph over distinct weights (``gpu_gemm_variants.graph_time``:
nothing stays in L2), after checking it against ``F.linear``.

An experiment: nothing in the engine uses this kernel.

Usage: python benchmarks/gpu_gemm_tma.py [--rows 256] [--copies 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from benchmarks.gpu_gemm_variants import BF16, SHAPES, checked_graph_time, graph_time

CONFIGS = [  # BLOCK_M, BLOCK_N, BLOCK_K, stages, warps
    (128, 128, 64, 4, 4), (128, 128, 64, 5, 8), (128, 256, 64, 3, 8), (256, 128, 64, 3, 8),
    (128, 128, 128, 3, 8), (64, 128, 128, 4, 4), (64, 256, 64, 4, 4), (128, 64, 128, 4, 4),
]


@triton.jit
def _matmul_tma(x_desc, w_desc, out_desc, M, N, K,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out[M, N] = x[M, K] @ w[N, K].T``. Row tiles vary fastest in the grid, so the
    programs that share a weight tile run side by side and read it from DRAM once."""
    num_m = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    m0 = (pid % num_m) * BLOCK_M
    n0 = (pid // num_m) * BLOCK_N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = x_desc.load([m0, k0])
        w = w_desc.load([n0, k0])
        acc = tl.dot(x, w.T, acc)
    out_desc.store([m0, n0], acc.to(out_desc.dtype))


def matmul_tma(x: torch.Tensor, w: torch.Tensor, cfg) -> torch.Tensor:
    bm, bn, bk, stages, warps = cfg
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _matmul_tma[grid](
        TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]),
        TensorDescriptor.from_tensor(out, [bm, bn]), m, n, k,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_stages=stages, num_warps=warps,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="256")
    parser.add_argument("--copies", type=int, default=16)
    parser.add_argument("--replays", type=int, default=30)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}", flush=True)
    rows_out = []
    for m in (int(r) for r in args.rows.split(",")):
        cublas_total = 0.0
        times: dict[str, list[float]] = {}  # by configuration, one entry per shape it ran on
        for name, (n, k) in SHAPES.items():
            ws = [torch.randn(n, k, device="cuda", dtype=BF16) * 0.02 for _ in range(args.copies)]
            xs = [torch.randn(m, k, device="cuda", dtype=BF16) for _ in range(args.copies)]
            want = F.linear(xs[0], ws[0]).float()
            base = graph_time(lambda x, w: F.linear(x, w), xs, ws, args.replays)
            cublas_total += base
            result = {"rows": m, "shape": name, "cublas_us": base, "configs": []}
            cells = [f"cublas {base:6.1f}"]
            for cfg in CONFIGS:
                label = "/".join(map(str, cfg))
                try:
                    us = checked_graph_time(lambda x, w, cfg=cfg: matmul_tma(x, w, cfg), xs, ws, want, 1e-2,
                                            args.replays)
                except Exception as e:  # out of shared memory, say: the others still run
                    print(f"M={m} {name} {label}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                    continue
                result["configs"].append({"config": label, "us": us})
                times.setdefault(label, []).append(us)
                cells.append(f"{label} {us:6.1f}")
            print(f"M={m:<4} {name:<8} " + "  ".join(cells), flush=True)
            rows_out.append(result)
            del ws, xs
            torch.cuda.empty_cache()
        # only configurations that ran on every shape: a partial total would look fast
        best = min(((sum(ts), label) for label, ts in times.items() if len(ts) == len(SHAPES)), default=None)
        print(f"M={m} layer total: cublas {cublas_total:.1f} us" +
              (f", best single config {best[1]} {best[0]:.1f} us" if best else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows_out, indent=2))


if __name__ == "__main__":
    main()
