"""End to end: the router in front of the real worker (worker/service.py) and
the real engine on SmolLM2-135M-Instruct. The worker registers itself with
the router; nothing is faked. Marked slow (loads the model)."""

from __future__ import annotations

import aiohttp
import openai
import pytest
from router_fixtures import start_router, wait_until
from worker_fixtures import load_real_engine

from orchestrator.client import AsyncKvmeshClient
from worker.config import WorkerConfig
from worker.engine.config import EngineConfig
from worker.service import WorkerServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    return load_real_engine(smollm2_dir)


@pytest.fixture
async def stack(engine, smollm2_dir):
    router = await start_router([])
    config = WorkerConfig(engine=EngineConfig(model=str(smollm2_dir)), worker_id="real-0",
                          router_address=router.grpc_address)
    worker = WorkerServer(config, engine_factory=lambda: engine)
    await worker.start()
    try:
        await wait_until(lambda: router.registry.healthy_count() == 1, timeout_s=30)
        yield router, worker
    finally:
        await worker.stop(grace=0)
        await router.stop(grace=0)


async def test_greedy_completion_over_grpc_matches_the_engine_tokens(stack, smollm2_tokenizer):
    router, _ = stack
    async with AsyncKvmeshClient(router.grpc_address) as client:
        chunks = [c async for c in client.generate("The capital of France is", max_tokens=8, temperature=0)]
        again = await client.complete("The capital of France is", max_tokens=8, temperature=0)
    ids = [t for c in chunks for t in c.token_ids]
    text = "".join(c.text for c in chunks)
    assert len(ids) == chunks[-1].usage.completion_tokens <= 8
    assert text == smollm2_tokenizer.decode(ids, skip_special_tokens=True)
    assert again == text                                    # greedy is deterministic
    assert chunks[-1].worker_id == "real-0"


async def test_openai_chat_stream_and_prefix_cache(stack):
    router, _ = stack
    client = openai.AsyncOpenAI(base_url=f"{router.http_url}/v1", api_key="unused", max_retries=0)
    try:
        messages = [{"role": "system", "content": "You are a terse assistant. " * 6},
                    {"role": "user", "content": "Name a color."}]
        for attempt in range(2):
            stream = await client.chat.completions.create(
                model="SmolLM2-135M-Instruct", messages=messages, max_tokens=6, temperature=0, stream=True,
                stream_options={"include_usage": True})
            chunks = [c async for c in stream]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            usage = chunks[-1].usage
            assert text and usage.completion_tokens <= 6
        assert usage.prompt_tokens_details.cached_tokens >= 16     # the second request hit the prefix cache
    finally:
        await client.close()


async def test_client_disconnect_frees_the_engine(stack):
    router, worker = stack
    async with aiohttp.ClientSession(base_url=router.http_url) as http:
        resp = await http.post("/v1/completions", json={
            "prompt": "Count to one thousand:", "max_tokens": 400, "ignore_eos": True, "stream": True})
        await resp.content.readuntil(b"\n\n")
        assert worker.engine.num_in_flight == 1
        resp.close()
    await wait_until(lambda: worker.engine.num_in_flight == 0, timeout_s=5)
    await wait_until(lambda: router.router.in_flight == 0)
