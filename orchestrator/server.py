"""The router process: configuration, wiring and life cycle.

``RouterServer`` runs, in one asyncio loop, a grpc.aio server (Generation +
Registry + grpc.health.v1 + reflection) and the OpenAI HTTP server. Port 0
binds a free port; the bound ports are ``grpc_port`` and ``http_port``.
``add_router_args``/``run_router`` are the ``kvmesh router`` command's
arguments and entry point (orchestrator/cli.py calls them).

Health: the overall service ("") is SERVING while the process runs;
``kvmesh.v1.Generation`` is SERVING only while a healthy worker exists.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
from dataclasses import dataclass

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from kvmesh.v1 import admin_pb2, admin_pb2_grpc, generate_pb2, generate_pb2_grpc, registry_pb2, registry_pb2_grpc
from kvmesh.v1.redis_layout import DEFAULT_PREFIX as REDIS_DEFAULT_PREFIX
from orchestrator.grpc_server import AdminServicer, GenerationServicer, RegistryServicer
from orchestrator.http_api import HttpApi
from orchestrator.kv_indexer import EventFeed, GrpcFeed, KvIndexer
from orchestrator.metrics import KvIndexStats, RouterMetrics
from orchestrator.kv_state import KvSettings, KvState
from orchestrator.placement import POLICIES, make_policy
from orchestrator.registry import WorkerRegistry
from orchestrator.router import Router, RouterLimits
from orchestrator.workers import WorkerHandle

logger = logging.getLogger(__name__)

GENERATION_SERVICE = generate_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
REGISTRY_SERVICE = registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
DISCOVERY_BACKENDS = ("router", "redis")
HTTP_SHUTDOWN_S = 5.0
"""How long HTTP requests still running may take to finish at shutdown."""


@dataclass(frozen=True)
class RouterConfig:
    grpc_host: str = "127.0.0.1"
    """Interface of the gRPC server (clients and worker registration)."""

    grpc_port: int = 50051
    """Port of the gRPC server; 0 picks a free one."""

    http_host: str = "127.0.0.1"
    """Interface of the OpenAI-compatible HTTP server."""

    http_port: int = 8000
    """Port of the HTTP server; 0 picks a free one."""

    workers: tuple[str, ...] = ()
    """Static workers (host:port), used besides those that register."""

    policy: str = "kv"
    """Placement policy, one of placement.POLICIES. ``kv`` weighs each worker's
    cached prefix against its load; with a single candidate every policy is the
    same (``kv`` then skips hashing)."""

    kv: KvSettings = KvSettings()
    """Weights, temperature and memory bounds of the ``kv`` policy (placement.py)."""

    discovery: str = "router"
    """How workers join besides ``workers``: "router" (they call the Registry
    service) or "redis" (they register in Redis at ``redis_url``; loads and KV
    events travel through Redis, so router replicas share one view). The
    Registry service keeps answering either way."""

    redis_url: str | None = None
    """redis://host:port[/db]; required by discovery "redis"."""

    redis_prefix: str = REDIS_DEFAULT_PREFIX
    """Prefix of this cluster's Redis keys (must match the workers')."""

    heartbeat_interval_s: float = 2.0
    """Heartbeat period asked of registered workers; also the GetLoad poll
    period of static workers."""

    missed_heartbeats: int = 3
    """Heartbeat periods of silence after which a worker is dropped."""

    max_in_flight: int = 1024
    """Requests admitted at once; beyond it clients get 429 / RESOURCE_EXHAUSTED."""

    worker_timeout_s: float = 120.0
    """Longest wait for a worker's next message before the worker counts as failed."""

    max_migrations: int = 2
    """Times one request may move to another worker after worker failures."""

    max_body_bytes: int = 8 * 1024 * 1024
    """Largest HTTP request body; larger ones get 413."""

    def limits(self) -> RouterLimits:
        return RouterLimits(max_in_flight=self.max_in_flight, worker_timeout_s=self.worker_timeout_s,
                            max_migrations=self.max_migrations)

    def __post_init__(self) -> None:
        for name in ("grpc_port", "http_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ValueError(f"{name} must be in [0, 65535] (0 = a free port), got {port}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown placement policy {self.policy!r}; valid: {', '.join(sorted(POLICIES))}")
        if self.discovery not in DISCOVERY_BACKENDS:
            raise ValueError(f"unknown discovery backend {self.discovery!r}; valid: {', '.join(DISCOVERY_BACKENDS)}")
        if self.discovery == "redis" and not self.redis_url:
            raise ValueError("discovery 'redis' needs redis_url (--redis-url redis://HOST:PORT)")
        if self.heartbeat_interval_s <= 0:
            raise ValueError(f"heartbeat_interval_s must be > 0, got {self.heartbeat_interval_s}")
        if self.missed_heartbeats < 1:
            raise ValueError(f"missed_heartbeats must be >= 1, got {self.missed_heartbeats}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        self.limits()   # validates them


class RouterServer:
    """Both servers of one router; use ``async with`` or ``start``/``stop``."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.metrics = RouterMetrics()
        self._health = HealthServicer()
        self._health_tasks: set[asyncio.Task] = set()
        self.registry = WorkerRegistry(
            heartbeat_interval_s=config.heartbeat_interval_s,
            missed_heartbeats=config.missed_heartbeats,
            on_change=self._workers_changed,
        )
        self.metrics.watch_workers(self.registry.workers)
        self.kv = KvState(config.kv)
        self.metrics.watch_kv_index(self._kv_index_stats)
        self.router = Router(self.registry, make_policy(config.policy, self.kv), self.metrics, config.limits())
        self.kv.ledger.bind(self.router.is_running)
        self.redis_discovery = None
        if config.discovery == "redis":
            from orchestrator.redis_discovery import RedisDiscovery  # needs the redis package only when used
            self.redis_discovery = RedisDiscovery(self.registry, config.redis_url, config.redis_prefix,
                                                  config.heartbeat_interval_s)
        self.kv_indexer = KvIndexer(self.kv, self.metrics, feed_for=self._kv_feed)
        self.registry.add_listener(self.kv_indexer)
        self._grpc: grpc.aio.Server | None = None
        self._http: web.AppRunner | None = None
        self.grpc_port = 0
        self.http_port = 0

    @property
    def grpc_address(self) -> str:
        return f"{self.config.grpc_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.config.http_host}:{self.http_port}"

    async def start(self) -> None:
        try:
            await self._start_grpc()
            await self._start_http()
            await self.registry.start(self.config.workers)
            if self.redis_discovery is not None:
                await self.redis_discovery.start()
            await self._set_generation_health()
        except BaseException:
            await self.stop(grace=0)
            raise
        logger.info("router serving gRPC on %s and HTTP on %s (policy %s)",
                    self.grpc_address, self.http_url, self.config.policy)

    async def stop(self, grace: float = 5.0) -> None:
        """Stops taking requests, lets running ones finish for ``grace`` seconds."""
        await self._health.enter_graceful_shutdown()
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
        if self._grpc is not None:
            await self._grpc.stop(grace)
            self._grpc = None
        await self.kv_indexer.stop()          # before its Redis feeds lose their connection
        if self.redis_discovery is not None:
            await self.redis_discovery.stop()
        await self.registry.stop()
        await asyncio.gather(*self._health_tasks, return_exceptions=True)

    def _kv_feed(self, handle: WorkerHandle) -> EventFeed:
        feed = self.redis_discovery.feed_for(handle) if self.redis_discovery is not None else None
        return feed or GrpcFeed(handle)

    def _kv_index_stats(self) -> KvIndexStats:
        index = self.kv.index
        return KvIndexStats(index.num_entries(), index.num_blocks(), index.approx_bytes(),
                            self.kv.recent.num_entries(), index.num_capacity_evictions)

    async def __aenter__(self) -> RouterServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _start_grpc(self) -> None:
        # so_reuseport off: a second router on the same port fails instead of
        # silently sharing it.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        generate_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(self.router, self.metrics), server)
        registry_pb2_grpc.add_RegistryServicer_to_server(RegistryServicer(self.registry, self.metrics), server)
        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(self.router, self.metrics), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (GENERATION_SERVICE, REGISTRY_SERVICE, ADMIN_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), server)
        address = f"{self.config.grpc_host}:{self.config.grpc_port}"
        try:
            self.grpc_port = server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"cannot bind the gRPC server to {address}: {e}") from e
        await server.start()
        self._grpc = server

    async def _start_http(self) -> None:
        api = HttpApi(self.router, self.metrics, max_body_bytes=self.config.max_body_bytes)
        runner = web.AppRunner(api.app(), handler_cancellation=True, access_log=None,
                               shutdown_timeout=HTTP_SHUTDOWN_S)
        await runner.setup()
        host, port = self.config.http_host, self.config.http_port
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            await runner.cleanup()
            raise OSError(f"cannot bind the HTTP server to {host}:{port}: {e}") from e
        await web.SockSite(runner, sock).start()
        self.http_port = sock.getsockname()[1]
        self._http = runner

    def _workers_changed(self) -> None:
        task = asyncio.get_running_loop().create_task(self._set_generation_health())
        self._health_tasks.add(task)
        task.add_done_callback(self._health_tasks.discard)

    async def _set_generation_health(self) -> None:
        serving = self.registry.healthy_count() > 0
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self._health.set(GENERATION_SERVICE, status)


# --- command line -------------------------------------------------------------------

def add_router_args(parser: argparse.ArgumentParser) -> None:
    d = RouterConfig
    parser.add_argument("--grpc-host", default=d.grpc_host, help="gRPC interface (default %(default)s)")
    parser.add_argument("--grpc-port", type=int, default=d.grpc_port, help="gRPC port, 0 = free (default %(default)s)")
    parser.add_argument("--http-host", default=d.http_host, help="HTTP interface (default %(default)s)")
    parser.add_argument("--http-port", type=int, default=d.http_port, help="HTTP port, 0 = free (default %(default)s)")
    parser.add_argument("--worker", action="append", default=[], metavar="HOST:PORT",
                        help="a static worker; repeat for several (workers may also register themselves)")
    parser.add_argument("--policy", choices=sorted(POLICIES), default=d.policy,
                        help="placement policy (default %(default)s)")
    k = KvSettings
    kv = parser.add_argument_group("kv placement (cost = prefill_weight * prefill_blocks + "
                                   "decode_weight * decode_blocks; see orchestrator/placement.py)")
    kv.add_argument("--kv-prefill-weight", type=float, default=k.prefill_weight,
                    help="weight of blocks still to prefill (default %(default)s)")
    kv.add_argument("--kv-decode-weight", type=float, default=k.decode_weight,
                    help="weight of KV blocks decoding on the worker (default %(default)s)")
    kv.add_argument("--kv-overlap-credit", type=float, default=k.overlap_credit,
                    help="share of a cached block subtracted from the prefill; 0 ignores caches (default %(default)s)")
    kv.add_argument("--kv-temperature", type=float, default=k.temperature,
                    help="0 picks the cheapest worker; > 0 samples a softmax over costs (default %(default)s)")
    kv.add_argument("--kv-predict-ttl", type=float, default=k.predict_ttl_s,
                    help="seconds a placement counts as cached before KV events confirm it (default %(default)s)")
    kv.add_argument("--kv-index-max-blocks-per-worker", type=int, default=k.index_max_blocks_per_worker,
                    help="cap on one worker's prefix index entries (default %(default)s)")
    kv.add_argument("--log-placement", action="store_true",
                    help="log every placement decision with its cost terms at INFO")
    disc = parser.add_argument_group("discovery")
    disc.add_argument("--discovery", choices=DISCOVERY_BACKENDS, default=d.discovery,
                      help="router: workers call the Registry service; redis: workers register in Redis, "
                           "shared by router replicas (default %(default)s)")
    disc.add_argument("--redis-url", default=None, metavar="redis://HOST:PORT",
                      help="the shared Redis of discovery backend redis")
    disc.add_argument("--redis-prefix", default=d.redis_prefix,
                      help="prefix of this cluster's Redis keys (default %(default)s)")
    parser.add_argument("--heartbeat-interval", type=float, default=d.heartbeat_interval_s,
                        help="seconds between worker heartbeats / polls (default %(default)s)")
    parser.add_argument("--missed-heartbeats", type=int, default=d.missed_heartbeats,
                        help="silent heartbeat periods before a worker is dropped (default %(default)s)")
    parser.add_argument("--max-in-flight", type=int, default=d.max_in_flight,
                        help="requests admitted at once; more get 429 (default %(default)s)")
    parser.add_argument("--worker-timeout", type=float, default=d.worker_timeout_s,
                        help="seconds to wait for a worker's next message (default %(default)s)")
    parser.add_argument("--max-migrations", type=int, default=d.max_migrations,
                        help="times a request may move to another worker after failures (default %(default)s)")
    parser.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                        help="largest HTTP request body (default %(default)s)")


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    return RouterConfig(
        grpc_host=args.grpc_host, grpc_port=args.grpc_port,
        http_host=args.http_host, http_port=args.http_port,
        workers=tuple(args.worker), policy=args.policy,
        kv=KvSettings(prefill_weight=args.kv_prefill_weight, decode_weight=args.kv_decode_weight,
                      overlap_credit=args.kv_overlap_credit, temperature=args.kv_temperature,
                      predict_ttl_s=args.kv_predict_ttl,
                      index_max_blocks_per_worker=args.kv_index_max_blocks_per_worker,
                      log_decisions=args.log_placement),
        discovery=args.discovery, redis_url=args.redis_url, redis_prefix=args.redis_prefix,
        heartbeat_interval_s=args.heartbeat_interval, missed_heartbeats=args.missed_heartbeats,
        max_in_flight=args.max_in_flight, worker_timeout_s=args.worker_timeout,
        max_migrations=args.max_migrations, max_body_bytes=args.max_body_bytes,
    )


def run_router(args: argparse.Namespace) -> int:
    """Runs a router until SIGINT or SIGTERM; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as e:
        logger.error("%s", e)
        return 2
    try:
        asyncio.run(_serve(config))
    except OSError as e:
        logger.error("%s", e)
        return 1
    return 0


async def _serve(config: RouterConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with RouterServer(config):
        await stop.wait()
        logger.info("shutting down")
