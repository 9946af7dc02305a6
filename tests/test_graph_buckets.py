"""The CUDA graphs' bucket sizes (pure functions: they run without a GPU)."""

from __future__ import annotations

import pytest

from worker.engine.cuda_graph import PREFILL_GRAPH_TOKENS, capture_sizes, prefill_graph_sizes


def test_decode_buckets_cover_every_batch_size():
    sizes = capture_sizes(100)
    assert sizes == [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 100]
    assert capture_sizes(1) == [1]
    for batch in range(1, 101):  # every batch has a bucket at most 16 rows larger
        bucket = next(s for s in sizes if s >= batch)
        assert bucket - batch < 16


@pytest.mark.parametrize("limit, expected", [
    (8192, PREFILL_GRAPH_TOKENS),          # over 512: every bucket
    (512, PREFILL_GRAPH_TOKENS),
    (256, (16, 32, 64, 128, 256)),
    (100, (16, 32, 64, 128)),              # the first bucket holding 100 tokens is 128
    (16, (16,)),
    (3, (16,)),
])
def test_prefill_buckets_stop_at_the_step_limit(limit, expected):
    """No bucket above the first that holds the largest possible step: it could never run."""
    assert prefill_graph_sizes(limit) == expected


def test_token_rows_pad_with_skipped_slots():
    """A step's rows padded to its bucket: padding tokens 0 and slot -1 (nothing stored), also
    where an earlier, longer step left its rows behind."""
    import numpy as np

    from worker.engine.cuda_graph import _CTX, _IDS, _POS, _SLOTS, fill_token_rows

    host = np.full((5, 8), 7, dtype=np.int32)
    fill_token_rows(host, [11, 12, 13], [0, 1, 2], [40, 41, 42], 6)
    assert host[_IDS].tolist() == [11, 12, 13, 0, 0, 0, 7, 7]
    assert host[_POS].tolist() == [0, 1, 2, 0, 0, 0, 7, 7]
    assert host[_SLOTS].tolist() == [40, 41, 42, -1, -1, -1, 7, 7]
    assert host[_CTX, 3:6].tolist() == [0, 0, 0]
