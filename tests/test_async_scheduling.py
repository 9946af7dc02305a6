"""Async scheduling (``EngineConfig.async_scheduling``): step N+1 is scheduled and launched
before step N's tokens reach the host, with placeholders for the tokens in flight.

Checked on the CPU engine (the same code path as CUDA, which only adds the overlap)
against the synchronous engine on the same weights: every request's tokens,
logprobs, finish reasons and usage must be identical, across chunked prefill,
prefix-cache hits, preemption in a tiny pool, stop tokens, EOS, seeded sampling and
aborts; the pool must be empty afterwards, and a length-capped request must not cost
an extra forward pass.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine_helpers import greedy, run_to_completion, tokens
from worker.engine.config import EngineConfig
from worker.engine.engine import LLMEngine
from worker.engine.types import EngineRequest, SamplingOptions

EOS = 255


def _engine(model_dir: Path, async_scheduling: bool, **kw) -> LLMEngine:
    kw.setdefault("block_size", 4)
    kw.setdefault("num_kv_blocks", 64)
    kw.setdefault("max_num_batched_tokens", 16)
    return LLMEngine(EngineConfig(model=str(model_dir), device="cpu", async_scheduling=async_scheduling, **kw))


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(1, EOS) for _ in range(9)]  # a common prefix: prefix-cache hits
    return [(shared if i % 2 else []) + [rng.randrange(1, EOS) for _ in range(rng.randint(1, 20))] for i in range(n)]


def _run(engine: LLMEngine, requests: list[EngineRequest], abort_after: dict[str, int] | None = None) -> dict:
    """Every request's outputs, by id; ``abort_after``: abort a request once it has streamed that many tokens."""
    for r in requests:
        engine.add_request(r)
    seen: dict[str, list] = {}
    aborted: set[str] = set()
    for _ in range(2000):
        if not engine.has_unfinished():
            break
        for o in engine.step():
            seen.setdefault(o.request_id, []).append(o)
        for rid, n in (abort_after or {}).items():
            if rid not in aborted and len(seen.get(rid, [])) >= n:
                engine.abort_request(rid)
                aborted.add(rid)
    else:
        raise AssertionError("engine still busy after 2000 steps")
    assert engine.block_manager.num_used_blocks == 0
    return seen


def _summary(outs: dict) -> dict:
    """Tokens, finish reasons, usage and log-probabilities rounded to 1e-4, for runs with stop
    tokens: a stopped sequence keeps its place one step longer under async scheduling, and a
    batch of another composition rounds its float32 sums differently (~1e-7)."""
    def lps(o):
        return tuple((lp.token_id, round(lp.logprob, 4), tuple((t, round(v, 4)) for t, v in lp.top)) for lp in o.logprobs)

    return {rid: ([t for o in os for t in o.new_token_ids], [o.finish_reason for o in os],
                  [(o.num_prompt_tokens, o.num_cached_tokens) for o in os], [lps(o) for o in os])
            for rid, os in outs.items()}


def _requests(prompts, **opts) -> list[EngineRequest]:
    out = []
    for i, p in enumerate(prompts):
        kw = dict(temperature=0.0, max_tokens=3 + (7 * i) % 11)
        kw.update(opts)
        out.append(EngineRequest(f"r{i}", tuple(p), SamplingOptions(**kw)))
    return out


@pytest.mark.parametrize("pool", [64, 12])  # 12 blocks of 4 tokens: preemption
def test_async_equals_sync_greedy(tiny_model_dir, pool) -> None:
    prompts = _prompts(8)
    results = []
    for mode in (False, True):
        engine = _engine(tiny_model_dir, mode, num_kv_blocks=pool, max_num_seqs=6)
        outs = _run(engine, _requests(prompts, logprobs=True, top_logprobs=2))
        # no stop tokens: batches are composed alike in both modes, so everything is bit-equal
        results.append({rid: [(o.new_token_ids, o.logprobs, o.finish_reason, o.num_prompt_tokens,
                               o.num_cached_tokens) for o in os] for rid, os in outs.items()})
        if pool == 12:
            assert engine.num_preemptions > 0
    assert results[0] == results[1]


def test_async_equals_sync_sampled_and_stops(tiny_model_dir) -> None:
    """Seeded sampling (per-request generators), stop tokens taken from the model's own
    output and EOS: a sequence stopped one step late must not stream the extra token."""
    prompts = _prompts(6, seed=1)
    probe = _run(_engine(tiny_model_dir, False), _requests(prompts, ignore_eos=True, max_tokens=12))
    stop = {f"r{i}": tokens(probe[f"r{i}"])[4] for i in range(len(prompts))}
    reqs = [EngineRequest(f"r{i}", tuple(p), SamplingOptions(
        temperature=0.0 if i % 2 else 0.9, seed=i, max_tokens=12, stop_token_ids=(stop[f"r{i}"],) if i % 3 else ()))
        for i, p in enumerate(prompts)]
    sync = _summary(_run(_engine(tiny_model_dir, False), reqs))
    asyn = _summary(_run(_engine(tiny_model_dir, True), reqs))
    assert sync == asyn
    stopped = [rid for rid, (toks, reasons, _, _) in sync.items() if reasons[-1] is not None and reasons[-1].value == "stop"]
    assert stopped, "no request stopped on a stop token: the test would not exercise late stops"


def test_async_aborts_in_flight(tiny_model_dir) -> None:
    prompts = _prompts(4, seed=2)
    reqs = _requests(prompts, max_tokens=15)
    sync = _run(_engine(tiny_model_dir, False), reqs, abort_after={"r1": 3, "r2": 1})
    asyn = _run(_engine(tiny_model_dir, True), reqs, abort_after={"r1": 3, "r2": 1})
    for rid in ("r0", "r3"):
        assert tokens(asyn[rid]) == tokens(sync[rid])
    for rid, n in (("r1", 3), ("r2", 1)):  # aborted: what streamed is a prefix of the full answer, nothing after the abort
        assert tokens(asyn[rid])[:n] == tokens(sync[rid])[:n]
        assert len(asyn[rid]) == n


def test_length_cap_costs_no_extra_forward_pass(tiny_model_dir) -> None:
    counts = []
    for mode in (False, True):
        engine = _engine(tiny_model_dir, mode)
        launches = []
        original = engine.runner.launch

        def counted(plan, original=original, launches=launches):
            if plan.scheduled:
                launches.append(len(plan.scheduled))
            return original(plan)

        engine.runner.launch = counted
        engine.add_request(EngineRequest("a", (5, 6, 7), greedy(5, ignore_eos=True)))
        outs = run_to_completion(engine)
        assert len(tokens(outs["a"])) == 5
        counts.append(len(launches))
    assert counts == [5, 5]


def test_async_is_off_by_default_on_cpu_and_refused_by_the_mock_runner(tiny_model_dir) -> None:
    from worker.engine.mock_runner import build_mock_engine

    assert _engine(tiny_model_dir, None).async_scheduling is False
    assert build_mock_engine(EngineConfig(model=str(tiny_model_dir))).async_scheduling is False
    with pytest.raises(ValueError, match="async_scheduling"):
        build_mock_engine(EngineConfig(model=str(tiny_model_dir), async_scheduling=True))


def test_worker_cli_flag(tiny_model_dir) -> None:
    import argparse

    from worker.cli import add_worker_args, config_from_args

    parser = argparse.ArgumentParser()
    add_worker_args(parser)
    assert config_from_args(parser.parse_args(["--model", str(tiny_model_dir)])).engine.async_scheduling is None
    args = parser.parse_args(["--model", str(tiny_model_dir), "--no-async-scheduling"])
    assert config_from_args(args).engine.async_scheduling is False


def test_abort_while_the_last_token_is_in_flight(tiny_model_dir) -> None:
    """A length-capped request leaves the scheduler when its last step launches; an abort
    then still finds it (the worker must get its ABORT), and its last token is dropped."""
    engine = _engine(tiny_model_dir, True)
    engine.add_request(EngineRequest("a", (5, 6, 7), greedy(3, ignore_eos=True)))
    streamed = engine.step() + engine.step() + engine.step()  # prefill, decode 1, decode 2 (the last) launched
    assert [len(o.new_token_ids) for o in streamed] == [1, 1]
    assert engine.scheduler.find("a") is None
    assert engine.abort_request("a") is True
    assert engine.step() == [] and not engine.has_unfinished()
    assert engine.abort_request("a") is False


def test_a_failed_step_is_not_read_again(tiny_model_dir) -> None:
    """After reading a step's tokens raises (a device error), the worker aborts every
    request (engine_loop) and the engine must serve new ones: the failed step is not
    waited for again."""
    engine = _engine(tiny_model_dir, True)
    engine.add_request(EngineRequest("a", (5, 6, 7), greedy(8, ignore_eos=True)))
    engine.step()
    original = engine.runner.launch

    class Lost:
        def result(self):
            raise RuntimeError("device lost")

    engine.runner.launch = lambda plan: (original(plan), Lost())[1]
    engine.step()                       # launched; its tokens are read by the next step
    engine.runner.launch = original
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()
    assert engine.abort_request("a")
    engine.add_request(EngineRequest("b", (9, 10), greedy(3, ignore_eos=True)))
    outs = run_to_completion(engine)
    assert len(tokens(outs["b"])) == 3 and "a" not in outs
    assert engine.block_manager.num_used_blocks == 0
