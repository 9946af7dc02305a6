"""The worker's Session RPC end to end: a real grpc.aio server with FakeEngine, driven by a raw stub.

One bidirectional call carries many requests: one update per engine
delivery with an entry per stream, each stream's output in order and its
finish last; refused submits end only their own stream; aborts and the end of
the call free the engine's requests; outputs that queue up while a write is
in progress, or while the router's flow-control window is full, go out merged.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from test_worker_service import _config, prompt, stub, submit_request  # noqa: F401 (stub: a fixture over this module's worker)
from worker_fixtures import FakeEngine, eventually

from kvmesh.v1 import common_pb2, worker_pb2
from worker.engine.types import FinishReason, RequestOutput
from worker.service import WorkerServer
from worker.session import SESSION_METADATA_KEY, WorkerSession

pytestmark = pytest.mark.timeout(60)

LENGTH = common_pb2.FINISH_REASON_LENGTH


@pytest.fixture
async def worker():
    server = WorkerServer(_config(None), engine_factory=lambda: FakeEngine(step_delay_s=0.005))
    await server.start()
    yield server
    await server.stop(grace=0)


def submits(*pairs: tuple[int, worker_pb2.SubmitRequest]) -> worker_pb2.SessionRequest:
    return worker_pb2.SessionRequest(submits=[worker_pb2.SessionSubmit(stream_id=i, request=r) for i, r in pairs])


async def read_until_done(
    call, stream_ids: set[int], aborted: frozenset[int] = frozenset(), seen_in: dict[int, list[int]] | None = None
) -> tuple[dict[int, list[worker_pb2.StreamUpdate]], int]:
    """Every entry per stream until each of ``stream_ids`` finished or failed; and the number of updates.

    Streams in ``aborted`` were aborted while running: tokens computed before the abort
    arrived may still come (collected, never waited for), but no entry ends them (no ABORT
    entry is sent). ``seen_in`` receives, per stream, the numbers of the updates it was in."""
    entries: dict[int, list[worker_pb2.StreamUpdate]] = {}
    open_ids, updates = set(stream_ids), 0
    while open_ids:
        update = await asyncio.wait_for(call.read(), 10)
        assert update is not grpc.aio.EOF
        updates += 1
        ids = [e.stream_id for e in update.streams]
        assert len(ids) == len(set(ids))                     # at most one entry per stream per update
        for entry in update.streams:
            if entry.stream_id in aborted:
                assert not entry.error_code and not entry.output.finish_reason
            else:
                assert entry.stream_id in open_ids           # nothing after a stream's last entry
            entries.setdefault(entry.stream_id, []).append(entry)
            if seen_in is not None:
                seen_in.setdefault(entry.stream_id, []).append(updates)
            if entry.error_code or entry.output.finish_reason:
                open_ids.discard(entry.stream_id)
    return entries, updates


async def test_many_requests_share_one_update_per_step_in_order_with_the_finish_last(stub, worker):
    call = stub.Session()
    assert (await call.initial_metadata())[SESSION_METADATA_KEY] == "1"
    n = 16
    await call.write(submits(*((i + 1, submit_request(f"s-{i}", prompt(i), max_tokens=8 + i)) for i in range(n))))
    entries, updates = await read_until_done(call, set(range(1, n + 1)))
    for i in range(n):
        got = entries[i + 1]
        assert sum(len(e.output.token_ids) for e in got) == 8 + i
        assert got[-1].output.finish_reason == LENGTH
        assert all(e.output.finish_reason == 0 for e in got[:-1])
        assert got[0].output.prompt_tokens == len(prompt(i))
        assert all(e.output.prompt_tokens == 0 for e in got[1:])
    assert updates < sum(len(v) for v in entries.values()) / 4      # many streams per update
    await call.done_writing()
    assert await asyncio.wait_for(call.read(), 5) is grpc.aio.EOF  # half-closed and nothing open: the call ends
    assert await call.code() == grpc.StatusCode.OK
    assert worker.engine.num_in_flight == 0


async def test_a_refused_submit_ends_only_its_stream_with_the_submit_status(stub, worker):
    call = stub.Session()
    await call.write(submits((1, submit_request("ok", prompt(1), max_tokens=30)),
                             (2, submit_request("bad", [5000], max_tokens=3)),       # outside the vocabulary
                             (3, submit_request("", prompt(2))),                      # no request_id
                             (4, submit_request("ok", prompt(3)))))                   # "ok" is running
    entries, _ = await read_until_done(call, {1, 2, 3, 4})
    for stream_id in (2, 3, 4):
        assert entries[stream_id][-1].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "request_id" in entries[3][-1].error_message
    assert sum(len(e.output.token_ids) for e in entries[1]) == 30
    worker._servicer.draining = True
    await call.write(submits((5, submit_request("late", prompt(4)))))
    entries, _ = await read_until_done(call, {5})
    assert entries[5][-1].error_code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "draining" in entries[5][-1].error_message
    call.cancel()


async def test_an_abort_frees_the_request_and_nothing_follows_it(stub, worker):
    call = stub.Session()
    await call.write(submits((1, submit_request("long", prompt(1), max_tokens=400)),
                             (2, submit_request("short", prompt(2), max_tokens=40))))
    first = await asyncio.wait_for(call.read(), 10)
    assert {e.stream_id for e in first.streams} == {1, 2}
    await call.write(worker_pb2.SessionRequest(aborts=[1, 99]))              # 99: unknown, ignored
    # tokens of 1 already on their way may still come; none ends it (no ABORT entry is sent)
    entries, _ = await read_until_done(call, {2}, aborted=frozenset({1}))
    assert sum(len(e.output.token_ids) for e in entries.get(1, [])) < 400
    # 2 is done after 40 tokens; without the abort, 1 would run ~360 more steps of 5 ms
    await eventually(lambda: worker.engine.num_in_flight == 0 and worker.engine.load().kv_blocks_used == 0,
                     timeout=1.0, what="the aborted request's blocks to be freed")
    call.cancel()


async def test_an_abort_behind_its_submit_in_one_message_is_applied_after_it(stub, worker):
    call = stub.Session()
    message = submits((1, submit_request("gone", prompt(1), max_tokens=400)))
    message.aborts.append(1)
    await call.write(message)
    await call.write(submits((2, submit_request("gone", prompt(1), max_tokens=3))))   # the id is free again
    entries, _ = await read_until_done(call, {2})
    assert set(entries) == {2} and sum(len(e.output.token_ids) for e in entries[2]) == 3
    await eventually(lambda: worker.engine.num_in_flight == 0, what="no request left")
    call.cancel()


async def test_an_abort_beside_a_submit_that_reuses_its_request_id_is_applied_first(stub, worker):
    """What a router sends when a client disconnects and retries with the same request id
    while the session's previous write is in progress: both in one message."""
    call = stub.Session()
    await call.write(submits((1, submit_request("same", prompt(1), max_tokens=400))))
    first = await asyncio.wait_for(call.read(), 10)
    assert [e.stream_id for e in first.streams] == [1]
    message = submits((2, submit_request("same", prompt(2), max_tokens=3)))
    message.aborts.append(1)
    await call.write(message)
    seen: dict[int, list[int]] = {}
    entries, _ = await read_until_done(call, {2}, aborted=frozenset({1}), seen_in=seen)
    assert all(not e.error_code for e in entries[2]), entries[2][-1].error_message
    assert sum(len(e.output.token_ids) for e in entries[2]) == 3
    # 1's tokens computed before the abort may still arrive (an update can merge them with
    # 2's first), never after an update that carried 2: the abort was applied first
    assert max(seen.get(1, [0])) <= min(seen[2])
    await eventually(lambda: worker.engine.num_in_flight == 0, what="no request left")
    call.cancel()


async def test_a_full_window_holds_updates_back_and_merges_the_steps_behind_it(stub, worker):
    call = stub.Session()
    message = submits((1, submit_request("w", prompt(1), max_tokens=400)))
    message.window = 1
    await call.write(message)
    first = await asyncio.wait_for(call.read(), 10)
    assert len(first.streams[0].output.token_ids) >= 1
    await asyncio.sleep(0.2)                        # ~40 steps of 5 ms, none sent: the window is full
    assert [s.updates_sent for s in worker._servicer._sessions] == [1]
    await call.write(worker_pb2.SessionRequest(acked_updates=1))
    second = await asyncio.wait_for(call.read(), 10)
    assert len(second.streams[0].output.token_ids) >= 10      # the steps held back, as one entry
    await call.write(worker_pb2.SessionRequest(window=100, acked_updates=2))  # a wide window: one step each
    sizes = [len((await asyncio.wait_for(call.read(), 10)).streams[0].output.token_ids) for _ in range(5)]
    assert max(sizes) <= 3
    call.cancel()


async def test_cancelling_the_session_aborts_every_request_on_it(stub, worker):
    call = stub.Session()
    await call.write(submits(*((i, submit_request(f"c-{i}", prompt(i), max_tokens=400)) for i in range(1, 6))))
    await asyncio.wait_for(call.read(), 10)
    assert worker.engine.num_in_flight == 5
    call.cancel()
    await eventually(lambda: worker.engine.num_in_flight == 0 and worker.engine.load().kv_blocks_used == 0,
                     what="the session's requests to be aborted")


async def test_stopping_the_worker_ends_its_sessions(stub, worker):
    call = stub.Session()
    await call.initial_metadata()
    await worker.stop(grace=5)
    assert await asyncio.wait_for(call.code(), 5) in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE)


def test_outputs_queued_during_a_write_go_out_merged_with_their_first_entry_first():
    class Engine:
        def __init__(self):
            self.callbacks = {}

        def add(self, request, on_output):
            self.callbacks[request.request_id] = on_output
            return asyncio.get_running_loop().create_future()

        def cancel(self, request_id):
            self.callbacks.pop(request_id)

    async def scenario():
        engine = Engine()
        session = WorkerSession(engine, lambda: None, lambda exc: grpc.StatusCode.INTERNAL)
        session._submit(1, submit_request("a", prompt(1)))
        session._submit(2, submit_request("b", prompt(2)))
        emit_a, emit_b = engine.callbacks["a"], engine.callbacks["b"]
        emit_a(RequestOutput("a", (1,), num_prompt_tokens=20, num_cached_tokens=4))
        emit_b(RequestOutput("b", (7,), num_prompt_tokens=20))
        emit_a(RequestOutput("a", (2, 3)))
        first = session._take()
        assert [(e.stream_id, list(e.output.token_ids), e.output.prompt_tokens, e.output.cached_tokens)
                for e in first.streams] == [(1, [1, 2, 3], 20, 4), (2, [7], 20, 0)]
        emit_a(RequestOutput("a", (4,)))
        emit_a(RequestOutput("a", (5,), finish_reason=FinishReason.LENGTH))
        second = session._take()
        assert [(e.stream_id, list(e.output.token_ids), e.output.finish_reason, e.output.prompt_tokens)
                for e in second.streams] == [(1, [4, 5], LENGTH, 0)]
        assert session.num_open == 1
        session._abort(2)
        assert "b" not in engine.callbacks and session.num_open == 0 and session._take().streams == []

    asyncio.run(scenario())
