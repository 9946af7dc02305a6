"""The Worker gRPC service end to end: a real grpc.aio server on 127.0.0.1.

Every service test runs twice: on ``FakeEngine`` (fast, no model) and on the
real LLMEngine with SmolLM2-135M (marked slow). The engine is shared per
module; each test gets its own server on it, so event ids start at 1.
"""

from __future__ import annotations

import asyncio
import json
import random

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvmesh.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from kvstore.hashing import HASH_SCHEME
from worker.config import WorkerConfig
from worker.engine.config import EngineConfig
from worker.engine.types import AllBlocksCleared, BlockRemoved, BlockStored, EngineRequest, SamplingOptions
from worker.engine_loop import EngineLoop
from worker.kv_events import EventsUnavailableError, KvEventPublisher
from worker.service import START_AFTER_METADATA_KEY, WORKER_SERVICE, WorkerServer
from worker_fixtures import FakeEngine, FakeRegistry, eventually, load_real_engine, start_registry

pytestmark = pytest.mark.timeout(60)

RPC_TIMEOUT = 30.0


@pytest.fixture(scope="module", params=["fake", pytest.param("real", marks=pytest.mark.slow)])
def engine(request):
    if request.param == "fake":
        return FakeEngine()
    return load_real_engine(request.getfixturevalue("smollm2_dir"))  # session fixture of conftest.py


def _config(engine, **overrides) -> WorkerConfig:
    # The engine is injected; EngineConfig only has to be valid.
    return WorkerConfig(engine=EngineConfig(model="unused"), port=0, **overrides)


@pytest.fixture
async def worker(engine):
    server = WorkerServer(_config(engine), engine_factory=lambda: engine)
    await server.start()
    yield server
    await server.stop(grace=0)


@pytest.fixture
async def stub(worker):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
        yield worker_pb2_grpc.WorkerStub(channel)


def prompt(seed: int, n: int = 20) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 900) for _ in range(n)]


def submit_request(rid: str, tokens: list[int], max_tokens: int = 4, **sampling) -> worker_pb2.SubmitRequest:
    sampling = {"temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": True, **sampling}
    params = common_pb2.SamplingParams(**sampling)
    return worker_pb2.SubmitRequest(request_id=rid, prompt_token_ids=tokens, sampling=params)


async def collect(stub, request) -> list[worker_pb2.SubmitResponse]:
    return [r async for r in stub.Submit(request, timeout=RPC_TIMEOUT)]


async def load(stub) -> worker_pb2.LoadReport:
    return await stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=RPC_TIMEOUT)


async def read_rest(call) -> list[worker_pb2.SubmitResponse]:
    """Drain a call already read with ``read()`` (grpc forbids mixing in ``async for``)."""
    responses = []
    while (response := await call.read()) is not grpc.aio.EOF:
        responses.append(response)
    return responses


async def start_long_request(stub, rid: str, seed: int):
    """A request that would run for hundreds of tokens, read up to its first token."""
    call = stub.Submit(submit_request(rid, prompt(seed), max_tokens=400), timeout=RPC_TIMEOUT)
    first = await call.read()
    assert len(first.token_ids) >= 1 and first.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED
    return call


async def test_submit_streams_deltas_until_length(stub):
    tokens = prompt(1)
    responses = await collect(stub, submit_request("len", tokens, max_tokens=5, logprobs=True, top_logprobs=2))
    assert sum(len(r.token_ids) for r in responses) == 5
    assert [r.finish_reason for r in responses][-1] == common_pb2.FINISH_REASON_LENGTH
    assert all(r.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
    assert responses[0].prompt_tokens == len(tokens)
    assert all(len(r.logprobs) == len(r.token_ids) for r in responses)
    assert all(len(lp.top) == 2 for r in responses for lp in r.logprobs)


async def test_many_concurrent_submits(stub):
    requests = [submit_request(f"many-{i}", prompt(100 + i, 8 + i), max_tokens=6) for i in range(16)]
    results = await asyncio.gather(*(collect(stub, r) for r in requests))
    for responses in results:
        assert sum(len(r.token_ids) for r in responses) == 6
        assert responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    report = await load(stub)
    assert report.num_running == 0 and report.kv_blocks_used == 0


async def test_abort_frees_blocks_before_replying(stub):
    call = await start_long_request(stub, "to-abort", seed=2)
    assert (await load(stub)).kv_blocks_used > 0
    reply = await stub.Abort(worker_pb2.WorkerAbortRequest(request_id="to-abort"), timeout=RPC_TIMEOUT)
    assert reply.found
    report = await load(stub)
    assert report.kv_blocks_used == 0 and report.num_running == 0
    rest = await read_rest(call)
    assert rest[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
    again = await stub.Abort(worker_pb2.WorkerAbortRequest(request_id="to-abort"), timeout=RPC_TIMEOUT)
    assert not again.found


async def test_client_cancellation_aborts_the_request(stub, worker):
    call = await start_long_request(stub, "to-cancel", seed=3)
    assert (await load(stub)).kv_blocks_used > 0
    call.cancel()
    await eventually(lambda: worker.engine.load().kv_blocks_used == 0 and worker.engine.num_in_flight == 0,
                     what="the cancelled request's blocks to be freed")
    assert (await load(stub)).num_running == 0


@pytest.mark.parametrize("request_pb, field", [
    (submit_request("empty", []), "prompt_token_ids"),
    (submit_request("", [5, 6, 7]), "request_id"),
    (submit_request("vocab", [5, 10**7]), "prompt_token_ids"),
    (submit_request("temp", [5, 6], temperature=-1.0), "temperature"),
    (submit_request("topp", [5, 6], top_p=1.5), "top_p"),
    (submit_request("maxtok", [5, 6], max_tokens=0), "max_tokens"),
])
async def test_invalid_input_is_invalid_argument_naming_the_field(stub, request_pb, field):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, request_pb)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()


async def test_duplicate_running_id_is_invalid_argument(stub):
    call = await start_long_request(stub, "dup", seed=4)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, submit_request("dup", prompt(5)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in err.value.details()
    call.cancel()


async def test_model_info(stub, engine):
    info = await stub.GetModelInfo(worker_pb2.GetModelInfoRequest(), timeout=RPC_TIMEOUT)
    summary = engine.model_summary
    assert info.worker_id and info.model == summary.name
    assert info.block_size == summary.block_size and info.max_model_len == summary.max_model_len
    assert info.vocab_size == summary.vocab_size and list(info.eos_token_ids) == list(summary.eos_token_ids)
    assert info.hash_scheme == HASH_SCHEME
    assert info.tokenizer_json == engine.tokenizer_json and json.loads(info.tokenizer_json)
    assert info.chat_template == engine.chat_template and info.eos_token == engine.eos_token
    if not isinstance(engine, FakeEngine):
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_str(info.tokenizer_json)  # the router rebuilds it from this alone
        assert tokenizer.token_to_id(info.eos_token) in info.eos_token_ids
        assert "{%" in info.chat_template


async def test_health_serving_and_reflection_lists_the_service(worker):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", WORKER_SERVICE):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                               timeout=RPC_TIMEOUT)
        names = [s.name async for r in replies for s in r.list_services_response.service]
        assert WORKER_SERVICE in names and "grpc.health.v1.Health" in names


async def test_kv_events_numbered_from_one_and_resumable(stub, engine):
    events = stub.StreamKvEvents(worker_pb2.StreamKvEventsRequest(after_event_id=0), timeout=RPC_TIMEOUT)
    assert dict(await events.initial_metadata())[START_AFTER_METADATA_KEY] == "0"
    block_size = engine.model_summary.block_size
    prompts = [prompt(600 + i, 3 * block_size + 1) for i in range(3)]
    for i, tokens in enumerate(prompts):
        await collect(stub, submit_request(f"events-{i}", tokens, max_tokens=2))
    received = []
    while not _stores_cover(received, prompts, block_size):
        received.extend((await asyncio.wait_for(events.read(), RPC_TIMEOUT)).events)
    events.cancel()
    ids = [e.event_id for e in received]
    assert ids == list(range(1, len(ids) + 1)) and len(ids) >= 3

    resumed = stub.StreamKvEvents(worker_pb2.StreamKvEventsRequest(after_event_id=1), timeout=RPC_TIMEOUT)
    batch = await asyncio.wait_for(resumed.read(), RPC_TIMEOUT)
    assert batch.events[0] == received[1]
    resumed.cancel()

    ahead = stub.StreamKvEvents(worker_pb2.StreamKvEventsRequest(after_event_id=10**6), timeout=RPC_TIMEOUT)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ahead.read()
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE and "resync" in err.value.details()


def _stores_cover(received, prompts, block_size) -> bool:
    """Every prompt's full blocks appear in some BlockStored event's tokens."""
    stored = [list(e.stored.token_ids) for e in received if e.WhichOneof("kind") == "stored"]
    joined = [tok for tokens in stored for tok in tokens]
    full = [p[: len(p) // block_size * block_size] for p in prompts]
    return all(_contains(joined, f[-block_size:]) for f in full)


def _contains(haystack: list[int], needle: list[int]) -> bool:
    n = len(needle)
    return any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


async def test_step_exception_ends_inflight_requests_with_error(stub, engine, monkeypatch):
    real_step = engine.step
    calls = {"n": 0}

    def failing_step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected step failure")
        return real_step()

    monkeypatch.setattr(engine, "step", failing_step)
    requests = [submit_request(f"doomed-{i}", prompt(700 + i), max_tokens=300) for i in range(3)]
    for call in [stub.Submit(r, timeout=RPC_TIMEOUT) for r in requests]:
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while (response := await call.read()) is not grpc.aio.EOF:
                received.append(response)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "injected step failure" in err.value.details()
        assert received[-1].finish_reason == common_pb2.FINISH_REASON_ERROR
    assert (await load(stub)).kv_blocks_used == 0
    # The loop keeps serving after the failure.
    responses = await collect(stub, submit_request("after-failure", prompt(710), max_tokens=3))
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH


async def test_drain_refuses_new_requests_and_finishes_running_ones(stub, worker):
    call = stub.Submit(submit_request("draining", prompt(800), max_tokens=12), timeout=RPC_TIMEOUT)
    await call.read()
    drain = asyncio.create_task(worker.drain(timeout=RPC_TIMEOUT))
    await eventually(lambda: worker.load_report().draining, what="draining to start")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, submit_request("late", prompt(801)))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details()
    assert (await read_rest(call))[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert await asyncio.wait_for(drain, RPC_TIMEOUT)
    assert (await load(stub)).draining
    async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_registers_heartbeats_and_reregisters(engine):
    registry = FakeRegistry(heartbeat_interval_s=0.05)
    registry_server, registry_port = await start_registry(registry)
    config = _config(engine, router_address=f"127.0.0.1:{registry_port}", heartbeat_interval_s=5.0,
                     retry_initial_s=0.05, retry_max_s=0.2)
    server = WorkerServer(config, engine_factory=lambda: engine)
    await server.start()
    try:
        await eventually(lambda: len(registry.heartbeats) >= 3, what="three heartbeats")
        registered = registry.registers[0]
        assert registered.worker_id == config.worker_id and registered.model == engine.model_summary.name
        assert registry.heartbeats[-1].load.worker_id == config.worker_id
        assert registry.heartbeats[-1].load.kv_blocks_total == engine.load().kv_blocks_total
        async with grpc.aio.insecure_channel(registered.address) as channel:  # the router dials back
            info = await worker_pb2_grpc.WorkerStub(channel).GetModelInfo(worker_pb2.GetModelInfoRequest(),
                                                                          timeout=RPC_TIMEOUT)
            assert info.worker_id == config.worker_id

        registry.workers.clear()  # the router forgot us: the next heartbeat says known=false
        await eventually(lambda: len(registry.registers) >= 2, what="re-registration")
    finally:
        await server.stop(grace=0)
        await registry_server.stop(0)
    assert registry.deregisters == [config.worker_id]


async def test_keeps_retrying_while_the_router_is_down(engine):
    registry = FakeRegistry(heartbeat_interval_s=0.05)
    probe, port = await start_registry(registry)
    await probe.stop(0)  # a port with nobody listening, yet
    config = _config(engine, router_address=f"127.0.0.1:{port}", retry_initial_s=0.05, retry_max_s=0.1)
    server = WorkerServer(config, engine_factory=lambda: engine)
    await server.start()
    registry_server = None
    try:
        await asyncio.sleep(0.3)
        assert not registry.registers and not server.router.registered
        registry_server, _ = await start_registry(registry, port)
        await eventually(lambda: bool(registry.heartbeats), what="registration after the router came up")
    finally:
        await server.stop(grace=0)
        if registry_server is not None:
            await registry_server.stop(0)


async def test_stop_ends_open_streams(engine):
    server = WorkerServer(_config(engine), engine_factory=lambda: engine)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        call = await start_long_request(stub, "open-at-stop", seed=900)
        events = stub.StreamKvEvents(worker_pb2.StreamKvEventsRequest(), timeout=RPC_TIMEOUT)
        await events.initial_metadata()
        await asyncio.wait_for(server.stop(grace=0.5), RPC_TIMEOUT)
        with pytest.raises(grpc.aio.AioRpcError):
            await read_rest(call)
    assert engine.load().kv_blocks_used == 0


# ------------------------------------------------------------- engine loop and publisher units


async def test_reused_request_id_never_sees_the_aborted_requests_tokens():
    engine = FakeEngine(step_delay_s=0.001)
    loop = EngineLoop(lambda: engine)
    await loop.start()
    try:
        for round_ in range(20):
            old = await loop.submit(EngineRequest("reused", (1, 100), SamplingOptions(max_tokens=50)))
            await anext(old)
            await old.aclose()  # the consumer leaves: the request is aborted
            new = await loop.submit(EngineRequest("reused", (1, 500), SamplingOptions(max_tokens=3)))
            tokens = [t async for out in new for t in out.new_token_ids]
            assert tokens == [10 + (500 + n) % 900 for n in range(1, 4)], round_
    finally:
        await loop.stop()
    assert engine.load().kv_blocks_used == 0



async def test_publisher_ring_buffer_resume_and_resync():
    publisher = KvEventPublisher(capacity=4, max_batch=3)
    publisher.publish([BlockRemoved((i,)) for i in range(1, 7)])  # ids 1..6, keeps 3..6
    assert publisher.last_event_id == 6
    batches = publisher.subscribe(after_event_id=2)
    assert [e.event_id for e in await anext(batches)] == [3, 4, 5]
    assert [e.event_id for e in await anext(batches)] == [6]
    await batches.aclose()
    with pytest.raises(EventsUnavailableError, match="resync"):
        publisher.subscribe(after_event_id=1)
    with pytest.raises(EventsUnavailableError, match="ahead"):
        publisher.subscribe(after_event_id=7)


async def test_publisher_fans_out_and_detects_a_lagging_subscriber():
    publisher = KvEventPublisher(capacity=2)
    fast, slow = publisher.subscribe(0), publisher.subscribe(0)
    pending = asyncio.ensure_future(anext(fast))
    await asyncio.sleep(0)
    publisher.publish([AllBlocksCleared()])
    assert [e.event_id for e in await asyncio.wait_for(pending, 1)] == [1]
    publisher.publish([BlockStored((1,), None, (1, 2), 2)])
    assert [e.event_id for e in await anext(fast)] == [2]
    publisher.publish([BlockRemoved((1,))])  # the buffer now holds 2..3
    assert [e.event_id for e in await anext(fast)] == [3]
    with pytest.raises(EventsUnavailableError):
        await anext(slow)  # it still wants event 1, which fell out of the buffer
    publisher.close()
    assert [b async for b in publisher.subscribe(0)] == []


async def test_engine_load_failure_is_raised_by_start():
    def broken_engine():
        raise OSError("model.safetensors: no such file")

    server = WorkerServer(WorkerConfig(engine=EngineConfig(model="missing")), engine_factory=broken_engine)
    with pytest.raises(OSError, match="no such file"):
        await asyncio.wait_for(server.start(), RPC_TIMEOUT)


def test_outputs_waiting_behind_one_are_sent_as_one_delta():
    """A stream that fell behind sends what is queued as one message, and never
    merges past the output that finishes the request."""
    import asyncio

    from worker.engine.types import FinishReason, RequestOutput, TokenLogprob
    from worker.engine_loop import _coalesce

    async def run():
        waiting: asyncio.Queue = asyncio.Queue()
        first = RequestOutput("r", (5,), (TokenLogprob(5, -0.1, ()),), num_prompt_tokens=7, num_cached_tokens=4)
        for out in (RequestOutput("r", (6,), (TokenLogprob(6, -0.2, ()),)),
                    RequestOutput("r", (7,), (TokenLogprob(7, -0.3, ()),), finish_reason=FinishReason.LENGTH),
                    RequestOutput("r", (8,))):  # behind the finish: not merged
            waiting.put_nowait(out)
        merged = _coalesce(first, waiting)
        assert merged.new_token_ids == (5, 6, 7)
        assert [lp.logprob for lp in merged.logprobs] == [-0.1, -0.2, -0.3]
        assert merged.finish_reason is FinishReason.LENGTH
        assert (merged.num_prompt_tokens, merged.num_cached_tokens) == (7, 4)
        assert waiting.qsize() == 1
        alone = RequestOutput("s", (1,))
        assert _coalesce(alone, asyncio.Queue()) == alone

    asyncio.run(run())



async def test_a_process_worker_freezes_its_startup_heap_before_serving(engine, monkeypatch):
    """serve_worker's WorkerServer (freeze_heap=True) moves the heap out of the collector's
    view once the engine is up and before its gRPC server exists; other WorkerServers do not."""
    import gc

    import worker.service as service

    calls: list[bool] = []  # per call: was the gRPC server still absent?
    servers: list[WorkerServer] = []

    def freeze() -> None:
        calls.append(servers[-1]._server is None)
        service.gc.freeze()

    monkeypatch.setattr(service, "freeze_startup_heap", freeze)
    for freeze_heap in (False, True):
        servers.append(WorkerServer(_config(engine), engine_factory=lambda: engine, freeze_heap=freeze_heap))
        try:
            await servers[-1].start()
            frozen = gc.get_freeze_count()
        finally:
            await servers[-1].stop(grace=0)
            gc.unfreeze()  # this test process builds and drops engines
        assert (frozen > 0) is freeze_heap
    assert calls == [True]
