"""The engine against Hugging Face transformers on the real SmolLM2 weights.

Greedy outputs must be token-identical to transformers' ``generate`` (run one
prompt at a time, no padding) for prompts of different lengths run as one
continuous batch: cold, with prefix-cache hits, with chunked prefill forced
by a tiny per-step budget, and under preemption by a tiny KV pool. Logits of
every sampled position must match transformers' forward pass within
``LOGIT_ATOL`` (float32 on both sides; the difference comes only from
summation order in batched matmuls and attention).
"""

from __future__ import annotations

import pytest
import torch

from engine_helpers import QUESTIONS, greedy, run_to_completion, submit_all, tokens
from worker.engine.config import EngineConfig
from worker.engine.engine import LLMEngine

pytestmark = pytest.mark.slow

MAX_NEW = 20
LOGIT_ATOL = 2e-3


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer) -> list[list[int]]:
    out = []
    for q in QUESTIONS:
        ids = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        out.append(list(ids if isinstance(ids, list) else ids["input_ids"]))
    assert len({len(p) for p in out}) >= 8, "prompts must have different lengths"
    return out


@pytest.fixture(scope="module")
def reference(smollm2_reference, prompts) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, one at a time."""
    refs = []
    with torch.inference_mode():
        for p in prompts:
            out = smollm2_reference.generate(
                torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False, attention_mask=torch.ones(1, len(p), dtype=torch.long)
            )
            refs.append(out[0, len(p) :].tolist())
    return refs


def _engine(model_dir, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), device="cpu", **kw))


def _check_batch(engine: LLMEngine, prompts, reference, prefix: str) -> dict:
    ids = submit_all(engine, prompts, greedy(MAX_NEW), prefix=prefix)
    outs = run_to_completion(engine)
    for rid, p, ref in zip(ids, prompts, reference):
        got = tokens(outs[rid])
        assert got == ref, f"{rid} (prompt of {len(p)} tokens): engine {got} != transformers {ref}"
    return outs


def test_one_continuous_batch_matches_transformers(smollm2_dir, prompts, reference):
    engine = _engine(smollm2_dir)
    outs = _check_batch(engine, prompts, reference, "cold")
    assert all(o[0].num_cached_tokens == 0 for o in outs.values())
    # the same prompts again: now served from the prefix cache, same tokens
    outs = _check_batch(engine, prompts, reference, "warm")
    cached = [o[0].num_cached_tokens for o in outs.values()]
    assert all(c > 0 for c in cached), cached
    assert all(c % engine.config.block_size == 0 and c < len(p) for c, p in zip(cached, prompts))


def test_shared_prefix_hits_within_a_batch(smollm2_dir, prompts, reference):
    engine = _engine(smollm2_dir)
    # warm the cache with the longest prompt, then run everything: the chat
    # template's common head is shared by all prompts
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    _check_batch(engine, [prompts[longest]], [reference[longest]], "seed")
    outs = _check_batch(engine, prompts, reference, "shared")
    assert outs[f"shared{longest}"][0].num_cached_tokens > 0


def test_chunked_prefill_forced(smollm2_dir, prompts, reference):
    engine = _engine(smollm2_dir, max_num_batched_tokens=24, enable_prefix_caching=False)
    _check_batch(engine, prompts, reference, "chunk")


def test_under_preemption(smollm2_dir, prompts, reference):
    longest = max(len(p) for p in prompts) + MAX_NEW
    engine = _engine(smollm2_dir, num_kv_blocks=longest // 16 + 4, max_num_batched_tokens=256)
    _check_batch(engine, prompts, reference, "pre")
    assert engine.num_preemptions > 0
    assert engine.load().kv_blocks_used == 0


def test_logits_match_transformers(smollm2_dir, smollm2_reference, prompts, reference):
    engine = _engine(smollm2_dir, max_num_batched_tokens=64)
    seen: dict[str, list[torch.Tensor]] = {}

    def observe(request_ids, logits):
        for rid, row in zip(request_ids, logits):
            seen.setdefault(rid, []).append(row.clone())

    engine.runner.logits_observer = observe
    ids = submit_all(engine, prompts, greedy(MAX_NEW), prefix="lg")
    run_to_completion(engine)
    worst = 0.0
    with torch.inference_mode():
        for rid, p, ref in zip(ids, prompts, reference):
            full = torch.tensor([p + ref[:-1]])
            ref_logits = smollm2_reference(full).logits[0, len(p) - 1 :].float()
            got = torch.stack(seen[rid])
            assert got.shape == ref_logits.shape
            worst = max(worst, (got - ref_logits).abs().max().item())
    assert worst < LOGIT_ATOL, f"max |logit diff| {worst:.2e} exceeds {LOGIT_ATOL:.0e}"
