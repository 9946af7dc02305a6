"""This router's one Session call per worker, demultiplexed into per-request streams.

``rpc Session`` (worker.proto) carries every request this router has on a
worker over one bidirectional stream: the router sends submits and aborts,
the worker sends one ``SessionUpdate`` per engine step with the new output of
each of those requests. ``RouterSession`` owns the call: a writer task sends
what ``submit``/``abort`` queued (batched into one message while the
previous write is in progress), a reader task hands each update's entries to
the ``SessionStream`` of their stream id. The per-request consumer
(``Router._submit``) takes from its stream exactly as from a ``ReadAhead``.

Identifiers: stream ids are numbered from 1 per session and never reused, so
an entry that was on the wire when its request was aborted cannot reach a
later request, even one with the same request id.

Failure: when the call breaks (the worker dies, the connection resets, the
worker ends the session) every open stream ends with a ``SessionError``
carrying the call's status (``None``: ended without one), which the router
treats as a failed Submit call with that status; the session is closed and
the worker handle opens a new one for the next request.

Backpressure: a stream's buffer is a list the reader appends to and its
consumer empties; a slow consumer never stops the reader, so other requests'
tokens keep flowing. Its memory is bounded by the tokens the request
generates (each arrives once). Towards the worker, the session keeps a
flow-control window of ``WINDOW`` updates: an update is acknowledged once the
consumers it woke have had their turn on the event loop (they have converted
their part and handed it to their client), so a router short of CPU falls
behind by at most ``WINDOW`` updates, and the worker merges the steps it
produces meanwhile into the next update: the router then relays several
tokens per message and per client chunk, and its cost per token falls as its
load grows instead of its backlog.
"""

from __future__ import annotations

import asyncio
import logging
import grpc

from kvmesh.v1 import worker_pb2, worker_pb2_grpc

logger = logging.getLogger(__name__)

SESSION_METADATA_KEY = "kvmesh-session"
"""Initial metadata of a Session; the worker sends it at once (worker/session.py)."""

_CODES = {code.value[0]: code for code in grpc.StatusCode}

WINDOW = 2
"""Updates the worker may send beyond the last one acknowledged: 2 hides the
acknowledgement's round trip while the router keeps up."""


class SessionError(Exception):
    """A stream ended without a finish: ``code`` is the status it failed with,
    None when the worker ended the session normally with the stream open."""

    def __init__(self, code: grpc.StatusCode | None, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class SessionUnsupported(Exception):
    """The worker has no Session RPC (UNIMPLEMENTED): use Submit."""


class SessionStream:
    """One request on a session. ``take`` has ``ReadAhead.take``'s contract:
    every message since the last call (waits for one), in order, each once;
    ``[]`` after the one with a finish reason; the stream's error, if it
    failed, after the messages before it."""

    __slots__ = ("stream_id", "_session", "_ready", "_error", "_ended", "_waiter")

    def __init__(self, session: RouterSession, stream_id: int) -> None:
        self.stream_id = stream_id
        self._session = session
        self._ready: list[worker_pb2.SubmitResponse] = []
        self._error: BaseException | None = None
        self._ended = False
        self._waiter: asyncio.Future | None = None

    async def take(self) -> list[worker_pb2.SubmitResponse]:
        while not self._ready:
            if self._ended:
                if self._error is not None:
                    raise self._error
                return []
            self._waiter = self._session.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        batch, self._ready = self._ready, []
        return batch

    def abort(self) -> None:
        """End the stream now (``take`` raises a CANCELLED ``SessionError``) and
        abort the request on the worker; no-op once it ended. Idempotent."""
        if self._ended:
            return
        self._end(SessionError(grpc.StatusCode.CANCELLED, "aborted by the router"))
        self._session.abort(self.stream_id)

    close = abort
    """For the consumer's ``finally``: a stream that did not finish is aborted on the worker."""

    def _push(self, message: worker_pb2.SubmitResponse, last: bool) -> None:
        self._ready.append(message)
        if last:
            self._ended = True
        self._wake()

    def _end(self, error: BaseException) -> None:
        if not self._ended:
            self._ended = True
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class RouterSession:
    """One Session call to one worker; ``open`` it, ``submit`` requests, ``close`` it."""

    def __init__(self, call: grpc.aio.StreamStreamCall, worker_id: str) -> None:
        self.loop = asyncio.get_running_loop()
        self.worker_id = worker_id
        self._call = call
        self._streams: dict[int, SessionStream] = {}
        self._next_id = 1
        self._submits: list[worker_pb2.SessionSubmit] = []
        self._aborts: list[int] = []
        self._acked = 0
        self._ack_due = False
        self._outbox = asyncio.Event()
        self._outbox.set()              # the first message sets the window
        self.closed = False
        self.updates = 0
        """SessionUpdates read (one per engine step or less)."""
        self._idle = asyncio.Event()
        self._idle.set()
        self._reader = self.loop.create_task(self._read(), name=f"session-read-{worker_id}")
        self._writer = self.loop.create_task(self._write(), name=f"session-write-{worker_id}")

    @classmethod
    async def open(cls, stub: worker_pb2_grpc.WorkerStub, worker_id: str, timeout: float) -> RouterSession:
        """Start the call and wait for the worker's session header (``timeout`` seconds at most).

        Raises ``SessionUnsupported`` when the worker has no Session RPC, and
        ``SessionError`` when the call fails otherwise (UNAVAILABLE when the
        worker sent nothing in time)."""
        call = stub.Session()
        try:
            metadata = await asyncio.wait_for(call.initial_metadata(), timeout)
            if metadata is None or metadata.get(SESSION_METADATA_KEY) is None:
                code = await asyncio.wait_for(call.code(), timeout)
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    raise SessionUnsupported(f"worker {worker_id} has no Session RPC")
                raise SessionError(code, await call.details())
        except asyncio.TimeoutError:
            call.cancel()
            raise SessionError(grpc.StatusCode.UNAVAILABLE,
                               f"no session header from worker {worker_id} within {timeout:g}s") from None
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise SessionUnsupported(f"worker {worker_id} has no Session RPC") from None
            raise SessionError(e.code(), e.details()) from None
        except BaseException:
            call.cancel()
            raise
        return cls(call, worker_id)

    @property
    def num_open(self) -> int:
        return len(self._streams)

    def submit(self, request: worker_pb2.SubmitRequest) -> SessionStream:
        """Send ``request`` on this session; its messages arrive on the returned stream."""
        if self.closed:
            raise SessionError(grpc.StatusCode.UNAVAILABLE, f"the session with worker {self.worker_id} ended")
        stream_id = self._next_id
        self._next_id += 1
        stream = SessionStream(self, stream_id)
        self._streams[stream_id] = stream
        self._idle.clear()
        self._submits.append(worker_pb2.SessionSubmit(stream_id=stream_id, request=request))
        self._outbox.set()
        return stream

    def abort(self, stream_id: int) -> None:
        """Forget ``stream_id`` here and abort its request on the worker (no-op if unknown).

        A submit still waiting to be written is dropped instead (nothing to abort).
        The worker applies a message's aborts of earlier streams before its submits,
        so an abort followed by a submit that reuses the request id (a client that
        disconnects and retries at once) reaches the engine in that order even when
        both travel in one message."""
        if self._forget(stream_id) is None or self.closed:
            return
        unsent = [s for s in self._submits if s.stream_id != stream_id]
        if len(unsent) < len(self._submits):
            self._submits = unsent
            return
        self._aborts.append(stream_id)
        self._outbox.set()

    async def wait_idle(self, timeout: float | None) -> bool:
        """Whether every stream ended within ``timeout`` seconds (None: no limit)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def close(self) -> None:
        """Cancel the call; open streams end with a CANCELLED ``SessionError``. Idempotent."""
        self._call.cancel()
        self._reader.cancel()

    def _ack(self) -> None:
        self._ack_due = False
        self._acked = self.updates
        self._outbox.set()

    def _forget(self, stream_id: int) -> SessionStream | None:
        stream = self._streams.pop(stream_id, None)
        if not self._streams:
            self._idle.set()
        return stream

    async def _write(self) -> None:
        try:
            while True:
                await self._outbox.wait()
                self._outbox.clear()
                message = worker_pb2.SessionRequest(submits=self._submits, aborts=self._aborts, window=WINDOW,
                                                    acked_updates=self._acked)
                self._submits, self._aborts = [], []
                await self._call.write(message)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
            # the call ended: the reader sees why and fails the streams
            logger.debug("session write to %s failed: %s", self.worker_id, e)

    async def _read(self) -> None:
        error: SessionError
        try:
            while True:
                update = await self._call.read()
                if update is grpc.aio.EOF:
                    error = SessionError(None, f"worker {self.worker_id} ended the session")
                    break
                self.updates += 1
                streams = self._streams
                for entry in update.streams:
                    stream = streams.get(entry.stream_id)
                    if stream is None:          # aborted here while the entry was on the wire
                        continue
                    if entry.error_code:
                        self._forget(entry.stream_id)
                        stream._end(SessionError(_CODES.get(entry.error_code, grpc.StatusCode.UNKNOWN),
                                                 entry.error_message))
                        continue
                    output = entry.output
                    last = output.finish_reason != 0      # FINISH_REASON_UNSPECIFIED
                    if last:
                        self._forget(entry.stream_id)
                    stream._push(output, last)
                if not self._ack_due:       # scheduled after the wake-ups above: runs once those consumers ran
                    self._ack_due = True
                    self.loop.call_soon(self._ack)
        except grpc.aio.AioRpcError as e:
            error = SessionError(e.code(), e.details())
        except asyncio.CancelledError:
            error = SessionError(grpc.StatusCode.CANCELLED, f"the session with worker {self.worker_id} was closed")
        except Exception as e:      # a bug here must still end every stream, never hang it
            logger.exception("session reader of %s failed", self.worker_id)
            error = SessionError(grpc.StatusCode.INTERNAL, f"session reader failed: {type(e).__name__}: {e}")
        self._fail_all(error)

    def _fail_all(self, error: SessionError) -> None:
        self.closed = True
        self._call.cancel()
        self._writer.cancel()
        streams, self._streams = self._streams, {}
        self._idle.set()
        if streams:
            logger.warning("session with worker %s ended (%s: %s) with %d requests open",
                           self.worker_id, error.code.name if error.code else "EOF", error.details, len(streams))
        for stream in streams.values():
            stream._end(error)

