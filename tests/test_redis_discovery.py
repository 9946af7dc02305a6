"""Discovery backend "redis" against a real redis-server (started by the session
fixture on a free port): workers register under keys with a TTL, loads and KV
events travel through Redis, router replicas share one view, and workers drain,
die and restart."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest
import redis.asyncio as aioredis
from kv_routing_fixtures import BlockEngine, eventually, redis_url, run, start_block_worker, worker_cache  # noqa: F401
from router_fixtures import start_router

from kvmesh.v1 import redis_layout, registry_pb2
from orchestrator.client import AsyncKvmeshClient
from orchestrator.redis_discovery import RedisFeed

_prefixes = itertools.count()


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 259) for _ in range(n)]


@pytest.fixture
def prefix() -> str:
    """A key prefix per test: tests share the session's Redis but not its keys."""
    return f"t{next(_prefixes)}"


async def redis_router(url: str, prefix: str):
    return await start_router([], policy="kv", discovery="redis", redis_url=url, redis_prefix=prefix)


async def redis_worker(worker_id: str, url: str, prefix: str, engine: BlockEngine | None = None):
    return await start_block_worker(worker_id, engine, discovery="redis", redis_url=url, redis_prefix=prefix)


async def index_in_step(router, workers) -> None:
    index = router.kv.index
    for w in workers:
        wid = w.config.worker_id
        await eventually(lambda: wid in router.kv_indexer.synced and index.has_worker(wid)
                         and index.last_event_id(wid) == w.events.last_event_id, what=f"index of {wid} in step")
        last, cache = await worker_cache(w)
        assert last == index.last_event_id(wid) and index.blocks_of(wid) == cache


def ids(router) -> set[str]:
    return {w.worker_id for w in router.registry.workers()}


async def test_workers_register_in_redis_and_kv_events_arrive_through_it(redis_url, prefix):
    router = await redis_router(redis_url, prefix)
    workers = [await redis_worker(f"w{i}", redis_url, prefix) for i in range(2)]
    r = aioredis.Redis.from_url(redis_url)
    try:
        await eventually(lambda: ids(router) == {"w0", "w1"}, what="workers discovered")
        members = {m.decode() for m in await r.smembers(redis_layout.workers_key(prefix))}
        assert members == {"w0", "w1"}
        record = registry_pb2.WorkerRecord.FromString(await r.get(redis_layout.worker_key(prefix, "w0")))
        assert (record.address, record.model, record.kv_event_epoch) == \
            (workers[0].address, "sim-model", workers[0].events.epoch)
        assert 0 < await r.pttl(redis_layout.worker_key(prefix, "w0")) <= 600
        async with AsyncKvmeshClient(router.grpc_address) as client:
            shared = tokens(1, 32)
            first = await run(client, shared + [5, 6])
            await index_in_step(router, workers)
            again = await run(client, shared + [7, 8])
        assert again.worker_id == first.worker_id and again.usage.cached_tokens == 32
        epoch = {w.config.worker_id: w.events.epoch for w in workers}[first.worker_id]
        assert await r.xlen(redis_layout.kv_stream_key(prefix, first.worker_id, epoch)) > 0   # through Redis
        assert isinstance(router.kv_indexer.feed_for(router.registry.get("w0")), RedisFeed)
        await eventually(lambda: router.registry.get(first.worker_id).load.kv_blocks_cached > 0,
                         what="loads arrive through Redis")
    finally:
        await r.aclose()
        for w in workers:
            await w.stop(grace=0)
        await router.stop(grace=0)


async def test_router_replicas_share_one_view_and_a_late_replica_catches_up(redis_url, prefix):
    a = await redis_router(redis_url, prefix)
    b = await redis_router(redis_url, prefix)
    workers = [await redis_worker(f"w{i}", redis_url, prefix, BlockEngine(num_blocks=48)) for i in range(3)]
    late = None
    try:
        await eventually(lambda: ids(a) == ids(b) == {"w0", "w1", "w2"}, what="both replicas see 3 workers")
        async with AsyncKvmeshClient(a.grpc_address) as client:
            await asyncio.gather(*(run(client, tokens(i % 4, 24) + tokens(100 + i, 5)) for i in range(12)))
        for router in (a, b):                                # b routed nothing and still knows every block
            await index_in_step(router, workers)
        late = await redis_router(redis_url, prefix)         # a new replica: current once started
        assert ids(late) == {"w0", "w1", "w2"}
        await index_in_step(late, workers)
        assert late.kv.index.num_entries() == a.kv.index.num_entries() > 0
        # the loads it started with may be a heartbeat from the burst above (a full suite on two
        # busy cores once routed away from the cached prefix on them): wait for idle workers
        await eventually(lambda: all(w.load.num_running == w.load.num_waiting == 0 for w in late.registry.workers()),
                         what="the late replica sees the workers idle")
        async with AsyncKvmeshClient(late.grpc_address) as client:     # and it routes by it
            reply = await run(client, tokens(0, 24) + [9])
        assert reply.usage.cached_tokens >= 20
    finally:
        for w in workers:
            await w.stop(grace=0)
        for router in (a, b, late):
            if router is not None:
                await router.stop(grace=0)


async def test_a_draining_worker_finishes_its_requests_then_leaves(redis_url, prefix):
    router = await redis_router(redis_url, prefix)
    workers = [await redis_worker(f"w{i}", redis_url, prefix, BlockEngine(step_delay_s=0.02)) for i in range(2)]
    try:
        await eventually(lambda: ids(router) == {"w0", "w1"}, what="workers discovered")
        async with AsyncKvmeshClient(router.grpc_address) as client:
            long = asyncio.ensure_future(run(client, tokens(1, 8), max_tokens=40, request_id="long"))
            await eventually(lambda: sum(w.engine.num_in_flight for w in workers) == 1, what="started")
            leaving, staying = sorted(workers, key=lambda w: -w.engine.num_in_flight)
            drain = asyncio.ensure_future(leaving.drain(timeout=10))
            handle = router.registry.get(leaving.config.worker_id)
            await eventually(lambda: not handle.available, what="draining seen through Redis")
            assert not long.done()                          # ~0.8 s of decoding left
            for i in range(3):                               # new requests avoid the draining worker
                assert (await run(client, tokens(10 + i, 8), max_tokens=1)).worker_id == staying.config.worker_id
            result = await long
            assert result.finish_reason.value == "length" and result.usage.completion_tokens == 40
            assert result.worker_id == leaving.config.worker_id
            assert await drain
        await eventually(lambda: ids(router) == {staying.config.worker_id}, what="the drained worker left")
        assert not router.kv.index.has_worker(leaving.config.worker_id)
    finally:
        for w in workers:
            await w.stop(grace=0)
        await router.stop(grace=0)


async def test_a_worker_whose_key_expires_is_dropped(redis_url, prefix):
    router = await redis_router(redis_url, prefix)
    doomed = await redis_worker("doomed", redis_url, prefix)
    r = aioredis.Redis.from_url(redis_url)
    try:
        await eventually(lambda: ids(router) == {"doomed"}, what="worker discovered")
        await doomed.router.close(deregister=False)          # the process "dies": no goodbye
        await doomed.stop(grace=0)
        await eventually(lambda: ids(router) == set(), timeout_s=5, what="expired worker dropped")
        assert not await r.sismember(redis_layout.workers_key(prefix), "doomed")
        assert not router.kv.index.has_worker("doomed")
    finally:
        await r.aclose()
        await router.stop(grace=0)


async def test_a_worker_restarted_under_the_same_id_is_rediscovered_and_resynced(redis_url, prefix):
    router = await redis_router(redis_url, prefix)
    worker = await redis_worker("phoenix", redis_url, prefix)
    try:
        await eventually(lambda: ids(router) == {"phoenix"}, what="worker discovered")
        async with AsyncKvmeshClient(router.grpc_address) as client:
            await run(client, tokens(1, 40))
        await index_in_step(router, [worker])
        first = router.registry.get("phoenix")
        assert router.kv.index.blocks_of("phoenix")
        await worker.router.close(deregister=False)
        await worker.stop(grace=0)
        worker = await redis_worker("phoenix", redis_url, prefix)       # new epoch, new address
        await eventually(lambda: router.registry.get("phoenix") not in (None, first), what="re-registered")
        await index_in_step(router, [worker])
        assert router.kv.index.blocks_of("phoenix") == frozenset()
    finally:
        await worker.stop(grace=0)
        await router.stop(grace=0)
