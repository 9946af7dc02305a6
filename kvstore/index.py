"""The router's prefix indexes: which workers hold (or will soon hold) which blocks.

``PrefixIndex`` is fed by the workers' KV events (block stored / removed /
all cleared) and answers, for a prompt's chained block hashes, how many
leading blocks each worker has cached. ``RecentPrefixes`` holds the router's
own placements for a few seconds, as a prediction of what the chosen worker
is about to cache (a burst sharing a new prefix then lands together before
the first "stored" event arrives).

Because a block hash covers its whole prefix (see ``hashing.py``), a flat map
``hash -> holders`` is as expressive as a radix tree over token blocks:
worker ``w`` holds the first ``k`` blocks of a prompt iff it holds each of
their hashes.

Identifiers: each tracked worker gets a *slot*, a small integer reused after
the worker leaves, and ``holders`` is a bitmask of slots (an ``int``). A
lookup therefore walks the prompt's blocks once with one dict lookup and one
integer AND per block, whatever the number of workers.

Complexity: ``apply_*`` is O(blocks in the event); ``overlaps`` is
O(prompt blocks + workers in the answer), stopping at the first block no
worker holds; ``remove_worker`` is O(that worker's entries).

Memory is bounded: each worker's entry count is capped at its KV pool size
(``capacity``; events from a faithful worker never exceed it). If removals
were lost and a worker's set would grow past its cap, its oldest entries are
dropped (they are the likeliest to have been evicted on the worker too).
``num_entries``, ``num_blocks`` and ``approx_bytes`` make the size
observable; a worker that leaves takes all its entries with it.

Event ids: each worker numbers its events from 1, +1 each. ``apply_*``
returns ``NeedsResync`` on a gap or a restart (an id not following the last
one): the caller then fetches the worker's full snapshot and calls
``reset_worker``.
"""

from __future__ import annotations

import collections
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

_BYTES_PER_ENTRY = 170
"""Memory per (worker, block) pair (its node in the worker's OrderedDict and its
key), and ``_BYTES_PER_BLOCK`` per distinct hash (its ``hash -> holders`` slot):
fitted to tracemalloc measurements of indexes of 64k to 524k entries
(benchmarks/routing_decision.py, CPython 3.11); dicts grow in steps, so
expect +-20%."""
_BYTES_PER_BLOCK = 100


@dataclass(frozen=True)
class Applied:
    """The event was applied in order."""


@dataclass(frozen=True)
class NeedsResync:
    """The event does not follow the last one seen from this worker."""

    worker_id: str
    expected_event_id: int
    got_event_id: int


class WorkerSlots:
    """worker id <-> bit, with bits reused after a worker is released.

    A ``PrefixIndex`` and a ``RecentPrefixes`` built on one ``WorkerSlots``
    give each worker the same bit, so one walk can combine them
    (``PrefixIndex.overlaps_with``); their owner then releases a worker
    after removing it from both.
    """

    def __init__(self) -> None:
        self.owner: list[str | None] = []
        self._bits: dict[str, int] = {}
        self._free: list[int] = []

    def bit(self, worker_id: str) -> int:
        """The worker's bit, assigned on first use."""
        bit = self._bits.get(worker_id)
        if bit is None:
            if self._free:
                slot = self._free.pop()
                self.owner[slot] = worker_id
            else:
                slot = len(self.owner)
                self.owner.append(worker_id)
            bit = self._bits[worker_id] = 1 << slot
        return bit

    def find(self, worker_id: str) -> int | None:
        """The worker's bit, or None if it has none."""
        return self._bits.get(worker_id)

    def release(self, worker_id: str) -> None:
        bit = self._bits.pop(worker_id, None)
        if bit is not None:
            slot = bit.bit_length() - 1
            self.owner[slot] = None
            self._free.append(slot)

    def depths(self, mask: int, depth: int, out: dict[str, int]) -> None:
        """Record ``depth`` for every worker whose bit is set in ``mask``."""
        owner = self.owner
        while mask:
            low = mask & -mask
            out[owner[low.bit_length() - 1]] = depth
            mask ^= low


def _walk(holders: dict[int, int], block_hashes: Sequence[int], slots: WorkerSlots) -> dict[str, int]:
    """Longest leading run of ``block_hashes`` per worker, from a ``hash -> slot mask`` map."""
    result: dict[str, int] = {}
    n = len(block_hashes)
    if n == 0:
        return result
    get = holders.get
    alive = get(block_hashes[0], 0)
    depth = 1
    while alive and depth < n:
        nxt = alive & get(block_hashes[depth], 0)
        if nxt != alive:
            slots.depths(alive & ~nxt, depth, result)
            alive = nxt
        depth += 1
    slots.depths(alive, depth, result)
    return result


class _Masks(dict):
    """Canonical holder-mask objects: a cluster has few distinct masks, so sharing one
    int object per mask keeps the lookup walk's memory reads on hot cache lines."""

    _MAX = 1 << 16

    def canon(self, mask: int) -> int:
        found = self.get(mask)
        if found is None:
            if len(self) >= self._MAX:    # an unusual spread of masks: start over (values stay valid)
                self.clear()
            self[mask] = found = mask
        return found


def _drop_bit(holders: dict[int, int], masks: _Masks, block_hash: int, bit: int) -> None:
    mask = holders.get(block_hash)
    if mask is None:
        return
    mask &= ~bit
    if mask:
        holders[block_hash] = masks.canon(mask)
    else:
        del holders[block_hash]


@dataclass
class _WorkerBlocks:
    capacity: int
    bit: int
    last_event_id: int = 0
    blocks: OrderedDict[int, None] = field(default_factory=OrderedDict)  # insertion order = age


class PrefixIndex:
    """Event-fed: ``hash -> workers holding it``, with per-worker event ids and capacity."""

    def __init__(self, slots: WorkerSlots | None = None) -> None:
        self._holders: dict[int, int] = {}
        self._masks = _Masks()
        self._workers: dict[str, _WorkerBlocks] = {}
        self._slots = slots or WorkerSlots()
        self._owns_slots = slots is None
        self.num_capacity_evictions = 0

    # ---- membership ----------------------------------------------------------
    def add_worker(self, worker_id: str, capacity: int) -> None:
        """Start tracking a worker whose KV pool holds ``capacity`` blocks (no entries yet)."""
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.remove_worker(worker_id)
        self._workers[worker_id] = _WorkerBlocks(capacity, self._slots.bit(worker_id))

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker and every entry it contributed. Unknown ids are ignored."""
        state = self._workers.pop(worker_id, None)
        if state is None:
            return
        self._clear(state)
        if self._owns_slots:
            self._slots.release(worker_id)

    def reset_worker(self, worker_id: str, block_hashes: Iterable[int], last_event_id: int,
                     capacity: int | None = None) -> None:
        """Replace a worker's entries with a full snapshot taken at ``last_event_id``
        (and its capacity, when given)."""
        state = self._workers.get(worker_id)
        if state is None:
            raise KeyError(f"unknown worker {worker_id!r}; call add_worker first")
        if capacity is not None:
            if capacity < 1:
                raise ValueError(f"capacity must be >= 1, got {capacity}")
            state.capacity = capacity
        self._clear(state)
        state.last_event_id = last_event_id
        self._store(state, block_hashes)

    def has_worker(self, worker_id: str) -> bool:
        return worker_id in self._workers

    @property
    def worker_ids(self) -> list[str]:
        return list(self._workers)

    # ---- events ----------------------------------------------------------------
    def apply_stored(self, worker_id: str, event_id: int, block_hashes: Sequence[int]) -> Applied | NeedsResync:
        state, verdict = self._advance(worker_id, event_id)
        if state is not None:
            self._store(state, block_hashes)
        return verdict

    def apply_removed(self, worker_id: str, event_id: int, block_hashes: Sequence[int]) -> Applied | NeedsResync:
        state, verdict = self._advance(worker_id, event_id)
        if state is not None:
            for h in block_hashes:
                if h in state.blocks:
                    del state.blocks[h]
                    _drop_bit(self._holders, self._masks, h, state.bit)
        return verdict

    def apply_cleared(self, worker_id: str, event_id: int) -> Applied | NeedsResync:
        state, verdict = self._advance(worker_id, event_id)
        if state is not None:
            self._clear(state)
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

    def _store(self, state: _WorkerBlocks, block_hashes: Iterable[int]) -> None:
        holders, bit, blocks, canon = self._holders, state.bit, state.blocks, self._masks.canon
        for h in block_hashes:
            if h in blocks:
                blocks.move_to_end(h)
                continue
            blocks[h] = None
            holders[h] = canon(holders.get(h, 0) | bit)
        while len(blocks) > state.capacity:
            old, _ = blocks.popitem(last=False)
            _drop_bit(holders, self._masks, old, bit)
            self.num_capacity_evictions += 1

    def _clear(self, state: _WorkerBlocks) -> None:
        for h in state.blocks:
            _drop_bit(self._holders, self._masks, h, state.bit)
        state.blocks.clear()

    # ---- queries -----------------------------------------------------------------
    def overlaps(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """For each worker holding at least the first block: how many leading blocks it holds."""
        return _walk(self._holders, block_hashes, self._slots)

    def overlaps_with(self, recent: RecentPrefixes, block_hashes: Sequence[int],
                      now: float) -> tuple[dict[str, int], dict[str, int]]:
        """(cached, cached or predicted) leading blocks per worker, in one walk.

        "cached or predicted" counts a block as held by a worker when its
        events say so or ``recent`` has it placed there, so a placement need
        only record the blocks its worker did not already hold. ``recent``
        must share this index's ``WorkerSlots``.
        """
        if recent._slots is not self._slots:
            raise ValueError("overlaps_with needs a RecentPrefixes built on this index's WorkerSlots")
        recent.expire(now)
        cached: dict[str, int] = {}
        either: dict[str, int] = {}
        n = len(block_hashes)
        if n == 0:
            return cached, either
        iget, rget, slots = self._holders.get, recent._holders.get, self._slots
        held = iget(block_hashes[0], 0)
        alive_c, alive_e = held, held | rget(block_hashes[0], 0)
        depth = 1
        while alive_e and depth < n:
            h = block_hashes[depth]
            held = iget(h, 0)
            if alive_e & ~held:              # only then can predictions matter (saves most lookups)
                nxt = alive_e & (held | rget(h, 0))
                if nxt != alive_e:
                    slots.depths(alive_e & ~nxt, depth, either)
                    alive_e = nxt
            if alive_c:
                nxt = alive_c & held
                if nxt != alive_c:
                    slots.depths(alive_c & ~nxt, depth, cached)
                    alive_c = nxt
            depth += 1
        slots.depths(alive_e, depth, either)
        slots.depths(alive_c, depth, cached)
        return cached, either

    def last_event_id(self, worker_id: str) -> int:
        return self._workers[worker_id].last_event_id

    def blocks_of(self, worker_id: str) -> frozenset[int]:
        """The block hashes indexed for one worker (empty for an unknown worker). O(its entries)."""
        state = self._workers.get(worker_id)
        return frozenset(state.blocks) if state is not None else frozenset()

    def worker_entries(self, worker_id: str) -> int:
        """Blocks indexed for one worker (0 for an unknown worker)."""
        state = self._workers.get(worker_id)
        return len(state.blocks) if state is not None else 0

    def num_entries(self) -> int:
        """(worker, block) pairs held: the index's size in the unit memory grows with."""
        return sum(len(s.blocks) for s in self._workers.values())

    def num_blocks(self) -> int:
        """Distinct block hashes known."""
        return len(self._holders)

    def approx_bytes(self) -> int:
        """Estimated memory of the index (per-entry sizes fitted to tracemalloc measurements)."""
        return _BYTES_PER_ENTRY * self.num_entries() + _BYTES_PER_BLOCK * self.num_blocks()


@dataclass
class _Route:
    expires_at: float
    bit: int
    block_hashes: Sequence[int]


class RecentPrefixes:
    """The router's own recent placements, as predicted cache content.

    ``record(worker, hashes, now)`` says "``worker`` was just given a prompt
    with these block hashes, so it is about to cache them"; for ``ttl_s``
    seconds lookups count them as held by that worker. Placements expire in
    order (one deque), each clearing its blocks' bits. The kv policy records
    only the blocks past what the worker already holds or is predicted to
    hold (``PrefixIndex.overlaps_with``), and chained hashes diverge for good
    once two prompts differ, so a live block is recorded once per worker; if
    a caller records one twice, it is forgotten with the earlier placement.
    The total number of recorded block hashes is capped at ``max_entries``
    (the oldest placements go first), so memory stays bounded at any rate.

    Complexity: ``record`` O(blocks recorded); ``overlaps`` O(prompt blocks +
    workers in the answer) after dropping expired placements (amortized O(1)
    per recorded block).
    """

    def __init__(self, ttl_s: float, max_entries: int = 1_000_000, slots: WorkerSlots | None = None) -> None:
        if ttl_s < 0:
            raise ValueError(f"ttl_s must be >= 0, got {ttl_s}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._holders: dict[int, int] = {}
        self._masks = _Masks()
        self._routes: collections.deque[_Route] = collections.deque()
        self._slots = slots or WorkerSlots()
        self._owns_slots = slots is None
        self._entries = 0

    def record(self, worker_id: str, block_hashes: Sequence[int], now: float) -> None:
        """Remember a placement; ``block_hashes`` must not be mutated afterwards (it is kept)."""
        if self.ttl_s == 0 or not block_hashes:
            return
        self.expire(now)                  # before: an expiring placement must not clear these blocks
        bit = self._slots.bit(worker_id)
        holders, masks = self._holders, self._masks
        get, canon_get = holders.get, masks.get
        for h in block_hashes:
            mask = get(h, 0) | bit
            holders[h] = canon_get(mask) or masks.canon(mask)
        self._routes.append(_Route(now + self.ttl_s, bit, block_hashes))
        self._entries += len(block_hashes)
        while self._entries > self.max_entries:
            self._forget(self._routes.popleft())

    def overlaps(self, block_hashes: Sequence[int], now: float) -> dict[str, int]:
        """Per worker: leading blocks of ``block_hashes`` placed there within ``ttl_s``."""
        self.expire(now)
        if not self._holders:
            return {}
        return _walk(self._holders, block_hashes, self._slots)

    def expire(self, now: float) -> None:
        routes = self._routes
        while routes and routes[0].expires_at <= now:
            self._forget(routes.popleft())

    def remove_worker(self, worker_id: str) -> None:
        """Forget every placement on ``worker_id`` (it left). O(recorded placements)."""
        bit = self._slots.find(worker_id)
        if bit is None:
            return
        kept: collections.deque[_Route] = collections.deque()
        for route in self._routes:
            if route.bit == bit:
                self._forget(route)
            else:
                kept.append(route)
        self._routes = kept
        if self._owns_slots:
            self._slots.release(worker_id)

    def num_entries(self) -> int:
        """Recorded block hashes of live placements (the unit of ``max_entries``)."""
        return self._entries

    def _forget(self, route: _Route) -> None:
        holders, masks, bit = self._holders, self._masks, route.bit
        get = holders.get
        for h in route.block_hashes:
            mask = get(h)
            if mask == bit:                   # the common case, inlined: only this worker predicted it
                del holders[h]
            elif mask is not None:
                _drop_bit(holders, masks, h, bit)
        self._entries -= len(route.block_hashes)
