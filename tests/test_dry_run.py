"""The placement dry run: ``kvmesh.v1.Admin.DryRunRoute`` and ``POST /v1/route/dry_run``
answer where a prompt would go and why, and route nothing."""

from __future__ import annotations

import random

import aiohttp
import grpc
import pytest
from kv_routing_fixtures import eventually, run, start_block_worker

from kvmesh.v1 import admin_pb2, admin_pb2_grpc, generate_pb2
from orchestrator.client import AsyncKvmeshClient, build_request
from router_fixtures import start_router


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 259) for _ in range(n)]


@pytest.fixture
async def cluster():
    router = await start_router([], policy="kv")
    workers = [await start_block_worker(f"w{i}", router_address=router.grpc_address) for i in range(3)]
    await eventually(lambda: len(router.registry.workers()) == 3, what="3 workers registered")
    yield router, workers
    for w in workers:
        await w.stop(grace=0)
    await router.stop(grace=0)


async def settle(router, workers) -> None:
    for w in workers:
        wid = w.config.worker_id
        await eventually(lambda: wid in router.kv_indexer.synced
                         and router.kv.index.last_event_id(wid) == w.events.last_event_id, what="index in step")


def dry_run_request(prompt: list[int], **kwargs) -> admin_pb2.DryRunRouteRequest:
    return admin_pb2.DryRunRouteRequest(request=build_request(prompt, **kwargs))


async def test_grpc_dry_run_reports_overlaps_and_costs_without_routing(cluster):
    router, workers = cluster
    prefix = tokens(1, 48)                                     # 12 blocks of 4
    async with AsyncKvmeshClient(router.grpc_address) as client:
        served = await run(client, prefix + [7, 8, 9])
    await settle(router, workers)
    events_before = [w.events.last_event_id for w in workers]
    state_before = (router.kv.ledger.num_leases(), router.kv.recent.num_placements())
    async with grpc.aio.insecure_channel(router.grpc_address) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        reply = await admin.DryRunRoute(dry_run_request(prefix + [1, 2, 3, 4, 5]))
        again = await admin.DryRunRoute(dry_run_request(prefix + [1, 2, 3, 4, 5]))
    assert reply == again                                      # nothing was recorded
    assert (reply.model, reply.policy, reply.block_size) == ("sim-model", "kv", 4)
    assert (reply.prompt_tokens, reply.prompt_blocks) == (53, 14)
    assert reply.chosen_worker_id == served.worker_id
    scores = {s.worker_id: s for s in reply.workers}
    assert set(scores) == {"w0", "w1", "w2"} and reply.workers[0].worker_id == served.worker_id
    best = scores[served.worker_id]
    assert (best.cached_blocks, best.overlap_blocks, best.probability) == (12, 12, 1.0)
    assert best.cost == pytest.approx(1.0 * best.prefill_blocks + 0.25 * best.decode_blocks)
    assert best.prefill_blocks == 14 - 12
    for wid, s in scores.items():
        if wid != served.worker_id:
            assert (s.overlap_blocks, s.prefill_blocks, s.probability) == (0, 14, 0.0)
    assert reply.formula == "cost = 1 * prefill_blocks + 0.25 * decode_blocks"
    assert [w.events.last_event_id for w in workers] == events_before          # no worker saw it
    assert router.kv.recent.num_placements() == state_before[1]          # no prediction recorded
    assert router.kv.ledger.num_leases() <= state_before[0]               # no lease (finished ones swept)
    assert sum(w.placements for w in router.registry.workers()) == 1
    async with AsyncKvmeshClient(router.grpc_address) as client:      # the real request agrees
        assert (await run(client, prefix + [1, 2, 3, 4, 5])).worker_id == reply.chosen_worker_id


async def test_grpc_dry_run_errors_are_those_of_generate(cluster):
    router, _ = cluster
    async with grpc.aio.insecure_channel(router.grpc_address) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await admin.DryRunRoute(dry_run_request([1, 2, 3], model="nope"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await admin.DryRunRoute(admin_pb2.DryRunRouteRequest(request=generate_pb2.GenerateRequest()))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in e.value.details()


async def test_http_dry_run_for_completion_and_chat_bodies(cluster):
    router, workers = cluster
    prefix = tokens(2, 40)
    async with AsyncKvmeshClient(router.grpc_address) as client:
        served = await run(client, prefix + [5])
    await settle(router, workers)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{router.http_url}/v1/route/dry_run",
                             json={"model": "sim-model", "prompt": prefix + [6, 7]}) as resp:
            assert resp.status == 200
            body = await resp.json()
        assert body["chosen_worker_id"] == served.worker_id and body["policy"] == "kv"
        top = body["workers"][0]
        assert (top["worker_id"], top["cached_blocks"]) == (served.worker_id, 10)
        assert {"cost", "prefill_blocks", "decode_blocks", "predicted_blocks", "probability"} <= set(top)
        async with http.post(f"{router.http_url}/v1/route/dry_run",
                             json={"messages": [{"role": "user", "content": "hello"}]}) as resp:
            assert resp.status == 200
            assert (await resp.json())["prompt_tokens"] > 5
        async with http.post(f"{router.http_url}/v1/route/dry_run", json={"model": "nope", "prompt": "x"}) as resp:
            assert resp.status == 404
        async with http.post(f"{router.http_url}/v1/route/dry_run", json={"prompt": 3}) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["param"] == "prompt"
    assert router.kv.recent.num_entries() > 0                  # only the real request's prediction


async def test_dry_run_under_round_robin_names_the_next_worker():
    router = await start_router([], policy="round_robin")
    workers = [await start_block_worker(f"w{i}", router_address=router.grpc_address) for i in range(3)]
    try:
        await eventually(lambda: len(router.registry.workers()) == 3, what="3 workers registered")
        async with grpc.aio.insecure_channel(router.grpc_address) as channel, \
                AsyncKvmeshClient(router.grpc_address) as client:
            admin = admin_pb2_grpc.AdminStub(channel)
            for i in range(4):
                reply = await admin.DryRunRoute(dry_run_request(tokens(i, 12)))
                assert reply.policy == "round_robin" and reply.formula == ""
                assert (await run(client, tokens(i, 12))).worker_id == reply.chosen_worker_id
    finally:
        for w in workers:
            await w.stop(grace=0)
        await router.stop(grace=0)
