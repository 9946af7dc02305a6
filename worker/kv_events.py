"""Numbers a worker's KV-cache events and fans them out to StreamKvEvents subscribers.

Identifiers: ``event_id`` is per worker, starts at 1 with each publisher (one
per engine start) and increases by one per event. ``epoch`` is a random
token per publisher naming that numbering, so a subscriber can tell a
restarted worker (ids from 1 again) from the one it followed. The last ``capacity``
events stay in a ring buffer, so a router that lost its stream resumes with
``after_event_id`` = the last id it applied and misses nothing.

Resync contract: a subscriber asking to resume from a position outside the
retained window gets ``EventsUnavailableError``, which the servicer turns into
``OUT_OF_RANGE``. It happens when the id is older than the buffer (events were
dropped while the subscriber was away or too slow) or newer than the last
event (the worker restarted and numbers from 1 again), or when the
subscriber names an epoch that is not this publisher's. Either way the
subscriber's view of this worker is stale: it must drop what it knows of this
worker's blocks and subscribe again with ``after_event_id=0``. OUT_OF_RANGE,
not FAILED_PRECONDITION, because the fault is the requested position, which no
amount of waiting or retrying fixes; transient trouble is UNAVAILABLE, so the
code alone tells a client to resync rather than retry.

Cost: ``publish`` is O(events); a subscriber's read is O(position in buffer)
per batch (a deque slice), at most ``max_batch`` events per batch.

Threading: event-loop only, no locks. ``EngineLoop`` forwards events from the
engine thread with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import secrets
from dataclasses import dataclass
from typing import AsyncIterator, Iterable

from worker.engine.types import KvCacheEvent

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NumberedEvent:
    event_id: int
    event: KvCacheEvent


class EventsUnavailableError(Exception):
    """The requested resume position is not retained; the subscriber must resync."""


class KvEventPublisher:
    """Assigns event ids, keeps a bounded history, and serves any number of subscribers."""

    def __init__(self, capacity: int = 10_000, max_batch: int = 1024) -> None:
        if capacity < 1 or max_batch < 1:
            raise ValueError(f"capacity and max_batch must be >= 1, got {capacity} and {max_batch}")
        self._buffer: collections.deque[NumberedEvent] = collections.deque(maxlen=capacity)
        self._max_batch = max_batch
        self._next_id = 1
        self.epoch = secrets.token_hex(8)
        """This publisher's numbering (KvSnapshot.epoch); new on every engine start."""
        self._wakeup = asyncio.Event()
        self._closed = False
        self._subscribers = 0

    @property
    def last_event_id(self) -> int:
        """Id of the newest event; 0 before the first."""
        return self._next_id - 1

    @property
    def num_subscribers(self) -> int:
        return self._subscribers

    def publish(self, events: Iterable[KvCacheEvent]) -> None:
        """Number ``events`` in order, retain them, and wake every subscriber."""
        for event in events:
            self._buffer.append(NumberedEvent(self._next_id, event))
            self._next_id += 1
        self._wake()

    def subscribe(self, after_event_id: int, epoch: str = "") -> AsyncIterator[list[NumberedEvent]]:
        """Batches of events with ids > ``after_event_id``, oldest first, forever.

        ``after_event_id=0`` starts at the next event. The position is fixed
        now, so events published before the first iteration are not missed.
        Raises ``EventsUnavailableError`` now if the position is not
        retained or ``epoch`` (when given) is not this publisher's, or later
        if this subscriber falls ``capacity`` events behind. The iterator
        ends after ``close()``.
        """
        if epoch and epoch != self.epoch:
            raise EventsUnavailableError(
                f"event epoch {epoch!r} is not this worker's ({self.epoch!r}): it restarted since; "
                f"resync: drop this worker's blocks, fetch GetKvSnapshot and resume after its last_event_id")
        return self._follow(self._start_position(after_event_id))

    def close(self) -> None:
        """End every subscription (the server is stopping)."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    def _oldest_id(self) -> int:
        return self._buffer[0].event_id if self._buffer else self._next_id

    def _start_position(self, after_event_id: int) -> int:
        last = self.last_event_id
        if after_event_id == 0:
            return last
        if after_event_id > last:
            raise EventsUnavailableError(
                f"after_event_id {after_event_id} is ahead of this worker's last event {last} "
                f"(it restarted and numbers events from 1 again); resync: drop this worker's "
                f"blocks and subscribe with after_event_id=0"
            )
        self._check_retained(after_event_id)
        return after_event_id

    def _check_retained(self, cursor: int) -> None:
        oldest = self._oldest_id()
        if cursor < oldest - 1:
            raise EventsUnavailableError(
                f"event {cursor + 1} is no longer retained (this worker keeps events "
                f"{oldest}..{self.last_event_id}); resync: drop this worker's blocks and "
                f"subscribe with after_event_id=0"
            )

    def _read(self, cursor: int) -> list[NumberedEvent]:
        self._check_retained(cursor)
        start = cursor - (self._oldest_id() - 1)
        return list(itertools.islice(self._buffer, start, start + self._max_batch))

    async def _follow(self, cursor: int) -> AsyncIterator[list[NumberedEvent]]:
        self._subscribers += 1
        try:
            while True:
                batch = self._read(cursor)
                if batch:
                    cursor = batch[-1].event_id
                    yield batch
                elif self._closed:
                    return
                else:
                    await self._wakeup.wait()
        finally:
            self._subscribers -= 1
