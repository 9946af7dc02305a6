"""Does timing every cuBLASLt algorithm beat cuBLAS's own pick at Llama-3-8B shapes?

Runs the engine's start-up tuner (``kernels.linear_tuning.tune``: ``F.linear``
against each of cuBLASLt's heuristic candidates and their split-K variants, each
inside one CUDA graph over distinct random weights, as a step runs them) on 32
layers' worth of random weights for qkv, o, gate_up and down, at each row count of
``--rows``, and prints per shape ``F.linear``'s time, the fastest candidate's, and
what the tuner keeps (it confirms a win against a second baseline timing first).

Usage: python benchmarks/gpu_cublaslt_algos.py [--rows 256,128,8192] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.gpu_gemm_variants import BF16, SHAPES
from kernels import linear_tuning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="256,128,192,512,8192")
    parser.add_argument("--layers", type=int, default=32, help="distinct weights of each shape")
    parser.add_argument("--search", action="store_true",
                        help="also every tile/stages/cluster configuration cuBLASLt accepts (LtMatmul.search)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    weights = {(n, k): [torch.randn(n, k, device="cuda", dtype=BF16) * 0.02 for _ in range(args.layers)]
               for n, k in SHAPES.values()}
    names = {shape: name for name, shape in SHAPES.items()}
    report = []
    for m in (int(r) for r in args.rows.split(",")):
        began = time.perf_counter()
        tuned = linear_tuning.tune(weights, [m], search=args.search)
        took = time.perf_counter() - began
        base = sum(t.baseline_us for t in tuned)
        kept = sum(t.baseline_us * (t.kept_ratio or 1.0) for t in tuned)
        for t in tuned:
            print(f"M={m:<5} {names[(t.n, t.k)]:<8} F.linear {t.baseline_us:7.1f}  fastest {t.best_us:7.1f} of "
                  f"{t.tried:2d} ({t.baseline_us / t.best_us:.3f}x)  kept: "
                  + (f"{t.choice} at {t.kept_ratio:.3f} of F.linear" if t.choice else "F.linear"), flush=True)
        print(f"M={m:<5} layer    F.linear {base:7.1f}  kept {kept:7.1f} ({base / kept:.3f}x)  tuning {took:.1f} s",
              flush=True)
        report += [dict(asdict(t), shape=names[(t.n, t.k)]) for t in tuned]
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
