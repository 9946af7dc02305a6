"""Reading a response stream ahead of its consumer, who takes what arrived in one batch.

The router relays each worker message to a client. Relaying them one by one
ties its cost to the worker's message rate: with hundreds of streams a
router that falls behind still reads, converts and sends every message.
``ReadAhead`` runs one small task per stream (the pump) that keeps reading
while the consumer is busy (detokenizing, sending to a slow client, or
simply waiting for its turn on a saturated event loop); the consumer's
``take`` returns everything read since its last call. A consumer that keeps
up gets one message per ``take``, as before; one that fell behind gets them
all at once and makes one chunk of them, so the router's work per token
shrinks as its backlog grows, and the backlog stops growing.

Contract: messages come out of ``take`` in the order they were read, each
exactly once. The message for which ``is_last`` holds is the last one read.
A read that raises ends the stream: its exception is raised by the ``take``
after the one that returned the messages read before it. At most ``limit``
messages wait in the buffer; the pump pauses (reads nothing) while it is full.
``close`` cancels the pump; the stream itself belongs to the caller.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Generic, TypeVar

T = TypeVar("T")

DEFAULT_LIMIT = 1024
"""Messages read ahead at most; then the pump waits for the consumer (memory bound for a stalled client)."""


class ReadAhead(Generic[T]):
    """One stream's pump and buffer; create it on the event loop that consumes it."""

    def __init__(self, read: Callable[[], Awaitable[T]], is_last: Callable[[T], bool],
                 limit: int = DEFAULT_LIMIT, name: str | None = None) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self._read = read
        self._is_last = is_last
        self._limit = limit
        self._ready: list[T] = []
        self._error: BaseException | None = None
        self._ended = False                               # the last message or an error was read
        self._loop = asyncio.get_running_loop()
        self._data_waiter: asyncio.Future | None = None   # the consumer, waiting for a message
        self._space_waiter: asyncio.Future | None = None  # the pump, waiting for room
        self._task = self._loop.create_task(self._pump(), name=name)

    async def take(self) -> list[T]:
        """Every message read since the last ``take`` (at least one; waits for it).

        Raises the read's exception once the messages before it were taken;
        returns ``[]`` after the last message was taken."""
        while not self._ready:
            if self._ended:
                if self._error is not None:
                    raise self._error
                return []
            self._data_waiter = self._loop.create_future()
            try:
                await self._data_waiter
            finally:
                self._data_waiter = None
        batch, self._ready = self._ready, []
        if self._space_waiter is not None and not self._space_waiter.done():
            self._space_waiter.set_result(None)
        return batch

    def close(self) -> None:
        """Stops reading (cancels the pump); idempotent."""
        self._task.cancel()

    async def _pump(self) -> None:
        try:
            while True:
                message = await self._read()
                self._ready.append(message)
                if self._data_waiter is not None and not self._data_waiter.done():
                    self._data_waiter.set_result(None)
                if self._is_last(message):
                    return
                if len(self._ready) >= self._limit:
                    self._space_waiter = self._loop.create_future()
                    try:
                        await self._space_waiter
                    finally:
                        self._space_waiter = None
        except asyncio.CancelledError as e:
            if self._task.cancelling():      # close(): nobody reads on
                raise
            self._error = e                  # the read itself was cancelled: the consumer sees that
        except Exception as e:
            self._error = e
        finally:
            self._ended = True
            if self._data_waiter is not None and not self._data_waiter.done():
                self._data_waiter.set_result(None)
