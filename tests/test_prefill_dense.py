"""The dense prefill kernel (``kernels/prefill_dense_triton.py``) against its torch reference
and a float32 one, on a TMA GPU (sm_90+) or on CPU through Triton's interpreter (float16
there, small heads). Tolerance as for the other attention kernels at 16 bits
(``test_kernels_gpu.py``): ``|out - ref| / |ref|`` below 1e-2."""

from __future__ import annotations

import os

import pytest
import torch

from kernels.backend import HAS_TRITON
from kernels.prefill_dense import dense_prefill_attention_ref

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TMA_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_TRITON or not (TMA_GPU or INTERPRET), reason="needs a TMA GPU (or the interpreter)"),
]
HEADS, KV_HEADS, DIM = (4, 2, 16) if INTERPRET else (32, 8, 128)
DTYPE = torch.float16 if INTERPRET else torch.bfloat16
DEVICE = "cuda" if TMA_GPU and not INTERPRET else "cpu"


def _tunings():
    from kernels.prefill_dense_triton import DEFAULT_TUNING, DenseTuning

    if INTERPRET:
        return [DenseTuning(16, 16, 1, 1), DenseTuning(32, 16, 1, 1, heavy_first=False),
                DenseTuning(32, 16, 1, 1, pack_gqa=True), DenseTuning(16, 32, 1, 1)]  # wider key tiles too
    return [DEFAULT_TUNING, DenseTuning(block_m=128, num_warps=8, num_stages=2),
            DenseTuning(block_m=128, block_n=128, num_warps=8), DenseTuning(block_m=128, num_warps=8, pack_gqa=True),
            DenseTuning(block_m=128, block_n=32, pack_gqa=True)]


def _float32_reference(q, k, v, starts, lens, scale):
    """Per sequence, causal softmax attention in float32 written out (GQA by repeating K/V)."""
    out = torch.zeros(q.shape, dtype=torch.float32)
    group = q.shape[1] // k.shape[1]
    for start, n in zip(starts, lens):
        qs, ks, vs = (x[start: start + n].float().cpu().transpose(0, 1) for x in (q, k, v))
        ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
        scores = qs @ ks.transpose(1, 2) * scale
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out[start: start + n] = (scores.softmax(-1) @ vs).transpose(0, 1)
    return out


def _step(lens: list[int], gaps: list[int], seed: int):
    """A step's flat rows: the sequences in reverse order with ``gaps[i]`` foreign rows (other
    sequences' decode or paged-prefill rows) before each; q/k/v as views of one fused qkv
    product with its row stride, as the model passes them (k rotated out separately)."""
    torch.manual_seed(seed)
    starts, at = [0] * len(lens), 0
    for i in reversed(range(len(lens))):
        at += gaps[i]
        starts[i] = at
        at += lens[i]
    tokens = at + 3
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * DIM, dtype=DTYPE, device=DEVICE)
    x = qkv.view(tokens, HEADS + 2 * KV_HEADS, DIM)
    q = x[:, :HEADS].contiguous()  # rotary's output
    k = x[:, HEADS: HEADS + KV_HEADS].contiguous()  # rotary's k_out
    v = x[:, HEADS + KV_HEADS:]  # a strided view of the product
    return q, k, v, starts


@pytest.mark.parametrize("lens,gaps", [([1], [0]), ([5, 17, 1, 33], [0, 2, 0, 7]), ([64, 70, 16, 130], [1, 0, 9, 0])],
                         ids=["one_row", "short", "tiles"])
def test_dense_prefill_matches_references(lens, gaps):
    """Sequences of one row, shorter than a tile, ending inside, at and past a tile, placed
    anywhere in the step (reverse order, foreign rows between them): each tuning against the
    float32 reference and the torch reference the CPU path would run; the foreign rows of
    ``out`` are left as they were."""
    from kernels.prefill_dense_triton import dense_prefill_attention

    q, k, v, starts = _step(lens, gaps, len(lens))
    i32 = dict(dtype=torch.int32, device=DEVICE)
    start_t, len_t = torch.tensor(starts, **i32), torch.tensor(lens, **i32)
    scale = DIM**-0.5
    want = _float32_reference(q, k, v, starts, lens, scale)
    torch_ref = dense_prefill_attention_ref(q, k, v, start_t, len_t, scale, torch.zeros_like(q))
    mine = torch.zeros(q.shape[0], dtype=torch.bool)
    for s, n in zip(starts, lens):
        mine[s: s + n] = True
    assert ((torch_ref.float().cpu() - want)[mine].norm() / want[mine].norm()).item() < 1e-2
    for tuning in _tunings():
        out = torch.full_like(q, 7.0)
        got = dense_prefill_attention(q, k, v, start_t, len_t, max(lens), scale, out, tuning)
        assert got is out
        err = ((got.float().cpu() - want)[mine].norm() / want[mine].norm()).item()
        assert err < 1e-2, (tuning, err)
        assert (got.cpu()[~mine] == 7.0).all(), (tuning, "rows of other sequences were written")


def test_foreign_rows_that_overflowed_do_not_reach_a_prompt():
    """Other requests' rows inside a prompt's last key tile may hold inf or NaN (an fp16
    activation that overflowed): masked scores give them weight 0, and 0 * inf is NaN, so
    the kernel must zero those values, not only mask their scores."""
    from kernels.prefill_dense_triton import dense_prefill_attention

    lens = [5, 17, 3]
    q, k, v, starts = _step(lens, [0, 4, 2], 3)
    mine = torch.zeros(q.shape[0], dtype=torch.bool)
    for s, n in zip(starts, lens):
        mine[s: s + n] = True
    foreign = (~mine).to(DEVICE)
    k[foreign] = float("nan")
    v.copy_(torch.where(foreign[:, None, None], torch.full_like(v, float("inf")), v))
    i32 = dict(dtype=torch.int32, device=DEVICE)
    start_t, len_t = torch.tensor(starts, **i32), torch.tensor(lens, **i32)
    want = _float32_reference(q, k, v, starts, lens, DIM**-0.5)
    for tuning in _tunings():
        got = dense_prefill_attention(q, k, v, start_t, len_t, max(lens), DIM**-0.5, torch.zeros_like(q), tuning)
        assert got.cpu()[mine].isfinite().all(), tuning
        assert ((got.float().cpu() - want)[mine].norm() / want[mine].norm()).item() < 1e-2, tuning


def test_dense_prefill_rejects_bad_inputs():
    """Clear errors naming the argument: a float32 query, misaligned rows (TMA), lengths not int32."""
    from kernels.prefill_dense_triton import dense_prefill_attention

    q, k, v, starts = _step([8], [0], 0)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    s, n = torch.tensor(starts, **i32), torch.tensor([8], **i32)
    with pytest.raises(ValueError, match="q must be float16 or bfloat16"):
        dense_prefill_attention(q.float(), k.float(), v.float(), s, n, 8, 1.0, q.float())
    odd = torch.zeros(q.shape[0], KV_HEADS * DIM + 1, dtype=DTYPE, device=DEVICE)[:, 1:].unflatten(1, (KV_HEADS, DIM))
    with pytest.raises(ValueError, match="k needs a 16-byte aligned start"):
        dense_prefill_attention(q, odd, v, s, n, 8, 1.0, torch.empty_like(q))
    with pytest.raises(ValueError, match="query_lens must be a contiguous"):
        dense_prefill_attention(q, k, v, s, n.long(), 8, 1.0, torch.empty_like(q))
    with pytest.raises(ValueError, match="query_start must be"):
        dense_prefill_attention(q, k, v, s[None], n, 8, 1.0, torch.empty_like(q))


def test_prompt_lengths_fill_the_step():
    from benchmarks.gpu_prefill_dense import prompt_lengths

    lens = prompt_lengths(16384, 128, 1024)
    assert sum(lens) == 16384 and all(1 <= n <= 1024 for n in lens) and all(n >= 128 for n in lens[:-1])
