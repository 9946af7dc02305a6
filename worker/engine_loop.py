"""The engine on a thread of its own, driven from asyncio.

Threading model
---------------
``step()`` runs model code for milliseconds to seconds; the gRPC event loop
must never run it. One dedicated thread therefore owns the engine from
construction (CUDA's current device is per thread) to shutdown, and is the
only thread that ever calls it. The two sides meet at exactly two points:

* event loop -> engine thread: a thread-safe command queue (``_Add``,
  ``_Abort``, ``_KvSnapshot``, ``_Stop``);
* engine thread -> event loop: ``loop.call_soon_threadsafe`` callbacks that
  carry outputs, KV events and acknowledgements.

Each side's state is touched only by that side -- the engine thread owns
``_active`` (ids the engine holds), the event loop owns ``_streams`` (one
output callback per request: an ``asyncio.Queue``'s ``put_nowait`` for
``submit``, a session's collector for ``add``) -- so there are no locks. The load snapshot is
the one shared value; it is replaced by a single atomic assignment.

The engine thread steps while the engine has unfinished work, draining new
commands between steps, and blocks on the command queue when idle (no spin).

Failure: if ``step()`` raises, the exception is logged, every in-flight
request is aborted in the engine and ends with ``FinishReason.ERROR``, and the
loop keeps serving new requests. A consumer that goes away (its stream closed
or its task cancelled) aborts its request, freeing the KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Protocol, Union

from worker.engine.types import (
    EngineRequest,
    FinishReason,
    KvCacheEvent,
    LoadSnapshot,
    ModelSummary,
    RequestOutput,
)

logger = logging.getLogger(__name__)

_MAX_FAILURE_BACKOFF_S = 1.0


class Engine(Protocol):
    """What the loop needs of ``worker.engine.engine.LLMEngine`` (fakes implement it too)."""

    model_summary: ModelSummary
    tokenizer_json: str
    chat_template: str
    bos_token: str
    eos_token: str

    def add_request(self, req: EngineRequest) -> None: ...
    def abort_request(self, request_id: str) -> bool: ...
    def step(self) -> list[RequestOutput]: ...
    def has_unfinished(self) -> bool: ...
    def load(self) -> LoadSnapshot: ...
    def drain_kv_events(self) -> list[KvCacheEvent]: ...

    @property
    def block_manager(self) -> _CachedBlocks: ...


class _CachedBlocks(Protocol):
    def cached_block_hashes(self) -> list[int]: ...


class EngineLoopClosed(RuntimeError):
    """The loop was stopped (or its thread died); it accepts no more requests."""


@dataclass(frozen=True)
class ServedModel:
    """The engine's static description, read once on the engine thread after loading."""

    summary: ModelSummary
    tokenizer_json: str
    chat_template: str
    bos_token: str
    eos_token: str

    @classmethod
    def of(cls, engine: Engine) -> ServedModel:
        return cls(engine.model_summary, engine.tokenizer_json, engine.chat_template,
                   engine.bos_token, engine.eos_token)


@dataclass(eq=False)
class _Stream:
    """One request's outputs, on the event loop side.

    ``accepted`` turns true with the engine's acknowledgement of this very
    submission: outputs for a reused request_id that arrive before it belong
    to an earlier, aborted request and are dropped.
    """

    on_output: Callable[[RequestOutput], None]
    accepted: bool = False


@dataclass(frozen=True)
class _Add:
    request: EngineRequest
    stream: _Stream  # carried through the engine thread untouched
    done: asyncio.Future  # None on success, the add_request exception otherwise


@dataclass(frozen=True)
class _Abort:
    request_id: str
    done: asyncio.Future | None  # None when the consumer left and nobody waits


@dataclass(frozen=True)
class _KvSnapshot:
    position: Callable[[], int]  # read on the event loop right after the events before the snapshot
    done: asyncio.Future  # KvCacheSnapshot


class _Stop:
    pass


_Command = Union[_Add, _Abort, _KvSnapshot, _Stop]


@dataclass(frozen=True)
class KvCacheSnapshot:
    """The engine's reusable cached blocks at one instant between two steps."""

    last_event_id: int
    """The id of the last KV event published before the snapshot (0: none yet)."""
    block_hashes: tuple[int, ...]
    kv_blocks_total: int


class _LoopGone(Exception):
    """The event loop closed under the engine thread; nobody is left to serve."""


def _resolve(fut: asyncio.Future | None, result: object = None, exc: BaseException | None = None) -> None:
    if fut is None or fut.done():  # the waiter may have been cancelled
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


def _coalesce(first: RequestOutput, waiting: asyncio.Queue) -> RequestOutput:
    """``first`` merged with the outputs already queued behind it, as one delta.

    When the event loop falls behind the engine (hundreds of streams, a step
    every ~15 ms), each stream then sends one message per turn of the loop
    instead of one per token, so the loop's cost per step shrinks as the load
    grows instead of piling up. Without a backlog nothing changes.
    """
    parts = [first]
    while not parts[-1].finished and not waiting.empty():
        parts.append(waiting.get_nowait())
    return merge_outputs(parts)


def merge_outputs(parts: list[RequestOutput]) -> RequestOutput:
    """Consecutive outputs of one request (at least one) as one delta: tokens
    and logprobs concatenated in order, the last one's finish reason, the
    prompt accounting of whichever part carried it."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return RequestOutput(
        request_id=first.request_id,
        new_token_ids=tuple(t for p in parts for t in p.new_token_ids),
        logprobs=tuple(lp for p in parts for lp in p.logprobs),
        finish_reason=parts[-1].finish_reason,
        num_prompt_tokens=sum(p.num_prompt_tokens for p in parts),
        num_cached_tokens=sum(p.num_cached_tokens for p in parts),
    )


def _run_all(callbacks: list[tuple[Callable[..., None], tuple]]) -> None:
    for fn, args in callbacks:
        fn(*args)


class EngineLoop:
    """Owns one engine on a dedicated thread; asyncio callers submit and abort.

    Lifecycle: ``await start()`` (builds the engine on its thread), then any
    number of ``submit``/``abort``/``load`` calls from the event loop that
    called ``start``, then ``await stop()``. Not safe to call from other
    threads: every public method belongs to the event loop.
    """

    def __init__(
        self,
        engine_factory: Callable[[], Engine],
        on_kv_events: Callable[[list[KvCacheEvent]], None] | None = None,
    ) -> None:
        self._factory = engine_factory
        self._on_kv_events = on_kv_events or (lambda events: None)
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._snapshot: LoadSnapshot | None = None
        # event-loop side
        self._streams: dict[str, _Stream] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._exited: asyncio.Future | None = None
        self.model: ServedModel | None = None
        self.last_error: str | None = None
        """The most recent step failure, as "Type: message" (for status details)."""
        # engine-thread side
        self._active: set[str] = set()
        self._pending: list[tuple[Callable[..., None], tuple]] = []
        self._consecutive_failures = 0

    # ------------------------------------------------------------ event loop side

    async def start(self) -> ServedModel:
        """Build the engine on its thread; raises whatever the factory raised."""
        if self._thread is not None:
            raise RuntimeError("EngineLoop.start() called twice")
        self._loop = asyncio.get_running_loop()
        self._exited = self._loop.create_future()
        ready = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="kvmesh-engine", daemon=True)
        self._thread.start()
        try:
            self.model = await ready
        except BaseException:
            await self.stop()
            raise
        return self.model

    async def submit(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Add a request; returns the stream of its outputs once the engine took it.

        Raises ``ValueError`` (from the engine's ``add_request``, naming the
        field) before any output, and ``EngineLoopClosed`` after ``stop``.
        The stream ends after the output whose ``finish_reason`` is set.
        Closing the stream early, or cancelling the task iterating it,
        aborts the request. The caller must iterate or ``aclose()`` it.
        """
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        rid = request.request_id
        done = self.add(request, outputs.put_nowait)
        try:
            await done
        except asyncio.CancelledError:
            self.cancel(rid)
            raise
        return self._iterate(rid, outputs)

    def add(self, request: EngineRequest, on_output: Callable[[RequestOutput], None]) -> asyncio.Future:
        """Queue a request for the engine without waiting; for callers that
        multiplex many requests (a session) and cannot await each one.

        ``on_output`` is called on the event loop with each output of the
        request, in order; the one whose ``finish_reason`` is set is the last
        call, and there is none after ``cancel``. The returned future
        resolves (None) once the engine took the request, or with the
        ``ValueError`` of its ``add_request`` (then ``on_output`` is never
        called). Raises ``ValueError`` at once for a ``request_id`` that is
        in flight here, ``EngineLoopClosed`` after ``stop``. A ``cancel``
        issued right after is applied after the add, in order.
        """
        self._check_open()
        rid = request.request_id
        if rid in self._streams:
            raise ValueError(f"request_id {rid!r} is already running on this worker")
        stream = _Stream(on_output)
        self._streams[rid] = stream
        self._idle.clear()
        done = self._loop.create_future()
        self._commands.put(_Add(request, stream, done))
        return done

    def cancel(self, request_id: str) -> None:
        """Abort a request without waiting, and deliver nothing more of it
        (its consumer left). No-op for ids not in flight."""
        if self._streams.pop(request_id, None) is None:
            return
        if not self._streams:
            self._idle.set()
        if not self._closed:
            self._commands.put(_Abort(request_id, None))

    async def abort(self, request_id: str) -> bool:
        """Abort a request; resolves after the engine freed its KV blocks.

        Returns whether the engine knew the request (False for unknown or
        already finished ids, and after ``stop``). Its stream, if still
        open, ends with ``FinishReason.ABORT``.
        """
        if self._closed:
            return False
        done = self._loop.create_future()
        self._commands.put(_Abort(request_id, done))
        return await done

    async def kv_snapshot(self, position: Callable[[], int]) -> KvCacheSnapshot:
        """The engine's cached block hashes, taken on the engine thread between steps.

        ``position()`` is called on the event loop right after every KV event
        produced before the snapshot went to ``on_kv_events`` and before any
        later one, so pass the publisher's last event id: the snapshot then
        reflects exactly the events up to the id it returns. Raises
        ``EngineLoopClosed`` after ``stop``, ``NotImplementedError`` for an
        engine without a block manager, and what the engine raised.
        """
        self._check_open()
        done = self._loop.create_future()
        self._commands.put(_KvSnapshot(position, done))
        return await done

    def load(self) -> LoadSnapshot:
        """The engine's load as of its last step or command (never blocks on a step)."""
        if self._snapshot is None:
            raise EngineLoopClosed("the engine is not loaded; await start() first")
        return self._snapshot

    @property
    def num_in_flight(self) -> int:
        """Requests submitted whose stream has not ended."""
        return len(self._streams)

    async def wait_idle(self) -> None:
        """Return once no request is in flight (used by drain)."""
        await self._idle.wait()

    async def wait_exited(self) -> None:
        """Return once the engine thread has exited (after ``stop``, or a crash)."""
        if self._exited is not None:
            await asyncio.shield(self._exited)

    async def stop(self) -> None:
        """Abort every request (streams end with ABORT) and join the engine thread."""
        if self._thread is None:
            return
        if not self._closed:
            self._closed = True
            self._commands.put(_Stop())
        await asyncio.shield(self._exited)
        await asyncio.to_thread(self._thread.join)

    def _check_open(self) -> None:
        if self._thread is None or self.model is None:
            raise EngineLoopClosed("the engine loop is not started")
        if self._closed:
            raise EngineLoopClosed("the engine loop is stopped")

    async def _iterate(self, rid: str, outputs: asyncio.Queue[RequestOutput]) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                if not out.finished and not outputs.empty():
                    out = _coalesce(out, outputs)
                finished = out.finished
                yield out
        finally:
            if not finished:
                logger.debug("consumer of %s went away; aborting it", rid)
                self.cancel(rid)

    def _forget(self, rid: str) -> None:
        self._streams.pop(rid, None)
        if not self._streams:
            self._idle.set()

    def _accept(self, stream: _Stream, done: asyncio.Future) -> None:
        stream.accepted = True
        _resolve(done)

    def _reject(self, rid: str, stream: _Stream, done: asyncio.Future, exc: BaseException) -> None:
        if self._streams.get(rid) is stream:
            self._forget(rid)
        _resolve(done, exc=exc)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None or not stream.accepted:  # its consumer left, or the id was reused
                continue
            if out.finished:
                self._forget(out.request_id)
            stream.on_output(out)

    def _deliver_failure(self, outputs: list[RequestOutput], message: str) -> None:
        self.last_error = message
        self._deliver(outputs)

    def _on_thread_exit(self) -> None:
        """Runs last on the loop: nothing may wait forever on a dead thread."""
        self._closed = True
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, _Add):
                self._reject(cmd.request.request_id, cmd.stream, cmd.done, EngineLoopClosed("the engine loop stopped"))
            elif isinstance(cmd, _Abort):
                _resolve(cmd.done, False)
            elif isinstance(cmd, _KvSnapshot):
                _resolve(cmd.done, exc=EngineLoopClosed("the engine loop stopped"))
        if self._streams and self.last_error is None:
            self.last_error = "the engine thread exited"
        for rid, stream in list(self._streams.items()):
            stream.accepted = True
            self._deliver([RequestOutput(rid, (), finish_reason=FinishReason.ERROR)])
        _resolve(self._exited)

    # ----------------------------------------------------------- engine thread side

    def _call(self, fn: Callable[..., None], *args: object) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError as exc:  # "Event loop is closed"
            raise _LoopGone() from exc

    def _run(self, ready: asyncio.Future) -> None:
        try:
            engine = self._load(ready)
            if engine is not None:
                self._serve(engine)
        except _LoopGone:
            logger.warning("event loop closed before EngineLoop.stop(); engine thread exits")
            return
        except Exception:
            logger.exception("engine thread crashed; failing every in-flight request")
        with contextlib.suppress(_LoopGone):  # no loop left means no waiter left
            self._call(self._on_thread_exit)

    def _load(self, ready: asyncio.Future) -> Engine | None:
        try:
            engine = self._factory()
            model = ServedModel.of(engine)
            self._snapshot = engine.load()
        except Exception as exc:  # raised again to the caller of start()
            logger.error("engine failed to load: %s: %s", type(exc).__name__, exc)
            self._call(_resolve, ready, None, exc)
            return None
        self._call(_resolve, ready, model)
        return engine

    def _serve(self, engine: Engine) -> None:
        while True:
            cmds = self._next_commands(block=not engine.has_unfinished())
            for cmd in cmds:
                if isinstance(cmd, _Stop):
                    self._abort_all(engine)
                    self._publish_state(engine)
                    return
                self._apply(engine, cmd)
            if cmds:  # else nothing changed since the last step's publish
                self._publish_state(engine)
            if engine.has_unfinished():
                self._step(engine)
                self._publish_state(engine)
                if self._consecutive_failures:  # a broken engine must not become a hot loop
                    time.sleep(min(0.01 * 2 ** self._consecutive_failures, _MAX_FAILURE_BACKOFF_S))

    def _next_commands(self, block: bool) -> list[_Command]:
        cmds = [self._commands.get()] if block else []
        while True:
            try:
                cmds.append(self._commands.get_nowait())
            except queue.Empty:
                return cmds

    def _apply(self, engine: Engine, cmd: _Add | _Abort | _KvSnapshot) -> None:
        if isinstance(cmd, _KvSnapshot):
            self._take_kv_snapshot(engine, cmd)
            return
        if isinstance(cmd, _Add):
            try:
                engine.add_request(cmd.request)
            except Exception as exc:  # ValueError by contract; anything else also goes back to the caller
                self._pending.append((self._reject, (cmd.request.request_id, cmd.stream, cmd.done, exc)))
                return
            self._active.add(cmd.request.request_id)
            self._pending.append((self._accept, (cmd.stream, cmd.done)))
            return
        rid = cmd.request_id
        try:
            found = engine.abort_request(rid)
        except Exception as exc:
            logger.exception("abort of %s failed", rid)
            self._pending.append((_resolve, (cmd.done, None, exc)))
            return
        self._active.discard(rid)
        if found:
            self._pending.append((self._deliver, ([RequestOutput(rid, (), finish_reason=FinishReason.ABORT)],)))
        self._pending.append((_resolve, (cmd.done, found)))

    def _take_kv_snapshot(self, engine: Engine, cmd: _KvSnapshot) -> None:
        # Events first, then the snapshot's resolution, both straight onto the
        # loop (not via _pending): callbacks run in order, so cmd.position()
        # sees exactly the events that precede the snapshot.
        manager = getattr(engine, "block_manager", None)
        if manager is None:              # a test engine without a prefix cache
            self._call(_resolve, cmd.done, None, NotImplementedError("this engine keeps no prefix cache to snapshot"))
            return
        try:
            events = engine.drain_kv_events()
            hashes = tuple(manager.cached_block_hashes())
            total = engine.load().kv_blocks_total
        except Exception as exc:
            logger.exception("KV snapshot failed")
            self._call(_resolve, cmd.done, None, exc)
            return
        if events:
            self._call(self._on_kv_events, events)
        self._call(self._finish_kv_snapshot, cmd, hashes, total)

    @staticmethod
    def _finish_kv_snapshot(cmd: _KvSnapshot, hashes: tuple[int, ...], total: int) -> None:
        _resolve(cmd.done, KvCacheSnapshot(cmd.position(), hashes, total))

    def _step(self, engine: Engine) -> None:
        try:
            outputs = engine.step()
        except Exception as exc:
            self._consecutive_failures += 1
            logger.exception("engine step failed; ending %d in-flight requests with ERROR", len(self._active))
            failed = [RequestOutput(rid, (), finish_reason=FinishReason.ERROR) for rid in sorted(self._active)]
            self._abort_all(engine, notify=False)
            self._pending.append((self._deliver_failure, (failed, f"{type(exc).__name__}: {exc}")))
            return
        self._consecutive_failures = 0
        for out in outputs:
            if out.finished:
                self._active.discard(out.request_id)
        if outputs:
            self._pending.append((self._deliver, (outputs,)))

    def _abort_all(self, engine: Engine, notify: bool = True) -> None:
        aborted = []
        for rid in sorted(self._active):
            try:
                engine.abort_request(rid)
            except Exception:
                logger.exception("abort of %s failed", rid)
            aborted.append(RequestOutput(rid, (), finish_reason=FinishReason.ABORT))
        self._active.clear()
        if notify and aborted:
            self._pending.append((self._deliver, (aborted,)))

    def _publish_state(self, engine: Engine) -> None:
        """Snapshot load and forward KV events, then release outputs and
        acknowledgements: whoever sees a request end or an abort resolve
        already sees its freed blocks in load()."""
        self._snapshot = engine.load()
        events = engine.drain_kv_events()
        if events:
            self._call(self._on_kv_events, events)
        if self._pending:
            pending, self._pending = self._pending, []
            self._call(_run_all, pending)  # one wakeup of the event loop per iteration
