"""Failover with nothing lost: a request whose worker dies or whose stream
breaks mid-request continues on another worker, and the client's stream goes
on with no token lost or repeated; a limit on migrations; cancellation that
reaches the worker, freeing its blocks, on every path.

Mock workers make every token predictable (``mock_fixtures.expected_tokens``),
so continuity is checked exactly; test_failover_model.py does the same with
the real engine on SmolLM2 under greedy sampling, against an uninterrupted run.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import grpc
import pytest
from mock_fixtures import WorkerProcesses, expected_tokens, mock_cluster, model_dir, tokens  # noqa: F401 (fixtures)
from router_fixtures import model_files, start_router, wait_until

from orchestrator.client import AsyncKvmeshClient
from orchestrator.types import FinishReason
from worker.engine.mock_timing import TimingModel

pytestmark = pytest.mark.timeout(60)

PROMPT = list(range(300, 364))                      # 64 tokens
MIGRATIONS = "kvmesh_router_request_migrations_total"


def ids_of(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def workers_in_order(chunks) -> list[str]:
    """The workers that served ``chunks``, each once, in the order they served."""
    return list(dict.fromkeys(c.worker_id for c in chunks if c.worker_id))


# --- migration keeps every token exactly once -------------------------------------------------

async def test_worker_stopped_mid_stream_migrates_with_every_token_exactly_once(model_dir, tokens):
    async with mock_cluster(model_dir, 2) as cluster:
        chunks = []
        async with AsyncKvmeshClient(cluster.router.grpc_address) as client:
            warm = [[c async for c in client.generate(PROMPT, max_tokens=1)] for _ in range(2)]
            assert len({c[-1].worker_id for c in warm}) == 2       # both workers hold PROMPT's 4 blocks
            async for chunk in client.generate(PROMPT, max_tokens=60, logprobs=True):
                chunks.append(chunk)
                if len(chunks) == 10:
                    await cluster.worker(chunk.worker_id).stop(grace=0)
        ids = ids_of(chunks)
        assert ids == expected_tokens(tokens, PROMPT, 60)
        assert sum(len(c.logprobs) for c in chunks) == 60
        assert "".join(c.text for c in chunks) == model_files().tokenizer.decode(ids)
        last = chunks[-1]
        assert last.finish_reason is FinishReason.LENGTH
        # the first worker reused 3 blocks of the prompt (the last token is always computed); the
        # second would report 4 for the longer continuation prompt, but usage keeps the first's
        assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.cached_tokens) == (64, 60, 48)
        assert len(workers_in_order(chunks)) == 2
        assert cluster.metric(MIGRATIONS) == 1
        await wait_until(cluster.all_idle)


async def test_sigkilled_mock_worker_process_mid_stream_loses_and_repeats_nothing(model_dir, tokens):
    router = await start_router([], heartbeat_interval_s=1.0)
    procs = WorkerProcesses()
    try:
        for worker_id in ("pa", "pb"):
            procs.spawn(worker_id, router.grpc_address, "--engine", "mock", "--model", str(model_dir),
                        "--num-kv-blocks", "256", "--mock-decode-base-ms", "15")
        await wait_until(lambda: router.registry.healthy_count() == 2, timeout_s=40)
        chunks = []
        async with AsyncKvmeshClient(router.grpc_address) as client:
            started = time.monotonic()
            async for chunk in client.generate(PROMPT, max_tokens=80, request_id="killed"):
                chunks.append(chunk)
                if len(chunks) == 10:
                    procs.kill(chunk.worker_id)
            elapsed = time.monotonic() - started
            survivor = workers_in_order(chunks)[-1]
            uninterrupted = ids_of([c async for c in client.generate(PROMPT, max_tokens=80)])
        assert ids_of(chunks) == uninterrupted == expected_tokens(tokens, PROMPT, 80)
        assert len(workers_in_order(chunks)) == 2 and chunks[-1].usage.completion_tokens == 80
        assert elapsed < 10
        assert [w.worker_id for w in router.registry.workers() if w.available] == [survivor]
    finally:
        await procs.close()
        await router.stop(grace=0)


async def test_a_live_worker_dropped_by_the_registry_hands_over_and_frees_its_blocks(model_dir, tokens):
    """The stream breaks while the worker lives on: the router cancels its call, the worker frees the blocks."""
    slow = TimingModel(prefill_s_per_token=20e-6, decode_base_s=10e-3, decode_s_per_seq=0,
                       decode_s_per_context_token=0)
    async with mock_cluster(model_dir, 2, timing=slow, heartbeat_interval_s=0.5) as cluster:
        chunks = []
        async with AsyncKvmeshClient(cluster.router.grpc_address) as client:
            async for chunk in client.generate(PROMPT, max_tokens=400):
                chunks.append(chunk)
                if len(chunks) == 5:
                    first = cluster.worker(chunk.worker_id)
                    await first.router.close(deregister=False)      # silent towards the router, still serving
        assert ids_of(chunks) == expected_tokens(tokens, PROMPT, 400)
        assert len(workers_in_order(chunks)) == 2
        await wait_until(lambda: cluster.idle(first))
        assert cluster.metric(MIGRATIONS) == 1


async def test_a_stalled_worker_times_out_and_the_request_moves_on(model_dir, tokens):
    async with mock_cluster(model_dir, 2, worker_timeout_s=0.5) as cluster:
        chunks = []
        async with AsyncKvmeshClient(cluster.router.grpc_address) as client:
            async for chunk in client.generate(PROMPT, max_tokens=40):
                chunks.append(chunk)
                if len(chunks) == 5:
                    index = [w.config.worker_id for w in cluster.fleet.workers].index(chunk.worker_id)
                    stalled = cluster.fleet.workers[index]
                    cluster.fleet.engines[index].runner.timing = TimingModel(decode_base_s=2.0)
        assert ids_of(chunks) == expected_tokens(tokens, PROMPT, 40)
        assert len(workers_in_order(chunks)) == 2
        await wait_until(lambda: cluster.idle(stalled), timeout_s=5)     # after its 2 s step


# --- the migration limit ------------------------------------------------------------------------

@pytest.mark.parametrize("limit", [0, 1])
async def test_migrations_stop_at_max_migrations_with_a_clean_error(model_dir, tokens, limit):
    async with mock_cluster(model_dir, 3, max_migrations=limit) as cluster:
        chunks = []
        per_worker: dict[str, int] = {}
        async with AsyncKvmeshClient(cluster.router.grpc_address) as client:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for chunk in client.generate(PROMPT, max_tokens=300):
                    chunks.append(chunk)
                    per_worker[chunk.worker_id] = per_worker.get(chunk.worker_id, 0) + 1
                    if per_worker[chunk.worker_id] == 5:              # each worker fails after 5 tokens
                        await cluster.worker(chunk.worker_id).stop(grace=0)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"gave up after {limit} migrations" in e.value.details()
        ids = ids_of(chunks)
        assert len(workers_in_order(chunks)) == limit + 1
        assert len(ids) >= 5 * (limit + 1) and ids == expected_tokens(tokens, PROMPT, len(ids))
        assert cluster.metric(MIGRATIONS) == limit
        await wait_until(lambda: cluster.router.router.in_flight == 0)


# --- cancellation on every path -------------------------------------------------------------------

async def test_cancel_before_placement_reaches_no_worker(model_dir):
    async with mock_cluster(model_dir, 2) as cluster:
        bundle = cluster.router.registry.resolve("mock").tokenizer
        entered, cancelled = asyncio.Event(), asyncio.Event()

        async def stuck_encode(prompt):
            entered.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        bundle.encode_prompt = stuck_encode
        async with AsyncKvmeshClient(cluster.router.grpc_address) as client:
            task = asyncio.create_task(anext(client.generate("hello there", max_tokens=5)))
            await asyncio.wait_for(entered.wait(), 5)
            task.cancel()
            await asyncio.wait_for(cancelled.wait(), 5)
        assert sum(w.placements for w in cluster.router.registry.workers()) == 0
        await wait_until(cluster.all_idle)


async def _cancel(how: str, cluster, client, stream, request_id: str, http_response) -> None:
    if how == "grpc-cancel":
        await stream.aclose()
    elif how == "abort-rpc":
        assert await client.abort(request_id)
        rest = [c async for c in stream]
        assert rest[-1].finish_reason is FinishReason.ABORT
    else:
        http_response.close()


async def _open_stream(how: str, cluster, client, http, request_id: str, max_tokens: int):
    """A streaming request over gRPC or HTTP; returns (gRPC chunk iterator or None, HTTP response or None)."""
    if how == "http-disconnect":
        resp = await http.post("/v1/completions", json={"model": "mock", "prompt": PROMPT, "max_tokens": max_tokens,
                                                        "stream": True})
        assert resp.status == 200
        return None, resp
    return client.generate(PROMPT, max_tokens=max_tokens, request_id=request_id), None


async def _next_event(stream, resp):
    if stream is not None:
        return await anext(stream)
    return await resp.content.readuntil(b"\n\n")


HOW = ["grpc-cancel", "abort-rpc", "http-disconnect"]


@pytest.mark.parametrize("how", HOW)
async def test_cancel_while_streaming_frees_the_workers_blocks(model_dir, how):
    async with mock_cluster(model_dir, 2) as cluster, \
            AsyncKvmeshClient(cluster.router.grpc_address) as client, \
            aiohttp.ClientSession(base_url=cluster.router.http_url) as http:
        stream, resp = await _open_stream(how, cluster, client, http, "streaming", max_tokens=2000)
        for _ in range(5):
            await _next_event(stream, resp)
        serving = [w for w in cluster.fleet.workers if w.engine.num_in_flight]
        assert len(serving) == 1
        await wait_until(lambda: serving[0].engine.load().kv_blocks_used > 0)
        await _cancel(how, cluster, client, stream, "streaming", resp)
        await wait_until(cluster.all_idle, timeout_s=5)


@pytest.mark.parametrize("how", HOW)
async def test_cancel_during_a_migration_reaches_the_new_worker(model_dir, how):
    """The first worker dies; the request is prefilling on the second when the client goes away."""
    slow_prefill = TimingModel(prefill_s_per_token=10e-3, decode_base_s=4e-3, decode_s_per_seq=0,
                               decode_s_per_context_token=0)                   # ~0.7 s per prefill
    async with mock_cluster(model_dir, 2, timing=slow_prefill) as cluster, \
            AsyncKvmeshClient(cluster.router.grpc_address) as client, \
            aiohttp.ClientSession(base_url=cluster.router.http_url) as http:
        stream, resp = await _open_stream(how, cluster, client, http, "moving", max_tokens=2000)
        for _ in range(5):
            await _next_event(stream, resp)
        first = next(w for w in cluster.fleet.workers if w.engine.num_in_flight)
        second = next(w for w in cluster.fleet.workers if w is not first)
        await first.stop(grace=0)
        await wait_until(lambda: second.engine.num_in_flight == 1, timeout_s=5)   # resubmitted, prefilling
        assert cluster.metric(MIGRATIONS) == 1
        await _cancel(how, cluster, client, stream, "moving", resp)
        await wait_until(cluster.all_idle, timeout_s=5)
