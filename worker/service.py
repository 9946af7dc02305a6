"""The worker's gRPC face: a thin Worker servicer, its server, and its router registration.

Error policy (the one exception boundary, ``_abort_for``):

=========================  =====================  =================================
raised                     status                 when
=========================  =====================  =================================
ValueError                 INVALID_ARGUMENT       bad input; the message names the field
EventsUnavailableError     OUT_OF_RANGE           StreamKvEvents resume id not retained: resync
WorkerUnavailable          UNAVAILABLE            draining (retry on another worker)
EngineLoopClosed           UNAVAILABLE            the engine is stopped
EngineFailed               INTERNAL               a step raised; the stream's last message says ERROR
NotImplementedError        UNIMPLEMENTED          GetKvSnapshot on an engine with no prefix cache
anything else              INTERNAL               a bug; logged with its traceback
=========================  =====================  =================================

A Session reports a refused submit with the same status in that stream's
error entry (``status_for``) instead of failing the whole call.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import random
import signal
from typing import TYPE_CHECKING, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvmesh.v1 import registry_pb2, registry_pb2_grpc, worker_pb2, worker_pb2_grpc
from worker.config import WorkerConfig
from worker.convert import (kv_batch_to_pb, kv_snapshot_to_pb, load_to_pb, model_info_to_pb, output_to_pb,
                            request_from_pb)
from worker.engine.config import EngineConfig
from worker.engine.types import FinishReason
from worker.engine_loop import Engine, EngineLoop, EngineLoopClosed
from worker.kv_events import EventsUnavailableError, KvEventPublisher
from worker.session import WorkerSession

if TYPE_CHECKING:
    from worker.redis_link import RedisLink

logger = logging.getLogger(__name__)

WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
START_AFTER_METADATA_KEY = "kvmesh-start-after-event-id"
"""Initial metadata of StreamKvEvents: the id the stream continues after. It is
sent once the subscription is in place, so a client that awaited it misses nothing."""


class WorkerUnavailable(Exception):
    """This worker takes no new requests (it is draining)."""


class EngineFailed(Exception):
    """The engine raised while running the request."""


_STATUS_BY_ERROR: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (EventsUnavailableError, grpc.StatusCode.OUT_OF_RANGE),
    (WorkerUnavailable, grpc.StatusCode.UNAVAILABLE),
    (EngineLoopClosed, grpc.StatusCode.UNAVAILABLE),
    (EngineFailed, grpc.StatusCode.INTERNAL),
    (NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),
)


def _known_status(exc: Exception) -> grpc.StatusCode | None:
    """The status the table above gives ``exc``; None for an error it does not list (a bug)."""
    return next((code for error_type, code in _STATUS_BY_ERROR if isinstance(exc, error_type)), None)


def status_for(exc: Exception) -> grpc.StatusCode:
    """The status ``exc`` is reported with (the table above); INTERNAL for anything else."""
    return _known_status(exc) or grpc.StatusCode.INTERNAL


async def _abort_for(exc: Exception, context: grpc.aio.ServicerContext, rpc: str) -> None:
    if isinstance(exc, grpc.aio.AbortError):  # context.abort() already chose the status
        raise exc
    code = _known_status(exc)
    if code is not None:
        await context.abort(code, str(exc))
    logger.error("unexpected error in %s", rpc, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {rpc}: {type(exc).__name__}: {exc}")


def _unary(method):
    @functools.wraps(method)
    async def boundary(self, request, context):
        try:
            return await method(self, request, context)
        except Exception as exc:
            await _abort_for(exc, context, method.__name__)
    return boundary


def _streaming(method):
    @functools.wraps(method)
    async def boundary(self, request, context):
        try:
            async with contextlib.aclosing(method(self, request, context)) as responses:
                async for response in responses:
                    yield response
        except Exception as exc:
            await _abort_for(exc, context, method.__name__)
    return boundary


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    """kvmesh.v1.Worker: each RPC converts, delegates to the EngineLoop or the publisher, converts back."""

    def __init__(self, engine: EngineLoop, events: KvEventPublisher, worker_id: str) -> None:
        self._engine = engine
        self._events = events
        self._worker_id = worker_id
        self._model_info = model_info_to_pb(engine.model, worker_id)
        self._sessions: set[WorkerSession] = set()
        self.draining = False

    @_streaming
    async def Submit(self, request, context):
        if self.draining:
            raise WorkerUnavailable(self._refusal())
        req = request_from_pb(request)
        # A cancelled call cancels this task; closing the stream aborts the request.
        async with contextlib.aclosing(await self._engine.submit(req)) as outputs:
            first = True
            async for out in outputs:
                yield output_to_pb(out, first)
                first = False
                if out.finish_reason is FinishReason.ERROR:
                    raise EngineFailed(f"request {req.request_id!r} failed in the engine: {self._engine.last_error}")

    @_unary
    async def Session(self, request_iterator, context):
        session = WorkerSession(self._engine, self._refusal, status_for)
        self._sessions.add(session)
        try:
            await session.serve(request_iterator, context)
        finally:
            self._sessions.discard(session)

    def close_sessions(self) -> None:
        """Stopping: sessions refuse new submits and end once their requests are done."""
        for session in list(self._sessions):
            session.close()

    def _refusal(self) -> str | None:
        return f"worker {self._worker_id} is draining; submit elsewhere" if self.draining else None

    @_unary
    async def Abort(self, request, context):
        return worker_pb2.WorkerAbortResponse(found=await self._engine.abort(request.request_id))

    @_unary
    async def GetLoad(self, request, context):
        return load_to_pb(self._engine.load(), self._worker_id, self.draining)

    @_unary
    async def GetModelInfo(self, request, context):
        return self._model_info

    @_streaming
    async def StreamKvEvents(self, request, context):
        start_after = request.after_event_id or self._events.last_event_id
        batches = self._events.subscribe(request.after_event_id, request.epoch)
        async with contextlib.aclosing(batches):
            await context.send_initial_metadata(((START_AFTER_METADATA_KEY, str(start_after)),))
            async for batch in batches:
                yield kv_batch_to_pb(batch)

    @_unary
    async def GetKvSnapshot(self, request, context):
        snapshot = await self._engine.kv_snapshot(lambda: self._events.last_event_id)
        return kv_snapshot_to_pb(snapshot, self._events.epoch)


class RouterLink:
    """Registers this worker with a router's Registry and keeps it registered.

    Register once, then Heartbeat (with the LoadReport) every interval the
    router's RegisterResponse asks for. A heartbeat answered known=false (the
    router restarted or dropped us) registers again at once. A failed call is
    retried with jittered exponential backoff: a router that is down is
    logged, never fatal.
    """

    def __init__(self, config: WorkerConfig, address: str, model: str,
                 load_report: Callable[[], worker_pb2.LoadReport]) -> None:
        self._config = config
        self._register_request = registry_pb2.RegisterRequest(
            worker_id=config.worker_id, address=address, model=model)
        self._load_report = load_report
        self._channel = grpc.aio.insecure_channel(config.router_address)
        self._stub = registry_pb2_grpc.RegistryStub(self._channel)
        self._interval = config.heartbeat_interval_s
        self._task: asyncio.Task | None = None
        self.registered = False
        self.registrations = 0
        self._closed = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"router-link-{self._config.worker_id}")

    async def heartbeat(self) -> None:
        """One heartbeat now; re-registers on known=false. Raises grpc.aio.AioRpcError."""
        if not self.registered:
            await self._register()
            return
        response = await self._stub.Heartbeat(
            registry_pb2.HeartbeatRequest(worker_id=self._config.worker_id, load=self._load_report()),
            timeout=self._config.router_timeout_s)
        if not response.known:
            logger.warning("router %s does not know worker %s; registering again",
                           self._config.router_address, self._config.worker_id)
            self.registered = False
            await self._register()

    async def close(self, deregister: bool) -> None:
        """Stop heartbeats; Deregister (best effort) if asked and registered. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if deregister and self.registered:
            try:
                await self._stub.Deregister(registry_pb2.DeregisterRequest(worker_id=self._config.worker_id),
                                            timeout=self._config.router_timeout_s)
                logger.info("deregistered from router %s", self._config.router_address)
            except grpc.aio.AioRpcError as exc:
                logger.warning("deregister from router %s failed: %s", self._config.router_address, exc.code())
            self.registered = False
        await self._channel.close()

    async def _register(self) -> None:
        response = await self._stub.Register(self._register_request, timeout=self._config.router_timeout_s)
        if response.heartbeat_interval_s > 0:
            self._interval = response.heartbeat_interval_s
        self.registered = True
        self.registrations += 1
        logger.info("registered worker %s at %s with router %s (heartbeat every %.1fs)",
                    self._config.worker_id, self._register_request.address,
                    self._config.router_address, self._interval)

    async def _run(self) -> None:
        backoff = self._config.retry_initial_s
        while True:
            try:
                await self.heartbeat()
                backoff = self._config.retry_initial_s
                delay = self._interval
            except grpc.aio.AioRpcError as exc:
                delay = random.uniform(backoff / 2, backoff)
                backoff = min(backoff * 2, self._config.retry_max_s)
                logger.warning("router %s unreachable (%s: %s); retrying in %.1fs",
                               self._config.router_address, exc.code().name, exc.details(), delay)
            await asyncio.sleep(delay)


def _build_engine(config: EngineConfig) -> Engine:
    # Imported here, on the engine thread, so importing this module stays
    # cheap (no torch) for tools and tests that inject an engine.
    from worker.engine.engine import LLMEngine
    return LLMEngine(config)


class WorkerServer:
    """Engine + gRPC server (+ router registration) of one worker.

    ``start()`` loads the engine on its thread, then serves Worker, health
    (SERVING once loaded, NOT_SERVING when draining or stopped) and
    reflection. ``engine_factory`` replaces the real engine (tests).
    """

    def __init__(self, config: WorkerConfig, engine_factory: Callable[[], Engine] | None = None,
                 freeze_heap: bool = False) -> None:
        """``freeze_heap``: freeze the garbage collector's view of the heap once the engine is
        up, before serving (``freeze_startup_heap``; for a process's one worker only)."""
        self.config = config
        self._freeze_heap = freeze_heap
        self.events = KvEventPublisher(config.kv_event_buffer)
        self.engine = EngineLoop(engine_factory or functools.partial(_build_engine, config.engine),
                                 self.events.publish)
        self.health = health.aio.HealthServicer()
        self.router: RouterLink | RedisLink | None = None
        self.port = 0
        self.address = ""
        self._server: grpc.aio.Server | None = None
        self._servicer: WorkerServicer | None = None
        self._stopped = False

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop(grace=0)
            raise

    async def _start(self) -> None:
        cfg = self.config
        model = await self.engine.start()
        if self._freeze_heap:
            freeze_startup_heap()  # before the first request can exist
        self._server = grpc.aio.server(options=[
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            # Two workers must never share a port silently (grpc sets SO_REUSEPORT by default).
            ("grpc.so_reuseport", 0),
            # Find dead peers of long-lived streams (StreamKvEvents, long generations).
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
        ])  # TCP_NODELAY stays on (grpc's default), so streamed tokens are not delayed.
        self._servicer = WorkerServicer(self.engine, self.events, cfg.worker_id)
        worker_pb2_grpc.add_WorkerServicer_to_server(self._servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection((WORKER_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self._server)
        self.port = self._server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        await self._server.start()
        self.address = cfg.resolve_advertise_address(self.port)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        logger.info("worker %s serving %s on %s:%d (advertised as %s)",
                    cfg.worker_id, model.summary.name, cfg.host, self.port, self.address)
        if cfg.discovery == "redis":
            from worker.redis_link import RedisLink  # needs the redis package only when used
            self.router = RedisLink(cfg, self.address, model.summary.name, self.load_report, self.events)
            self.router.start()
        elif cfg.router_address:
            self.router = RouterLink(cfg, self.address, model.summary.name, self.load_report)
            self.router.start()

    def load_report(self) -> worker_pb2.LoadReport:
        draining = self._servicer is not None and self._servicer.draining
        return load_to_pb(self.engine.load(), self.config.worker_id, draining)

    async def drain(self, timeout: float | None = None) -> bool:
        """Refuse new requests, let running ones finish, then Deregister.

        Returns whether every request finished within ``timeout`` seconds
        (None waits forever); stragglers are left to ``stop``.
        """
        if self._servicer is None:
            return True
        self._servicer.draining = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        logger.info("draining worker %s: %d requests in flight", self.config.worker_id, self.engine.num_in_flight)
        if self.router is not None:
            try:  # tell the router now rather than at the next heartbeat
                await self.router.heartbeat()
            except grpc.aio.AioRpcError as exc:
                logger.warning("draining heartbeat failed: %s", exc.code())
        try:
            await asyncio.wait_for(self.engine.wait_idle(), timeout)
            finished = True
        except asyncio.TimeoutError:
            logger.warning("drain timed out after %.1fs with %d requests in flight", timeout,
                           self.engine.num_in_flight)
            finished = False
        if self.router is not None:
            await self.router.close(deregister=True)
        return finished

    async def stop(self, grace: float | None = None) -> None:
        """Deregister, end event streams, stop the server (open calls get
        ``grace`` seconds, then are cancelled), then abort what is left and join the engine."""
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        if self.router is not None:
            await self.router.close(deregister=True)
        self.events.close()
        if self._servicer is not None:
            self._servicer.close_sessions()
        if self._server is not None:
            await self._server.stop(self.config.stop_grace_s if grace is None else grace)
        await self.engine.stop()
        logger.info("worker %s stopped", self.config.worker_id)

    async def _set_health(self, status: int) -> None:
        for service in ("", WORKER_SERVICE):
            await self.health.set(service, status)

    async def __aenter__(self) -> WorkerServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def freeze_startup_heap() -> None:
    """Moves every object alive now (the model, its CUDA graphs, the tokenizer: they live
    as long as the process) out of the cyclic garbage collector's view.

    A full collection traverses every tracked object; with a model loaded that can be a pause
    of tens of milliseconds inside whatever engine step triggers it (batch-1 first tokens of
    17-35 ms against 17-19 frozen on an H100: docs/PERFORMANCE.md). Frozen, a collection
    scans only what requests create. For a process's one long-lived engine only: frozen objects in
    reference cycles are never freed, so an engine that is dropped and rebuilt in the same
    process (tests, benchmarks comparing engines) must ``gc.unfreeze()`` first."""
    gc.collect()
    gc.freeze()


async def serve_worker(config: WorkerConfig, engine_factory: Callable[[], Engine] | None = None) -> None:
    """Run a worker until SIGINT/SIGTERM, then drain (up to drain_timeout_s) and stop.

    Raises RuntimeError if the engine thread dies, so the process exits
    non-zero and a supervisor restarts it.
    """
    server = WorkerServer(config, engine_factory, freeze_heap=True)
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before loading: a signal then stops right after
        loop.add_signal_handler(sig, signalled.set)
    try:
        await server.start()
        waits = [asyncio.ensure_future(signalled.wait()), asyncio.ensure_future(server.engine.wait_exited())]
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if not signalled.is_set():
            raise RuntimeError("the engine thread exited unexpectedly; see the log above")
        logger.info("shutdown signal received")
        await server.drain(config.drain_timeout_s)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.stop()
