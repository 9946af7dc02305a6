"""Workers failing under the router: every failure must end the client's
stream with a clean error, quickly (each wait here is bounded), and a failure
before the first token is retried once on another worker."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import grpc
import openai
import pytest
from router_fixtures import Behaviour, start_fake_worker, start_router, wait_until

from orchestrator.client import AsyncKvmeshClient

FIXTURES = Path(__file__).with_name("router_fixtures.py")
SLOW = Behaviour(reply="word " * 200, token_delay_s=0.02)


async def expect_grpc_error(address: str, code: grpc.StatusCode, within_s: float, **kwargs) -> tuple[int, str]:
    """Streams one request; returns (chunks received, error details) once it fails with ``code``."""
    received = 0
    start = time.monotonic()
    async with AsyncKvmeshClient(address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async with asyncio.timeout(within_s):
                async for _ in client.generate("go", max_tokens=500, **kwargs):
                    received += 1
    assert e.value.code() == code, e.value.details()
    assert time.monotonic() - start < within_s
    return received, e.value.details()


async def test_worker_dying_mid_stream_fails_the_grpc_stream_quickly():
    worker = await start_fake_worker("w0", behaviour=Behaviour(reply="word " * 200, token_delay_s=0.01,
                                                               die_after_tokens=5))
    router = await start_router([worker])
    try:
        received, details = await expect_grpc_error(router.grpc_address, grpc.StatusCode.UNAVAILABLE, within_s=3)
        assert received == 5 and "w0" in details
        assert router.router.in_flight == 0
    finally:
        await router.stop(grace=0)


async def test_worker_dying_mid_stream_ends_sse_with_an_error_event():
    worker = await start_fake_worker("w0", behaviour=Behaviour(reply="word " * 200, token_delay_s=0.01,
                                                               die_after_tokens=3))
    router = await start_router([worker])
    try:
        async with aiohttp.ClientSession(base_url=router.http_url) as http:
            async with asyncio.timeout(3):
                async with http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 500,
                                                              "stream": True}) as resp:
                    raw = await resp.text()
        assert resp.status == 200
        assert raw.endswith('data: [DONE]\n\n')
        last_event = raw.split("\n\n")[-3]
        assert '"error"' in last_event and '"worker_failed"' in last_event
        client = openai.AsyncOpenAI(base_url=f"{router.http_url}/v1", api_key="unused", max_retries=0)
        worker2 = await start_fake_worker("w1", behaviour=Behaviour(reply="word " * 200, token_delay_s=0.01,
                                                                    die_after_tokens=3))
        await router.registry.register("w1", worker2.address)
        with pytest.raises(openai.APIError):
            async with asyncio.timeout(3):
                stream = await client.completions.create(model="smollm2-test", prompt="hi", max_tokens=500,
                                                         stream=True)
                async for _ in stream:
                    pass
        await client.close()
    finally:
        await router.stop(grace=0)


async def test_sigkilled_worker_process_fails_the_stream_quickly():
    proc = subprocess.Popen([sys.executable, str(FIXTURES), "--token-delay", "0.02", "--reply", "word " * 300],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout=30)
        port = int(line.split()[1])
        router = await start_router([f"127.0.0.1:{port}"])
        try:
            async with AsyncKvmeshClient(router.grpc_address) as client:
                stream = client.generate("go", max_tokens=1000)
                await stream.__anext__()
                os.kill(proc.pid, signal.SIGKILL)
                start = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    async with asyncio.timeout(5):
                        async for _ in stream:
                            pass
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - start < 5
        finally:
            await router.stop(grace=0)
    finally:
        proc.kill()
        proc.wait(timeout=10)


async def test_failure_before_the_first_token_is_retried_on_another_worker():
    bad = await start_fake_worker("bad", behaviour=Behaviour(fail_code=grpc.StatusCode.UNAVAILABLE))
    good = await start_fake_worker("good")
    router = await start_router([bad, good], policy="round_robin")
    try:
        async with AsyncKvmeshClient(router.grpc_address) as client:
            for _ in range(4):
                chunks = [c async for c in client.generate("hi", max_tokens=3)]
                assert chunks[-1].worker_id == "good"
        assert len(bad.servicer.record.submits) >= 1
        assert 'kvmesh_router_worker_retries_total{model="smollm2-test"}' in router.metrics.exposition().decode()
    finally:
        await router.stop(grace=0)
        await bad.stop()
        await good.stop()


async def test_failure_before_the_first_token_with_no_other_worker_is_an_error():
    bad = await start_fake_worker("bad", behaviour=Behaviour(fail_code=grpc.StatusCode.UNAVAILABLE))
    router = await start_router([bad])
    try:
        _, details = await expect_grpc_error(router.grpc_address, grpc.StatusCode.UNAVAILABLE, within_s=3)
        assert "bad" in details
    finally:
        await router.stop(grace=0)
        await bad.stop()


async def test_stream_ended_without_finish_is_an_error():
    worker = await start_fake_worker("w0", behaviour=Behaviour(reply="a b c", end_without_finish=True))
    router = await start_router([worker])
    try:
        received, details = await expect_grpc_error(router.grpc_address, grpc.StatusCode.UNAVAILABLE, within_s=3)
        assert received > 0 and "without a finish reason" in details
    finally:
        await router.stop(grace=0)
        await worker.stop()


async def test_silent_worker_times_out_and_is_cancelled():
    worker = await start_fake_worker("w0", behaviour=Behaviour(hang=True))
    router = await start_router([worker], worker_timeout_s=0.5)
    try:
        _, details = await expect_grpc_error(router.grpc_address, grpc.StatusCode.UNAVAILABLE, within_s=3,
                                             request_id="hung")
        assert "sent nothing for 0.5s" in details
        await wait_until(lambda: "hung" in worker.servicer.record.cancelled)
        async with aiohttp.ClientSession(base_url=router.http_url) as http:
            async with http.post("/v1/completions", json={"prompt": "hi"}) as resp:
                assert resp.status == 504
                assert (await resp.json())["error"]["code"] == "worker_timeout"
    finally:
        await router.stop(grace=0)
        await worker.stop()


async def test_in_flight_bound_rejects_with_429_and_resource_exhausted():
    worker = await start_fake_worker("w0", behaviour=SLOW)
    router = await start_router([worker], max_in_flight=1)
    try:
        async with AsyncKvmeshClient(router.grpc_address) as client:
            stream = client.generate("go", max_tokens=500)
            await stream.__anext__()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                [c async for c in client.generate("go")]
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            async with aiohttp.ClientSession(base_url=router.http_url) as http:
                async with http.post("/v1/completions", json={"prompt": "hi"}) as resp:
                    assert resp.status == 429
                    assert (await resp.json())["error"]["type"] == "rate_limit_error"
            await stream.aclose()
        await wait_until(lambda: router.router.in_flight == 0)
        async with AsyncKvmeshClient(router.grpc_address) as client:
            assert await client.complete("hi", max_tokens=2)
    finally:
        await router.stop(grace=0)
        await worker.stop()


async def test_no_workers_is_unavailable():
    router = await start_router([])
    try:
        await expect_grpc_error(router.grpc_address, grpc.StatusCode.UNAVAILABLE, within_s=3)
    finally:
        await router.stop(grace=0)
