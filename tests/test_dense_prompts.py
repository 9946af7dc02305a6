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
