"""The router's Session path: one stream per worker for all requests, with failures handled as for Submit.

Mock workers (in-process, or processes that are SIGKILLed) speak the real
Session RPC; their tokens are predictable (``mock_fixtures.expected_tokens``),
so every stream is checked token for token. The FakeWorker test double has no
Session RPC, so it checks the fallback to Submit.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from mock_fixtures import WorkerProcesses, expected_tokens, mock_cluster, model_dir, tokens  # noqa: F401 (fixtures)
from router_fixtures import start_fake_worker, start_router, wait_until

from orchestrator.client import AsyncKvmeshClient
from orchestrator.types import FinishReason
from worker.engine.mock_timing import TimingModel

pytestmark = pytest.mark.timeout(90)

STEADY = TimingModel(prefill_s_per_token=1e-6, decode_base_s=10e-3, decode_s_per_seq=0,
                     decode_s_per_context_token=0)


def prompt(i: int) -> list[int]:
    return list(range(300 + 7 * i, 348 + 7 * i))


def ids_of(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


async def collect(client, p, max_tokens, **kwargs):
    return [c async for c in client.generate(p, max_tokens=max_tokens, **kwargs)]


async def test_concurrent_requests_share_one_session_per_worker(model_dir, tokens):
    async with mock_cluster(model_dir, 1, timing=STEADY) as cluster, \
            AsyncKvmeshClient(cluster.router.grpc_address) as client:
        results = await asyncio.gather(*(collect(client, prompt(i), 40 + i) for i in range(12)))
        for i, chunks in enumerate(results):
            assert ids_of(chunks) == expected_tokens(tokens, prompt(i), 40 + i)
            assert chunks[-1].finish_reason is FinishReason.LENGTH
        handle = cluster.router.registry.workers()[0]
        session = handle._session
        assert handle.sessions_supported and session is not None and not session.closed
        assert session.num_open == 0
        total = sum(len(ids_of(c)) for c in results)
        assert session.updates < total / 4           # one update carries many requests' tokens
        await wait_until(cluster.all_idle)


async def test_a_reused_request_id_after_an_abort_gets_only_its_own_tokens(model_dir, tokens):
    async with mock_cluster(model_dir, 1, timing=STEADY) as cluster, \
            AsyncKvmeshClient(cluster.router.grpc_address) as client:
        for round_ in range(5):
            stream = client.generate(prompt(1), max_tokens=500, request_id="same")
            await anext(stream)
            assert await client.abort("same")
            rest = [c async for c in stream]
            assert rest[-1].finish_reason is FinishReason.ABORT
            chunks = await collect(client, prompt(2), 20, request_id="same")
            assert ids_of(chunks) == expected_tokens(tokens, prompt(2), 20), round_
        await wait_until(cluster.all_idle)


async def test_a_client_that_stops_reading_does_not_hold_up_the_others(model_dir, tokens):
    async with mock_cluster(model_dir, 1, timing=STEADY) as cluster, \
            AsyncKvmeshClient(cluster.router.grpc_address) as client:
        stalled = client.generate(prompt(0), max_tokens=1500)
        first = await anext(stalled)                 # then not read while the others run
        started = time.monotonic()
        results = await asyncio.gather(*(collect(client, prompt(i), 100) for i in range(1, 5)))
        assert time.monotonic() - started < 10
        for i, chunks in enumerate(results, start=1):
            assert ids_of(chunks) == expected_tokens(tokens, prompt(i), 100)
        rest = [c async for c in stalled]
        assert ids_of([first, *rest]) == expected_tokens(tokens, prompt(0), 1500)
        await wait_until(cluster.all_idle)


async def test_client_cancellation_aborts_on_the_worker_over_the_session(model_dir):
    async with mock_cluster(model_dir, 1, timing=STEADY) as cluster, \
            AsyncKvmeshClient(cluster.router.grpc_address) as client:
        keep = asyncio.create_task(collect(client, prompt(1), 200))
        stream = client.generate(prompt(2), max_tokens=2000)
        await anext(stream)
        worker = cluster.fleet.workers[0]
        await wait_until(lambda: worker.engine.num_in_flight == 2)
        await stream.aclose()
        await wait_until(lambda: worker.engine.num_in_flight == 1, timeout_s=5)
        assert not (await keep)[-1].finish_reason is None
        session = cluster.router.registry.workers()[0]._session
        assert not session.closed                    # one request's end leaves the session open
        await wait_until(cluster.all_idle)


async def _spawn_two(model_dir, router, procs, *extra: str) -> None:
    for worker_id in ("pa", "pb"):
        procs.spawn(worker_id, router.grpc_address, "--engine", "mock", "--model", str(model_dir),
                    "--num-kv-blocks", "512", "--mock-decode-base-ms", "15", *extra)
    await wait_until(lambda: router.registry.healthy_count() == 2, timeout_s=40)


async def test_sigkilled_worker_process_moves_every_request_of_its_session_losing_nothing(model_dir, tokens):
    router = await start_router([], heartbeat_interval_s=1.0, policy="round_robin")
    procs = WorkerProcesses()
    try:
        await _spawn_two(model_dir, router, procs)
        n = 10
        async with AsyncKvmeshClient(router.grpc_address) as client:
            streams = [client.generate(prompt(i), max_tokens=80, request_id=f"k-{i}") for i in range(n)]
            chunks = [[await anext(s)] for s in streams]
            victim = chunks[0][0].worker_id
            on_victim = [i for i in range(n) if chunks[i][0].worker_id == victim]
            assert 0 < len(on_victim) < n
            for i in range(n):                      # a few more tokens each, then the kill
                for _ in range(3):
                    chunks[i].append(await anext(streams[i]))
            started = time.monotonic()
            procs.kill(victim)

            async def rest(i):
                chunks[i].extend([c async for c in streams[i]])
            await asyncio.gather(*(rest(i) for i in range(n)))
            elapsed = time.monotonic() - started
        for i in range(n):
            assert ids_of(chunks[i]) == expected_tokens(tokens, prompt(i), 80), i
            assert chunks[i][-1].finish_reason is FinishReason.LENGTH
            assert chunks[i][-1].usage.completion_tokens == 80
            workers = list(dict.fromkeys(c.worker_id for c in chunks[i] if c.worker_id))
            assert len(workers) == (2 if i in on_victim else 1)
        assert elapsed < 10
        await wait_until(lambda: router.router.in_flight == 0)
    finally:
        await procs.close()
        await router.stop(grace=0)


async def test_sigkilled_worker_with_no_migration_allowed_fails_every_stream_cleanly(model_dir, tokens):
    router = await start_router([], heartbeat_interval_s=1.0, max_migrations=0)
    procs = WorkerProcesses()
    try:
        procs.spawn("solo", router.grpc_address, "--engine", "mock", "--model", str(model_dir),
                    "--num-kv-blocks", "512", "--mock-decode-base-ms", "15")
        await wait_until(lambda: router.registry.healthy_count() == 1, timeout_s=40)
        async with AsyncKvmeshClient(router.grpc_address) as client:
            streams = [client.generate(prompt(i), max_tokens=2000) for i in range(6)]
            for s in streams:
                await anext(s)
            procs.kill("solo")
            started = time.monotonic()
            for s in streams:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    async for _ in s:
                        pass
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < 10
        await wait_until(lambda: router.router.in_flight == 0)
    finally:
        await procs.close()
        await router.stop(grace=0)


async def test_a_worker_without_the_session_rpc_is_served_by_submit():
    fake = await start_fake_worker("legacy")
    router = await start_router([fake])
    try:
        await wait_until(lambda: router.registry.healthy_count() == 1)
        async with AsyncKvmeshClient(router.grpc_address) as client:
            for _ in range(2):
                chunks = await collect(client, "hello", 10)
                assert chunks[-1].finish_reason is not None and len(ids_of(chunks)) == 10
        handle = router.registry.workers()[0]
        assert not handle.sessions_supported
        assert len(fake.servicer.record.submits) == 2
    finally:
        await router.stop(grace=0)
        await fake.stop()


async def test_a_session_that_cannot_open_is_retried_on_another_worker(model_dir, tokens):
    async with mock_cluster(model_dir, 2, timing=STEADY) as cluster, \
            AsyncKvmeshClient(cluster.router.grpc_address) as client:
        down = cluster.fleet.workers[0]
        await down._server.stop(0)                  # still registered (its heartbeats go on), not serving
        for i in range(4):
            chunks = await collect(client, prompt(i), 10)
            assert ids_of(chunks) == expected_tokens(tokens, prompt(i), 10)
            assert chunks[-1].worker_id == cluster.fleet.workers[1].config.worker_id
        assert cluster.metric("kvmesh_router_worker_retries_total") == 1


class _HeldCall:
    """A Session call whose first write blocks until released (a write in progress)."""

    def __init__(self) -> None:
        self.sent: list = []
        self.release = asyncio.Event()

    async def write(self, message) -> None:
        self.sent.append(message)
        if len(self.sent) == 1:
            await self.release.wait()

    async def read(self):
        await asyncio.sleep(3600)

    def cancel(self) -> None:
        pass


async def test_an_abort_of_an_unsent_submit_drops_it_and_aborts_keep_their_order():
    from test_worker_service import submit_request

    from orchestrator.session import RouterSession

    session = RouterSession(_HeldCall(), "w")
    call = session._call
    s1 = session.submit(submit_request("same", prompt(1)))
    for _ in range(3):
        await asyncio.sleep(0)          # the first write (submit 1) is in progress, held
    s1.abort()                          # its client left: submit 1 was sent, so an abort follows
    s2 = session.submit(submit_request("same", prompt(2)))   # retried with the same request id
    s3 = session.submit(submit_request("other", prompt(3)))
    s3.abort()                          # never sent: dropped, no abort needed
    call.release.set()
    await wait_until(lambda: len(call.sent) == 2, timeout_s=5)
    second = call.sent[1]
    assert [s.stream_id for s in second.submits] == [s2.stream_id]
    assert list(second.aborts) == [s1.stream_id]
    session.close()

