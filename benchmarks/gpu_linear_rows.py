"""Does cuBLAS's pick stay fast over every row count a mixed step can have?

A mixed step (a few short prompts plus decode rows) has an arbitrary number of
rows, and ``linear_tuning`` times only the row counts of decode graphs and of the
largest step: every other count runs ``F.linear``, whose algorithm cuBLAS's heuristic
picks per shape. Session 17 saw that pick go wrong: the Llama-3-8B gate/up product plus
``silu_and_mul`` at 448 rows took 314 µs against 172-192 at 512 (``gpu_mlp_fusions.py
--only gate_up_il``). Comparing each count with its two neighbours flags a single slow count
and the edges of a slow stretch, not the inside of one.
This sweeps ``F.linear`` over ``--rows`` (a range, step 16 by default) for the model's
four weight shapes, each inside one CUDA graph over ``--copies`` distinct weights (as a
step runs them: nothing stays in L2), and lists the row counts whose rate falls under
``--slow`` times the better of their two neighbours': where the heuristic picked badly.

An experiment: it changes nothing in the engine.

Usage: python benchmarks/gpu_linear_rows.py [--rows 272:2048:16] [--copies 8] [--slow 0.8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.gpu_gemm_variants import BF16, SHAPES, graph_time


def parse_rows(text: str) -> list[int]:
    """``START:STOP:STEP`` (STOP included when on the step) or comma-separated counts."""
    if ":" in text:
        start, stop, *step = (int(x) for x in text.split(":"))
        return list(range(start, stop + 1, step[0] if step else 16))
    return [int(x) for x in text.split(",")]


def slow_rows(rows: list[int], us: list[float], slow: float) -> list[int]:
    """Row counts whose FLOP rate (rows / µs) is under ``slow`` times the better neighbour's."""
    rate = [m / t for m, t in zip(rows, us)]
    out = []
    for i, r in enumerate(rate):
        neighbours = [rate[j] for j in (i - 1, i + 1) if 0 <= j < len(rate)]
        if neighbours and r < slow * max(neighbours):
            out.append(rows[i])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="272:2048:16")
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--replays", type=int, default=10)
    parser.add_argument("--slow", type=float, default=0.8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = parse_rows(args.rows)
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    results = {}
    for name, (n, k) in SHAPES.items():
        ws = [torch.randn(n, k, device="cuda", dtype=BF16) * 0.02 for _ in range(args.copies)]
        x_all = [torch.randn(max(rows), k, device="cuda", dtype=BF16) for _ in range(args.copies)]
        us = [graph_time(lambda x, w: F.linear(x, w), [x[:m] for x in x_all], ws, args.replays) for m in rows]
        flagged = slow_rows(rows, us, args.slow)
        results[name] = {"rows": rows, "us": us, "slow_rows": flagged}
        tflops = [2 * m * n * k / t / 1e6 for m, t in zip(rows, us)]
        print(f"{name:<8} {min(tflops):5.0f}-{max(tflops):5.0f} TFLOP/s over {rows[0]}-{rows[-1]} rows; slow at: "
              + (", ".join(f"{m} ({t:.1f} us, {rows[max(i - 1, 0)]}: {us[max(i - 1, 0)]:.1f})"
                           for i, (m, t) in enumerate(zip(rows, us)) if m in flagged) or "none"), flush=True)
        del ws, x_all
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
