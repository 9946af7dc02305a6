"""Where a request runs: placement policies behind one small interface.

A policy sees a ``RequestView`` (what a policy may look at: prompt token
ids, cache salt and block size are there for KV-aware placement) and the
model's available workers. ``choose`` returns one of them and may record
the decision (a turn counter, the ``kv`` policy's load ledger and recent
placements); ``explain`` answers the same question for a dry run, with every
candidate's terms, and records nothing. Policies are looked up by name in
``POLICIES``; adding one is adding an entry.

The ``kv`` policy (``KvAware``) and its formula
-----------------------------------------------
For a prompt of ``T`` tokens in blocks of ``B`` tokens, and each candidate
worker ``w``::

    P        = ceil(T / B)                          prompt blocks
    cached   = leading prompt blocks w has cached   (KV events, kvstore.PrefixIndex)
    predicted= max(cached, leading prompt blocks shared with a prompt this router gave w in
               the last predict_ttl_s seconds)      (kvstore.RecentPrefixes: read at each of the
               first 16 blocks, then every 8th and the last, so exact up to 16 blocks and up to
               7 blocks short past them until the events arrive)
    overlap  = min(predicted, (T - 1) // B)         the last token is always recomputed
    queued   = own prefill blocks + others' prefill blocks
    shared   = min(queued, overlap - min(cached, overlap))
               this prompt's blocks already queued for prefill on w: computed once for both
    prefill  = queued - shared + P - overlap_credit * overlap
    decode   = own decode blocks + others' decode blocks
    cost     = prefill_weight * prefill + decode_weight * decode        (lower wins)

"own" blocks come from this router's load ledger (load_ledger.py): exact and
immediate for its own requests. "others'" blocks are what the worker's latest
report (``ceil(waiting_prefill_tokens / B)``, ``kv_blocks_used``) held beyond
the most this router's own load there can have been since that report was
taken, i.e. its own load right after the decision before the report was
first read (own load grows only at a decision): other routers' requests
(and the output blocks the ledger cannot foresee). The report is up to a
heartbeat old, so it is never trusted for this router's own requests: read
against the own load of the moment it is first read instead, every request
of ours that finished, or finished its prefill, between the report and that
moment looked like another router's for a whole heartbeat, and idle workers
were passed over (measured without prefix reuse: +22 % TTFT p50 against
``least_loaded`` when the report was trusted outright, +8 % with that
baseline, level with this one). Without any overlap the cost is thus a pure
load ranking: queued prefill blocks first, then decode blocks. The decode term counts each running
request's blocks separately (attention reads a shared prefix once per
sequence), so it grows with every request a worker takes even when they
share one prefix: with the default weights a worker holding a whole prompt
loses once it decodes about ``prefill_weight / decode_weight`` (= 4)
prompt-sized requests more than an idle one. That is the guard against
hot-spotting: cache affinity never outweighs an unbounded load skew.

``temperature`` 0 picks the lowest cost (ties rotate); above 0 the worker is
sampled with probability ``softmax(-(cost - min) / (max - min) / temperature)``.
Every decision can be logged as the formula with its terms
(``log_decisions``, else at DEBUG).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple, Protocol, Sequence

from kvmesh.v1 import admin_pb2
from kvstore.hashing import HashNamespace, hash_block, max_cacheable_prompt_blocks
from orchestrator.kv_state import KvSettings, KvState
from orchestrator.workers import WorkerHandle, WorkerLoad

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestView:
    request_id: str
    model: str
    prompt_token_ids: Sequence[int]
    cache_salt: str
    block_size: int


@dataclass(frozen=True)
class WorkerScore:
    """One candidate's terms in a decision (fields as in admin.proto's WorkerRouteScore)."""

    worker_id: str
    overlap_blocks: int = 0
    cached_blocks: int = 0
    predicted_blocks: int = 0
    cost: float = 0.0
    prefill_blocks: float = 0.0
    decode_blocks: float = 0.0
    probability: float = 0.0

    def to_pb(self) -> admin_pb2.WorkerRouteScore:
        return admin_pb2.WorkerRouteScore(
            worker_id=self.worker_id, overlap_blocks=self.overlap_blocks, cached_blocks=self.cached_blocks,
            predicted_blocks=self.predicted_blocks, cost=self.cost, prefill_blocks=self.prefill_blocks,
            decode_blocks=self.decode_blocks, probability=self.probability)

    def to_json(self) -> dict[str, object]:
        return {"worker_id": self.worker_id, "overlap_blocks": self.overlap_blocks,
                "cached_blocks": self.cached_blocks, "predicted_blocks": self.predicted_blocks,
                "cost": self.cost, "prefill_blocks": self.prefill_blocks, "decode_blocks": self.decode_blocks,
                "probability": self.probability}


@dataclass(frozen=True)
class PlacementDecision:
    """What a policy chose and why; ``scores`` cheapest first."""

    policy: str
    chosen: WorkerHandle
    prompt_tokens: int
    block_size: int
    scores: tuple[WorkerScore, ...]
    formula: str = ""

    @property
    def prompt_blocks(self) -> int:
        return -(-self.prompt_tokens // self.block_size)

    def to_pb(self, model: str) -> admin_pb2.DryRunRouteResponse:
        return admin_pb2.DryRunRouteResponse(
            model=model, policy=self.policy, chosen_worker_id=self.chosen.worker_id,
            prompt_tokens=self.prompt_tokens, prompt_blocks=self.prompt_blocks, block_size=self.block_size,
            workers=[s.to_pb() for s in self.scores], formula=self.formula)

    def to_json(self, model: str) -> dict[str, object]:
        return {"model": model, "policy": self.policy, "chosen_worker_id": self.chosen.worker_id,
                "prompt_tokens": self.prompt_tokens, "prompt_blocks": self.prompt_blocks,
                "block_size": self.block_size, "formula": self.formula,
                "workers": [s.to_json() for s in self.scores]}


class PlacementPolicy(Protocol):
    name: str

    def choose(self, request: RequestView, candidates: Sequence[WorkerHandle]) -> WorkerHandle:
        """One of ``candidates`` (never empty, all ``available``). Must not
        await or block: it runs on the event loop for every request."""
        ...

    def explain(self, request: RequestView, candidates: Sequence[WorkerHandle]) -> PlacementDecision:
        """What ``choose`` would do now, with every candidate's terms; records nothing."""
        ...


class _Turns:
    """A rotating tie-break counter that a dry run can read without advancing."""

    def __init__(self) -> None:
        self._n = 0

    def take(self) -> int:
        self._n += 1
        return self._n - 1

    def peek(self) -> int:
        return self._n


# --- simple policies ----------------------------------------------------------------------

def _overlap_scores(kv: KvState | None, request: RequestView, candidates: Sequence[WorkerHandle],
                    costs: Sequence[float], chosen: WorkerHandle) -> tuple[WorkerScore, ...]:
    """Scores for policies without a KV term: their cost, plus the overlaps for information."""
    cached: dict[str, int] = {}
    predicted: dict[str, int] = {}
    cap = max_cacheable_prompt_blocks(len(request.prompt_token_ids), request.block_size)
    if kv is not None and len(candidates) > 1:
        cached, predicted = kv.overlaps(kv.prompt_hashes(request), kv.clock())
    scores = [WorkerScore(w.worker_id, min(predicted.get(w.worker_id, 0), cap),
                          cached.get(w.worker_id, 0), predicted.get(w.worker_id, 0), float(c),
                          probability=1.0 if w is chosen else 0.0)
              for w, c in zip(candidates, costs)]
    return tuple(sorted(scores, key=lambda s: s.cost))


class LeastLoaded:
    """Lowest ``in_flight + num_waiting`` wins.

    ``in_flight`` is this router's own count (exact, never stale);
    ``num_waiting`` is the worker's last report and adds the queue other
    routers put there, so a worker that cannot admit more counts as fuller.
    Ties rotate, so equal workers share a burst.
    """

    name = "least_loaded"

    def __init__(self, kv: KvState | None = None) -> None:
        self._turns = _Turns()
        self._kv = kv

    def choose(self, request: RequestView, candidates: Sequence[WorkerHandle]) -> WorkerHandle:
        costs = self._costs(candidates)
        chosen = self._pick(candidates, costs, self._turns.take())
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("least_loaded %s -> %s; cost = in_flight + waiting: %s", request.request_id,
                         chosen.worker_id, ", ".join(
                             f"{w.worker_id}: {c} = {w.in_flight} + {w.load.num_waiting}"
                             for w, c in zip(candidates, costs)))
        return chosen

    def explain(self, request: RequestView, candidates: Sequence[WorkerHandle]) -> PlacementDecision:
        costs = self._costs(candidates)
        chosen = self._pick(candidates, costs, self._turns.peek())
        return PlacementDecision(self.name, chosen, len(request.prompt_token_ids), request.block_size,
                                 _overlap_scores(self._kv, request, candidates, costs, chosen),
                                 "cost = in_flight + num_waiting")

    @staticmethod
    def _costs(candidates: Sequence[WorkerHandle]) -> list[int]:
        return [w.in_flight + w.load.num_waiting for w in candidates]

    @staticmethod
    def _pick(candidates: Sequence[WorkerHandle], costs: list[int], turn: int) -> WorkerHandle:
        best = min(costs)
        tied = [w for w, c in zip(candidates, costs) if c == best]
        return tied[turn % len(tied)]


class RoundRobin:
    """Each request goes to the next worker in turn, ignoring load."""

    name = "round_robin"

    def __init__(self, kv: KvState | None = None) -> None:
        self._turns = _Turns()
        self._kv = kv

    def choose(self, request: RequestView, candidates: Sequence[WorkerHandle]) -> WorkerHandle:
        return candidates[self._turns.take() % len(candidates)]

    def explain(self, request: RequestView, candidates: Sequence[WorkerHandle]) -> PlacementDecision:
        chosen = candidates[self._turns.peek() % len(candidates)]
        return PlacementDecision(self.name, chosen, len(request.prompt_token_ids), request.block_size,
                                 _overlap_scores(self._kv, request, candidates, [0] * len(candidates), chosen))


class RandomChoice:
    """A uniformly random worker (seedable for tests)."""

    name = "random"

    def __init__(self, kv: KvState | None = None, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._kv = kv

    def choose(self, request: RequestView, candidates: Sequence[WorkerHandle]) -> WorkerHandle:
        return self._rng.choice(candidates)

    def explain(self, request: RequestView, candidates: Sequence[WorkerHandle]) -> PlacementDecision:
        state = self._rng.getstate()        # a draw that leaves the generator as it was
        chosen = self._rng.choice(candidates)
        self._rng.setstate(state)
        scores = _overlap_scores(self._kv, request, candidates, [0] * len(candidates), chosen)
        share = 1.0 / len(candidates)
        return PlacementDecision(self.name, chosen, len(request.prompt_token_ids), request.block_size,
                                 tuple(replace(s, probability=share) for s in scores))


# --- KV-aware ---------------------------------------------------------------------------------

def _first_block_hash(request: RequestView) -> int | None:
    """The hash of the prompt's first full block (None if it has none), as the engine computes it."""
    bs = request.block_size
    if len(request.prompt_token_ids) < bs:
        return None
    namespace = HashNamespace(model=request.model, cache_salt=request.cache_salt)
    return hash_block(namespace.root_hash(), request.prompt_token_ids[:bs])


class _Chain:
    """A prompt's block hashes, computed on the first call and kept (a deferred placement's)."""

    __slots__ = ("_kv", "_request", "_hashes")

    def __init__(self, kv: KvState, request: RequestView) -> None:
        self._kv: KvState | None = kv
        self._request: RequestView | None = request
        self._hashes: list[int] = []

    def __call__(self) -> list[int]:
        if self._kv is not None:
            self._hashes = self._kv.prompt_hashes(self._request)
            self._kv = self._request = None
        return self._hashes

    def last(self) -> int | None:
        """The last full block's hash: the one whose "stored" event ends the prefill."""
        hashes = self()
        return hashes[-1] if hashes else None


class _Row(NamedTuple):
    """The kv formula's terms for one candidate."""

    cached: int
    predicted: int
    overlap: int
    prefill: float
    decode: float
    cost: float


class KvAware:
    """The ``kv`` policy: prefix overlap against prefill queue and decode load (module docstring)."""

    name = "kv"

    def __init__(self, kv: KvState | None = None, rng: random.Random | None = None) -> None:
        self._kv = kv or KvState()
        self._settings = self._kv.settings
        self._rng = rng or random.Random()
        self._turns = _Turns()
        # worker id -> (a load report, this router's own prefill and decode it is read against)
        self._baselines: dict[str, tuple[WorkerLoad, int, int]] = {}
        # worker id -> this router's own (prefill, decode) right after the last decision: the
        # most it can have held since, as own load only grows at a decision
        self._own_after: dict[str, tuple[int, int]] = {}

    def choose(self, request: RequestView, candidates: Sequence[WorkerHandle]) -> WorkerHandle:
        kv = self._kv
        now = kv.clock()
        blocks = -(-len(request.prompt_token_ids) // request.block_size)
        if len(candidates) == 1:             # nothing to weigh: skip hashing, keep the ledger exact
            chosen = candidates[0]
            own = kv.ledger.own_load(chosen, now)  # sweeps ended leases
            kv.ledger.add(chosen.worker_id, request.request_id, blocks=blocks, prefill_blocks=blocks,
                          done_hash=None, now=now)
            self._own_after[chosen.worker_id] = (own.prefill_blocks + blocks, own.decode_blocks + blocks)
            return chosen
        first = _first_block_hash(request)
        if first is not None and not kv.index.holds(first) and not kv.recent.agrees(first, now):
            # No worker holds, or was given, this prompt's first block, so none shares any of it
            # (hashes are chained): decide on load alone; the rest of the chain is hashed only if
            # a later prompt starts with the same block, or when the prefill-done check needs it
            # (once the worker's events show it storing the first block).
            chain = _Chain(kv, request)
            rows = self._terms(request, candidates, {}, {}, now, own_after=self._own_after)
            index, probabilities = self._select([r[5] for r in rows], self._turns.take())
            chosen, row = candidates[index], _Row(*rows[index])
            kv.ledger.add(chosen.worker_id, request.request_id, blocks=blocks, prefill_blocks=blocks,
                          done_hash=None, now=now, done_hash_of=chain.last, first_hash=first)
            kv.recent.record_deferred(chosen.worker_id, first, chain, now)
        else:
            hashes = kv.prompt_hashes(request)
            cached_of, predicted_of = kv.overlaps(hashes, now)
            rows = self._terms(request, candidates, cached_of, predicted_of, now, own_after=self._own_after)
            index, probabilities = self._select([r[5] for r in rows], self._turns.take())
            chosen, row = candidates[index], _Row(*rows[index])
            kv.ledger.add(chosen.worker_id, request.request_id, blocks=blocks,
                          prefill_blocks=blocks - row.overlap,
                          done_hash=hashes[-1] if len(hashes) > row.overlap else None, now=now)
            kv.recent.record(chosen.worker_id, hashes, now, start=row.predicted)   # it holds (or will) the rest
        own_prefill, own_decode = self._own_after[chosen.worker_id]
        self._own_after[chosen.worker_id] = (own_prefill + blocks - row.overlap, own_decode + blocks)
        if self._settings.log_decisions or logger.isEnabledFor(logging.DEBUG):
            self._log(request, self._decision(request, candidates, rows, index, probabilities))
        return chosen

    def explain(self, request: RequestView, candidates: Sequence[WorkerHandle]) -> PlacementDecision:
        kv = self._kv
        now = kv.clock()
        rows = self._terms(request, candidates, *kv.overlaps(kv.prompt_hashes(request), now), now)
        rng_state = self._rng.getstate()
        index, probabilities = self._select([r[5] for r in rows], self._turns.peek())
        self._rng.setstate(rng_state)
        return self._decision(request, candidates, rows, index, probabilities)

    def _terms(self, request: RequestView, candidates: Sequence[WorkerHandle], cached_of: dict[str, int],
               predicted_of: dict[str, int], now: float, own_after: dict[str, tuple[int, int]] | None = None
               ) -> list[tuple[int, int, int, float, float, float]]:
        """Every candidate's terms as ``_Row`` fields, in candidate order (the hot path: plain
        tuples, no calls per worker), from the (cached, predicted) overlaps of ``kv.overlaps``.
        ``own_after`` (``choose`` only) receives each candidate's own load as read now;
        ``choose`` then adds the new lease to the chosen one."""
        s, kv = self._settings, self._kv
        bs = request.block_size
        num_tokens = len(request.prompt_token_ids)
        prompt_blocks = -(-num_tokens // bs)
        cap = max_cacheable_prompt_blocks(num_tokens, bs)
        cached_get, predicted_get = cached_of.get, predicted_of.get
        pw, dw, credit = s.prefill_weight, s.decode_weight, s.overlap_credit
        rows = []
        baselines, last_own = self._baselines, self._own_after
        if len(baselines) > 2 * len(candidates) + 16:    # forget workers that left
            live = {w.worker_id for w in candidates}
            self._baselines = baselines = {k: v for k, v in baselines.items() if k in live}
            self._own_after = last_own = {k: v for k, v in last_own.items() if k in live}
            if own_after is not None:
                own_after = last_own
        for w, own in zip(candidates, kv.ledger.own_loads(candidates, now)):
            wid = w.worker_id
            own_prefill, own_decode = own
            cached = cached_get(wid, 0)
            predicted = predicted_get(wid, 0)
            overlap = predicted if predicted < cap else cap
            load = w.load
            base = baselines.get(wid)
            if base is None or base[0] is not load:
                # A report new since the last decision was taken at some moment since then;
                # this router's own load was at most what it was right after that decision
                # (it only grows at a decision), so read the report against that: a request
                # of ours that finished (or finished prefill) after the report was taken is
                # not mistaken for another router's for a whole heartbeat.
                peak = last_own.get(wid, own)
                base = baselines[wid] = (load, max(peak[0], own_prefill), max(peak[1], own_decode))
            if own_after is not None:
                own_after[wid] = own
            others_prefill = -(-load.waiting_prefill_tokens // bs) - base[1]
            others_decode = load.kv_blocks_used - base[2]
            queued = own_prefill + (others_prefill if others_prefill > 0 else 0)
            shared = overlap - (cached if cached < overlap else overlap)
            if shared > queued:
                shared = queued
            prefill = queued - shared + prompt_blocks - credit * overlap
            decode = own_decode + (others_decode if others_decode > 0 else 0)
            rows.append((cached, predicted, overlap, prefill, decode, pw * prefill + dw * decode))
        return rows

    def _decision(self, request: RequestView, candidates: Sequence[WorkerHandle], rows: list[tuple], index: int,
                  probabilities: list[float]) -> PlacementDecision:
        scores = []
        for w, row, p in zip(candidates, rows, probabilities):
            r = _Row(*row)
            scores.append(WorkerScore(w.worker_id, r.overlap, r.cached, r.predicted, r.cost, r.prefill, r.decode, p))
        scores.sort(key=lambda sc: sc.cost)
        return PlacementDecision(self.name, candidates[index], len(request.prompt_token_ids), request.block_size,
                                 tuple(scores), self._settings.formula)

    def _select(self, costs: list[float], turn: int) -> tuple[int, list[float]]:
        """The chosen index and each candidate's probability of being chosen."""
        best = min(costs)
        if self._settings.temperature == 0:
            tied = [i for i, c in enumerate(costs) if c - best <= 1e-9 * max(1.0, abs(best))]
            chosen = tied[turn % len(tied)]
            return chosen, [1.0 if i == chosen else 0.0 for i in range(len(costs))]
        spread = max(costs) - best
        logits = [-(c - best) / spread / self._settings.temperature if spread > 0 else 0.0 for c in costs]
        top = max(logits)
        weights = [math.exp(x - top) for x in logits]
        total = sum(weights)
        probabilities = [x / total for x in weights]
        chosen = self._rng.choices(range(len(costs)), weights=weights)[0]
        return chosen, probabilities

    def _log(self, request: RequestView, d: PlacementDecision) -> None:
        s = self._settings
        level = logging.INFO if s.log_decisions else logging.DEBUG
        logger.log(level, "kv %s -> %s; P=%d blocks; %s: %s", request.request_id, d.chosen.worker_id,
                   d.prompt_blocks, s.formula, "; ".join(
                       "%s: %.1f = %g * %.1f + %g * %.1f (overlap %d: cached %d, predicted %d)" % (
                           sc.worker_id, sc.cost, s.prefill_weight, sc.prefill_blocks, s.decode_weight,
                           sc.decode_blocks, sc.overlap_blocks, sc.cached_blocks, sc.predicted_blocks)
                       for sc in d.scores))


POLICIES: dict[str, Callable[[KvState | None], PlacementPolicy]] = {
    KvAware.name: KvAware,
    LeastLoaded.name: LeastLoaded,
    RandomChoice.name: RandomChoice,
    RoundRobin.name: RoundRobin,
}


def make_policy(name: str, kv: KvState | None = None) -> PlacementPolicy:
    """A new policy by name, reading ``kv`` (the router's KV state) when it needs it;
    ``ValueError`` lists the valid names."""
    factory = POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown placement policy {name!r}; valid: {', '.join(sorted(POLICIES))}")
    return factory(kv)
