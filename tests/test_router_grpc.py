"""The router's gRPC API (kvmesh.v1.Generation) against a real grpc.aio worker
test double: generation, chat, stop strings, bad input, abort, cancellation."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from router_fixtures import Behaviour, start_fake_worker, start_router, wait_until

from kvmesh.v1 import generate_pb2, generate_pb2_grpc
from orchestrator.client import AsyncKvmeshClient, KvmeshClient, build_request
from orchestrator.types import FinishReason

REPLY = "Héllo wörld 🙂, the fake worker says STOP and then more text."


@pytest.fixture
async def worker():
    w = await start_fake_worker("w0", behaviour=Behaviour(reply=REPLY, cached_tokens=4))
    yield w
    await w.stop()


@pytest.fixture
async def router(worker):
    r = await start_router([worker])
    yield r
    await r.stop(grace=0)


@pytest.fixture
async def client(router):
    async with AsyncKvmeshClient(router.grpc_address) as c:
        yield c


def tokenizer(worker):
    return worker.servicer.files.tokenizer


async def collect(client, *args, **kwargs):
    return [chunk async for chunk in client.generate(*args, **kwargs)]


async def test_text_generation_streams_the_reply_with_usage(client, worker):
    chunks = await collect(client, "Tell me something", temperature=0.0)
    assert "".join(c.text for c in chunks) == REPLY
    last = chunks[-1]
    assert last.finish_reason is FinishReason.STOP
    assert all(c.finish_reason is None for c in chunks[:-1])
    reply_ids = tokenizer(worker).encode(REPLY, add_special_tokens=False).ids
    assert [t for c in chunks for t in c.token_ids] == reply_ids + [2]
    prompt_ids = tokenizer(worker).encode("Tell me something").ids
    assert last.usage.prompt_tokens == len(prompt_ids)
    assert last.usage.completion_tokens == len(reply_ids) + 1
    assert last.usage.cached_tokens == 4
    assert {c.worker_id for c in chunks} == {"w0"}
    submitted = worker.servicer.record.submits[-1]
    assert list(submitted.prompt_token_ids) == prompt_ids
    assert submitted.sampling.temperature == 0.0


async def test_token_id_prompt_is_sent_as_is(client, worker):
    chunks = await collect(client, [5, 6, 7], max_tokens=3)
    assert list(worker.servicer.record.submits[-1].prompt_token_ids) == [5, 6, 7]
    assert chunks[-1].finish_reason is FinishReason.LENGTH
    assert chunks[-1].usage.completion_tokens == 3


async def test_chat_messages_go_through_the_template(client, worker):
    await collect(client, chat=[{"role": "user", "content": "Hi!"}], max_tokens=2)
    ids = list(worker.servicer.record.submits[-1].prompt_token_ids)
    text = tokenizer(worker).decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")


async def test_stop_string_truncates_and_cancels_the_worker_call(client, worker):
    worker.servicer.behaviour.token_delay_s = 0.01
    chunks = await collect(client, "x", stop=["STOP"], request_id="stop-1")
    assert "".join(c.text for c in chunks) == REPLY[:REPLY.index("STOP")]
    assert chunks[-1].finish_reason is FinishReason.STOP
    assert list(worker.servicer.record.submits[-1].sampling.stop) == []   # workers never see text
    await wait_until(lambda: "stop-1" in worker.servicer.record.cancelled)


async def test_logprobs_are_passed_through(client):
    chunks = await collect(client, "x", max_tokens=3, logprobs=True, top_logprobs=2)
    logprobs = [lp for c in chunks for lp in c.logprobs]
    assert len(logprobs) == 3 and all(len(lp.top) == 2 for lp in logprobs)
    assert [lp.token_id for lp in logprobs] == [t for c in chunks for t in c.token_ids]


BAD_REQUESTS = [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=2.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=5000), "max_tokens"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    (dict(top_logprobs=3), "top_logprobs"),
    (dict(stop=[""]), "stop"),
    (dict(stop=[str(i) for i in range(17)]), "stop"),
    (dict(stop_token_ids=[10**9]), "stop_token_ids"),
]


@pytest.mark.parametrize("kwargs, field", BAD_REQUESTS)
async def test_bad_sampling_is_invalid_argument_naming_the_field(client, kwargs, field):
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await collect(client, "hello", **kwargs)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(f"{field}:")


@pytest.mark.parametrize("args, kwargs, field", [
    (("",), {}, "prompt"),
    (([10**8],), {}, "prompt"),
    ((), dict(chat=[]), "messages"),
    ((), dict(chat=[("robot", "hi")]), "messages[0].role"),
    (([5] * 2040,), dict(max_tokens=16), "max_tokens"),
    (([5] * 2048,), {}, "prompt"),
])
async def test_bad_prompts_are_invalid_argument(client, args, kwargs, field):
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await collect(client, *args, **kwargs)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(f"{field}:")


async def test_missing_prompt_unknown_model_and_server_keeps_serving(router, client):
    async with grpc.aio.insecure_channel(router.grpc_address) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in stub.Generate(generate_pb2.GenerateRequest()):
                pass
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in e.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in stub.Generate(build_request("hi", model="gpt-17")):
                pass
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "smollm2-test" in e.value.details()
    chunks = await collect(client, "still alive?", max_tokens=2)
    assert chunks[-1].finish_reason is FinishReason.LENGTH


async def test_abort_ends_the_stream_and_reaches_the_worker(client, worker):
    worker.servicer.behaviour.token_delay_s = 0.05
    worker.servicer.behaviour.reply = "word " * 200
    stream = client.generate("go", request_id="to-abort")
    first = await stream.__anext__()
    assert first.finish_reason is None
    assert await client.abort("to-abort") is True
    rest = [c async for c in stream]
    assert rest[-1].finish_reason is FinishReason.ABORT
    await wait_until(lambda: "to-abort" in worker.servicer.record.cancelled)
    assert await client.abort("to-abort") is False


async def test_client_cancel_reaches_the_worker(router, worker):
    worker.servicer.behaviour.token_delay_s = 0.05
    worker.servicer.behaviour.reply = "word " * 200
    async with grpc.aio.insecure_channel(router.grpc_address) as channel:
        call = generate_pb2_grpc.GenerationStub(channel).Generate(build_request("go", request_id="cancel-me"))
        await call.read()
        call.cancel()
    await wait_until(lambda: "cancel-me" in worker.servicer.record.cancelled, timeout_s=3)
    await wait_until(lambda: router.router.in_flight == 0)
    assert worker.servicer.record.finished == []


async def test_duplicate_running_request_id_is_refused(client, worker):
    worker.servicer.behaviour.token_delay_s = 0.05
    worker.servicer.behaviour.reply = "word " * 50
    stream = client.generate("go", request_id="same")
    await stream.__anext__()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await collect(client, "go", request_id="same")
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    await stream.aclose()


async def test_list_models(client):
    [card] = await client.list_models()
    assert (card.id, card.max_model_len, card.num_workers) == ("smollm2-test", 2048, 1)


async def test_health_and_reflection(router):
    async with grpc.aio.insecure_channel(router.grpc_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "kvmesh.v1.Generation"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name async for r in responses for s in r.list_services_response.service}
    assert {"kvmesh.v1.Generation", "kvmesh.v1.Registry", "grpc.health.v1.Health"} <= names


async def test_blocking_client(router):
    def use_blocking_client():
        with KvmeshClient(router.grpc_address) as c:
            return c.complete("hi", max_tokens=3), c.list_models()

    text, models = await asyncio.to_thread(use_blocking_client)
    assert text and models[0].id == "smollm2-test"
