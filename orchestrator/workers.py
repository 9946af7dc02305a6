"""One worker as the router sees it: address, channel, load, health.

``in_flight`` counts the requests this router has on the worker (raised when
a Submit starts, lowered when it ends); ``load`` is the worker's own latest
report (heartbeat or GetLoad), which also counts other routers' requests.
``streams`` holds the running requests (Submit calls or session streams) so
that dropping a worker fails them at once instead of leaving clients waiting.

``session()`` is this router's one Session call with the worker
(orchestrator/session.py), opened on first use and again after it ended; a
worker without the Session RPC is remembered as such and served by Submit.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from kvmesh.v1 import worker_pb2, worker_pb2_grpc
from orchestrator.errors import RouterError
from orchestrator.session import RouterSession, SessionError, SessionUnsupported

# ModelInfo carries the whole tokenizer.json (up to tens of MB for large
# vocabularies). No keepalive pings: default servers punish frequent pings
# with GOAWAY; a silent dead worker is found by its missed heartbeats or
# failed GetLoad polls (registry.py) and by the stream timeout (router.py).
CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)


@dataclass(frozen=True)
class WorkerLoad:
    """A worker's self-reported load (``kvmesh.v1.LoadReport``)."""

    num_running: int = 0
    num_waiting: int = 0
    waiting_prefill_tokens: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    kv_blocks_cached: int = 0
    kv_usage: float = 0.0
    draining: bool = False

    @classmethod
    def from_pb(cls, pb: worker_pb2.LoadReport) -> WorkerLoad:
        return cls(
            num_running=pb.num_running,
            num_waiting=pb.num_waiting,
            waiting_prefill_tokens=pb.waiting_prefill_tokens,
            kv_blocks_total=pb.kv_blocks_total,
            kv_blocks_used=pb.kv_blocks_used,
            kv_blocks_cached=pb.kv_blocks_cached,
            kv_usage=pb.kv_usage,
            draining=pb.draining,
        )


class WorkerStream(Protocol):
    """A running Submit call that can be failed from outside (see router.py)."""

    def fail(self, error: RouterError) -> None: ...


@dataclass(eq=False)
class WorkerHandle:
    worker_id: str
    address: str
    model: str
    channel: grpc.aio.Channel
    stub: worker_pb2_grpc.WorkerStub
    static: bool = False                       # given with --worker, never expires
    load: WorkerLoad = WorkerLoad()
    healthy: bool = True
    in_flight: int = 0
    placements: int = 0                        # requests this router placed here
    failures: int = 0                          # of those, calls that failed
    last_seen: float = field(default_factory=time.monotonic)
    streams: set[WorkerStream] = field(default_factory=set)
    sessions_supported: bool = True            # False once the worker answered Session with UNIMPLEMENTED
    _session: RouterSession | None = field(default=None, repr=False)
    _opening: asyncio.Future | None = field(default=None, repr=False)
    _closing: bool = field(default=False, repr=False)

    @classmethod
    def connect(cls, worker_id: str, address: str, model: str, *, static: bool = False) -> WorkerHandle:
        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        return cls(worker_id, address, model, channel, worker_pb2_grpc.WorkerStub(channel), static=static)

    @property
    def available(self) -> bool:
        """Whether new requests may be placed here."""
        return self.healthy and not self.load.draining

    def fail_streams(self, error: RouterError) -> None:
        for stream in list(self.streams):
            stream.fail(error)

    async def session(self, timeout: float) -> RouterSession | None:
        """The open Session with this worker, opening one if needed (concurrent
        callers share the opening); None when the worker has no Session RPC.
        Raises ``SessionError`` when the worker cannot be reached (``timeout``
        bounds the wait for its session header)."""
        if self._session is not None and not self._session.closed:
            return self._session
        if not self.sessions_supported:
            return None
        if self._closing:
            raise SessionError(grpc.StatusCode.UNAVAILABLE, f"worker {self.worker_id} was removed")
        if self._opening is None:
            self._opening = asyncio.ensure_future(RouterSession.open(self.stub, self.worker_id, timeout))
            self._opening.add_done_callback(self._opened)
        try:
            return await asyncio.shield(self._opening)
        except SessionUnsupported:
            return None

    def _opened(self, opening: asyncio.Future) -> None:
        self._opening = None
        if opening.cancelled():
            return
        error = opening.exception()
        if isinstance(error, SessionUnsupported):
            self.sessions_supported = False
        elif error is None:
            self._session = opening.result()

    async def close(self, grace: float | None = None) -> None:
        """Close the channel; with a ``grace``, requests on the session get that
        long to finish (as Submit calls do from the channel's own grace)."""
        self._closing = True
        session = self._session
        if session is not None:
            if grace:
                await session.wait_idle(grace)
            session.close()
        await self.channel.close(grace)
