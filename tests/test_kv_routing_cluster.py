"""KV routing in a real cluster: a router, workers over the real block manager
(``BlockEngine``) and their real KV events over gRPC. The router's prefix
index is checked against the workers' actual caches (brute force), through
joins, restarts, gaps and leaves."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
from kv_routing_fixtures import (BlockEngine, eventually, removed, run, start_block_worker, start_scripted_worker,
                                 stored, worker_cache)
from router_fixtures import FakeWorker, start_fake_worker, start_router

from kvmesh.v1 import registry_pb2, registry_pb2_grpc, worker_pb2, worker_pb2_grpc
from orchestrator.client import AsyncKvmeshClient
from orchestrator.placement import RequestView

BS = 4


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 259) for _ in range(n)]


def brute_overlap(held: set[int], hashes: list[int]) -> int:
    n = 0
    while n < len(hashes) and hashes[n] in held:
        n += 1
    return n


async def index_in_step(router, workers) -> None:
    """Wait until the router applied every event each worker published, then
    check its index against each worker's real cache."""
    index = router.kv.index
    for w in workers:
        wid = w.config.worker_id
        await eventually(lambda: wid in router.kv_indexer.synced and index.last_event_id(wid) == w.events.last_event_id,
                         what=f"router index of {wid} in step")
        last, cache = await worker_cache(w)
        assert last == index.last_event_id(wid)
        assert index.blocks_of(wid) == cache, wid


async def test_router_index_follows_real_workers_through_evictions():
    router = await start_router([], policy="kv")
    workers = [await start_block_worker(f"w{i}", BlockEngine(num_blocks=40), router_address=router.grpc_address)
               for i in range(3)]
    try:
        await eventually(lambda: len(router.registry.workers()) == 3, what="3 workers registered")
        prefixes = [tokens(i, 24) for i in range(5)]
        rng = random.Random(1)
        async with AsyncKvmeshClient(router.grpc_address) as client:
            async def one(i: int):
                prompt = rng.choice(prefixes) + tokens(1000 + i, rng.randrange(1, 12))
                return await run(client, prompt, max_tokens=rng.randrange(1, 5),
                                 cache_salt=rng.choice(["", "", "tenant"]))
            results = []
            for start in range(0, 48, 8):
                results += await asyncio.gather(*(one(i) for i in range(start, start + 8)))
        assert sum(r.usage.cached_tokens for r in results) > 0           # prefixes were reused
        assert sum(w.test_engine.num_removed_events for w in workers) > 0  # and blocks were evicted
        await index_in_step(router, workers)
        assert router.metrics.kv_events._value.get() > 0
        kv = router.kv
        for seed in range(20):                       # lookups agree with the workers' caches
            prompt = rng.choice(prefixes)[: rng.randrange(4, 25)] + tokens(seed, rng.randrange(0, 8))
            for salt in ("", "tenant"):
                hashes = kv.prompt_hashes(RequestView("p", "sim-model", prompt, salt, BS))
                got = kv.index.overlaps(hashes)
                for w in workers:
                    _, cache = await worker_cache(w)
                    assert got.get(w.config.worker_id, 0) == brute_overlap(cache, hashes)
    finally:
        for w in workers:
            await w.stop(grace=0)
        await router.stop(grace=0)


async def test_kv_policy_sends_a_repeated_prefix_back_to_its_worker():
    router = await start_router([], policy="kv")
    workers = [await start_block_worker(f"w{i}", router_address=router.grpc_address) for i in range(4)]
    try:
        await eventually(lambda: len(router.registry.workers()) == 4, what="4 workers registered")
        prefix = tokens(7, 64)
        async with AsyncKvmeshClient(router.grpc_address) as client:
            first = await run(client, prefix + [10, 11])
            await index_in_step(router, workers)
            later = [await run(client, prefix + tokens(50 + i, 6)) for i in range(4)]
        assert {c.worker_id for c in later} == {first.worker_id}
        assert all(c.usage.cached_tokens == 64 for c in later)
    finally:
        for w in workers:
            await w.stop(grace=0)
        await router.stop(grace=0)


async def test_a_new_router_starts_with_the_blocks_cached_before_it():
    worker = await start_block_worker("early")
    first = await start_router([f"127.0.0.1:{worker.port}"], policy="round_robin")
    try:
        async with AsyncKvmeshClient(first.grpc_address) as client:
            for i in range(3):
                await run(client, tokens(i, 30))
    finally:
        await first.stop(grace=0)
    assert worker.events.last_event_id > 0
    late = await start_router([f"127.0.0.1:{worker.port}"])
    try:
        await index_in_step(late, [worker])
        assert late.kv.index.num_entries() > 0
        assert late.metrics.kv_resyncs.labels("join")._value.get() == 1
    finally:
        await late.stop(grace=0)
        await worker.stop(grace=0)


async def test_a_gap_in_event_ids_triggers_a_resync():
    servicer, server, address = await start_scripted_worker("s1")
    servicer.snapshot.last_event_id = 2
    servicer.snapshot.block_hashes.extend([11, 12])
    router = await start_router([address])
    index = router.kv.index
    try:
        await eventually(lambda: index.blocks_of("s1") == {11, 12}, what="initial snapshot applied")
        servicer.push(stored(3, 13), removed(4, 11))
        await eventually(lambda: index.blocks_of("s1") == {12, 13}, what="events 3-4 applied")
        servicer.snapshot.last_event_id = 6
        del servicer.snapshot.block_hashes[:]
        servicer.snapshot.block_hashes.extend([12, 13, 15, 16])
        servicer.push(stored(6, 16))                      # 5 is missing
        await eventually(lambda: index.blocks_of("s1") == {12, 13, 15, 16}, what="resync after the gap")
        assert servicer.snapshot_calls == 2
        assert router.metrics.kv_resyncs.labels("gap")._value.get() == 1
        # the follower reopens the event stream after applying the snapshot: wait for that call
        await eventually(lambda: len(servicer.stream_requests) >= 2, what="the event stream reopened")
        last = servicer.stream_requests[-1]
        assert (last.after_event_id, last.epoch) == (6, "epoch-1")      # resumed right after the snapshot
        servicer.push(stored(7, 17))
        await eventually(lambda: 17 in index.blocks_of("s1"), what="events after the resync applied")
    finally:
        await router.stop(grace=0)
        await server.stop(None)


async def test_index_memory_is_bounded_by_the_workers_pool():
    servicer, server, address = await start_scripted_worker("s1")
    servicer.snapshot.kv_blocks_total = 5
    router = await start_router([address])
    try:
        await eventually(lambda: "s1" in router.kv_indexer.synced, what="synced")
        servicer.push(*(stored(i, 100 + i) for i in range(1, 21)))    # removals lost: 20 blocks stored
        await eventually(lambda: router.kv.index.last_event_id("s1") == 20, what="events applied")
        assert router.kv.index.blocks_of("s1") == {116, 117, 118, 119, 120}
        metrics = router.metrics.exposition().decode()
        assert "kvmesh_router_kv_index_entries 5.0" in metrics
        assert "kvmesh_router_kv_index_capacity_evictions_total 15.0" in metrics
    finally:
        await router.stop(grace=0)
        await server.stop(None)


async def test_a_restarted_worker_is_resynced_and_its_old_blocks_forgotten():
    worker = await start_block_worker("phoenix")
    port = worker.port
    router = await start_router([f"127.0.0.1:{port}"])
    try:
        async with AsyncKvmeshClient(router.grpc_address) as client:
            await run(client, tokens(1, 40))
        await index_in_step(router, [worker])
        assert router.kv.index.blocks_of("phoenix")
        await worker.stop(grace=0)
        worker = await start_block_worker("phoenix", port=port)      # same id and address, new epoch
        await eventually(lambda: router.metrics.kv_resyncs.labels("out_of_range")._value.get() == 1,
                         timeout_s=8, what="resync after the restart")
        await index_in_step(router, [worker])
        assert router.kv.index.blocks_of("phoenix") == frozenset()
    finally:
        await router.stop(grace=0)
        await worker.stop(grace=0)


async def test_a_worker_that_leaves_takes_its_entries_with_it():
    router = await start_router([])
    a = await start_block_worker("a", router_address=router.grpc_address)
    b = await start_block_worker("b", router_address=router.grpc_address)
    try:
        await eventually(lambda: len(router.registry.workers()) == 2, what="2 workers registered")
        async with AsyncKvmeshClient(router.grpc_address) as client:
            await asyncio.gather(*(run(client, tokens(i, 40)) for i in range(6)))
        await index_in_step(router, [a, b])
        assert router.kv.index.blocks_of("a")
        assert await a.drain(timeout=5)
        await eventually(lambda: not router.kv.index.has_worker("a"), what="a's entries dropped")
        assert router.kv.index.blocks_of("a") == frozenset()
        assert "a" not in router.kv_indexer.synced and router.kv.index.worker_ids == ["b"]
    finally:
        await a.stop(grace=0)
        await b.stop(grace=0)
        await router.stop(grace=0)


class _OtherHashWorker(FakeWorker):
    async def GetModelInfo(self, request, context):
        info = await super().GetModelInfo(request, context)
        info.hash_scheme = "sha256-cbor-v9"
        return info


async def test_workers_that_hash_differently_are_refused():
    router = await start_router([])
    other = _OtherHashWorker("x")
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(other, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    a = await start_fake_worker("a", block_size=16)
    b = await start_fake_worker("b", block_size=32)
    try:
        async with grpc.aio.insecure_channel(router.grpc_address) as channel:
            stub = registry_pb2_grpc.RegistryStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Register(registry_pb2.RegisterRequest(worker_id="x", address=f"127.0.0.1:{port}"))
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "sha256-cbor-v9" in e.value.details() and "blake2b64-v1" in e.value.details()
            await stub.Register(registry_pb2.RegisterRequest(worker_id="a", address=a.address))
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Register(registry_pb2.RegisterRequest(worker_id="b", address=b.address))
            assert "block_size 16 != 32" in e.value.details()
    finally:
        await router.stop(grace=0)
        await server.stop(None)
        await a.stop()
        await b.stop()


async def test_snapshot_rpc_is_consistent_with_the_event_stream():
    """GetKvSnapshot's blocks are exactly the events up to its last_event_id, replayed."""
    worker = await start_block_worker("w", BlockEngine(num_blocks=24))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            events = stub.StreamKvEvents(worker_pb2.StreamKvEventsRequest())
            await events.initial_metadata()
            held: set[int] = set()
            last = 0

            async def submit(i: int):
                req = worker_pb2.SubmitRequest(request_id=f"r{i}", prompt_token_ids=tokens(i % 5, 20 + i))
                req.sampling.max_tokens = 2
                async for _ in stub.Submit(req):
                    pass

            load = asyncio.gather(*(submit(i) for i in range(30)))
            snaps = []
            while not load.done() or not snaps:
                snaps.append(await stub.GetKvSnapshot(worker_pb2.GetKvSnapshotRequest()))
                await asyncio.sleep(0.005)
            await load
            final = await stub.GetKvSnapshot(worker_pb2.GetKvSnapshotRequest())
            snaps.append(final)
            for snap in snaps:                       # replay the stream up to each snapshot
                while last < snap.last_event_id:
                    batch = await events.read()
                    for ev in batch.events:
                        assert ev.event_id == last + 1
                        kind = ev.WhichOneof("kind")
                        if kind == "stored":
                            held.update(ev.stored.block_hashes)
                        elif kind == "removed":
                            held.difference_update(ev.removed.block_hashes)
                        else:
                            held.clear()
                        last = ev.event_id
                assert last == snap.last_event_id and held == set(snap.block_hashes)
                assert snap.kv_blocks_total == 24 and snap.epoch == worker.events.epoch
            events.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.StreamKvEvents(worker_pb2.StreamKvEventsRequest(after_event_id=1, epoch="old")).read()
            assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE
    finally:
        await worker.stop(grace=0)
