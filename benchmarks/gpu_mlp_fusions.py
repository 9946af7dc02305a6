"""Can the MLP's memory passes join its matmuls at prefill sizes? Two fusions, each against what the engine runs.

A mixed step of the offline run (8,192 prompt rows) spends ~164 ms in cuBLAS
matmuls, which run at the power-capped H100's rate and will not get faster,
and ~13 ms in two bandwidth-bound passes this script tries to fold into them:

* ``gate_up``: the engine runs ``F.linear(x, W_gate_up)`` (cuBLAS), then
  ``silu_and_mul`` reads the 2 x 14,336-wide product back and writes the
  14,336-wide gate (7.6 ms a step). Against it: a Triton matmul that keeps the
  gate and the up product of one output tile in two accumulators (the same
  row tile of ``x`` feeds both; the weight stays as loaded, gate rows then up
  rows) and writes only ``silu(gate) * up``. Both products are rounded to
  bf16 before the gate, as the engine's two-pass form rounds them. ~20 % behind
  cuBLAS (session 13).
* ``gate_up_il``: the engine's fused kernel since session 15
  (``kernels/gate_up_silu_triton.py``: the weight interleaved in runs of 128, one
  accumulator) at a few tunings, against the same two-pass form, both with ``F.linear``
  and with the cuBLASLt algorithm ``linear_tuning`` keeps for that row count (what the
  engine's decode graphs run where the fused kernel is off).
* ``residual``: the engine runs ``F.linear`` for the o and down projections,
  then ``add_rms_norm`` reads the product and the residual and writes the sum
  and the normalised rows (5.6 ms of norms a step). Against it:
  ``residual.addmm_(x, W.T)`` (cuBLAS adds the residual in its epilogue; beta
  = 1), then ``rms_norm`` reads one tensor and writes one.

Each variant runs inside one CUDA graph over ``--copies`` distinct weights
(``gpu_gemm_variants.graph_time``: nothing stays in L2) and is checked against
the engine's form first. An experiment: the engine takes a fusion only if it
wins here and then in ``gpu_bench.py``.

Usage: python benchmarks/gpu_mlp_fusions.py [--rows 8192,2048,256] [--only gate_up|gate_up_il|gate_up_waves|residual]
       [--copies 8] [--json out.json]
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

from benchmarks.gpu_gemm_variants import BF16, FFN, HIDDEN, checked_graph_time, graph_time
from kernels import linear_tuning
from kernels.activation import interleave_gate_up
from kernels.activation_triton import silu_and_mul_triton
from kernels.gate_up_silu_triton import FUSED_HALF, GateUpTuning, gate_up_silu_triton
from kernels.linear import linear
from kernels.rmsnorm_triton import rms_norm_triton

CONFIGS = [  # BLOCK_M, BLOCK_N (each of gate and up), BLOCK_K, stages, warps, GROUP_M
    (128, 128, 64, 3, 8, 8), (128, 128, 64, 4, 8, 8), (128, 64, 64, 4, 4, 8), (128, 64, 64, 5, 4, 8),
    (64, 128, 64, 4, 4, 8), (128, 128, 64, 4, 8, 16), (256, 64, 64, 3, 8, 8),
]


@triton.jit
def _gate_up_silu(x_desc, g_desc, u_desc, out_desc, M, I, K,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """``out[M, I] = silu(x @ Wg.T) * (x @ Wu.T)``. Programs go in groups of ``GROUP_M`` row
    tiles per column tile, so a weight tile is read from DRAM about once per group."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(I, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    m0 = (first_m + (pid % per_group) % size_m) * BLOCK_M
    n0 = ((pid % per_group) // size_m) * BLOCK_N
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = x_desc.load([m0, k0])
        acc_g = tl.dot(x, g_desc.load([n0, k0]).T, acc_g)
        acc_u = tl.dot(x, u_desc.load([n0, k0]).T, acc_u)
    gate = acc_g.to(out_desc.dtype).to(tl.float32)
    up = acc_u.to(out_desc.dtype).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    out_desc.store([m0, n0], out.to(out_desc.dtype))


def gate_up_silu(x: torch.Tensor, w: torch.Tensor, cfg) -> torch.Tensor:
    bm, bn, bk, stages, warps, group_m = cfg
    m, k = x.shape
    inter = w.shape[0] // 2
    out = torch.empty((m, inter), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, bm) * triton.cdiv(inter, bn),)
    _gate_up_silu[grid](
        TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w[:inter], [bn, bk]),
        TensorDescriptor.from_tensor(w[inter:], [bn, bk]), TensorDescriptor.from_tensor(out, [bm, bn]),
        m, inter, k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, num_stages=stages, num_warps=warps,
    )
    return out


IL_CONFIGS = [GateUpTuning(), GateUpTuning(num_stages=4), GateUpTuning(block_m=256), GateUpTuning(group_m=16),
              GateUpTuning(num_stages=4, group_m=16),
              GateUpTuning(block_k=32, num_stages=5),
              # decode-sized batches (<= 256 rows): one warpgroup's 64-row tiles, deeper pipelines
              GateUpTuning(block_m=64, num_warps=4, num_stages=4), GateUpTuning(block_m=64, num_warps=4, num_stages=5),
              GateUpTuning(block_m=64, block_k=32, num_warps=4, num_stages=8),
              GateUpTuning(block_m=64, num_warps=8, num_stages=4)]
"""``--only gate_up_il``: the engine's fused kernel (``kernels/gate_up_silu_triton.py``) at these
tunings. Session 15 also timed warp specialisation and 128-wide tiles (runs of 64): no better."""


def bench_gate_up_interleaved(m: int, copies: int, replays: int) -> dict:
    """The interleaved single-accumulator fusion against cuBLAS + ``silu_and_mul`` (timed
    before and after the candidates: the clock drifts at the power limit)."""
    ws = [torch.randn(2 * FFN, HIDDEN, device="cuda", dtype=BF16) * 0.02 for _ in range(copies)]
    xs = [torch.randn(m, HIDDEN, device="cuda", dtype=BF16) for _ in range(copies)]
    want = silu_and_mul_triton(F.linear(xs[0], ws[0])).float()
    base = graph_time(lambda x, w: silu_and_mul_triton(F.linear(x, w)), xs, ws, replays)
    mm_only = graph_time(lambda x, w: F.linear(x, w), xs, ws, replays)
    # the engine's unfused path at a decode graph's size: the cuBLASLt algorithm its start-up
    # tuning keeps for this exact row count (or F.linear where none beats it), then silu_and_mul
    try:
        tuned = linear_tuning.tune({tuple(ws[0].shape): ws}, [m])[0]
        tuned_us = graph_time(lambda x, w: silu_and_mul_triton(linear(x, w)), xs, ws, replays)
    finally:  # the fused candidates' timings must not see a tuned algorithm left behind
        linear_tuning.forget(ws)
    cells = [f"cuBLAS+silu {base:7.1f} (matmul {mm_only:7.1f})",
             f"tuned+silu {tuned_us:7.1f} ({tuned.choice or 'F.linear'})"]
    result = {"rows": m, "cublas_plus_silu_us": base, "cublas_only_us": mm_only, "tuned_plus_silu_us": tuned_us,
              "tuned_choice": tuned.choice, "configs": []}
    interleaved = [interleave_gate_up(w, FUSED_HALF) for w in ws]
    for cfg in IL_CONFIGS:
        label = f"{cfg.block_m}x{2 * FUSED_HALF}x{cfg.block_k}/{cfg.num_stages}/{cfg.num_warps}/g{cfg.group_m}"
        try:
            us = checked_graph_time(lambda x, w, cfg=cfg: gate_up_silu_triton(x, w, tuning=cfg), xs, interleaved, want,
                                    2e-2, replays)
        except Exception as e:
            print(f"  gate_up_il M={m} {label}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        result["configs"].append({"config": label, "us": us})
        cells.append(f"{label} {us:7.1f}")
    again = graph_time(lambda x, w: silu_and_mul_triton(F.linear(x, w)), xs, ws, replays)
    result["cublas_plus_silu_after_us"] = again
    cells.append(f"cuBLAS+silu again {again:7.1f}")
    print(f"gate_up_il M={m:<5} " + "  ".join(cells), flush=True)
    return result


WAVE_TILES = (132, 176, 224, 264)
"""``--only gate_up_waves``: output tile counts timed (the H100 has 132 SMs; Llama-3-8B's gate/up
at 256 rows is 224 tiles: 1.7 waves of persistent programs)."""


def bench_gate_up_waves(m: int, copies: int, replays: int) -> dict:
    """Is the fused kernel at decode-batch rows held back by its last, partial wave of tiles?
    Times it (the engine's tuning for ``m`` rows) at FFN widths that give ``WAVE_TILES`` output
    tiles. Time proportional to the tile count: no wave loss; a partial wave costing a whole
    one shows as equal times at different tile counts, and is what splitting tiles across
    programs (stream-K) would win back."""
    from kernels.gate_up_silu_triton import tuning_for_rows

    tuning = tuning_for_rows(m)
    row_tiles = triton.cdiv(m, tuning.block_m)
    if row_tiles > min(WAVE_TILES):
        raise ValueError(f"{m} rows are {row_tiles} row tiles: more than the fewest tile count timed, "
                         f"{min(WAVE_TILES)}; use --rows of at most {min(WAVE_TILES) * tuning.block_m}")
    result = {"rows": m, "tuning": str(tuning), "widths": []}
    cells = []
    for tiles in WAVE_TILES:
        ffn = tiles // row_tiles * FUSED_HALF
        ws = [interleave_gate_up(torch.randn(2 * ffn, HIDDEN, device="cuda", dtype=BF16) * 0.02, FUSED_HALF)
              for _ in range(copies)]
        xs = [torch.randn(m, HIDDEN, device="cuda", dtype=BF16) for _ in range(copies)]
        us = graph_time(lambda x, w: gate_up_silu_triton(x, w), xs, ws, replays)
        tb_s = 2 * ffn * HIDDEN * 2 / us / 1e6
        result["widths"].append({"ffn": ffn, "tiles": row_tiles * (2 * ffn // (2 * FUSED_HALF)), "us": us,
                                 "weight_TBps": tb_s})
        cells.append(f"{row_tiles * (2 * ffn // (2 * FUSED_HALF))} tiles (FFN {ffn}) {us:7.1f} us {tb_s:4.2f} TB/s")
        del ws, xs
        torch.cuda.empty_cache()
    print(f"gate_up_waves M={m:<5} " + "  ".join(cells), flush=True)
    return result


def bench_gate_up(m: int, copies: int, replays: int) -> dict:
    ws = [torch.randn(2 * FFN, HIDDEN, device="cuda", dtype=BF16) * 0.02 for _ in range(copies)]
    xs = [torch.randn(m, HIDDEN, device="cuda", dtype=BF16) for _ in range(copies)]
    want = silu_and_mul_triton(F.linear(xs[0], ws[0])).float()
    base = graph_time(lambda x, w: silu_and_mul_triton(F.linear(x, w)), xs, ws, replays)
    mm_only = graph_time(lambda x, w: F.linear(x, w), xs, ws, replays)
    result = {"rows": m, "cublas_plus_silu_us": base, "cublas_only_us": mm_only, "configs": []}
    cells = [f"cuBLAS+silu {base:7.1f} (matmul {mm_only:7.1f})"]
    for cfg in CONFIGS:
        label = "/".join(map(str, cfg))
        try:
            us = checked_graph_time(lambda x, w, cfg=cfg: gate_up_silu(x, w, cfg), xs, ws, want, 2e-2, replays)
        except Exception as e:  # out of shared memory, say: the others still run
            print(f"  gate_up M={m} {label}: {type(e).__name__}: {str(e)[:160]}", flush=True)
            continue
        result["configs"].append({"config": label, "us": us})
        cells.append(f"{label} {us:7.1f}")
    print(f"gate_up M={m:<5} " + "  ".join(cells), flush=True)
    return result


def bench_residual(m: int, name: str, n_in: int, copies: int, replays: int) -> dict:
    ws = [torch.randn(HIDDEN, n_in, device="cuda", dtype=BF16) * 0.02 for _ in range(copies)]
    xs = [torch.randn(m, n_in, device="cuda", dtype=BF16) for _ in range(copies)]
    norm_w = torch.rand(HIDDEN, device="cuda", dtype=BF16) + 0.5
    residual = torch.randn(m, HIDDEN, device="cuda", dtype=BF16)
    start = residual.clone()

    def engine(x, w):
        return rms_norm_triton(F.linear(x, w), norm_w, 1e-5, residual)

    def fused(x, w):
        residual.addmm_(x, w.t())
        return rms_norm_triton(residual, norm_w, 1e-5)

    want_norm, want_sum = engine(xs[0], ws[0])
    got_norm = fused(xs[0], ws[0])
    err = max((got_norm.float() - want_norm.float()).abs().max().item() / want_norm.float().abs().max().item(),
              (residual.float() - want_sum.float()).abs().max().item() / want_sum.float().abs().max().item())
    residual.copy_(start)
    base = graph_time(engine, xs, ws, replays)
    addmm = graph_time(fused, xs, ws, replays)
    print(f"residual {name:<5} M={m:<5} linear+add_rms_norm {base:7.1f}  addmm_+rms_norm {addmm:7.1f} us "
          f"(max rel. difference {err:.1e})", flush=True)
    return {"rows": m, "shape": name, "linear_add_norm_us": base, "addmm_norm_us": addmm, "rel_diff": err}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="8192,2048,256")
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--replays", type=int, default=15)
    parser.add_argument("--only", choices=("gate_up", "gate_up_il", "gate_up_waves", "residual"), default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}", flush=True)
    results = []
    for m in (int(r) for r in args.rows.split(",")):
        if args.only in ("gate_up_il", "gate_up_waves"):
            bench = bench_gate_up_interleaved if args.only == "gate_up_il" else bench_gate_up_waves
            results.append(bench(m, args.copies, args.replays))
            torch.cuda.empty_cache()
            continue
        if args.only != "residual":
            results.append(bench_gate_up(m, args.copies, args.replays))
            torch.cuda.empty_cache()
        for name, n_in in (("o", HIDDEN), ("down", FFN)) if args.only != "gate_up" else ():
            results.append(bench_residual(m, name, n_in, args.copies, args.replays))
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
