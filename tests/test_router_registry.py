"""Workers joining and leaving a real router: Register / Heartbeat / expiry /
Deregister over gRPC, static workers, and load-aware placement."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from router_fixtures import Behaviour, Heartbeats, free_port, start_fake_worker, start_router, wait_until

from kvmesh.v1 import registry_pb2, registry_pb2_grpc, worker_pb2
from orchestrator.client import AsyncKvmeshClient


@pytest.fixture
async def router():
    r = await start_router([])          # heartbeat interval 0.2 s, dropped after 3 missed
    yield r
    await r.stop(grace=0)


@pytest.fixture
async def registry_stub(router):
    async with grpc.aio.insecure_channel(router.grpc_address) as channel:
        yield registry_pb2_grpc.RegistryStub(channel)


async def test_register_heartbeat_and_serve(router):
    worker = await start_fake_worker("w1")
    beats = Heartbeats(router.grpc_address, worker)
    try:
        await beats.register()
        assert beats.interval_s == pytest.approx(0.2)
        async with AsyncKvmeshClient(router.grpc_address) as client:
            [card] = await client.list_models()
            assert (card.id, card.num_workers) == ("smollm2-test", 1)
            assert await client.complete("hi", max_tokens=3)
        worker.servicer.load.num_waiting = 3
        worker.servicer.load.kv_usage = 0.25
        await wait_until(lambda: router.registry.workers()[0].load.num_waiting == 3)
        metrics = router.metrics.exposition().decode()
        assert 'kvmesh_router_worker_waiting_requests{model="smollm2-test",worker_id="w1"} 3.0' in metrics
        assert 'kvmesh_router_worker_kv_usage_ratio{model="smollm2-test",worker_id="w1"} 0.25' in metrics
    finally:
        await beats.close()
        await worker.stop()


async def test_missed_heartbeats_drop_the_worker_and_fail_its_streams(router):
    worker = await start_fake_worker("w1", behaviour=Behaviour(hang=True))
    beats = Heartbeats(router.grpc_address, worker)
    try:
        await beats.register()
        async with AsyncKvmeshClient(router.grpc_address) as client:
            stream = client.generate("go", request_id="stranded")
            pending = asyncio.ensure_future(stream.__anext__())
            await wait_until(lambda: worker.servicer.record.submits)
            await beats.stop()                               # the worker goes silent
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await asyncio.wait_for(pending, timeout=3)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "stopped sending heartbeats" in e.value.details()
            assert await client.list_models() == []
        assert router.registry.workers() == []
        await wait_until(lambda: "stranded" in worker.servicer.record.cancelled)
        assert 'worker_id="w1"' not in router.metrics.exposition().decode()
    finally:
        await beats.close()
        await worker.stop()


async def test_heartbeat_from_unknown_worker_says_register_again(registry_stub):
    reply = await registry_stub.Heartbeat(registry_pb2.HeartbeatRequest(worker_id="ghost"))
    assert reply.known is False


async def test_deregister_removes_the_worker(router, registry_stub):
    worker = await start_fake_worker("w1")
    try:
        await registry_stub.Register(registry_pb2.RegisterRequest(worker_id="w1", address=worker.address))
        assert [w.worker_id for w in router.registry.workers()] == ["w1"]
        await registry_stub.Deregister(registry_pb2.DeregisterRequest(worker_id="w1"))
        assert router.registry.workers() == []
        reply = await registry_stub.Heartbeat(registry_pb2.HeartbeatRequest(worker_id="w1"))
        assert reply.known is False
    finally:
        await worker.stop()


async def test_reregistering_replaces_the_entry(router, registry_stub):
    first = await start_fake_worker("w1")
    second = await start_fake_worker("w1")
    try:
        for w in (first, second):
            await registry_stub.Register(registry_pb2.RegisterRequest(worker_id="w1", address=w.address))
        [handle] = router.registry.workers()
        assert handle.address == second.address
        async with AsyncKvmeshClient(router.grpc_address) as client:
            assert await client.complete("hi", max_tokens=2)
        assert second.servicer.record.submits and not first.servicer.record.submits
    finally:
        await first.stop()
        await second.stop()


@pytest.mark.parametrize("request_fields, code, words", [
    (dict(worker_id="", address="127.0.0.1:1"), grpc.StatusCode.INVALID_ARGUMENT, "worker_id"),
    (dict(worker_id="w9", address=""), grpc.StatusCode.INVALID_ARGUMENT, "address"),
    (dict(worker_id="w9", address="127.0.0.1:1"), grpc.StatusCode.UNAVAILABLE, "cannot fetch ModelInfo"),
])
async def test_register_refusals(registry_stub, request_fields, code, words):
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await registry_stub.Register(registry_pb2.RegisterRequest(**request_fields), timeout=15)
    assert e.value.code() == code and words in e.value.details()


async def test_register_refuses_a_wrong_model_name_and_an_incompatible_worker(router, registry_stub):
    a = await start_fake_worker("a")
    b = await start_fake_worker("b", max_model_len=1024)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await registry_stub.Register(registry_pb2.RegisterRequest(worker_id="a", address=a.address, model="x"))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "model" in e.value.details()
        await registry_stub.Register(registry_pb2.RegisterRequest(worker_id="a", address=a.address))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await registry_stub.Register(registry_pb2.RegisterRequest(worker_id="b", address=b.address))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "max_model_len 2048 != 1024" in e.value.details()
    finally:
        await a.stop()
        await b.stop()


async def test_static_worker_down_at_start_joins_later_and_recovers():
    port = free_port()
    router = await start_router([f"127.0.0.1:{port}"])
    worker = None
    try:
        assert router.registry.workers() == []
        worker = await start_fake_worker("late", port=port)
        await wait_until(lambda: [w.worker_id for w in router.registry.workers()] == ["late"], timeout_s=3)
        [handle] = router.registry.workers()
        assert handle.static and handle.available
        await worker.stop()
        await wait_until(lambda: not handle.available, timeout_s=3)   # failed GetLoad poll
        assert router.registry.workers() == [handle]                  # static: kept, just unhealthy
        worker = await start_fake_worker("late", port=port)
        await wait_until(lambda: handle.available, timeout_s=3)
    finally:
        await router.stop(grace=0)
        if worker is not None:
            await worker.stop()


async def test_draining_worker_gets_no_new_requests():
    a = await start_fake_worker("a")
    b = await start_fake_worker("b")
    router = await start_router([a, b], policy="round_robin")
    try:
        a.servicer.load.CopyFrom(worker_pb2.LoadReport(worker_id="a", draining=True))
        [handle] = [w for w in router.registry.workers() if w.worker_id == "a"]
        await wait_until(lambda: not handle.available, timeout_s=3)
        async with AsyncKvmeshClient(router.grpc_address) as client:
            for _ in range(4):
                assert await client.complete("hi", max_tokens=1)
        assert not a.servicer.record.submits and len(b.servicer.record.submits) == 4
    finally:
        await router.stop(grace=0)
        await a.stop()
        await b.stop()


async def test_least_loaded_spreads_concurrent_requests():
    workers = [await start_fake_worker(f"w{i}", behaviour=Behaviour(reply="word " * 20, token_delay_s=0.01))
               for i in range(2)]
    router = await start_router(workers)
    try:
        async with AsyncKvmeshClient(router.grpc_address) as client:
            results = await asyncio.gather(*(client.complete("hi", max_tokens=10) for _ in range(6)))
        assert all(results)
        assert [len(w.servicer.record.submits) for w in workers] == [3, 3]
    finally:
        await router.stop(grace=0)
        for w in workers:
            await w.stop()
