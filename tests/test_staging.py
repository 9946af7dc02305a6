"""PinnedStaging on the CPU: the buffers' reuse and the oversize fallback (the pinned,
asynchronous path runs in the GPU engine tests)."""

import logging

import numpy as np
import pytest
import torch

from worker.engine.staging import PinnedStaging


def test_copies_equal_their_arrays_across_buffer_reuse():
    staging = PinnedStaging(capacity=64, device=torch.device("cpu"), slots=3)
    rng = np.random.default_rng(0)
    arrays = [rng.integers(-2**31, 2**31 - 1, size=rng.integers(0, 65), dtype=np.int32) for _ in range(20)]
    outs = [staging.copy(a) for a in arrays]  # more copies than buffers: each buffer refilled
    for array, out in zip(arrays, outs):  # earlier results must not change when their buffer is reused
        assert out.dtype == torch.int32
        assert torch.equal(out, torch.from_numpy(array))


def test_an_array_over_capacity_is_copied_whole_with_one_warning(caplog):
    staging = PinnedStaging(capacity=8, device=torch.device("cpu"), slots=2)
    big = np.arange(20, dtype=np.int32)
    with caplog.at_level(logging.WARNING, logger="worker.engine.staging"):
        first, second = staging.copy(big), staging.copy(big + 1)
    assert torch.equal(first, torch.from_numpy(big)) and torch.equal(second, torch.from_numpy(big + 1))
    assert sum("exceeds" in r.getMessage() for r in caplog.records) == 1
    assert torch.equal(staging.copy(np.arange(8, dtype=np.int32)), torch.arange(8, dtype=torch.int32))


@pytest.mark.parametrize("array", [np.zeros(4, dtype=np.int64), np.zeros((2, 2), dtype=np.int32)])
def test_rejects_other_than_flat_int32(array):
    with pytest.raises(ValueError, match="1-D int32"):
        PinnedStaging(capacity=8, device=torch.device("cpu")).copy(array)
