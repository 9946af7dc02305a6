"""Helpers to drive an engine to completion in tests."""

from __future__ import annotations

from worker.engine.engine import LLMEngine
from worker.engine.types import EngineRequest, RequestOutput, SamplingOptions

# Prompts of different lengths for the SmolLM2 parity tests (CPU and GPU).
QUESTIONS = [
    "What is the capital of France?",
    "hi",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain gravity to a five year old in detail, please, with two examples.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 12?",
    "Describe the water cycle. " * 12,
    "Name a famous painter from the Netherlands and one of their paintings.",
]


def greedy(max_tokens: int, **kw) -> SamplingOptions:
    return SamplingOptions(temperature=0.0, max_tokens=max_tokens, **kw)


def run_to_completion(engine: LLMEngine, max_steps: int = 10_000) -> dict[str, list[RequestOutput]]:
    """Step until idle; returns each request's outputs in order. Bounded in steps."""
    outs: dict[str, list[RequestOutput]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return outs
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    raise AssertionError(f"engine still busy after {max_steps} steps")


def tokens(outputs: list[RequestOutput]) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


def submit_all(engine: LLMEngine, prompts: list[list[int]], sampling: SamplingOptions, prefix: str = "r") -> list[str]:
    ids = []
    for i, p in enumerate(prompts):
        rid = f"{prefix}{i}"
        engine.add_request(EngineRequest(rid, tuple(p), sampling))
        ids.append(rid)
    return ids
