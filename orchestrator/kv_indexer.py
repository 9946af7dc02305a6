"""Keeps the router's prefix index in step with every worker's KV events.

One task per worker (``KvIndexer.watch``) runs this loop::

    snapshot = GetKvSnapshot()                   # blocks + the last event id L + epoch
    index.reset_worker(worker, snapshot)         # replaces whatever was known
    for batch in feed.events(after=L, epoch):    # gRPC StreamKvEvents or a Redis stream
        apply each event with id > L; a gap (NeedsResync) -> back to the snapshot

so a router that starts, a worker that joins or restarts (new epoch: the
feed answers OUT_OF_RANGE), a gap in event ids and a subscriber that fell
out of the worker's buffer all end in the same resync. Transient failures
(worker unreachable, Redis down) retry with jittered backoff, resuming after
the last applied event when the index is still in step. A worker that
leaves (``forget``) has its task cancelled and its entries dropped. A worker
that implements no ``GetKvSnapshot`` publishes nothing usable: it is placed
by load only (logged once).

Stored events also tell the load ledger that a request's prefill reached its
last prompt block (``on_stored``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Protocol

import grpc

from kvmesh.v1 import worker_pb2
from kvstore.index import NeedsResync
from orchestrator.metrics import RouterMetrics
from orchestrator.kv_state import KvState
from orchestrator.router import task_cancelled
from orchestrator.workers import WorkerHandle

logger = logging.getLogger(__name__)


class ResyncRequired(Exception):
    """The feed cannot continue from the requested position: take a new snapshot."""


class FeedUnsupported(Exception):
    """The worker does not publish KV events; place it by load only."""


@dataclass(frozen=True)
class Snapshot:
    last_event_id: int
    block_hashes: tuple[int, ...]
    kv_blocks_total: int
    epoch: str

    @classmethod
    def from_pb(cls, pb: worker_pb2.KvSnapshot) -> Snapshot:
        return cls(pb.last_event_id, tuple(pb.block_hashes), pb.kv_blocks_total, pb.epoch)


class EventFeed(Protocol):
    """Where one worker's KV events come from."""

    async def snapshot(self) -> Snapshot:
        """The worker's cached blocks now. Raises ``FeedUnsupported``."""
        ...

    def events(self, after_event_id: int, epoch: str) -> AsyncIterator[list[worker_pb2.KvEvent]]:
        """Batches of events with ids > ``after_event_id`` of ``epoch``, in order (a
        batch may also hold older ones: skip them). Raises ``ResyncRequired`` when
        that position cannot be served, and transport errors when unreachable."""
        ...


class GrpcFeed:
    """The worker's own ``StreamKvEvents`` (discovery backend "router" and static workers)."""

    def __init__(self, handle: WorkerHandle, timeout_s: float = 10.0) -> None:
        self._stub = handle.stub
        self._timeout_s = timeout_s

    async def snapshot(self) -> Snapshot:
        try:
            pb = await self._stub.GetKvSnapshot(worker_pb2.GetKvSnapshotRequest(), timeout=self._timeout_s)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise FeedUnsupported("it implements no GetKvSnapshot") from e
            raise
        return Snapshot.from_pb(pb)

    async def events(self, after_event_id: int, epoch: str) -> AsyncIterator[list[worker_pb2.KvEvent]]:
        call = self._stub.StreamKvEvents(worker_pb2.StreamKvEventsRequest(after_event_id=after_event_id,
                                                                          epoch=epoch))
        try:
            async for batch in call:
                yield list(batch.events)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.OUT_OF_RANGE:
                raise ResyncRequired(e.details()) from e
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise FeedUnsupported("it implements no StreamKvEvents") from e
            raise
        finally:
            call.cancel()


@dataclass(eq=False)
class _Follower:
    handle: WorkerHandle
    task: asyncio.Task | None = None


class KvIndexer:
    """Runs one follower task per watched worker, feeding ``kv.index`` (and
    ``kv.ledger.on_stored``); a registry listener (join -> watch, leave -> forget).

    ``feed_for`` picks each worker's event source (``GrpcFeed`` by default).
    """

    def __init__(self, kv: KvState, metrics: RouterMetrics, *,
                 feed_for: Callable[[WorkerHandle], EventFeed] = GrpcFeed,
                 retry_initial_s: float = 0.2, retry_max_s: float = 5.0) -> None:
        self.kv = kv
        self.index = kv.index
        self._metrics = metrics
        self.feed_for = feed_for
        self._on_stored = kv.ledger.on_stored
        self._max_blocks = kv.settings.index_max_blocks_per_worker
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._followers: dict[str, _Follower] = {}
        self.synced: set[str] = set()
        """Workers whose index entries are in step with their events (tests, diagnostics)."""

    # --- membership (registry listener) -----------------------------------------------

    def worker_joined(self, handle: WorkerHandle) -> None:
        self.watch(handle)

    def worker_left(self, handle: WorkerHandle) -> None:
        follower = self._followers.get(handle.worker_id)
        if follower is not None and follower.handle is handle:
            self.forget(handle.worker_id)

    def watch(self, handle: WorkerHandle) -> None:
        """Start following ``handle``'s events (replacing an earlier follower of its id)."""
        self.forget(handle.worker_id)
        self.index.add_worker(handle.worker_id, self._max_blocks)
        follower = _Follower(handle)
        follower.task = asyncio.get_running_loop().create_task(
            self._follow(handle), name=f"kv-events-{handle.worker_id}")
        self._followers[handle.worker_id] = follower

    def forget(self, worker_id: str) -> None:
        """Stop following ``worker_id`` and drop everything known of it (index
        entries, predictions, load leases)."""
        follower = self._followers.pop(worker_id, None)
        if follower is not None and follower.task is not None:
            follower.task.cancel()
        self.kv.forget_worker(worker_id)
        self.synced.discard(worker_id)

    async def stop(self) -> None:
        tasks = [f.task for f in self._followers.values() if f.task is not None]
        for worker_id in list(self._followers):
            self.forget(worker_id)
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- the follower ------------------------------------------------------------------

    async def _follow(self, handle: WorkerHandle) -> None:
        wid = handle.worker_id
        feed = self.feed_for(handle)
        reason = "join"
        backoff = self._retry_initial_s
        last_resync = -float("inf")
        epoch = ""
        while True:
            if task_cancelled():         # a client library swallowed the cancellation: stop anyway
                raise asyncio.CancelledError()
            try:
                if reason:
                    # A worker that keeps asking for resyncs must not become a hot loop.
                    if time.monotonic() - last_resync < self._retry_initial_s:
                        await asyncio.sleep(self._retry_initial_s)
                    last_resync = time.monotonic()
                    epoch = await self._resync(wid, feed, reason)
                    reason = ""
                reason = await self._apply_feed(wid, feed, epoch)
                backoff = self._retry_initial_s
                if not reason:       # the stream ended cleanly: the worker is stopping
                    await asyncio.sleep(self._retry_initial_s)
            except ResyncRequired as e:
                logger.info("worker %s: event stream cannot resume (%s); resyncing", wid, e)
                reason = "out_of_range"
            except FeedUnsupported as e:
                logger.info("worker %s publishes no KV events (%s); placing it by load only", wid, e)
                self.index.reset_worker(wid, (), 0)
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:   # transport trouble (gRPC, Redis, OS): retry, resuming if in step
                if task_cancelled():     # redis-py may report an interrupted command as ConnectionError
                    raise asyncio.CancelledError() from e
                delay = random.uniform(backoff / 2, backoff)
                backoff = min(backoff * 2, self._retry_max_s)
                logger.log(logging.DEBUG if isinstance(e, grpc.aio.AioRpcError) else logging.WARNING,
                           "worker %s: KV events unavailable (%s: %s); retrying in %.2fs",
                           wid, type(e).__name__, e, delay)
                await asyncio.sleep(delay)

    async def _resync(self, wid: str, feed: EventFeed, reason: str) -> str:
        snap = await feed.snapshot()
        capacity = min(snap.kv_blocks_total or self._max_blocks, self._max_blocks)
        self.index.reset_worker(wid, snap.block_hashes, snap.last_event_id, capacity)
        self.synced.add(wid)
        self._metrics.kv_resyncs.labels(reason).inc()
        logger.info("worker %s: KV index resynced (%s): %d blocks at event %d, epoch %s",
                    wid, reason, len(snap.block_hashes), snap.last_event_id, snap.epoch)
        return snap.epoch

    async def _apply_feed(self, wid: str, feed: EventFeed, epoch: str) -> str:
        """Apply events until the feed ends (returns "") or a gap appears (returns "gap")."""
        async for batch in feed.events(self.index.last_event_id(wid), epoch):
            applied, verdict = self._apply_batch(wid, batch)
            self._metrics.kv_events.inc(applied)
            if verdict:
                self.synced.discard(wid)
                return verdict
        return ""

    def _apply_batch(self, wid: str, batch: list[worker_pb2.KvEvent]) -> tuple[int, str]:
        """(events applied, "" or why a resync is needed)."""
        index = self.index
        last = index.last_event_id(wid)
        applied = 0
        for ev in batch:
            if ev.event_id <= last:          # already in the snapshot (a Redis batch may straddle it)
                continue
            kind = ev.WhichOneof("kind")
            if kind == "stored":
                verdict = index.apply_stored(wid, ev.event_id, ev.stored.block_hashes)
                if not isinstance(verdict, NeedsResync):
                    self._on_stored(wid, ev.stored.block_hashes)
            elif kind == "removed":
                verdict = index.apply_removed(wid, ev.event_id, ev.removed.block_hashes)
            elif kind == "cleared":
                verdict = index.apply_cleared(wid, ev.event_id)
            else:
                logger.warning("worker %s: KV event %d of unknown kind; resyncing", wid, ev.event_id)
                return applied, "unknown_event"
            if isinstance(verdict, NeedsResync):
                logger.info("worker %s: KV event %d where %d was expected; resyncing",
                            wid, verdict.got_event_id, verdict.expected_event_id)
                return applied, "gap"
            applied += 1
            last = ev.event_id
        return applied, ""
