"""Worker settings: one frozen dataclass, every field documented and bounded."""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass, field

from worker.engine.config import EngineConfig

_WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")


def default_worker_id() -> str:
    """hostname-pid-random: unique even for several workers on one host, and
    different after a restart (a restarted worker's event ids start again at 1,
    so it must not be mistaken for the old one)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class WorkerConfig:
    engine: EngineConfig
    """The engine this worker runs (model directory, KV pool, batch limits)."""

    host: str = "127.0.0.1"
    """Interface the gRPC server binds; "0.0.0.0" to accept remote routers."""

    port: int = 0
    """TCP port; 0 picks a free one (read it back from ``WorkerServer.port``)."""

    worker_id: str = field(default_factory=default_worker_id)
    """This worker's identity towards the router; also stamped on LoadReports."""

    advertise_address: str | None = None
    """host:port the router dials back. Default: host:bound_port, or this
    machine's FQDN when ``host`` is a wildcard. In Kubernetes pass the pod IP."""

    router_address: str | None = None
    """host:port of a router's Registry service; None runs standalone."""

    discovery: str = "router"
    """How routers find this worker: "router" (Register/Heartbeat RPCs to
    ``router_address``) or "redis" (a worker key with a TTL and a KV event
    stream in Redis at ``redis_url``, read by every router replica)."""

    redis_url: str | None = None
    """redis://host:port[/db] of the shared Redis; required by discovery "redis"."""

    redis_prefix: str = "kvmesh"
    """Prefix of every Redis key (kvmesh/v1/redis_layout.py); separates clusters sharing a Redis."""

    missed_heartbeats: int = 3
    """Discovery "redis": the worker key's TTL, in heartbeat intervals."""

    heartbeat_interval_s: float = 2.0
    """Seconds between heartbeats until the router's RegisterResponse sets its own."""

    router_timeout_s: float = 5.0
    """Deadline of each Register/Heartbeat/Deregister call."""

    retry_initial_s: float = 0.5
    """First backoff after a failed call to the router; doubles up to ``retry_max_s``."""

    retry_max_s: float = 10.0
    """Longest backoff between attempts to reach a router that is down."""

    kv_event_buffer: int = 10_000
    """KV events kept for StreamKvEvents subscribers resuming with after_event_id."""

    max_message_bytes: int = 64 * 1024 * 1024
    """gRPC send/receive limit; ModelInfo carries a tokenizer.json of a few MB."""

    drain_timeout_s: float = 30.0
    """On SIGTERM, how long running requests may take to finish before stop."""

    stop_grace_s: float = 5.0
    """Grace period of the final ``server.stop``; calls still open are cancelled."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not self.worker_id:
            raise ValueError("worker_id must not be empty; leave it unset for hostname-pid-random")
        for name in ("heartbeat_interval_s", "router_timeout_s", "retry_initial_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError(
                f"retry_max_s ({self.retry_max_s}) is smaller than retry_initial_s "
                f"({self.retry_initial_s}); raise retry_max_s or lower retry_initial_s"
            )
        if self.discovery not in ("router", "redis"):
            raise ValueError(f"discovery must be 'router' or 'redis', got {self.discovery!r}")
        if self.discovery == "redis" and not self.redis_url:
            raise ValueError("discovery 'redis' needs redis_url (--redis-url redis://HOST:PORT)")
        if self.missed_heartbeats < 1:
            raise ValueError(f"missed_heartbeats must be >= 1, got {self.missed_heartbeats}")
        if self.kv_event_buffer < 1:
            raise ValueError(f"kv_event_buffer must be >= 1, got {self.kv_event_buffer}")
        if self.max_message_bytes < 4 * 1024 * 1024:
            raise ValueError(
                f"max_message_bytes must be >= 4 MiB (ModelInfo carries the tokenizer), "
                f"got {self.max_message_bytes}"
            )
        if self.drain_timeout_s < 0 or self.stop_grace_s < 0:
            raise ValueError(
                f"drain_timeout_s and stop_grace_s must be >= 0, "
                f"got {self.drain_timeout_s} and {self.stop_grace_s}"
            )

    def resolve_advertise_address(self, bound_port: int) -> str:
        """The address to register with the router once the port is known."""
        if self.advertise_address:
            return self.advertise_address
        host = socket.getfqdn() if self.host in _WILDCARD_HOSTS else self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # a bare IPv6 literal
        return f"{host}:{bound_port}"
