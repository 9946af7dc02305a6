"""The dense prefill attention experiment (``benchmarks/gpu_prefill_dense.py``) against its float32
reference, before its timings are believed: on a TMA GPU (sm_90+), or on CPU through Triton's
interpreter (float16 there, small heads)."""

from __future__ import annotations

import os

import pytest
import torch

from kernels.backend import HAS_TRITON

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TMA_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_TRITON or not (TMA_GPU or INTERPRET), reason="needs a TMA GPU (or the interpreter)"),
]


@pytest.mark.parametrize("lens", [[1], [5, 17, 1, 33], [64, 70, 16, 130]])
def test_dense_prefill_matches_reference(lens):
    """Sequences shorter than a tile, of one row, ending inside, at and past a tile; tiles
    that reach into the next sequence's rows (masked, never stored)."""
    from benchmarks.gpu_prefill_dense import DenseTuning, dense_prefill_attention, reference

    heads, kv_heads, dim = (4, 2, 16) if INTERPRET else (32, 8, 128)
    dtype = torch.float16 if INTERPRET else torch.bfloat16
    device = "cuda" if TMA_GPU and not INTERPRET else "cpu"
    tunings = [DenseTuning(16, 16, 1, 1), DenseTuning(32, 16, 1, 1, heavy_first=False),
               DenseTuning(32, 16, 1, 1, pack_gqa=True)] if INTERPRET else \
        [DenseTuning(), DenseTuning(block_m=64, num_warps=4), DenseTuning(block_n=128, num_stages=3),
         DenseTuning(pack_gqa=True), DenseTuning(num_warps=4, block_n=32, num_stages=3, pack_gqa=True)]
    torch.manual_seed(len(lens))
    total = sum(lens)
    qkv = torch.randn(total, (heads + 2 * kv_heads) * dim, dtype=dtype, device=device)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=device)
    want = reference(qkv, heads, kv_heads, lens, dim**-0.5)
    for tuning in tunings:
        got = dense_prefill_attention(qkv, heads, kv_heads, cu, max(lens), dim**-0.5, tuning)
        assert got.shape == (total, heads, dim)
        err = ((got.float() - want).norm() / want.norm()).item()
        assert err < 1e-2, (tuning, err)


def test_prompt_lengths_fill_the_step():
    from benchmarks.gpu_prefill_dense import prompt_lengths

    lens = prompt_lengths(16384, 128, 1024)
    assert sum(lens) == 16384 and all(1 <= n <= 1024 for n in lens) and all(n >= 128 for n in lens[:-1])
