"""Discovery backend "redis", worker side: registration, heartbeats and KV events through Redis.

The key layout is ``kvmesh/v1/redis_layout.py``. Every heartbeat interval
the worker rewrites its ``WorkerRecord`` (address, model, load, draining,
KV event epoch) under its worker key with a TTL of ``missed_heartbeats``
intervals; if the worker dies the key expires and every router drops it.
Each batch of KV events is appended to the worker's event stream, whose
entry ids carry the event ids, so any router replica, including one started
later, resumes from the last event it applied (after a ``GetKvSnapshot``).

``RedisLink`` has ``RouterLink``'s interface (``start``, ``heartbeat``,
``close``), so draining works the same: publish ``draining`` at once, let
running requests finish, then delete the key and leave the worker set.

Failures: a Redis that is down is logged and retried with jittered backoff,
never fatal. If the event forwarder falls behind the publisher's buffer it
resubscribes from the newest event; routers see the gap in event ids and
resync from ``GetKvSnapshot``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from kvmesh.v1 import redis_layout, registry_pb2, worker_pb2
from worker.config import WorkerConfig
from worker.convert import kv_batch_to_pb
from worker.kv_events import EventsUnavailableError, KvEventPublisher, NumberedEvent

logger = logging.getLogger(__name__)


def _cancelled() -> bool:
    """Whether this task is being cancelled: redis-py can turn a cancellation that
    interrupts a command into a ConnectionError, which the retry loops must not swallow."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class RedisLink:
    def __init__(self, config: WorkerConfig, address: str, model: str,
                 load_report: Callable[[], worker_pb2.LoadReport], events: KvEventPublisher) -> None:
        self._config = config
        self._address = address
        self._model = model
        self._load_report = load_report
        self._events = events
        self._redis = aioredis.Redis.from_url(config.redis_url, socket_timeout=config.router_timeout_s,
                                              socket_connect_timeout=config.router_timeout_s)
        prefix, wid = config.redis_prefix, config.worker_id
        self._workers_key = redis_layout.workers_key(prefix)
        self._worker_key = redis_layout.worker_key(prefix, wid)
        self._stream_key = redis_layout.kv_stream_key(prefix, wid, events.epoch)
        self._ttl_ms = max(1, int(config.heartbeat_interval_s * config.missed_heartbeats * 1000))
        # Subscribed now, before registering: no router can send a request
        # (so no event can happen) before the worker key exists.
        self._batches = events.subscribe(0)
        self._tasks: list[asyncio.Task] = []
        self.registered = False
        self._closed = False

    def start(self) -> None:
        wid = self._config.worker_id
        self._tasks = [asyncio.create_task(self._beat_forever(), name=f"redis-heartbeat-{wid}"),
                       asyncio.create_task(self._forward_events(), name=f"redis-kv-events-{wid}")]

    async def heartbeat(self) -> None:
        """Write the record now (used by drain to announce ``draining`` at once).
        A Redis error is logged, not raised: the heartbeat loop retries."""
        try:
            await self._write_record()
        except RedisError as exc:
            logger.warning("heartbeat to redis %s failed: %s", self._config.redis_url, exc)

    async def close(self, deregister: bool) -> None:
        """Stop heartbeats and event forwarding; leave the worker set if asked. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._batches.aclose()
        if deregister and self.registered:
            try:
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.delete(self._worker_key)
                    pipe.srem(self._workers_key, self._config.worker_id)
                    pipe.delete(self._stream_key)
                    await pipe.execute()
                logger.info("left the worker set in redis %s", self._config.redis_url)
            except RedisError as exc:
                logger.warning("deregister from redis %s failed: %s", self._config.redis_url, exc)
            self.registered = False
        await self._redis.aclose()

    def _record(self) -> bytes:
        return registry_pb2.WorkerRecord(
            worker_id=self._config.worker_id, address=self._address, model=self._model,
            load=self._load_report(), kv_event_epoch=self._events.epoch,
            heartbeat_unix_ms=int(time.time() * 1000),
            heartbeat_interval_s=self._config.heartbeat_interval_s,
        ).SerializeToString()

    async def _write_record(self) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._worker_key, self._record(), px=self._ttl_ms)
            pipe.sadd(self._workers_key, self._config.worker_id)
            pipe.pexpire(self._stream_key, self._ttl_ms)
            await pipe.execute()
        if not self.registered:
            self.registered = True
            logger.info("registered worker %s at %s in redis %s (heartbeat every %.1fs, ttl %dms)",
                        self._config.worker_id, self._address, self._config.redis_url,
                        self._config.heartbeat_interval_s, self._ttl_ms)

    async def _beat_forever(self) -> None:
        cfg = self._config
        backoff = cfg.retry_initial_s
        while not self._closed:
            if _cancelled():       # swallowed by redis-py inside a command: stop anyway
                raise asyncio.CancelledError()
            try:
                await self._write_record()
                backoff, delay = cfg.retry_initial_s, cfg.heartbeat_interval_s
            except RedisError as exc:
                if _cancelled():
                    raise asyncio.CancelledError() from exc
                delay = random.uniform(backoff / 2, backoff)
                backoff = min(backoff * 2, cfg.retry_max_s)
                logger.warning("redis %s unreachable (%s); retrying in %.1fs", cfg.redis_url, exc, delay)
            await asyncio.sleep(delay)

    async def _forward_events(self) -> None:
        while not self._closed:
            try:
                async for batch in self._batches:
                    await self._append(batch)
                return  # the publisher closed: the worker is stopping
            except EventsUnavailableError as exc:
                logger.warning("KV event forwarding to redis fell behind (%s); routers will resync", exc)
                await self._batches.aclose()
                self._batches = self._events.subscribe(0)

    async def _append(self, batch: list[NumberedEvent]) -> None:
        """XADD one batch, retrying while Redis is down (events keep queueing in the publisher)."""
        last = batch[-1].event_id
        data = kv_batch_to_pb(batch).SerializeToString()
        oldest_kept = last - self._config.kv_event_buffer
        cfg = self._config
        backoff = cfg.retry_initial_s
        while not self._closed:
            if _cancelled():
                raise asyncio.CancelledError()
            try:
                await self._redis.xadd(self._stream_key, {redis_layout.BATCH_FIELD: data},
                                       id=redis_layout.entry_id(last),
                                       minid=redis_layout.entry_id(oldest_kept) if oldest_kept > 0 else None,
                                       approximate=True)
                return
            except ResponseError as exc:
                if "equal or smaller" not in str(exc):  # else an earlier attempt landed; its reply was lost
                    logger.error("redis refused KV events %d..%d (%s); routers will resync",
                                 batch[0].event_id, last, exc)
                return
            except RedisError as exc:
                if _cancelled():
                    raise asyncio.CancelledError() from exc
                delay = random.uniform(backoff / 2, backoff)
                backoff = min(backoff * 2, cfg.retry_max_s)
                logger.warning("XADD of KV events %d..%d failed (%s); retrying in %.1fs",
                               batch[0].event_id, last, exc, delay)
                await asyncio.sleep(delay)
