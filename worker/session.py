"""One router's Session: many requests over one bidirectional stream (``rpc Session``, worker.proto).

In: each ``SessionRequest``'s submits, then its aborts, are applied as they
arrive, without waiting for the engine (``EngineLoop.add``/``cancel`` queue
their commands in order, so an abort right behind its submit is applied
after it). A submit the worker refuses (bad input, an id already running,
draining or stopped) ends its stream at once with an error entry: the status
Submit would have failed with.

Out: the engine loop hands each step's outputs to ``_collect`` on the event
loop; one writer sends everything collected as one ``SessionUpdate``, one
entry per stream. Outputs that arrive while a write is in progress, or while
the router's flow-control window is full (``SessionRequest.window``: at most
that many updates beyond the last it acknowledged), wait and go out merged
with the next ones (``merge_outputs``), so the engine thread never waits for
the router: a slow router costs memory for unsent tokens and gets fewer,
larger updates, as Submit's coalescing does per request.

End: the session ends when the router cancels the call or goes away, when
the router half-closes and its last stream finished, or when the worker
stops (``close``: no new submits; the call ends once its streams are done,
or is cancelled by the server's grace period). However it ends, every stream
still open is cancelled on the engine, freeing its KV blocks.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import grpc

from kvmesh.v1 import worker_pb2
from worker.convert import output_to_pb, request_from_pb
from worker.engine.types import RequestOutput
from worker.engine_loop import EngineLoop, merge_outputs

logger = logging.getLogger(__name__)

SESSION_METADATA_KEY = "kvmesh-session"
"""Initial metadata the worker sends as soon as a Session starts (value: the protocol version)."""
SESSION_VERSION = "1"


@dataclass(eq=False)
class _Open:
    """A stream the engine holds for this session."""

    request_id: str
    first_sent: bool = False        # prompt accounting goes on the stream's first entry


class WorkerSession:
    """The worker side of one Session call; build it on the event loop, then ``await serve``.

    ``refusal()`` says why new submits are refused now (draining), or None;
    ``status_for(exc)`` maps a submit's exception to the status it is
    reported with (the servicer's error table).
    """

    def __init__(self, engine: EngineLoop, refusal: Callable[[], str | None],
                 status_for: Callable[[Exception], grpc.StatusCode]) -> None:
        self._engine = engine
        self._refusal = refusal
        self._status_for = status_for
        self._open: dict[int, _Open] = {}
        self._pending: dict[int, tuple[_Open, list[RequestOutput]]] = {}
        self._errors: list[worker_pb2.StreamUpdate] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._window = 0                # 0: no flow control
        self._acked = 0
        self.updates_sent = 0

    @property
    def num_open(self) -> int:
        return len(self._open)

    async def serve(self, requests: AsyncIterator[worker_pb2.SessionRequest],
                    context: grpc.aio.ServicerContext) -> None:
        """Runs the call until it ends (see the module docstring); raises what reading the requests raised."""
        await context.send_initial_metadata(((SESSION_METADATA_KEY, SESSION_VERSION),))
        reader = asyncio.create_task(self._read(requests), name="session-reader")
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if (self._pending or self._errors) and (self._may_send() or reader.done()):
                    await context.write(self._take())
                    self.updates_sent += 1
                    self._wake.set()        # more may have come, or be allowed, meanwhile
                if reader.done() and reader.exception() is not None:
                    raise reader.exception()
                if (reader.done() or self._closing) and not self._open and not self._pending and not self._errors:
                    return
        finally:
            reader.cancel()
            self._cancel_all()

    def _may_send(self) -> bool:
        return not self._window or self.updates_sent - self._acked < self._window

    def close(self) -> None:
        """Refuse new submits; the call ends once the open streams finished. Idempotent."""
        self._closing = True
        self._wake.set()

    # --- in ------------------------------------------------------------------------

    async def _read(self, requests: AsyncIterator[worker_pb2.SessionRequest]) -> None:
        try:
            async for message in requests:
                if message.window:
                    self._window = message.window
                if message.acked_updates > self._acked:
                    self._acked = message.acked_updates
                    self._wake.set()
                # aborts of earlier streams first: a submit may reuse the request id of a
                # stream aborted beside it (a client that disconnected and retried at once);
                # a stream submitted and aborted in the same message never runs
                aborted = set(message.aborts)
                submitted = {submit.stream_id for submit in message.submits}
                for stream_id in message.aborts:
                    if stream_id not in submitted:
                        self._abort(stream_id)
                for submit in message.submits:
                    if submit.stream_id not in aborted:
                        self._submit(submit.stream_id, submit.request)
        finally:
            self._wake.set()      # the writer decides whether the session is over

    def _submit(self, stream_id: int, request: worker_pb2.SubmitRequest) -> None:
        if stream_id in self._open:
            self._refuse(stream_id, grpc.StatusCode.INVALID_ARGUMENT,
                         f"stream id {stream_id} is already open on this session")
            return
        why = "the worker is stopping" if self._closing else self._refusal()
        if why is not None:
            self._refuse(stream_id, grpc.StatusCode.UNAVAILABLE, why)
            return
        try:
            req = request_from_pb(request)
            added = self._engine.add(req, functools.partial(self._collect, stream_id))
        except Exception as exc:
            self._refuse(stream_id, self._status_for(exc), str(exc))
            return
        entry = _Open(req.request_id)
        self._open[stream_id] = entry
        added.add_done_callback(functools.partial(self._added, stream_id, entry))

    def _added(self, stream_id: int, entry: _Open, added: asyncio.Future) -> None:
        if added.cancelled():
            return
        exc = added.exception()
        if exc is not None and self._open.get(stream_id) is entry:
            del self._open[stream_id]
            self._refuse(stream_id, self._status_for(exc), str(exc))

    def _abort(self, stream_id: int) -> None:
        entry = self._open.pop(stream_id, None)
        if entry is None:                 # finished, refused or never submitted: nothing to do
            return
        self._pending.pop(stream_id, None)
        self._engine.cancel(entry.request_id)

    def _refuse(self, stream_id: int, code: grpc.StatusCode, message: str) -> None:
        logger.debug("session stream %d refused: %s: %s", stream_id, code.name, message)
        self._errors.append(worker_pb2.StreamUpdate(stream_id=stream_id, error_code=code.value[0],
                                                    error_message=message))
        self._wake.set()

    # --- out -----------------------------------------------------------------------

    def _collect(self, stream_id: int, out: RequestOutput) -> None:
        """The engine loop's output callback: called on the event loop, in order
        per stream, only while the stream is open (``_abort`` and ``_cancel_all``
        cancel it on the engine first)."""
        pending = self._pending.get(stream_id)
        if pending is not None:
            pending[1].append(out)
        else:
            entry = self._open.get(stream_id)
            if entry is None:
                return
            self._pending[stream_id] = (entry, [out])
        if out.finished:
            self._open.pop(stream_id, None)
        self._wake.set()

    def _take(self) -> worker_pb2.SessionUpdate:
        """Everything collected since the last update, as one message."""
        update = worker_pb2.SessionUpdate()
        entries = update.streams
        for stream_id, (entry, parts) in self._pending.items():
            entries.add(stream_id=stream_id, output=output_to_pb(merge_outputs(parts), not entry.first_sent))
            entry.first_sent = True
        self._pending = {}
        if self._errors:
            entries.extend(self._errors)
            self._errors = []
        return update

    def _cancel_all(self) -> None:
        open_streams, self._open = self._open, {}
        self._pending = {}
        for entry in open_streams.values():
            self._engine.cancel(entry.request_id)
        if open_streams:
            logger.info("session ended with %d requests running; aborted them", len(open_streams))
