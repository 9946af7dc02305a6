"""KV-aware placement as pure state machines: the ``kv`` policy's formula and its
guards, the router's load ledger, and the prefix indexes against brute force.
No servers (the cluster tests are in test_kv_routing_cluster.py)."""

from __future__ import annotations

import math
import random

import pytest
from index_reference import brute_overlaps

from kvstore.hashing import CachedBlockHasher, HashNamespace, block_hashes
from kvstore.index import PrefixIndex, RecentPrefixes, WorkerSlots
from orchestrator.load_ledger import LoadLedger
from orchestrator.kv_state import KvSettings, KvState
from orchestrator.placement import KvAware, RandomChoice, RequestView, RoundRobin, make_policy
from orchestrator.workers import WorkerHandle, WorkerLoad

BS = 4


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def handle(worker_id: str, **load) -> WorkerHandle:
    w = WorkerHandle(worker_id, f"{worker_id}:1", "m", channel=None, stub=None)
    w.load = WorkerLoad(**load)
    return w


def view(tokens: list[int], rid: str = "r", salt: str = "") -> RequestView:
    return RequestView(rid, "m", tokens, salt, BS)


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(n)]


class Cluster:
    """A KvState + KvAware over hand-made handles; requests "run" until ``finish``."""

    def __init__(self, names: str = "abcd", **settings) -> None:
        self.clock = Clock()
        self.kv = KvState(KvSettings(**settings), clock=self.clock)
        self.running: set[str] = set()
        self.kv.ledger.bind(self.running.__contains__)
        self.policy = KvAware(self.kv, rng=random.Random(0))
        self.workers = [handle(n) for n in names]
        self.by_id = {w.worker_id: w for w in self.workers}
        self._ids = iter(range(10**9))
        for w in self.workers:
            self.kv.index.add_worker(w.worker_id, 10_000)

    def cache(self, worker_id: str, prompt: list[int], salt: str = "") -> None:
        hashes = self.kv.prompt_hashes(view(prompt, salt=salt))
        index = self.kv.index
        index.apply_stored(worker_id, index.last_event_id(worker_id) + 1, hashes)

    def stored(self, worker_id: str, hashes: list[int]) -> None:
        """A "stored" event from the worker, as KvIndexer handles it: the index, then the ledger."""
        index = self.kv.index
        index.apply_stored(worker_id, index.last_event_id(worker_id) + 1, hashes)
        self.kv.ledger.on_stored(worker_id, hashes)

    def place(self, prompt: list[int]) -> str:
        rid = f"r{next(self._ids)}"
        w = self.policy.choose(view(prompt, rid), self.workers)
        self.running.add(rid)
        w.in_flight += 1          # what Router._submit does right after placement
        return w.worker_id

    def finish_all(self) -> None:
        self.running.clear()
        for w in self.workers:
            w.in_flight = 0       # Router._submit's finally

    def explain(self, prompt: list[int]):
        return self.policy.explain(view(prompt, "dry"), self.workers)


# --- the formula -------------------------------------------------------------------------------------

def test_cached_hasher_equals_block_hashes():
    rng = random.Random(0)
    hasher = CachedBlockHasher(segment_blocks=4, max_segments=6)      # small: evictions happen
    shared = tokens(50, 100)
    for i in range(120):
        bs = rng.choice([1, 4, 16])
        prompt = shared[: rng.randrange(0, 101)] + tokens(i, rng.randrange(0, 90))
        ns = HashNamespace(model=rng.choice(["m", "n"]), cache_salt=rng.choice(["", "s"]))
        assert hasher(prompt, bs, ns) == block_hashes(prompt, bs, ns)
    assert hasher.hits > 0 and hasher.misses > 0 and len(hasher._memo) <= 6


def test_router_hashes_like_the_engine():
    kv = KvState()
    prompt = tokens(1, 37)
    for salt in ("", "tenant-1"):
        assert kv.prompt_hashes(RequestView("r", "m", prompt, salt, BS)) == \
            block_hashes(prompt, BS, HashNamespace(model="m", cache_salt=salt))
    assert kv.prompt_hashes(view(prompt)) != kv.prompt_hashes(view(prompt, salt="x"))


def test_prefers_the_worker_holding_the_prefix_and_reports_the_terms():
    c = Cluster()
    prompt = tokens(2, 40)                     # 10 blocks; at most 9 reusable
    c.cache("b", prompt[:32])                  # 8 blocks
    c.cache("c", prompt)                       # all 10, counted as 9
    d = c.explain(prompt)
    scores = {s.worker_id: s for s in d.scores}
    assert d.chosen.worker_id == "c"
    assert (scores["c"].cached_blocks, scores["c"].overlap_blocks, scores["c"].cost) == (10, 9, 1.0)
    assert (scores["b"].overlap_blocks, scores["b"].cost) == (8, 2.0)
    assert (scores["a"].overlap_blocks, scores["a"].cost) == (0, 10.0)
    assert [s.worker_id for s in d.scores][:2] == ["c", "b"] and d.formula.startswith("cost = 1 * prefill")
    assert c.place(prompt) == "c"


def test_a_salted_prompt_does_not_match_another_namespace():
    c = Cluster()
    prompt = tokens(3, 40)
    c.cache("b", prompt, salt="tenant-a")
    assert {s.worker_id: s.overlap_blocks for s in c.explain(prompt).scores}["b"] == 0


def test_load_beats_cache_affinity_under_skew():
    """The hot-spotting guard: a worker holding the whole prompt loses once its decode
    load exceeds an idle worker's by prefill_weight/decode_weight prompts."""
    prompt = tokens(4, 40)
    c = Cluster("ab")
    c.cache("b", prompt)
    c.by_id["b"].load = WorkerLoad(kv_blocks_used=20)        # 2 prompts' worth (reported)
    assert c.explain(prompt).chosen.worker_id == "b"         # 1 + 0.25 * 20 = 6 < 10
    c.by_id["b"].load = WorkerLoad(kv_blocks_used=60)
    d = c.explain(prompt)
    assert d.chosen.worker_id == "a"                          # 1 + 0.25 * 60 = 16 > 10
    assert {s.worker_id: s.decode_blocks for s in d.scores} == {"a": 0, "b": 60}


def test_one_hot_prefix_spreads_instead_of_piling_on_its_worker():
    c = Cluster()
    shared = tokens(5, 128)                                  # 32 blocks, cached on a only
    c.cache("a", shared)
    placed = [c.place(shared + tokens(100 + i, 16)) for i in range(24)]    # none finishes
    counts = {w: placed.count(w) for w in "abcd"}
    assert placed[0] == "a"
    assert all(counts[w] >= 4 for w in "abcd"), counts      # the load term spread them
    assert max(counts.values()) <= 9, counts


def test_a_burst_sharing_a_new_prefix_lands_together_before_any_kv_event():
    prefix = tokens(6, 64)                                   # 16 new blocks, cached nowhere
    burst = [prefix + tokens(200 + i, 4) for i in range(3)]
    c = Cluster()
    assert len({c.place(p) for p in burst}) == 1             # predicted from its own placements
    blind = Cluster(predict_ttl_s=0)
    assert len({blind.place(p) for p in burst}) == 3         # without prediction they scatter


def test_a_burst_sharing_a_long_new_prefix_lands_together_with_coarse_predictions():
    """Predictions keep every 8th hash (and the first and last): a burst sharing a 44-block
    prefix still lands on one worker, credited with the 40 blocks up to the last shared anchor."""
    prefix = tokens(20, 176)                                 # 44 blocks of 4, cached nowhere
    burst = [prefix + tokens(210 + i, 12) for i in range(3)]
    c = Cluster()
    assert len({c.place(p) for p in burst}) == 1
    d = {s.worker_id: s for s in c.explain(prefix + tokens(220, 12)).scores}
    assert max(s.predicted_blocks for s in d.values()) == 40
    blind = Cluster(predict_ttl_s=0)
    assert len({blind.place(p) for p in burst}) == 3


@pytest.mark.parametrize("shared,suffix", [(2, 1), (6, 1), (7, 1), (12, 1), (7, 4)])
def test_a_burst_sharing_a_short_new_prefix_lands_together(shared, suffix):
    """Predictions keep each of the first 16 blocks: a burst sharing a prefix of a few blocks
    is credited all of it before any KV event, so its second request joins the first (as with
    every block kept) instead of being credited one block and spread by the load term."""
    prefix = tokens(6, shared * BS)                          # cached nowhere
    burst = [prefix + tokens(200 + i, suffix * BS) for i in range(6)]
    c = Cluster()
    placed = [c.place(p) for p in burst]
    assert placed[1] == placed[0] and len(set(placed)) <= 3, placed
    assert max(s.predicted_blocks for s in c.explain(prefix + tokens(230, suffix * BS)).scores) == shared


def test_a_prompt_nobody_shares_is_hashed_past_its_first_block_only_when_needed():
    c = Cluster("ab")
    calls = []
    real = c.kv.prompt_hashes
    c.kv.prompt_hashes = lambda request: calls.append(request.request_id) or real(request)
    first, other = tokens(21, 40), tokens(22, 40)
    chain = block_hashes(first, BS, HashNamespace(model="m"))
    stored = c.stored
    w1 = c.place(first)
    w2 = c.place(other)
    assert calls == [] and c.kv.recent.num_entries() == 2     # one block each, recorded at once
    stored(w1, [123])                                          # another request's block: r0 not started
    assert calls == []
    stored(w1, chain[:3])                                      # r0's prefill stores its first blocks
    assert calls == ["r0"]                                     # done hash needed now
    assert c.kv.ledger.own_load(c.by_id[w1], c.clock()).prefill_blocks == 10     # not that block
    stored(w1, chain[3:])
    assert c.kv.ledger.own_load(c.by_id[w1], c.clock()).prefill_blocks == 0      # prefill done
    assert c.place(first[:20] + tokens(23, 20)) == w1          # shares 5 blocks: completes r0's prediction
    assert calls == ["r0", "r2"] and w2 != w1                  # r1 (nobody shares it) never hashed
    assert c.kv.ledger.own_load(c.by_id[w2], c.clock()).prefill_blocks == 10


def test_predictions_expire_and_events_take_over():
    prefix = tokens(7, 64)
    c = Cluster()
    first = c.place(prefix + [1, 2, 3, 4])
    c.clock.now += 6                                         # past predict_ttl_s (5 s)
    c.finish_all()                                           # ... and the request finished
    d = c.explain(prefix + [5, 6, 7, 8])
    assert all(s.predicted_blocks == 0 for s in d.scores)
    c.cache(first, prefix)                                   # the worker's stored event arrives
    assert c.explain(prefix + [5, 6, 7, 8]).chosen.worker_id == first


def test_finished_requests_stop_counting_as_load():
    c = Cluster("ab")
    prompt = tokens(8, 40)
    assert c.place(prompt) == "a"
    d = {s.worker_id: s for s in c.explain(tokens(9, 40)).scores}
    assert (d["a"].prefill_blocks, d["a"].decode_blocks) == (20, 10)      # queued 10 + own 10
    c.finish_all()
    d = {s.worker_id: s for s in c.explain(tokens(9, 40)).scores}
    assert (d["a"].prefill_blocks, d["a"].decode_blocks) == (10, 0)


def test_a_report_taken_before_our_own_request_moved_on_is_not_another_routers_load():
    """A heartbeat taken while our request was still prefilling (or running) and first read
    after it finished must not count as other routers' load for a whole heartbeat."""
    c = Cluster("ab")
    prompt = tokens(13, 40)                                  # 10 blocks
    assert c.place(prompt) == "a"
    a = c.by_id["a"]
    a.load = WorkerLoad(num_running=1, waiting_prefill_tokens=40, kv_blocks_used=10)   # taken mid-prefill
    c.stored("a", c.kv.prompt_hashes(view(prompt)))                                     # then prefill done
    d = {s.worker_id: s for s in c.explain(tokens(14, 40)).scores}
    assert (d["a"].prefill_blocks, d["a"].decode_blocks) == (10, 10)        # ours only: no phantom queue
    c.finish_all()                                           # ... and it finished before the next decision
    a.load = WorkerLoad(num_running=1, kv_blocks_used=10)    # a newer report, taken before that
    d = {s.worker_id: s for s in c.explain(tokens(14, 40)).scores}
    assert (d["a"].prefill_blocks, d["a"].decode_blocks) == (10, 0)
    assert d["a"].cost == d["b"].cost                       # idle again, like b


def test_a_report_beyond_our_own_load_counts_as_other_routers_requests():
    c = Cluster("ab")
    assert c.place(tokens(17, 40)) == "a"                    # ours: 10 queued, 10 decoding
    c.by_id["a"].load = WorkerLoad(num_running=3, waiting_prefill_tokens=120, kv_blocks_used=30)
    d = {s.worker_id: s for s in c.explain(tokens(18, 40)).scores}
    assert (d["a"].prefill_blocks, d["a"].decode_blocks) == (30 + 10, 30)  # queued 10 ours + 20 others'


def test_temperature_samples_a_softmax_over_normalized_costs():
    c = Cluster("ab", temperature=0.5, predict_ttl_s=0)
    prompt = tokens(10, 40)
    c.cache("b", prompt[:20])                                # costs: a 10, b 5 -> normalized 1, 0
    d = c.explain(prompt)
    p = {s.worker_id: s.probability for s in d.scores}
    expected_b = 1 / (1 + math.exp(-1 / 0.5))
    assert p["b"] == pytest.approx(expected_b) and p["a"] == pytest.approx(1 - expected_b)
    picks = []
    for i in range(600):
        picks.append(c.policy.choose(view(prompt, f"t{i}"), c.workers).worker_id)   # never running: no load
    assert abs(picks.count("b") / 600 - expected_b) < 0.06


def test_explain_records_nothing_and_agrees_with_the_next_choice():
    c = Cluster()
    prompt = tokens(11, 40)
    first = c.explain(prompt)
    assert c.explain(prompt).chosen is first.chosen
    assert c.kv.ledger.num_leases() == 0 and c.kv.recent.num_entries() == 0
    assert c.place(prompt) == first.chosen.worker_id
    for policy in (RoundRobin(c.kv), RandomChoice(c.kv, random.Random(3))):
        expected = policy.explain(view(prompt), c.workers).chosen
        assert policy.choose(view(prompt), c.workers) is expected


def test_a_single_candidate_skips_hashing(monkeypatch):
    c = Cluster("a")
    monkeypatch.setattr(c.kv, "prompt_hashes", lambda request: pytest.fail("hashed with one candidate"))
    assert c.place(tokens(12, 40)) == "a"
    assert c.kv.ledger.own_load(c.by_id["a"], c.clock()).decode_blocks == 10


def test_unknown_settings_fail_with_the_field_name():
    with pytest.raises(ValueError, match="decode_weight"):
        KvSettings(decode_weight=-1)
    with pytest.raises(ValueError, match="fastest"):
        make_policy("fastest")


# --- the load ledger ----------------------------------------------------------------------------------------

def test_ledger_prefill_ends_on_the_stored_event_of_the_last_prompt_block_or_a_timeout():
    running = {"r1", "r2"}
    ledger = LoadLedger(prefill_timeout_s=10, is_running=running.__contains__)
    w = handle("w")
    w.in_flight = 2
    ledger.add("w", "r1", blocks=10, prefill_blocks=6, done_hash=111, now=0)
    ledger.add("w", "r2", blocks=4, prefill_blocks=4, done_hash=None, now=5)
    assert ledger.own_load(w, 1) == (10, 14)
    ledger.on_stored("w", [999, 111])
    assert ledger.own_load(w, 1) == (4, 14)
    assert ledger.own_load(w, 15.5) == (0, 14)              # r2 timed out of prefill
    running.discard("r1")
    w.in_flight = 1
    assert ledger.own_load(w, 16) == (0, 4)


def test_ledger_asks_deferred_hashes_only_for_started_prefills_and_a_few_per_event():
    """A lease placed without its done hash is hashed once the worker holds its first block,
    at most max_hashed_per_event per "stored" event (oldest first); one asked late whose last
    block is already held is done at once."""
    index = PrefixIndex()
    index.add_worker("w", 10_000)
    ledger = LoadLedger(is_running=lambda rid: True, holds=index.holds_on, max_hashed_per_event=2)
    asked: list[int] = []
    for i in range(32):                                      # 32 deferred prompts of 5 blocks
        ledger.add("w", f"r{i}", blocks=5, prefill_blocks=5, done_hash=None, now=0,
                   done_hash_of=lambda i=i: asked.append(i) or 2000 + i, first_hash=1000 + i)
    w = handle("w")
    w.in_flight = 32

    def stored(hashes: list[int]) -> None:
        index.apply_stored("w", index.last_event_id("w") + 1, hashes)
        ledger.on_stored("w", hashes)

    stored([7])                                              # nobody's prefill started
    assert asked == []
    stored([1000 + i for i in range(4)] + [2000, 2001, 2002])   # 4 prefills started, 3 of them done
    assert asked == [0, 1] and ledger.own_load(w, 1).prefill_blocks == 30 * 5
    stored([8])                                              # the next event: the next two
    assert asked == [0, 1, 2, 3] and ledger.own_load(w, 1).prefill_blocks == 29 * 5   # r2 stored already
    stored([9])
    assert asked == [0, 1, 2, 3]                             # r4.. have not started
    stored([1004, 2003])
    assert asked == [0, 1, 2, 3, 4] and ledger.own_load(w, 1).prefill_blocks == 28 * 5   # r3 done, r4 not
    stored([2004])
    assert ledger.own_load(w, 1).prefill_blocks == 27 * 5


def test_ledger_a_retry_moves_the_lease():
    ledger = LoadLedger(is_running=lambda rid: True)
    a, b = handle("a"), handle("b")
    ledger.add("a", "r", blocks=5, prefill_blocks=5, done_hash=7, now=0)
    ledger.add("b", "r", blocks=5, prefill_blocks=2, done_hash=7, now=1)
    a.in_flight, b.in_flight = 0, 1
    assert ledger.own_load(a, 1) == (0, 0) and ledger.own_load(b, 1) == (2, 5)
    ledger.drop_worker("b")
    assert ledger.num_leases() == 0


# --- the indexes against brute force ----------------------------------------------------------------------


def test_prefix_index_beyond_64_workers_with_slot_reuse():
    rng = random.Random(0)
    chains = [block_hashes(tokens(i, 64), 4) for i in range(6)]
    index, sets = PrefixIndex(), {}
    for i in range(70):
        index.add_worker(f"w{i}", 1000)
        sets[f"w{i}"] = set()
    for step in range(400):
        w = f"w{rng.randrange(70)}"
        if step % 37 == 0:                                  # leave and rejoin: the slot is reused
            index.remove_worker(w)
            index.add_worker(w, 1000)
            sets[w] = set()
            continue
        chain = rng.choice(chains)
        cut = rng.randrange(1, len(chain) + 1)
        index.apply_stored(w, index.last_event_id(w) + 1, chain[:cut])
        sets[w].update(chain[:cut])
        for probe in chains:
            assert index.overlaps(probe) == brute_overlaps(sets, probe)
    assert index.blocks_of("w3") == frozenset(sets["w3"])


def is_anchor(k: int, n: int, stride: int, dense: int) -> bool:
    """Position ``k`` of an ``n``-block prompt is kept: in the dense head, every stride-th, or the last."""
    return k < dense or (k + 1) % stride == 0 or k == n - 1


def brute_predicted(placed: list[tuple[str, list[int], int]], probe: list[int], stride: int,
                    dense: int) -> dict[str, int]:
    """RecentPrefixes.overlaps from its definition: per worker, the deepest position ``k`` that
    is an anchor of the probe and, at or past the placement's ``start``, of a prompt placed
    there, where the two prompts agree up to ``k``."""
    out: dict[str, int] = {}
    for w, chain, start in placed:
        for k in range(min(len(chain), len(probe))):
            if (k >= start and is_anchor(k, len(probe), stride, dense) and is_anchor(k, len(chain), stride, dense)
                    and chain[: k + 1] == probe[: k + 1]):
                out[w] = max(out.get(w, 0), k + 1)
    return out


@pytest.mark.parametrize("stride,dense", [(1, 1), (3, 1), (4, 1), (4, 6), (8, 16)])
def test_one_walk_over_events_and_predictions_matches_brute_force(stride, dense):
    """overlaps_with: (cached, cached-or-predicted) depths, predictions recorded only past
    the blocks a worker already holds, as the kv policy records them; the prediction is
    never deeper than the agreement with a placed prompt, and misses it by < stride blocks."""
    rng = random.Random(7)
    chains = [block_hashes(tokens(300 + i, 48), 4) for i in range(3)]
    chains += [c[: rng.randrange(2, 12)] + block_hashes(tokens(400 + i, 24), 4, parent_hash=c[-1])[:5]
               for i, c in enumerate(chains)]            # branches sharing a prefix
    slots = WorkerSlots()
    index, recent = PrefixIndex(slots), RecentPrefixes(ttl_s=3.0, slots=slots, stride=stride, dense=dense)
    held: dict[str, set[int]] = {w: set() for w in "abcd"}
    routes: list[tuple[float, str, list[int], int]] = []
    for w in "abcd":
        index.add_worker(w, 10_000)
    now = 0.0
    for _ in range(300):
        now += rng.random() * 0.5
        w, chain = rng.choice("abcd"), rng.choice(chains)
        cut = chain[: rng.randrange(1, len(chain) + 1)]
        if rng.random() < 0.5:
            index.apply_stored(w, index.last_event_id(w) + 1, cut)
            held[w].update(cut)
        else:                                 # as the kv policy records: past what w holds or will hold
            _, both = index.overlaps_with(recent, cut, now)
            recent.record(w, cut, now, start=both.get(w, 0))
            routes.append((now + 3.0, w, cut, both.get(w, 0)))
        probe = rng.choice(chains)
        live = [(x, hs, start) for expires, x, hs, start in routes if expires > now]
        cached, both = index.overlaps_with(recent, probe, now)
        assert cached == brute_overlaps(held, probe)
        predicted = brute_predicted(live, probe, stride, dense)
        assert both == {x: max(cached.get(x, 0), predicted.get(x, 0)) for x in {*cached, *predicted}}
        every_block = {x: held[x].union(*(hs[start:] for y, hs, start in live if y == x)) for x in "abcd"}
        exact = brute_overlaps(every_block, probe)          # had each placement kept all its blocks
        for x in "abcd":
            agree = max([cached.get(x, 0)] + [next((k for k in range(min(len(hs), len(probe)))
                                                    if hs[k] != probe[k]), min(len(hs), len(probe)))
                                               for y, hs, _ in live if y == x])
            assert exact.get(x, 0) - stride < both.get(x, 0) <= agree


def anchor_hashes(chain: list[int], start: int, stride: int, dense: int) -> list[int]:
    return [h for k, h in enumerate(chain) if k >= start and is_anchor(k, len(chain), stride, dense)]


@pytest.mark.parametrize("seed,stride,dense", [(0, 1, 1), (1, 4, 1), (2, 5, 1), (3, 4, 6), (4, 8, 16)])
def test_recent_prefixes_match_a_set_model_with_expiry(seed, stride, dense):
    """The bitmask lookup against plain sets: a placement adds its anchors to its worker's
    set (a deferred one its first, the rest when a lookup completes it), its expiry (or the
    worker leaving) removes them; a probe's depth on a worker is
    ``k + 1`` for its deepest anchor ``k`` in that set."""
    rng = random.Random(seed)
    chains = [block_hashes(tokens(seed * 100 + i, 48), 4) for i in range(8)]
    recent = RecentPrefixes(ttl_s=5.0, max_entries=10**6, stride=stride, dense=dense)
    routes: list[tuple[float, str, list[int], list[bool]]] = []     # [deferred, not completed yet]
    sets: dict[str, set[int]] = {w: set() for w in "abc"}
    now = 0.0

    def lookup(probe: list[int]) -> dict[str, int]:
        for _, w, kept, pending in routes:                    # a lookup completes deferred placements
            if pending[0] and kept[0] == probe[0]:
                pending[0] = False
                sets[w].update(kept)
        return recent.overlaps(probe, now)

    for _ in range(300):
        now += rng.random()
        while routes and routes[0][0] <= now:
            _, w, kept, pending = routes.pop(0)
            sets[w].difference_update(kept[:1] if pending[0] else kept)     # never completed: its first
        if rng.random() < 0.6:
            w, chain = rng.choice("abc"), rng.choice(chains)
            cut = chain[: rng.randrange(1, len(chain) + 1)]
            start = 0
            if rng.random() < 0.8:                            # usually past what is already predicted
                start = lookup(cut).get(w, 0)
            deferred = start == 0 and not recent.agrees(cut[0], now) and rng.random() < 0.5
            if deferred:                                      # nobody shares its first block
                recent.record_deferred(w, cut[0], lambda cut=cut: cut, now)
            else:
                recent.record(w, cut, now, start=start)
            kept = anchor_hashes(cut, start, stride, dense)
            if kept:
                routes.append((now + 5.0, w, kept, [deferred]))
                sets[w].update(kept[:1] if deferred else kept)       # deferred: the rest on completion
        elif rng.random() < 0.05:
            w = rng.choice("abc")
            recent.remove_worker(w)
            routes = [r for r in routes if r[1] != w]
            sets[w].clear()
        probe = rng.choice(chains)
        got = lookup(probe)
        expected = {}
        for w, held in sets.items():
            probed = [k for k in range(len(probe)) if is_anchor(k, len(probe), stride, dense)]
            deepest = [k + 1 for k in probed if probe[k] in held]
            if deepest:
                expected[w] = max(deepest)
        assert got == expected
    assert recent.num_entries() == sum(1 if pending[0] else len(kept) for _, _, kept, pending in routes)
    assert recent.num_placements() == len(routes)
    assert sorted(recent._deferred) == sorted({kept[0] for _, _, kept, pending in routes if pending[0]})


def test_recent_prefixes_keep_a_dense_head_every_stride_th_and_the_last_hash():
    recent = RecentPrefixes(ttl_s=5.0, stride=4, dense=1)
    hashes = list(range(100, 110))                            # positions 0..9
    assert recent.anchors(hashes) == [100, 103, 107, 109]
    assert recent.anchors(hashes, start=4) == [107, 109]
    assert recent.anchors(hashes, start=9) == [109] and recent.anchors(hashes, start=10) == []
    assert recent.anchors(hashes[:8]) == [100, 103, 107] and recent.anchors(hashes[:1]) == [100]
    assert RecentPrefixes(ttl_s=5.0, stride=1).anchors(hashes[:3]) == [100, 101, 102]
    recent.record("a", hashes, now=0.0)
    assert recent.num_entries() == 4
    dense = RecentPrefixes(ttl_s=5.0, stride=4, dense=3)
    assert dense.anchors(hashes) == [100, 101, 102, 103, 107, 109]
    assert dense.anchors(hashes, start=1) == [101, 102, 103, 107, 109]
    assert dense.anchors(hashes, start=3) == [103, 107, 109] and dense.anchors(hashes[:2]) == [100, 101]
    default = RecentPrefixes(ttl_s=5.0)                       # 16 dense, then every 8th: 16 + 62 for 512 blocks
    assert len(default.anchors(list(range(512)))) == 78 and default.anchors(list(range(20)))[-3:] == [14, 15, 19]
    dense.record("a", hashes, now=0.0)
    assert dense.overlaps([100, 101, 55], now=1.0) == {"a": 2}     # exact in the head
    assert dense.overlaps(hashes[:6] + [55], now=1.0) == {"a": 4}  # to the anchor below past it


def test_recent_prefixes_memory_is_capped():
    recent = RecentPrefixes(ttl_s=60, max_entries=100, stride=1)
    for i in range(50):
        recent.record("a", [i * 1000 + j for j in range(10)], now=float(i))
    assert recent.num_entries() <= 100
    assert recent.overlaps([49_000], now=50.0) == {"a": 1}     # the newest survive
    assert recent.overlaps([0], now=50.0) == {}
