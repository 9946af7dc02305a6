"""Three decode-attention launches per cache dtype (fp8, then bf16), for Nsight Compute.

The engine's offline decode steps at their shape: 256 sequences of contexts uniform
in 256-1152 tokens (seeded), Llama-3-8B's 32/8 heads of 128, 16-token blocks,
launched longest first as the engine does. Profile one warm launch of each:

    ncu --clock-control none --kernel-name _paged_decode_kernel --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \\
        python benchmarks/ncu_decode.py          # fp8; --launch-skip 5 for bf16

(docs/PERFORMANCE.md quotes what it found for the fp8 kernel: latency-bound at 4
programs an SM.)
"""

from __future__ import annotations

import random

import torch

from kernels.paged_decode_triton import paged_decode_attention
from worker.models.attention import longest_first

HQ, HK, D, BS, BATCH = 32, 8, 128, 16, 256


def main() -> None:
    rng = random.Random(BATCH)
    ctx = [rng.randint(256, 1152) for _ in range(BATCH)]
    blocks = -(-max(ctx) // BS)
    num_blocks = BATCH * blocks + 8
    table = torch.randperm(num_blocks)[: BATCH * blocks].view(BATCH, blocks).to("cuda", torch.int32)
    lens = torch.tensor(ctx, dtype=torch.int32, device="cuda")
    order = torch.from_numpy(longest_first(ctx)).cuda()
    rows = torch.arange(BATCH, device="cuda", dtype=torch.int32)
    for dtype in (torch.float8_e4m3fn, torch.bfloat16):
        k = torch.randn(num_blocks, BS, HK, D, device="cuda").to(dtype)
        v = torch.randn(num_blocks, BS, HK, D, device="cuda").to(dtype)
        q = torch.randn(BATCH, HQ, D, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(q)
        for _ in range(3):
            paged_decode_attention(q, k, v, table, lens, rows, D**-0.5, out, order=order)
        torch.cuda.synchronize()
        del k, v


if __name__ == "__main__":
    main()
