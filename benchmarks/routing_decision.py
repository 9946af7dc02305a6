"""Cost of one KV-aware routing decision, and of the router's prefix index.

Builds the router-side state of a large cluster in-process: ``--workers``
synthetic workers, each a real ``BlockManager`` (``--blocks-per-worker``
blocks of ``--block-size`` tokens) fed a stream of requests drawn from
``--docs`` shared documents (Zipf popularity) plus unique questions, so its
KV events (stored, and removed by LRU eviction once the pool is full) are
the engine's own. The events go through the router's ``PrefixIndex`` as the
KV indexer applies them. Then ``--decisions`` placements of
``--prompt-tokens``-token prompts are timed through ``KvAware.choose``
(prompt hashing, both index lookups, the load ledger and the scoring of
every worker), with ``--in-flight`` requests kept running so the ledger has
work to track. Reports the decision time percentiles, the hashing a decision defers
(``deferred``: a prompt no worker shares is hashed past its first block only
when the worker's events show it storing that block, and the ledger asks for its
last block's hash: timed as the "stored" event of the first block, on the
event loop like the decision but apart from it), a breakdown, event
application throughput and the index's memory (tracemalloc).

Usage: python benchmarks/routing_decision.py [--workers 64] [--prompt-tokens 8192] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import time
import tracemalloc
from collections import deque

from kvmesh.v1 import worker_pb2
from kvstore.hashing import HashNamespace, block_hashes, hash_block
from orchestrator.kv_state import KvSettings, KvState
from orchestrator.placement import KvAware, RequestView
from orchestrator.workers import WorkerHandle
from worker.engine.block_manager import BlockManager
from worker.engine.sequence import Sequence
from worker.engine.types import AllBlocksCleared, BlockRemoved, BlockStored, EngineRequest, SamplingOptions

MODEL = "bench-model"


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


class Workload:
    """Prompts = one of ``docs`` documents (Zipf) + a unique question."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.rng = random.Random(args.seed)
        self.doc_tokens = args.prompt_tokens - args.question_tokens
        # tuples: the garbage collector stops tracking them, as it would a router's
        # transient prompts, so its pauses reflect the router and not this harness
        self.docs = [tuple(self.rng.randrange(50_000) for _ in range(self.doc_tokens)) for _ in range(args.docs)]
        self.weights = [1 / (i + 1) ** args.zipf for i in range(args.docs)]
        self.question_tokens = args.question_tokens

    def prompt(self) -> list[int]:
        if not self.docs:                                # --docs 0: no reuse at all
            return [self.rng.randrange(50_000) for _ in range(self.doc_tokens + self.question_tokens)]
        doc = self.rng.choices(self.docs, weights=self.weights)[0]
        return [*doc, *(self.rng.randrange(50_000) for _ in range(self.question_tokens))]


def feed_worker(bm: BlockManager, workload: Workload, num_requests: int, apply) -> int:
    """Run ``num_requests`` prompts through a real block manager; hand its events to ``apply``."""
    events = 0
    for i in range(num_requests):
        req = EngineRequest(f"sim{i}", tuple(workload.prompt()), SamplingOptions())
        seq = Sequence(request=req, arrival=i, max_tokens=1, namespace=HashNamespace(model=MODEL))
        match = bm.match_prefix(seq)
        if not bm.allocate(seq, seq.num_tokens - match.num_tokens, match):
            continue
        seq.num_computed_tokens = seq.num_tokens
        bm.register_computed_blocks(seq)
        bm.free(seq)
        for ev in bm.drain_events():
            apply(ev)
            events += 1
    return events


def to_pb(event_id: int, ev) -> bytes:
    pb = worker_pb2.KvEvent(event_id=event_id)
    if isinstance(ev, BlockStored):
        pb.stored.block_hashes.extend(ev.block_hashes)
    elif isinstance(ev, BlockRemoved):
        pb.removed.block_hashes.extend(ev.block_hashes)
    elif isinstance(ev, AllBlocksCleared):
        pb.cleared.SetInParent()
    return pb.SerializeToString()


def apply_pb(index, worker_id: str, data: bytes) -> None:
    """What KvIndexer does with each event it receives: parse, then apply."""
    ev = worker_pb2.KvEvent.FromString(data)
    kind = ev.WhichOneof("kind")
    if kind == "stored":
        index.apply_stored(worker_id, ev.event_id, ev.stored.block_hashes)
    elif kind == "removed":
        index.apply_removed(worker_id, ev.event_id, ev.removed.block_hashes)
    else:
        index.apply_cleared(worker_id, ev.event_id)


def build(args: argparse.Namespace) -> tuple[KvState, list[WorkerHandle], Workload, dict[str, float]]:
    workload = Workload(args)
    kv = KvState(KvSettings())
    index = kv.index
    handles = [WorkerHandle(f"w{i:02d}", f"w{i}:1", MODEL, channel=None, stub=None) for i in range(args.workers)]
    applied = 0
    apply_s = 0.0
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for h in handles:
        wid = h.worker_id
        index.add_worker(wid, args.blocks_per_worker + 1)   # + 1: room for time_decisions' stored event
        wire: list[bytes] = []
        bm = BlockManager(args.blocks_per_worker, args.block_size)
        feed_worker(bm, workload, args.requests_per_worker, lambda ev: wire.append(to_pb(len(wire) + 1, ev)))
        t = time.perf_counter()
        for data in wire:
            apply_pb(index, wid, data)
        apply_s += time.perf_counter() - t
        applied += len(wire)
        assert index.blocks_of(wid) == frozenset(bm.cached_block_hashes())   # the index is exact
        del bm, wire                                     # only the index stays allocated
    gc.collect()
    index_bytes = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    stats = {"events": applied, "events_per_s_traced": applied / apply_s if apply_s else 0.0,
             "entries": index.num_entries(), "blocks": index.num_blocks(),
             "traced_bytes": index_bytes, "approx_bytes": index.approx_bytes()}
    return kv, handles, workload, stats


def events_per_second(args: argparse.Namespace, workload: Workload) -> float:
    """Event application throughput without tracemalloc's overhead (one worker)."""
    kv = KvState(KvSettings())
    kv.index.add_worker("w", args.blocks_per_worker)
    wire: list[bytes] = []
    feed_worker(BlockManager(args.blocks_per_worker, args.block_size), workload, args.requests_per_worker * 2,
                lambda ev: wire.append(to_pb(len(wire) + 1, ev)))
    t = time.perf_counter()
    for data in wire:
        apply_pb(kv.index, "w", data)
    return len(wire) / (time.perf_counter() - t)


def time_decisions(args: argparse.Namespace, kv: KvState, handles: list[WorkerHandle],
                   workload: Workload) -> dict[str, list[float]]:
    policy = KvAware(kv, rng=random.Random(args.seed))
    running: set[str] = set()
    kv.ledger.bind(running.__contains__)
    in_flight: deque[tuple[str, WorkerHandle]] = deque()
    total, hashing, lookup, deferred = [], [], [], []
    index, root = kv.index, HashNamespace(model=MODEL).root_hash()
    for i in range(args.decisions + args.warmup):
        prompt = workload.prompt()                       # as a tokenizer would return it: a fresh list
        view = RequestView(f"q{i}", MODEL, prompt, "", args.block_size)
        if i >= args.warmup:
            t2 = time.perf_counter()                     # the two main parts, measured apart (before the
            hashes = block_hashes(prompt, args.block_size, HashNamespace(model=MODEL))   # decision: a
            t3 = time.perf_counter()                     # lookup after it would complete its deferred
            kv.overlaps(hashes, kv.clock())              # prediction)
            t4 = time.perf_counter()
            hashing.append(t3 - t2)
            lookup.append(t4 - t3)
        t0 = time.perf_counter()
        worker = policy.choose(view, handles)
        t1 = time.perf_counter()
        # What the decision left for later: once the worker's events show it storing the prompt's
        # first block, the ledger asks for the last block's hash of a prompt placed without hashing
        # it (no worker shared it). That event, applied as KvIndexer does (index, then ledger) and
        # taken back afterwards so the index stays as built; only the ledger's part is timed.
        wid, first = worker.worker_id, hash_block(root, prompt[:args.block_size])
        fresh = not index.holds_on(wid, first)
        if fresh:
            index.apply_stored(wid, index.last_event_id(wid) + 1, [first])
        t5 = time.perf_counter()
        kv.ledger.on_stored(wid, [first])
        deferred.append(time.perf_counter() - t5)
        if fresh:
            index.apply_removed(wid, index.last_event_id(wid) + 1, [first])
        running.add(view.request_id)
        worker.in_flight += 1
        in_flight.append((view.request_id, worker))
        if len(in_flight) > args.in_flight:              # the oldest request finishes
            rid, w = in_flight.popleft()
            running.discard(rid)
            w.in_flight -= 1
        total.append(t1 - t0)
    return {"decision (first)": total[: args.warmup], "decision": total[args.warmup:],
            "deferred": deferred[args.warmup:], "hashing": hashing, "lookup": lookup}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=8192)
    p.add_argument("--question-tokens", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--blocks-per-worker", type=int, default=8192, help="KV pool per worker (131k tokens at 16)")
    p.add_argument("--docs", type=int, default=256, help="shared documents (0: every prompt unique)")
    p.add_argument("--zipf", type=float, default=0.8, help="popularity skew of the documents")
    p.add_argument("--requests-per-worker", type=int, default=40, help="requests replayed per worker to fill its cache")
    p.add_argument("--decisions", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=1000,
                   help="decisions before the steady-state ones (reported apart as 'decision (first)')")
    p.add_argument("--in-flight", type=int, default=512, help="requests kept running during the decisions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()

    t = time.perf_counter()
    kv, handles, workload, stats = build(args)
    build_s = time.perf_counter() - t
    stats["events_per_s"] = events_per_second(args, workload)
    times = time_decisions(args, kv, handles, workload)
    result = {"machine": f"{platform.processor() or platform.machine()}, {platform.python_implementation()} "
                         f"{platform.python_version()}", "args": vars(args), "build_s": build_s, **stats}
    print(f"cluster: {args.workers} workers x {args.blocks_per_worker} blocks (block size {args.block_size}); "
          f"{stats['events']} events replayed in {build_s:.1f}s")
    print(f"index: {stats['entries']:,} entries, {stats['blocks']:,} distinct blocks; traced "
          f"{stats['traced_bytes'] / 2**20:.1f} MiB = {stats['traced_bytes'] / max(stats['entries'], 1):.0f} B/entry "
          f"(approx_bytes says {stats['approx_bytes'] / 2**20:.1f} MiB); "
          f"parse + apply {stats['events_per_s']:,.0f} events/s (engine events: one per evicted block, "
          f"one per stored chain)")
    print(f"decisions: {args.warmup} + {args.decisions} prompts of {args.prompt_tokens} tokens, "
          f"{args.in_flight} in flight; prompt hash memo {kv.hasher.hits} hits / {kv.hasher.misses} misses "
          f"(segments); 'deferred' is the hashing a decision left to the stored event of its first block "
          f"(prompts no worker shared); 'hashing' and 'lookup' time block_hashes (no memo) and the "
          f"index walk alone")
    print(f"{'part':<10}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}   (µs)")
    for name, values in times.items():
        s = sorted(values)
        row = {"mean": statistics.fmean(s), "p50": percentile(s, 0.5), "p90": percentile(s, 0.9),
               "p99": percentile(s, 0.99), "max": s[-1]}
        result[name] = row
        print(f"{name:<10}" + "".join(f"{v * 1e6:>10.0f}" for v in row.values()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
