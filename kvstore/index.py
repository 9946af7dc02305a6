"""The router's prefix index: which workers hold which cached blocks.

Fed by the workers' KV events (block stored / removed / all cleared), it
answers, for a prompt's chained block hashes, how many leading blocks each
worker has cached. Because a block hash covers its whole prefix (see
``hashing.py``), a flat map ``hash -> workers`` is as expressive as a radix
tree over token blocks: worker ``w`` holds the first ``k`` blocks of a prompt
iff it holds block ``k``'s hash and all before it.

Complexity: ``apply`` is O(blocks in the event); ``overlaps`` is
O(prompt blocks x matching workers), stopping at the first block no worker
holds.

Memory is bounded: each worker's entry count is capped at its KV pool size
(``capacity`` given on ``add_worker``; events from a faithful worker never
exceed it). If removals were lost and a worker's set would grow past its
cap, its oldest entries are dropped (they are the likeliest to have been
evicted on the worker too). ``num_entries`` and ``approx_bytes`` make the size
observable; a worker that leaves takes all its entries with it.

Event ids: each worker numbers its events from 1, +1 each. ``apply`` returns
``NeedsResync`` on a gap or a restart (an id not following the last one):
the caller then fetches the worker's full snapshot and calls ``reset_worker``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Sequence


@dataclass(frozen=True)
class Applied:
    """The event was applied in order."""


@dataclass(frozen=True)
class NeedsResync:
    """The event does not follow the last one seen from this worker."""

    worker_id: str
    expected_event_id: int
    got_event_id: int


@dataclass
class _WorkerBlocks:
    capacity: int
    last_event_id: int = 0
    blocks: OrderedDict[int, None] = field(default_factory=OrderedDict)  # insertion order = age


class PrefixIndex:
    def __init__(self) -> None:
        self._holders: dict[int, set[str]] = {}
        self._workers: dict[str, _WorkerBlocks] = {}
        self.num_capacity_evictions = 0

    # ---- membership ----------------------------------------------------------
    def add_worker(self, worker_id: str, capacity: int) -> None:
        """Start tracking a worker whose KV pool holds ``capacity`` blocks (no entries yet)."""
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.remove_worker(worker_id)
        self._workers[worker_id] = _WorkerBlocks(capacity)

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker and every entry it contributed. Unknown ids are ignored."""
        state = self._workers.pop(worker_id, None)
        if state is None:
            return
        for h in state.blocks:
            self._drop_holder(h, worker_id)

    def reset_worker(self, worker_id: str, block_hashes: Iterable[int], last_event_id: int) -> None:
        """Replace a worker's entries with a full snapshot taken at ``last_event_id``."""
        state = self._workers.get(worker_id)
        if state is None:
            raise KeyError(f"unknown worker {worker_id!r}; call add_worker first")
        for h in state.blocks:
            self._drop_holder(h, worker_id)
        state.blocks.clear()
        state.last_event_id = last_event_id
        self._store(worker_id, state, block_hashes)

    @property
    def worker_ids(self) -> list[str]:
        return list(self._workers)

    # ---- events ----------------------------------------------------------------
    def apply_stored(self, worker_id: str, event_id: int, block_hashes: Sequence[int]) -> Applied | NeedsResync:
        state, verdict = self._advance(worker_id, event_id)
        if state is not None:
            self._store(worker_id, state, block_hashes)
        return verdict

    def apply_removed(self, worker_id: str, event_id: int, block_hashes: Sequence[int]) -> Applied | NeedsResync:
        state, verdict = self._advance(worker_id, event_id)
        if state is not None:
            for h in block_hashes:
                if h in state.blocks:
                    del state.blocks[h]
                    self._drop_holder(h, worker_id)
        return verdict

    def apply_cleared(self, worker_id: str, event_id: int) -> Applied | NeedsResync:
        state, verdict = self._advance(worker_id, event_id)
        if state is not None:
            for h in state.blocks:
                self._drop_holder(h, worker_id)
            state.blocks.clear()
        return verdict

    def _advance(self, worker_id: str, event_id: int) -> tuple[_WorkerBlocks | None, Applied | NeedsResync]:
        state = self._workers.get(worker_id)
        if state is None:
            raise KeyError(f"unknown worker {worker_id!r}; call add_worker first")
        expected = state.last_event_id + 1
        if event_id != expected:
            return None, NeedsResync(worker_id, expected, event_id)
        state.last_event_id = event_id
        return state, Applied()

    def _store(self, worker_id: str, state: _WorkerBlocks, block_hashes: Iterable[int]) -> None:
        for h in block_hashes:
            if h in state.blocks:
                state.blocks.move_to_end(h)
                continue
            state.blocks[h] = None
            self._holders.setdefault(h, set()).add(worker_id)
        while len(state.blocks) > state.capacity:
            old, _ = state.blocks.popitem(last=False)
            self._drop_holder(old, worker_id)
            self.num_capacity_evictions += 1

    def _drop_holder(self, block_hash: int, worker_id: str) -> None:
        holders = self._holders.get(block_hash)
        if holders is None:
            return
        holders.discard(worker_id)
        if not holders:
            del self._holders[block_hash]

    # ---- queries -----------------------------------------------------------------
    def overlaps(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """For each worker holding at least the first block: how many leading blocks it holds."""
        result: dict[str, int] = {}
        if not block_hashes:
            return result
        alive = set(self._holders.get(block_hashes[0], ()))
        depth = 0
        while alive:
            depth += 1
            if depth == len(block_hashes):
                for w in alive:
                    result[w] = depth
                break
            nxt = self._holders.get(block_hashes[depth])
            still = alive & nxt if nxt else set()
            for w in alive - still:
                result[w] = depth
            alive = still
        return result

    def last_event_id(self, worker_id: str) -> int:
        return self._workers[worker_id].last_event_id

    def num_entries(self) -> int:
        """(worker, block) pairs held: the index's size in the unit memory grows with."""
        return sum(len(s.blocks) for s in self._workers.values())

    def num_blocks(self) -> int:
        """Distinct block hashes known."""
        return len(self._holders)

    def approx_bytes(self) -> int:
        """Rough memory of the entries (CPython: ~100 B per (worker, block) pair plus ~250 B per hash)."""
        return 100 * self.num_entries() + 250 * self.num_blocks()
