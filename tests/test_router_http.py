"""The OpenAI-compatible HTTP API against a real grpc.aio worker test double:
bad input (400 naming the field), SSE format, usage, chat, disconnects,
metrics, the standard ``openai`` client, and streaming latency on kept-alive
connections (TCP_NODELAY)."""

from __future__ import annotations

import json
import statistics
import time

import aiohttp
import openai
import pytest
from router_fixtures import Behaviour, start_fake_worker, start_router, wait_until

REPLY = "Héllo wörld 🙂, the fake worker says STOP and then more text."


@pytest.fixture
async def worker():
    w = await start_fake_worker("w0", behaviour=Behaviour(reply=REPLY, cached_tokens=7))
    yield w
    await w.stop()


@pytest.fixture
async def router(worker):
    r = await start_router([worker], max_body_bytes=64 * 1024)
    yield r
    await r.stop(grace=0)


@pytest.fixture
async def http(router):
    async with aiohttp.ClientSession(base_url=router.http_url) as session:
        yield session


def read_sse(raw: str) -> list:
    """SSE events as JSON objects, with "[DONE]" kept as a string; checks the framing."""
    assert raw.endswith("\n\n")
    events = []
    for block in raw.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def post_sse(http, path, body):
    async with http.post(path, json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        return read_sse(await resp.text())


# --- bad input ------------------------------------------------------------------------------------

COMPLETION_ERRORS = [
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": -5}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 1.5}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": True}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 4000}, "max_tokens"),
    ({"prompt": "hi", "temperature": -0.1}, "temperature"),
    ({"prompt": "hi", "temperature": 2.5}, "temperature"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "top_p": 1.01}, "top_p"),
    ({"prompt": "hi", "top_k": -1}, "top_k"),
    ({"prompt": "hi", "top_k": 2**40}, "top_k"),
    ({"prompt": "hi", "seed": 2**64}, "seed"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "hi", "logprobs": -1}, "logprobs"),
    ({"prompt": "hi", "n": 2}, "n"),
    ({"prompt": "hi", "best_of": 3}, "best_of"),
    ({"prompt": "hi", "stop": 5}, "stop"),
    ({"prompt": "hi", "stop": [str(i) for i in range(17)]}, "stop"),
    ({"prompt": "hi", "seed": -1}, "seed"),
    ({"prompt": "hi", "stream": "yes"}, "stream"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "hi", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "hi", "echo": True}, "echo"),
    ({"prompt": "hi", "stop_token_ids": ["a"]}, "stop_token_ids"),
    ({"prompt": ""}, "prompt"),
    ({}, "prompt"),
    ({"prompt": [[1], [2]]}, "prompt"),
    ({"prompt": [1.5]}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": [5] * 2048}, "prompt"),
]


@pytest.mark.parametrize("body, field", COMPLETION_ERRORS)
async def test_completion_bad_input_is_400_naming_the_field(http, body, field):
    async with http.post("/v1/completions", json=body) as resp:
        error = (await resp.json())["error"]
        assert resp.status == 400, error
    assert error["param"] == field
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith(f"{field}:")


CHAT_ERRORS = [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
     "response_format"),
]


@pytest.mark.parametrize("body, field", CHAT_ERRORS)
async def test_chat_bad_input_is_400_naming_the_field(http, body, field):
    async with http.post("/v1/chat/completions", json=body) as resp:
        error = (await resp.json())["error"]
        assert resp.status == 400, error
    assert error["param"] == field


async def test_context_window_error_gives_the_numbers(http):
    async with http.post("/v1/completions", json={"prompt": [5] * 2000, "max_tokens": 100}) as resp:
        error = (await resp.json())["error"]
    assert resp.status == 400
    assert "2048" in error["message"] and "2100" in error["message"] and "2000 in the prompt" in error["message"]


async def test_malformed_and_oversized_bodies_then_server_keeps_serving(http):
    async with http.post("/v1/completions", data=b'{"prompt": "hi",', headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400
        assert "not valid JSON" in (await r.json())["error"]["message"]
    async with http.post("/v1/completions", json=["not", "an", "object"]) as r:
        assert r.status == 400 and "JSON object" in (await r.json())["error"]["message"]
    async with http.post("/v1/completions", json={"prompt": "x" * 100_000}) as r:
        assert r.status == 413
        assert "limit" in (await r.json())["error"]["message"]
    async with http.post("/v1/completions", json={"prompt": "hi", "model": "gpt-17"}) as r:
        error = (await r.json())["error"]
        assert r.status == 404 and error["code"] == "model_not_found" and "smollm2-test" in error["message"]
    async with http.get("/v1/nothing-here") as r:
        assert r.status == 404 and "error" in await r.json()
    async with http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3}) as r:
        assert r.status == 200
        assert (await r.json())["choices"][0]["finish_reason"] == "length"


# --- generation ---------------------------------------------------------------------------------

async def test_completion_whole_response_with_cached_tokens(http, worker):
    async with http.post("/v1/completions", json={"prompt": "Say it", "temperature": 0}) as resp:
        body = await resp.json()
    assert resp.status == 200
    assert body["object"] == "text_completion" and body["model"] == "smollm2-test"
    assert body["id"].startswith("cmpl-")
    choice = body["choices"][0]
    assert choice["text"] == "Héllo wörld 🙂, the fake worker says STOP and then"[:len(choice["text"])]
    assert choice["finish_reason"] == "length"          # OpenAI's default max_tokens=16
    usage = body["usage"]
    assert usage["completion_tokens"] == 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + 16
    assert usage["prompt_tokens_details"] == {"cached_tokens": 7}


async def test_completion_sse_with_include_usage(http):
    events = await post_sse(http, "/v1/completions", {
        "prompt": "Say it", "max_tokens": 100, "stream": True, "stream_options": {"include_usage": True},
        "stop": ["STOP"]})
    assert events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == REPLY[:REPLY.index("STOP")]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["prompt_tokens_details"]["cached_tokens"] == 7
    assert usage_chunk["usage"]["completion_tokens"] > 0
    assert len({c["id"] for c in chunks}) == 1


async def test_completion_sse_without_usage_has_no_usage_chunk(http):
    events = await post_sse(http, "/v1/completions", {"prompt": "hi", "max_tokens": 4, "stream": True})
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"


async def test_completion_logprobs(http):
    async with http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "logprobs": 2}) as resp:
        logprobs = (await resp.json())["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == 3
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"])
    assert logprobs["text_offset"][0] == 0


async def test_chat_renders_the_template_and_streams_deltas(http, worker):
    events = await post_sse(http, "/v1/chat/completions", {
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "max_completion_tokens": 5, "stream": True, "stream_options": {"include_usage": True},
        "logprobs": True, "top_logprobs": 1})
    chunks = events[:-2]
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert REPLY.startswith(text) and text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"]["completion_tokens"] == 5
    content_logprobs = [lp for c in chunks if c["choices"][0]["logprobs"]
                        for lp in c["choices"][0]["logprobs"]["content"]]
    assert len(content_logprobs) == 5 and all(isinstance(lp["bytes"], list) for lp in content_logprobs)
    sent = worker.servicer.files.tokenizer.decode(list(worker.servicer.record.submits[-1].prompt_token_ids),
                                                  skip_special_tokens=False)
    assert sent == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n")


async def test_chat_whole_response(http):
    async with http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi"}], "stop": "STOP"}) as resp:
        body = await resp.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": REPLY[:REPLY.index("STOP")]}
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_extensions_reach_the_worker(http, worker):
    body = {"prompt": "hi", "max_tokens": 5, "top_k": 7, "ignore_eos": True, "stop_token_ids": [9], "seed": 42}
    async with http.post("/v1/completions", json=body) as resp:
        assert resp.status == 200
    sampling = worker.servicer.record.submits[-1].sampling
    assert (sampling.top_k, sampling.ignore_eos, list(sampling.stop_token_ids), sampling.seed) == (7, True, [9], 42)


async def test_client_disconnect_during_sse_cancels_the_worker(router, worker):
    worker.servicer.behaviour.token_delay_s = 0.05
    worker.servicer.behaviour.reply = "word " * 200
    async with aiohttp.ClientSession(base_url=router.http_url) as session:
        resp = await session.post("/v1/completions", json={"prompt": "hi", "max_tokens": 500, "stream": True})
        await resp.content.readuntil(b"\n\n")
        resp.close()                                   # drop the connection mid-stream
    await wait_until(lambda: len(worker.servicer.record.cancelled) == 1, timeout_s=3)
    await wait_until(lambda: router.router.in_flight == 0)
    assert worker.servicer.record.finished == []


# --- information endpoints --------------------------------------------------------------------------

async def test_models_health_and_metrics(http):
    async with http.get("/v1/models") as resp:
        models = await resp.json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == "smollm2-test" and models["data"][0]["object"] == "model"
    async with http.get("/health") as resp:
        assert resp.status == 200 and (await resp.json())["healthy_workers"] == 1
    async with http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True}) as resp:
        await resp.read()
    async with http.get("/metrics") as resp:
        text = await resp.text()
    assert resp.headers["Content-Type"].startswith("text/plain")
    for name in ("kvmesh_router_requests_total", "kvmesh_router_finished_requests_total",
                 "kvmesh_router_time_to_first_token_seconds_bucket", "kvmesh_router_inter_token_latency_seconds",
                 "kvmesh_router_chunk_tokens_bucket", "kvmesh_router_worker_messages_total",
                 "kvmesh_router_e2e_request_latency_seconds", "kvmesh_router_prompt_tokens_total",
                 "kvmesh_router_generation_tokens_total", "kvmesh_router_cached_prompt_tokens_total",
                 "kvmesh_router_requests_in_flight", "kvmesh_router_worker_running_requests",
                 "kvmesh_router_worker_waiting_requests", "kvmesh_router_worker_kv_usage_ratio",
                 "kvmesh_router_worker_in_flight_requests", "kvmesh_router_worker_placements_total",
                 "kvmesh_router_worker_failures_total"):
        assert name in text, name
    assert 'kvmesh_router_requests_total{endpoint="/v1/completions",status="200"} 1.0' in text
    assert 'kvmesh_router_worker_healthy{model="smollm2-test",worker_id="w0"} 1.0' in text


async def test_health_is_503_without_workers():
    router = await start_router([])
    try:
        async with aiohttp.ClientSession(base_url=router.http_url) as http:
            async with http.get("/health") as resp:
                assert resp.status == 503
            async with http.post("/v1/completions", json={"prompt": "hi"}) as resp:
                assert resp.status == 503
                assert (await resp.json())["error"]["code"] == "no_healthy_worker"
    finally:
        await router.stop(grace=0)


# --- the standard OpenAI client ----------------------------------------------------------------------

async def test_openai_client_completions_and_chat(router):
    client = openai.AsyncOpenAI(base_url=f"{router.http_url}/v1", api_key="unused", max_retries=0)
    try:
        [model] = (await client.models.list()).data
        assert model.id == "smollm2-test"

        completion = await client.completions.create(model=model.id, prompt="Say it", max_tokens=5, temperature=0)
        assert completion.choices[0].text and completion.usage.completion_tokens == 5
        assert completion.usage.prompt_tokens_details.cached_tokens == 7

        stream = await client.chat.completions.create(
            model=model.id, messages=[{"role": "user", "content": "Hi"}], stop=["STOP"], stream=True,
            stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == REPLY[:REPLY.index("STOP")]
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 7

        chat = await client.chat.completions.create(
            model=model.id, messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=3)
        assert chat.choices[0].message.content and chat.choices[0].finish_reason == "length"

        with pytest.raises(openai.BadRequestError) as e:
            await client.completions.create(model=model.id, prompt="hi", temperature=5)
        assert e.value.body["param"] == "temperature"
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="nope", prompt="hi")
    finally:
        await client.close()


# --- latency on kept-alive connections -----------------------------------------------------------------

async def test_streamed_first_chunk_is_not_delayed_on_a_kept_alive_connection(router):
    """Nagle's algorithm meeting delayed ACKs holds small writes ~40 ms on a
    reused connection; with TCP_NODELAY the first chunk comes in a few ms."""
    body = {"prompt": "hi", "max_tokens": 2, "stream": True}
    connector = aiohttp.TCPConnector(limit=1)            # one pooled connection for every request
    async with aiohttp.ClientSession(base_url=router.http_url, connector=connector) as http:
        delays = []
        for _ in range(12):
            start = time.perf_counter()
            async with http.post("/v1/completions", json=body) as resp:
                await resp.content.readuntil(b"\n\n")
                delays.append(time.perf_counter() - start)
                await resp.read()
    assert statistics.median(delays[2:]) < 0.030, delays


# --- no input is a server error --------------------------------------------------------------------------

WEIRD_VALUES = [None, True, -1, 0, 2**70, 1e308, "x", "", [], [1, "a"], {}, {"a": 1}]
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "seed", "stop", "stop_token_ids", "ignore_eos", "logprobs", "top_logprobs", "n", "stream",
          "stream_options", "cache_salt", "response_format"]


async def test_no_field_value_causes_a_server_error(http):
    for path, base in (("/v1/completions", {"prompt": "hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        for field in FIELDS:
            for value in WEIRD_VALUES:
                body = {**base, "max_tokens": 1, field: value}
                async with http.post(path, json=body) as resp:
                    await resp.read()
                    assert resp.status in (200, 400, 404), (path, field, value, resp.status)
