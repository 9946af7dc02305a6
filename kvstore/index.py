"""The router's prefix indexes: which workers hold (or will soon hold) which blocks.

``PrefixIndex`` is fed by the workers' KV events (block stored / removed /
all cleared) and answers, for a prompt's chained block hashes, how many
leading blocks each worker has cached. ``RecentPrefixes`` holds the router's
own placements for a few seconds, as a prediction of what the chosen worker
is about to cache (a burst sharing a new prefix then lands together before
the first "stored" event arrives). It keeps a placed prompt's first ``dense``
hashes, then only every ``stride``-th (and its last one): a chained hash
stands for its whole prefix, so that is enough to say how far two prompts
agree, exactly up to ``dense`` blocks and to within ``stride - 1`` blocks
beyond, at about a ``stride``-th of the cost for a long prompt.

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
worker holds (the per-block work, one dict lookup and one AND, runs in C:
``map`` / ``accumulate``); ``remove_worker`` is O(that worker's entries).

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
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import accumulate, repeat, takewhile
from operator import and_
from typing import Callable, Iterable, Sequence

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


def _fewer_holders(mask: int) -> int:
    return -mask.bit_count()


def _walk(holders: dict[int, int], block_hashes: Sequence[int], slots: WorkerSlots) -> dict[str, int]:
    """Longest leading run of ``block_hashes`` per worker, from a ``hash -> slot mask`` map.

    The running AND of the blocks' masks (computed in C, up to the first block
    nobody holds) only ever loses bits, so its popcount never rises and each
    worker's depth is where the popcount first drops below the masks it was in:
    found by bisection, one per distinct mask, instead of a Python step per block.
    """
    result: dict[str, int] = {}
    alive = list(takewhile(bool, accumulate(map(holders.get, block_hashes, repeat(0)), and_)))
    n = len(alive)
    pos = 0
    while pos < n:
        mask = alive[pos]
        end = bisect_right(alive, -mask.bit_count(), pos, n, key=_fewer_holders)
        slots.depths(mask & ~alive[end] if end < n else mask, end, result)
        pos = end
    return result


def _anchor_depths(holders: dict[int, int], block_hashes: Sequence[int], dense: int, stride: int,
                   slots: WorkerSlots) -> dict[str, int]:
    """Per worker, ``k + 1`` for the deepest anchor ``k`` of ``block_hashes`` (every position
    below ``dense``, then every ``stride``-th, and the last) whose hash it holds in ``holders``."""
    result: dict[str, int] = {}
    n = len(block_hashes)
    if n == 0 or not holders:
        return result
    get = holders.get
    seen = get(block_hashes[-1], 0)
    if seen:
        slots.depths(seen, n, result)
    first = dense + (-(dense + 1)) % stride          # the first anchor past the dense head
    seen = _credit_deepest(get, block_hashes, first, None, stride, seen, slots, result)
    _credit_deepest(get, block_hashes, 0, dense, 1, seen, slots, result)
    return result


def _credit_deepest(get: Callable[[int, int], int], block_hashes: Sequence[int], start: int, stop: int | None,
                    step: int, seen: int, slots: WorkerSlots, result: dict[str, int]) -> int:
    """Walks the anchors ``block_hashes[start:stop:step]`` from the deepest and credits each
    worker not in ``seen`` with the depth of the deepest one it holds; returns ``seen`` with them."""
    masks = list(map(get, block_hashes[start:stop:step], repeat(0)))
    for i in range(len(masks) - 1, -1, -1):
        fresh = masks[i] & ~seen
        if fresh:
            slots.depths(fresh, start + i * step + 1, result)
            seen |= fresh
    return seen


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
    def holds(self, block_hash: int) -> bool:
        """Whether any worker holds this block (O(1))."""
        return block_hash in self._holders

    def holds_on(self, worker_id: str, block_hash: int) -> bool:
        """Whether this worker holds this block (O(1))."""
        bit = self._slots.find(worker_id)
        return bit is not None and self._holders.get(block_hash, 0) & bit != 0

    def overlaps(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """For each worker holding at least the first block: how many leading blocks it holds."""
        return _walk(self._holders, block_hashes, self._slots)

    def overlaps_with(self, recent: RecentPrefixes, block_hashes: Sequence[int],
                      now: float) -> tuple[dict[str, int], dict[str, int]]:
        """(cached, cached or predicted) leading blocks per worker.

        "cached" is ``overlaps``; "cached or predicted" is the larger of that and
        ``recent.overlaps`` (how far this prompt agrees with one placed on the worker
        within ``recent.ttl_s``, to an anchor), so a placement need only record the
        blocks past it. ``recent`` must share this index's ``WorkerSlots``.
        """
        if recent._slots is not self._slots:
            raise ValueError("overlaps_with needs a RecentPrefixes built on this index's WorkerSlots")
        cached = _walk(self._holders, block_hashes, self._slots)
        predicted = recent.overlaps(block_hashes, now)
        if not predicted:
            return cached, cached
        either = dict(cached)
        for worker_id, depth in predicted.items():
            if depth > either.get(worker_id, 0):
                either[worker_id] = depth
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


@dataclass(eq=False)
class _Route:
    expires_at: float
    bit: int
    block_hashes: list[int]        # the anchors recorded
    complete: Callable[[], Sequence[int]] | None = None   # deferred: the prompt's chain, on demand


class RecentPrefixes:
    """The router's own recent placements, as predicted cache content.

    ``record(worker, hashes, now, start)`` says "``worker`` was just given a
    prompt with these chained block hashes, so it is about to cache them";
    for ``ttl_s`` seconds lookups count them as held by that worker.

    Only *anchors* are kept: the first ``dense`` blocks, then positions ``k``
    with ``(k + 1) % stride == 0``, and the last block. Since a block hash covers
    its whole prefix, a prompt whose anchor ``k`` is held on ``w`` agrees with a
    prompt placed on ``w`` for its first ``k + 1`` blocks, so ``overlaps``
    answers the deepest such anchor: exact for an agreement of up to ``dense``
    blocks, else short by at most ``stride - 1`` blocks, for about
    ``1 / stride`` of the dict writes, the memory and the expiry work of
    keeping every block of a long prompt (``dense + (blocks - dense) / stride``
    anchors). ``stride = 1`` keeps every block. The dense head is what lets a
    burst sharing a *short* new prefix land together: with the default weights
    a worker already given the burst's first request wins the next only if
    credited more than about 5/8 of its prompt (it also queued the first
    one's prefill), and 16 exact blocks, then at most 7 short, keep any shared
    prefix with a short suffix above that.

    ``start`` skips the anchors below the depth the worker already holds or is
    predicted to hold (``PrefixIndex.overlaps_with``): those are already
    there, so a live anchor is recorded once per worker; if a caller records
    one twice, it is forgotten with the earlier placement. Placements expire
    in order (one deque), each clearing its anchors' bits. The number of
    recorded anchors is capped at ``max_entries`` (the oldest placements go
    first), so memory stays bounded at any rate.

    ``record_deferred`` keeps a placement whose prompt nobody shared even its
    first block with, when it was placed: it records that block now and
    hashes the rest of the chain (``complete``) only when a lookup's prompt
    starts with the same block, so traffic without reuse never hashes past
    a prompt's first block on the placement path.

    Complexity: ``record`` O(dense + blocks / stride); ``overlaps`` O(dense +
    blocks / stride + workers in the answer) after dropping expired placements (amortized O(1)
    per recorded anchor).
    """

    def __init__(self, ttl_s: float, max_entries: int = 1_000_000, slots: WorkerSlots | None = None,
                 stride: int = 8, dense: int = 16) -> None:
        if ttl_s < 0:
            raise ValueError(f"ttl_s must be >= 0, got {ttl_s}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        if dense < 1:
            raise ValueError(f"dense must be >= 1 (the first block is always an anchor), got {dense}")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.stride = stride
        self.dense = dense
        self._holders: dict[int, int] = {}
        self._masks = _Masks()
        self._routes: collections.deque[_Route] = collections.deque()
        self._deferred: dict[int, list[_Route]] = {}     # first block hash -> deferred placements
        self._slots = slots or WorkerSlots()
        self._owns_slots = slots is None
        self._entries = 0

    def anchors(self, block_hashes: Sequence[int], start: int = 0) -> list[int]:
        """The hashes ``record`` keeps of ``block_hashes[start:]``."""
        n, stride, dense = len(block_hashes), self.stride, self.dense
        if start >= n:
            return []
        kept = list(block_hashes[start:dense])
        lo = start if start > dense else dense
        kept += block_hashes[lo + (-(lo + 1)) % stride::stride]      # positions k >= lo, (k+1) % stride == 0
        if n % stride and n > dense:
            kept.append(block_hashes[-1])
        return kept

    def agrees(self, first_block_hash: int, now: float) -> bool:
        """Whether a live placement's prompt starts with this block (on any worker)."""
        self.expire(now)
        return first_block_hash in self._holders

    def record_deferred(self, worker_id: str, first_block_hash: int,
                        complete: Callable[[], Sequence[int]], now: float) -> None:
        """``record(worker_id, complete(), now)``, with ``complete`` called only when a
        lookup's prompt starts with ``first_block_hash`` (never, if none does in ``ttl_s``).
        For a prompt nobody agreed with (``agrees`` was false): until then only its first
        block can match, and that is recorded now."""
        if self.ttl_s == 0:
            return
        self.expire(now)
        bit = self._slots.bit(worker_id)
        mask = self._holders.get(first_block_hash, 0) | bit
        self._holders[first_block_hash] = self._masks.canon(mask)
        route = _Route(now + self.ttl_s, bit, [first_block_hash], complete)
        self._routes.append(route)
        self._deferred.setdefault(first_block_hash, []).append(route)
        self._entries += 1
        self._cap()

    def record(self, worker_id: str, block_hashes: Sequence[int], now: float, start: int = 0) -> None:
        """Remember that ``worker_id`` was given a prompt with these chained hashes, and
        already held (or was predicted to hold) its first ``start`` blocks."""
        if self.ttl_s == 0:
            return
        kept = self.anchors(block_hashes, start)
        if not kept:
            return
        self.expire(now)                  # before: an expiring placement must not clear these anchors
        bit = self._slots.bit(worker_id)
        holders, masks = self._holders, self._masks
        get, canon_get = holders.get, masks.get
        for h in kept:
            mask = get(h, 0) | bit
            holders[h] = canon_get(mask) or masks.canon(mask)
        self._routes.append(_Route(now + self.ttl_s, bit, kept))
        self._entries += len(kept)
        self._cap()

    def overlaps(self, block_hashes: Sequence[int], now: float) -> dict[str, int]:
        """Per worker: how many leading blocks of ``block_hashes`` agree with a prompt placed
        there within ``ttl_s``, to its deepest recorded anchor (``k + 1`` for anchor ``k``)."""
        self.expire(now)
        if block_hashes and self._deferred and block_hashes[0] in self._deferred:
            self._complete(block_hashes[0])
        return _anchor_depths(self._holders, block_hashes, self.dense, self.stride, self._slots)

    def _complete(self, first_block_hash: int) -> None:
        """Record the rest of the anchors of the deferred placements starting with this block."""
        holders, masks = self._holders, self._masks
        for route in self._deferred.pop(first_block_hash):
            complete, route.complete = route.complete, None
            kept = self.anchors(complete(), 1)          # the first block is recorded already
            for h in kept:
                holders[h] = masks.canon(holders.get(h, 0) | route.bit)
            route.block_hashes.extend(kept)
            self._entries += len(kept)
        self._cap()

    def _cap(self) -> None:
        while self._entries > self.max_entries:
            self._forget(self._routes.popleft())

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

    def num_placements(self) -> int:
        """Live placements recorded (deferred or not)."""
        return len(self._routes)

    def num_entries(self) -> int:
        """Recorded anchors of live placements (the unit of ``max_entries``; completing a
        deferred placement adds its anchors)."""
        return self._entries

    def _forget(self, route: _Route) -> None:
        if route.complete is not None:            # deferred and never completed
            waiting = self._deferred[route.block_hashes[0]]
            waiting.remove(route)
            if not waiting:
                del self._deferred[route.block_hashes[0]]
        holders, masks, bit = self._holders, self._masks, route.bit
        get = holders.get
        for h in route.block_hashes:
            mask = get(h)
            if mask == bit:                   # the common case, inlined: only this worker predicted it
                del holders[h]
            elif mask is not None:
                _drop_bit(holders, masks, h, bit)
        self._entries -= len(route.block_hashes)
