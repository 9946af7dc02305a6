"""One worker as the router sees it: address, channel, load, health.

``in_flight`` counts the requests this router has on the worker (raised when
a Submit starts, lowered when it ends); ``load`` is the worker's own latest
report (heartbeat or GetLoad), which also counts other routers' requests.
``streams`` holds the running Submit calls so that dropping a worker fails
them at once instead of leaving clients waiting.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from kvmesh.v1 import worker_pb2, worker_pb2_grpc
from orchestrator.errors import RouterError

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

    async def close(self, grace: float | None = None) -> None:
        await self.channel.close(grace)
