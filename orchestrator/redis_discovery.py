"""Discovery backend "redis", router side: the worker set, loads and KV events from Redis.

Workers keep a ``WorkerRecord`` under a key with a TTL and append their KV
event batches to a stream (layout: ``kvmesh/v1/redis_layout.py``; writer:
``worker/redis_link.py``). Every router replica reads the same keys, so they
share one view of the cluster, and a replica that starts later catches up at
once: its first ``sync`` registers every live worker, and each worker's KV
index is rebuilt from ``GetKvSnapshot`` and then follows the worker's stream
from the snapshot's event id.

``RedisDiscovery.sync`` (every ``poll_interval_s``) reconciles Redis with the
``WorkerRegistry``:

=============================================  ==========================================
in Redis                                       registry
=============================================  ==========================================
a record whose worker is unknown, or whose     ``register(expires=False)`` (GetModelInfo);
address or KV event epoch changed (restart)    a refused worker is retried after a while
a newer heartbeat                              ``heartbeat(load)``: load, draining
id in the set, key expired (missed heartbeats)  ``expire``: its streams fail now; SREM
id left the set (a worker that drained)        ``deregister``: running streams may finish
=============================================  ==========================================

Redis being unreachable changes nothing: the last view is kept (a Redis
outage is not a cluster outage) and the poll retries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from kvmesh.v1 import redis_layout, registry_pb2, worker_pb2
from orchestrator.errors import RouterError
from orchestrator.kv_indexer import EventFeed, GrpcFeed, Snapshot
from orchestrator.registry import WorkerRegistry
from orchestrator.workers import WorkerHandle, WorkerLoad

logger = logging.getLogger(__name__)

_REFUSED_RETRY_POLLS = 10
"""A worker the registry refused is tried again after this many polls."""
_XREAD_BLOCK_MS = 1000
_REDIS_TIMEOUT_S = 5.0
_XREAD_COUNT = 256


@dataclass
class _Known:
    epoch: str
    address: str
    heartbeat_ms: int
    handle: WorkerHandle | None = None


class RedisDiscovery:
    def __init__(self, registry: WorkerRegistry, url: str, prefix: str = redis_layout.DEFAULT_PREFIX,
                 poll_interval_s: float = 2.0) -> None:
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be > 0, got {poll_interval_s}")
        self._registry = registry
        self._url = url
        self.prefix = prefix
        self._poll_interval_s = poll_interval_s
        # Every command answers within the timeout, the blocking XREADs included
        # (they block for _XREAD_BLOCK_MS): a Redis that hangs is an error, not a stall.
        self.redis = aioredis.Redis.from_url(url, socket_connect_timeout=_REDIS_TIMEOUT_S,
                                             socket_timeout=_REDIS_TIMEOUT_S)
        self._known: dict[str, _Known] = {}
        self._refused: dict[tuple[str, str], float] = {}      # (worker id, epoch) -> retry at
        self._task: asyncio.Task | None = None

    # --- life cycle --------------------------------------------------------------------

    async def start(self) -> None:
        """One sync now (a new replica starts with the whole cluster), then poll."""
        try:
            await self.sync()
        except RedisError as e:
            logger.warning("redis %s unreachable at start (%s); polling", self._url, e)
        self._task = asyncio.create_task(self._poll(), name="redis-discovery")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.redis.aclose()

    def feed_for(self, handle: WorkerHandle) -> EventFeed | None:
        """The Redis stream feed of a worker discovered here; None for others."""
        if handle.worker_id not in self._known:
            return None
        return RedisFeed(handle, self.redis, self.prefix)

    # --- reconciliation ------------------------------------------------------------------

    async def sync(self) -> None:
        r, prefix = self.redis, self.prefix
        ids = sorted(m.decode() for m in await r.smembers(redis_layout.workers_key(prefix)))
        raws = await r.mget([redis_layout.worker_key(prefix, wid) for wid in ids]) if ids else []
        live: dict[str, registry_pb2.WorkerRecord] = {}
        for wid, raw in zip(ids, raws):
            if raw is None:
                await self._expired(wid)
            else:
                live[wid] = registry_pb2.WorkerRecord.FromString(raw)
        for wid in [wid for wid in self._known if wid not in live and wid not in ids]:
            self._left(wid)
        joins = [rec for wid, rec in live.items() if self._needs_register(rec)]
        await asyncio.gather(*(self._join(rec) for rec in joins))
        for wid, rec in live.items():
            known = self._known.get(wid)
            if known is not None and known.handle is not None and rec.heartbeat_unix_ms != known.heartbeat_ms:
                known.heartbeat_ms = rec.heartbeat_unix_ms
                self._registry.heartbeat(wid, WorkerLoad.from_pb(rec.load))

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval_s)   # raises if cancelled, even if a command swallowed it
            try:
                await self.sync()
            except Exception as e:
                task = asyncio.current_task()
                if task is not None and task.cancelling():   # redis-py may report it as ConnectionError
                    raise asyncio.CancelledError() from e
                if isinstance(e, RedisError):
                    logger.warning("redis %s unreachable (%s); keeping the last view of the cluster", self._url, e)
                else:               # a bug here must not stop discovery for good
                    logger.exception("redis discovery round failed")

    def _needs_register(self, rec: registry_pb2.WorkerRecord) -> bool:
        known = self._known.get(rec.worker_id)
        if known is not None and known.epoch == rec.kv_event_epoch and known.address == rec.address \
                and known.handle is not None and self._registry.get(rec.worker_id) is known.handle:
            return False
        retry_at = self._refused.get((rec.worker_id, rec.kv_event_epoch))
        return retry_at is None or time.monotonic() >= retry_at

    async def _join(self, rec: registry_pb2.WorkerRecord) -> None:
        wid = rec.worker_id
        known = _Known(rec.kv_event_epoch, rec.address, rec.heartbeat_unix_ms)
        self._known[wid] = known             # before register: feed_for must see it
        try:
            known.handle = await self._registry.register(wid, rec.address, rec.model, expires=False)
        except RouterError as e:
            del self._known[wid]
            self._refused[(wid, rec.kv_event_epoch)] = \
                time.monotonic() + _REFUSED_RETRY_POLLS * self._poll_interval_s
            logger.error("worker %s from redis refused: %s", wid, e.message)
            return
        self._refused.pop((wid, rec.kv_event_epoch), None)
        self._registry.heartbeat(wid, WorkerLoad.from_pb(rec.load))

    async def _expired(self, wid: str) -> None:
        known = self._known.pop(wid, None)
        if known is not None and known.handle is not None and self._registry.get(wid) is known.handle:
            self._registry.expire(wid, "let its redis key expire (missed heartbeats)")
        # Any router may clean up; a worker that is merely late re-adds itself on its next heartbeat.
        await self.redis.srem(redis_layout.workers_key(self.prefix), wid)

    def _left(self, wid: str) -> None:
        known = self._known.pop(wid)
        if known.handle is not None and self._registry.get(wid) is known.handle:
            self._registry.deregister(wid)


class RedisFeed:
    """A worker's KV events from its Redis stream; the snapshot still comes over gRPC."""

    def __init__(self, handle: WorkerHandle, redis: aioredis.Redis, prefix: str) -> None:
        self._grpc = GrpcFeed(handle)
        self._redis = redis
        self._prefix = prefix
        self._worker_id = handle.worker_id

    async def snapshot(self) -> Snapshot:
        return await self._grpc.snapshot()

    async def events(self, after_event_id: int, epoch: str) -> AsyncIterator[list[worker_pb2.KvEvent]]:
        key = redis_layout.kv_stream_key(self._prefix, self._worker_id, epoch)
        position: bytes | str = redis_layout.entry_id(after_event_id)
        while True:
            task = asyncio.current_task()
            if task is not None and task.cancelling():   # redis-py may swallow a cancellation
                raise asyncio.CancelledError()
            reply = await self._redis.xread({key: position}, count=_XREAD_COUNT, block=_XREAD_BLOCK_MS)
            for _stream, entries in reply or ():
                for entry_id, fields in entries:
                    position = entry_id
                    yield list(worker_pb2.KvEventBatch.FromString(fields[redis_layout.BATCH_FIELD]).events)
