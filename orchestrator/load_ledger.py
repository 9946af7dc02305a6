"""Router-side load tracking: the work this router itself has put on each worker.

Worker heartbeats lag by an interval and miss a burst that arrives between
two of them, so the ``kv`` policy counts its own placements (as Dynamo does):
each placement opens a *lease* on the chosen worker with

* ``blocks``: the KV blocks the request holds there while it decodes,
  ``ceil(prompt_tokens / block_size)`` (its output is not known in advance;
  the worker-reported ``kv_blocks_used`` corrects for it, see placement.py);
* ``prefill_blocks``: the prompt blocks the worker must compute for it
  (those not cached there at placement).

A lease stops counting as prefill when the worker's KV events report its
last full prompt block stored (the prefill reached the end of the prompt),
when ``prefill_timeout_s`` passed, or when the request ended. That block's
hash may be given as ``done_hash_of``, a callable asked for it only once the
prefill has started storing (the kv policy then hashes a prompt nobody
shares after placing it, off the placement path): on a "stored" event from
the worker, when the prefix index (``holds``) shows it holding the lease's
``first_hash``. At most ``max_hashed_per_event`` leases are asked per event,
oldest first, so one event never pays for a whole backlog on the event loop;
the rest wait for the worker's next events (each started prefill stores at
least one chain, so the backlog drains as prefills start). A lease asked late
whose last block is already held is done at once, so the cap never loses a
prefill's end. It ends when
the request is no longer running on this router (``is_running``) or is
placed again (a retry). Ending is noticed lazily: a worker's leases are swept
only when their count differs from the worker's ``in_flight`` (this router's
exact count of Submit calls running there), so a decision costs O(workers)
while nothing ended.

All methods run on the event loop; nothing here awaits.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, NamedTuple, Sequence

from orchestrator.workers import WorkerHandle


@dataclass(eq=False)
class _Lease:
    request_id: str
    worker_id: str
    blocks: int
    prefill_blocks: int
    done_hash: int | None
    placed_at: float
    done_hash_of: Callable[[], int | None] | None = None
    first_hash: int | None = None       # with done_hash_of: the block whose storing starts the prefill


@dataclass
class _WorkerLeases:
    leases: dict[str, _Lease] = field(default_factory=dict)
    prefilling: OrderedDict[str, _Lease] = field(default_factory=OrderedDict)   # placement order
    by_done_hash: dict[int, set[str]] = field(default_factory=dict)
    unhashed: dict[str, _Lease] = field(default_factory=dict)       # prefilling, done hash not asked yet
                                                                    # (placement order)
    prefill_blocks: int = 0
    decode_blocks: int = 0

    def end_prefill(self, lease: _Lease) -> None:
        if self.prefilling.pop(lease.request_id, None) is None:
            return
        self.prefill_blocks -= lease.prefill_blocks
        self.unhashed.pop(lease.request_id, None)
        if lease.done_hash is not None:
            waiting = self.by_done_hash.get(lease.done_hash)
            if waiting is not None:
                waiting.discard(lease.request_id)
                if not waiting:
                    del self.by_done_hash[lease.done_hash]

    def end(self, lease: _Lease) -> None:
        self.end_prefill(lease)
        if self.leases.pop(lease.request_id, None) is not None:
            self.decode_blocks -= lease.blocks


class OwnLoad(NamedTuple):
    """This router's requests on one worker, in KV blocks."""

    prefill_blocks: int
    """Prompt blocks still to compute (placed, prefill not known to be done)."""
    decode_blocks: int
    """KV blocks held by its running requests (per request, shared prefixes counted per request)."""


_ZERO = (0, 0)


class LoadLedger:
    def __init__(self, prefill_timeout_s: float = 30.0,
                 is_running: Callable[[str], bool] | None = None,
                 holds: Callable[[str, int], bool] | None = None, max_hashed_per_event: int = 2) -> None:
        """``holds(worker_id, block_hash)``: whether the worker's KV events (applied before
        ``on_stored`` is called) say it holds the block; without it a deferred lease's hash
        is asked on the worker's next "stored" event, whatever it stored."""
        if prefill_timeout_s <= 0:
            raise ValueError(f"prefill_timeout_s must be > 0, got {prefill_timeout_s}")
        if max_hashed_per_event < 1:
            raise ValueError(f"max_hashed_per_event must be >= 1, got {max_hashed_per_event}")
        self.prefill_timeout_s = prefill_timeout_s
        self.max_hashed_per_event = max_hashed_per_event
        self._is_running = is_running or (lambda request_id: True)
        self._holds = holds
        self._workers: dict[str, _WorkerLeases] = {}
        self._where: dict[str, _Lease] = {}      # request id -> its current lease
        self._placed: deque[_Lease] = deque()    # every lease in placement order, for the prefill timeout

    def bind(self, is_running: Callable[[str], bool]) -> None:
        """Say how to tell whether a request still runs (the router's own table)."""
        self._is_running = is_running

    def add(self, worker_id: str, request_id: str, *, blocks: int, prefill_blocks: int,
            done_hash: int | None, now: float, done_hash_of: Callable[[], int | None] | None = None,
            first_hash: int | None = None) -> None:
        """Open a lease for ``request_id`` on ``worker_id``, ending any earlier one (a retry).
        ``done_hash_of`` (instead of ``done_hash``) gives the hash once the worker holds
        ``first_hash`` (the prompt's first block; None: on its next "stored" event)."""
        old = self._where.get(request_id)
        if old is not None:
            self._end(old)
        lease = _Lease(request_id, worker_id, blocks, prefill_blocks, done_hash, now, done_hash_of, first_hash)
        w = self._workers.setdefault(worker_id, _WorkerLeases())
        w.leases[request_id] = lease
        w.decode_blocks += blocks
        w.prefilling[request_id] = lease
        w.prefill_blocks += prefill_blocks
        if done_hash is not None:
            w.by_done_hash.setdefault(done_hash, set()).add(request_id)
        elif done_hash_of is not None:
            w.unhashed[request_id] = lease
        self._where[request_id] = lease
        self._placed.append(lease)

    def own_load(self, worker: WorkerHandle, now: float) -> OwnLoad:
        """This router's load on ``worker`` now (ending timed-out prefills and
        sweeping ended leases first)."""
        return OwnLoad(*self.own_loads((worker,), now)[0])

    def own_loads(self, workers: Sequence[WorkerHandle], now: float) -> list[tuple[int, int]]:
        """``own_load`` of each worker, in order: one call per decision, O(workers)
        while no lease ended."""
        self._expire_prefills(now)
        tracked = self._workers
        out = []
        for worker in workers:
            w = tracked.get(worker.worker_id)
            if w is None:
                out.append(_ZERO)
                continue
            if len(w.leases) != worker.in_flight:
                self._sweep(w)
            out.append((w.prefill_blocks, w.decode_blocks))     # a plain tuple: this runs per worker
        return out

    def _expire_prefills(self, now: float) -> None:
        placed, deadline = self._placed, now - self.prefill_timeout_s
        while placed and placed[0].placed_at <= deadline:
            lease = placed.popleft()
            w = self._workers.get(lease.worker_id)
            if w is not None and w.prefilling.get(lease.request_id) is lease:
                w.end_prefill(lease)

    def on_stored(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        """A worker stored these blocks: leases waiting for one of them are done prefilling."""
        w = self._workers.get(worker_id)
        if w is None:
            return
        if w.unhashed:
            self._ask_started(worker_id, w)
        if not w.by_done_hash:
            return
        for h in block_hashes:
            waiting = w.by_done_hash.get(h)
            if waiting:
                for rid in list(waiting):
                    w.end_prefill(w.leases[rid])

    def _ask_started(self, worker_id: str, w: _WorkerLeases) -> None:
        """Ask the done hash of up to ``max_hashed_per_event`` unhashed leases whose prefill
        has started storing, oldest first (a check per unhashed lease: one dict lookup)."""
        holds, budget = self._holds, self.max_hashed_per_event
        started = []
        for lease in w.unhashed.values():
            if holds is None or lease.first_hash is None or holds(worker_id, lease.first_hash):
                started.append(lease)
                if len(started) == budget:
                    break
        for lease in started:
            del w.unhashed[lease.request_id]
            done_hash_of, lease.done_hash_of = lease.done_hash_of, None
            done = lease.done_hash = done_hash_of()
            if done is None:
                continue
            if holds is not None and holds(worker_id, done):   # stored already (asked late): done
                w.end_prefill(lease)
            else:
                w.by_done_hash.setdefault(done, set()).add(lease.request_id)

    def drop_worker(self, worker_id: str) -> None:
        w = self._workers.pop(worker_id, None)
        if w is None:
            return
        for rid, lease in w.leases.items():
            if self._where.get(rid) is lease:
                del self._where[rid]

    def num_leases(self) -> int:
        return len(self._where)

    def _sweep(self, w: _WorkerLeases) -> None:
        for lease in [lease for rid, lease in w.leases.items() if not self._is_running(rid)]:
            self._end(lease)

    def _end(self, lease: _Lease) -> None:
        w = self._workers.get(lease.worker_id)
        if w is not None:
            w.end(lease)
        if self._where.get(lease.request_id) is lease:
            del self._where[lease.request_id]
