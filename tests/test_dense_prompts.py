"""Which prompts of a step the model runner sends to the dense prefill kernel
(``model_runner.dense_prompts``): a CPU check of the split the GPU engine test
(``test_engine_gpu.py::test_dense_prefill_matches_paged_prefill``) exercises on an H100."""

from __future__ import annotations

import numpy as np

from worker.engine.model_runner import DENSE_MIN_STEP_TOKENS, dense_prompts


def _split(query_lens, context_lens):
    return dense_prompts(np.asarray(query_lens, dtype=np.int32), np.asarray(context_lens, dtype=np.int32)).tolist()


def test_whole_prompts_of_a_large_step_go_dense():
    """A whole prompt and a long prompt's first chunk (context = its new tokens) go dense; a
    decode row, a later chunk and a prefix-cache hit (context beyond the new tokens) do not."""
    assert _split([300, 124, 1, 336, 40], [300, 124, 901, 460, 72]) == [True, True, False, False, False]


def test_small_steps_keep_the_paged_kernel():
    """Below ``DENSE_MIN_STEP_TOKENS`` (512 tokens and under: the prefill graphs' sizes) nothing
    goes dense, so a lone prompt computes the same whether a graph replays it or not."""
    below = DENSE_MIN_STEP_TOKENS - 1
    assert DENSE_MIN_STEP_TOKENS == 513
    assert _split([below], [below]) == [False]
    assert _split([below, 1], [below, 40]) == [True, False]
    assert _split([200, 200, 112], [200, 200, 112]) == [False, False, False]


def test_one_token_prompts_are_not_dense():
    """A one-token prompt is a decode-shaped row (the decode kernel takes it)."""
    assert _split([1, 600], [1, 600]) == [False, True]


def test_dense_prefill_gate(monkeypatch):
    """Where the runner turns dense prefill on (``_dense_prefill_fits``, owned by
    ``dense_prefill_supported``): 16-bit activations, a power-of-two head size of 16 or more,
    sm_90+ with the tuning's shared memory. No GPU here: the device queries are stood in for
    (an H100's capability and opt-in shared memory, a consumer Blackwell's)."""
    import types

    import pytest
    import torch

    pytest.importorskip("triton")
    from worker.engine import model_runner

    cuda = torch.device("cuda", 0)
    for capability, shared, want in (((9, 0), 227 * 1024, True), ((12, 0), 99 * 1024, False),
                                     ((8, 0), 163 * 1024, False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device=None: types.SimpleNamespace(major=capability[0],
                                                                      shared_memory_per_block_optin=shared))
        assert model_runner._dense_prefill_fits(cuda, torch.bfloat16, 128) is want, capability
        if want:
            assert model_runner._dense_prefill_fits(cuda, torch.float16, 64)
            assert not model_runner._dense_prefill_fits(cuda, torch.float32, 128)
            assert not model_runner._dense_prefill_fits(cuda, torch.bfloat16, 96)
            assert not model_runner._dense_prefill_fits(cuda, torch.bfloat16, 8)
    assert not model_runner._dense_prefill_fits(torch.device("cpu"), torch.bfloat16, 128)
