"""The mock engine: the real scheduler, block manager and KV events over
``MockRunner`` (timing model + deterministic tokens), and mock fleets of many
workers in one process, in-process and through ``kvmesh worker --engine mock``."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import pytest
from mock_fixtures import REPO, expected_tokens, mock_cluster, model_dir, token_function  # noqa: F401 (fixture)
from router_fixtures import start_router, wait_until

from kvstore.hashing import HashNamespace, block_hashes
from orchestrator.client import AsyncKvmeshClient
from worker.config import WorkerConfig
from worker.engine.config import EngineConfig
from worker.engine.engine import LLMEngine
from worker.engine.mock_runner import MockRunner, build_mock_engine
from worker.engine.mock_timing import TimingModel
from worker.engine.types import BlockStored, EngineRequest, SamplingOptions
from worker.mock_fleet import fleet_configs
from worker.models.config import ModelConfig

pytestmark = pytest.mark.timeout(60)

A, B, C, D = 1e-3, 5e-3, 2e-4, 1e-5           # round timing terms, to check the formula
TIMING = TimingModel(prefill_s_per_token=A, decode_base_s=B, decode_s_per_seq=C, decode_s_per_context_token=D)


def engine_with(model_dir, timing: TimingModel = TIMING, steps: list[float] | None = None, **config):
    """An LLMEngine over a MockRunner whose sleeps are recorded in ``steps`` instead of waited."""
    cfg = EngineConfig(model=str(model_dir), **{"num_kv_blocks": 256, **config})
    runner = MockRunner(cfg, ModelConfig.from_dir(model_dir), timing,
                        sleep=steps.append if steps is not None else lambda s: None)
    return LLMEngine(cfg, runner=runner)


def run(engine, *requests: EngineRequest) -> dict[str, list[int]]:
    for r in requests:
        engine.add_request(r)
    out: dict[str, list[int]] = {r.request_id: [] for r in requests}
    for _ in range(10_000):
        if not engine.has_unfinished():
            return out
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
    raise AssertionError("engine did not finish")


def req(rid: str, prompt: list[int], max_tokens: int, **sampling) -> EngineRequest:
    return EngineRequest(rid, tuple(prompt), SamplingOptions(temperature=0, max_tokens=max_tokens, **sampling))


PROMPT = list(range(100, 164))        # 64 tokens = 4 full blocks


# --- timing model --------------------------------------------------------------------------

def test_step_times_follow_the_timing_model(model_dir):
    steps: list[float] = []
    engine = engine_with(model_dir, steps=steps)
    run(engine, req("a", PROMPT, 3))
    assert steps == pytest.approx([
        A * 64,                             # prefill of 64 uncached tokens, samples token 1
        B + C * 1 + D * 65,                 # decode: batch 1, context 65
        B + C * 1 + D * 66,
    ], rel=0.05)   # the runner subtracts the few µs it spent hashing


def test_prefix_hits_are_not_prefilled_and_batches_cost_per_sequence_and_context(model_dir):
    steps: list[float] = []
    engine = engine_with(model_dir, steps=steps)
    run(engine, req("a", PROMPT, 1))
    steps.clear()
    run(engine, req("b", PROMPT[:48] + [7, 8, 9], 2), req("c", PROMPT[:32] + [5, 6], 2))
    # b hits 3 cached blocks (48 tokens), c hits 2 (32): only 3 + 2 tokens are computed
    assert steps[0] == pytest.approx(A * (3 + 2), rel=0.05)
    assert steps[1] == pytest.approx(B + C * 2 + D * (52 + 35), rel=0.05)


def test_speedup_divides_every_step_and_sleeping_burns_no_cpu(model_dir):
    fast = TimingModel(prefill_s_per_token=0, decode_base_s=0.05, decode_s_per_seq=0, decode_s_per_context_token=0,
                       speedup=10)                                       # 5 ms a step
    engine = build_mock_engine(EngineConfig(model=str(model_dir), num_kv_blocks=64), fast)
    wall, cpu = time.monotonic(), time.thread_time()
    out = run(engine, req("a", [5] * 10, 40))
    wall, cpu = time.monotonic() - wall, time.thread_time() - cpu
    assert len(out["a"]) == 40
    assert 0.19 <= wall < 0.6                     # 39 decode steps of 5 ms
    assert cpu < 0.25 * wall                      # asleep, not spinning
    assert engine.runner.busy_s == pytest.approx(39 * 0.005)


def test_timing_model_rejects_bad_values():
    with pytest.raises(ValueError, match="speedup must be > 0"):
        TimingModel(speedup=0)
    with pytest.raises(ValueError, match="decode_base_s must be >= 0"):
        TimingModel(decode_base_s=-1)


# --- tokens ------------------------------------------------------------------------------------

def test_tokens_depend_on_the_context_not_on_where_the_prompt_ends(model_dir):
    engine = engine_with(model_dir)
    full = run(engine, req("a", PROMPT, 30))["a"]
    assert full == expected_tokens(engine.runner.tokens, PROMPT, 30)
    for k in (1, 13, 29):                          # a resubmission after k streamed tokens
        assert run(engine, req(f"r{k}", PROMPT + full[:k], 30 - k))[f"r{k}"] == full[k:]
    seeded = run(engine, req("s", PROMPT, 30, seed=7))["s"]
    assert seeded != full and seeded == run(engine, req("s2", PROMPT, 30, seed=7))["s2"]


def test_tokens_are_never_special_or_eos_and_logprobs_are_reported(model_dir):
    engine = engine_with(model_dir)
    special = engine.runner.tokens._excluded
    assert engine.model_config.eos_token_ids[0] in special
    engine.add_request(EngineRequest("a", tuple(PROMPT), SamplingOptions(max_tokens=200, logprobs=True,
                                                                          top_logprobs=3)))
    outputs = [o for _ in range(300) if engine.has_unfinished() for o in engine.step()]
    tokens = [t for o in outputs for t in o.new_token_ids]
    assert len(tokens) == 200 and not special & set(tokens)
    lp = outputs[0].logprobs[0]
    assert lp.token_id == tokens[0] and len(lp.top) == 3 and lp.top[0][0] == tokens[0]


def test_outputs_do_not_depend_on_batching_or_preemption(model_dir):
    alone = {f"r{i}": run(engine_with(model_dir), req(f"r{i}", PROMPT[i:] + [i], 40))[f"r{i}"] for i in range(6)}
    tight = engine_with(model_dir, num_kv_blocks=12, max_num_batched_tokens=64)   # forces preemption
    together = run(tight, *(req(f"r{i}", PROMPT[i:] + [i], 40) for i in range(6)))
    assert together == alone
    assert tight.num_preemptions > 0
    assert tight.load().kv_blocks_used == 0


def test_kv_events_are_the_real_block_manager_events(model_dir):
    engine = engine_with(model_dir)
    run(engine, req("a", PROMPT, 2))
    stored = [e for e in engine.drain_kv_events() if isinstance(e, BlockStored)]
    hashes = [h for e in stored for h in e.block_hashes]
    namespace = HashNamespace(model=engine.model_summary.name)
    assert hashes[:4] == block_hashes(PROMPT, 16, namespace)     # the hash the router's index uses


def test_kv_pool_size(model_dir):
    assert build_mock_engine(EngineConfig(model=str(model_dir))).runner.num_blocks == 8192
    per_block = 30 * 2 * 16 * 3 * 64 * 2                          # layers, K+V, tokens, kv heads, dim, bf16
    engine = build_mock_engine(EngineConfig(model=str(model_dir), kv_cache_memory_bytes=100 * per_block))
    assert engine.runner.num_blocks == 100
    with pytest.raises(ValueError, match="raise kv_cache_memory_bytes"):
        build_mock_engine(EngineConfig(model=str(model_dir), kv_cache_memory_bytes=per_block))


# --- fleets -----------------------------------------------------------------------------------------

def test_fleet_configs_give_each_worker_an_id_and_a_port():
    base = WorkerConfig(engine=EngineConfig(model="m"), worker_id="f", port=7000)
    configs = fleet_configs(base, 3)
    assert [(c.worker_id, c.port) for c in configs] == [("f-0", 7000), ("f-1", 7001), ("f-2", 7002)]
    assert fleet_configs(base, 1) == [base]
    with pytest.raises(ValueError, match="advertise_address"):
        fleet_configs(WorkerConfig(engine=base.engine, advertise_address="h:1"), 2)


async def test_a_fleet_in_one_process_serves_through_the_router(model_dir):
    tokens = token_function(model_dir)
    async with mock_cluster(model_dir, 8) as cluster:
        assert len({w.port for w in cluster.fleet.workers}) == 8
        async with AsyncKvmeshClient(cluster.router.grpc_address) as client:
            async def one(i: int) -> tuple[list[int], str]:
                chunks = [c async for c in client.generate(PROMPT + [i], max_tokens=20)]
                return [t for c in chunks for t in c.token_ids], chunks[-1].worker_id
            results = await asyncio.gather(*(one(i) for i in range(16)))
        for i, (ids, _) in enumerate(results):
            assert ids == expected_tokens(tokens, PROMPT + [i], 20)
        assert len({worker for _, worker in results}) == 8              # least_loaded spread them
        await wait_until(cluster.all_idle)


async def test_kvmesh_worker_engine_mock_starts_a_fleet_and_stops_on_sigterm(model_dir):
    router = await start_router([])
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "--engine", "mock", "--num-workers", "3", "--model", str(model_dir),
         "--router", router.grpc_address, "--worker-id", "cli", "--speedup", "5"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        await wait_until(lambda: router.registry.healthy_count() == 3, timeout_s=30)
        assert sorted(w.worker_id for w in router.registry.workers()) == ["cli-0", "cli-1", "cli-2"]
        async with AsyncKvmeshClient(router.grpc_address) as client:
            assert len([c async for c in client.generate(PROMPT, max_tokens=5)]) == 5
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
        assert router.registry.workers() == []                          # each one deregistered
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        await router.stop(grace=0)


def test_num_workers_without_the_mock_engine_is_refused(model_dir):
    result = subprocess.run([sys.executable, "-m", "worker.cli", "--num-workers", "2", "--model", str(model_dir)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--num-workers 2 needs --engine mock" in result.stderr

