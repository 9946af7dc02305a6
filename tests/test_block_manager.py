"""The block manager as a pure state machine, checked against a brute-force model.

The harness below drives ``BlockManager`` with real ``Sequence`` objects the way
the scheduler and the engine's ``_update`` do (match, allocate, advance
``num_computed_tokens``, register, free, preempt) and after every operation
compares its state with a model that tracks, for every block, which tokens
were written into it. Reference counts, the free pool, the prefix cache, the
eviction order and the KV event stream are all derived independently.

The block manager has no public accessor for per-block reference counts or
the hash -> block map, so the harness reads ``_blocks``, ``_free`` and
``_cached`` (read only).
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from kvstore.hashing import HashNamespace, block_hashes, max_cacheable_prompt_blocks
from worker.engine.block_manager import BlockManager, PrefixMatch
from worker.engine.sequence import Sequence, SequenceStatus
from worker.engine.types import AllBlocksCleared, BlockRemoved, BlockStored, EngineRequest, SamplingOptions

NS_A = HashNamespace(model="m")
NS_B = HashNamespace(model="m", cache_salt="tenant-b")


def make_seq(rid: str, prompt: list[int], ns: HashNamespace = NS_A, arrival: int = 0) -> Sequence:
    return Sequence(
        request=EngineRequest(rid, tuple(prompt), SamplingOptions(temperature=0.0)),
        arrival=arrival,
        max_tokens=1000,
        namespace=ns,
    )


def compute(bm: BlockManager, seq: Sequence, n: int) -> None:
    """What the engine does after a step computed ``n`` tokens of ``seq``."""
    seq.num_computed_tokens += n
    bm.register_computed_blocks(seq)


def snapshot(bm: BlockManager, seqs: list[Sequence]):
    return (
        [(b.ref_count, b.hash) for b in bm._blocks],
        list(bm._free),
        dict(bm._cached),
        list(bm._events),
        [(s.num_computed_tokens, list(s.block_table), s.num_registered_blocks, s.status) for s in seqs],
    )


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class Harness:
    """A BlockManager plus the brute-force model it is checked against."""

    def __init__(self, num_blocks: int, block_size: int, caching: bool = True, seed: int = 0) -> None:
        self.bm = BlockManager(num_blocks, block_size, caching)
        self.bs = block_size
        self.n = num_blocks
        self.caching = caching
        self.rng = random.Random(seed)
        self.live: list[Sequence] = []
        self.waiting: list[Sequence] = []
        self.written: dict[int, tuple[HashNamespace, tuple[int, ...]]] = {}
        """block id -> (namespace, the whole token prefix up to the block's last written slot)."""
        self.freed_at: dict[int, int] = {}
        self.clock = 0
        self.replayed: set[int] = set()
        self.namespaces = {NS_A, NS_B}
        self.stats: Counter[str] = Counter()
        self.prompts: list[tuple[list[int], HashNamespace]] = []

    # ---- the model -------------------------------------------------------
    def refs(self) -> Counter[int]:
        return Counter(b for s in self.live for b in s.block_table)

    def expected_match(self, seq: Sequence) -> list[int]:
        """Longest chain of cached blocks whose written prefix equals the sequence's."""
        if not self.caching:
            return []
        limit = max_cacheable_prompt_blocks(seq.num_tokens, self.bs)
        cached_blocks = set(self.bm._cached.values())
        out = []
        for i in range(limit):
            want = (seq.namespace, tuple(seq.token_ids[: (i + 1) * self.bs]))
            found = [b for b in cached_blocks if self.written.get(b) == want]
            assert len(found) <= 1, f"prefix {i} cached twice: {found}"
            if not found:
                break
            out.append(found[0])
        return out

    def free_candidates(self) -> dict[int, bool]:
        """Free block -> whether it still holds a cached (hashed) block."""
        refs = self.refs()
        cached_blocks = set(self.bm._cached.values())
        return {b: b in cached_blocks for b in range(self.n) if refs[b] == 0}

    def check_eviction(self, taken: list[int], candidates: dict[int, bool]) -> None:
        """Fresh blocks come from unreferenced blocks: unhashed first, then the
        least recently freed hashed ones."""
        assert len(set(taken)) == len(taken)
        assert all(b in candidates for b in taken), "took a referenced block"
        unhashed = {b for b, hashed in candidates.items() if not hashed}
        hashed = sorted((b for b, h in candidates.items() if h), key=lambda b: self.freed_at[b])
        if len(taken) <= len(unhashed):
            assert set(taken) <= unhashed, "evicted a cached block while unhashed free blocks remained"
        else:
            assert unhashed <= set(taken)
            evicted = set(taken) - unhashed
            assert evicted == set(hashed[: len(evicted)]), "eviction is not least-recently-freed first"
            self.stats["evictions"] += len(evicted)

    def write(self, seq: Sequence, n: int) -> None:
        old = seq.num_computed_tokens
        new = old + n
        refs = self.refs()
        for i in range(old // self.bs, ceil_div(new, self.bs)):
            b = seq.block_table[i]
            assert refs[b] == 1, f"writing into block {b} shared by {refs[b]} sequences"
            self.written[b] = (seq.namespace, tuple(seq.token_ids[: min(new, (i + 1) * self.bs)]))
        compute(self.bm, seq, n)

    def release(self, seq: Sequence) -> None:
        refs = self.refs()
        for b in reversed(seq.block_table):  # the tail is queued for eviction before the head
            refs[b] -= 1
            if refs[b] == 0:
                self.freed_at[b] = self.clock
                self.clock += 1
        self.bm.free(seq)
        assert seq.block_table == []
        self.live.remove(seq)

    # ---- operations --------------------------------------------------------
    def new_seq(self, prefixes: list[list[int]]) -> Sequence:
        rng = self.rng
        if self.prompts and rng.random() < 0.25:  # an exact repeat: a full prefix hit
            prompt, ns = rng.choice(self.prompts)
        else:
            base = rng.choice(prefixes)[: rng.randint(0, len(prefixes[0]))]
            prompt = base + [rng.randrange(4) for _ in range(rng.randint(1, 10))]
            ns = rng.choice([NS_A, NS_A, NS_B])
            self.prompts.append((prompt, ns))
        seq = make_seq(f"s{self.stats['created']}", prompt, ns, arrival=self.stats["created"])
        seq.max_tokens = rng.randint(1, 8)
        self.stats["created"] += 1
        return seq

    def admit(self, seq: Sequence) -> bool:
        before = snapshot(self.bm, [seq])
        match = self.bm.match_prefix(seq)
        assert snapshot(self.bm, [seq]) == before, "match_prefix mutated state"
        assert isinstance(match, PrefixMatch)
        assert list(match.block_ids) == self.expected_match(seq)
        assert match.num_tokens < seq.num_tokens, "a prefix hit covered the last token"
        hits = list(match.block_ids)
        self.stats["hit_blocks"] += len(hits)
        n = min(seq.num_tokens - match.num_tokens, self.rng.randint(1, 12))
        candidates = self.free_candidates()
        need = ceil_div(match.num_tokens + n, self.bs) - len(hits)
        revived = sum(1 for b in hits if b in candidates)
        if not self.bm.allocate(seq, n, match):
            assert need + revived > len(candidates), "allocate refused although the pool had room"
            assert snapshot(self.bm, [seq]) == before, "a failed allocate changed state"
            self.stats["alloc_failures"] += 1
            return False
        assert need + revived <= len(candidates)
        assert seq.block_table[: len(hits)] == hits
        assert seq.num_computed_tokens == match.num_tokens
        for b in hits:
            candidates.pop(b, None)
        fresh = seq.block_table[len(hits) :]
        assert len(fresh) == need
        self.live.append(seq)
        self.check_eviction(fresh, candidates)
        self.write(seq, n)
        return True

    def step(self, seq: Sequence) -> None:
        if seq.num_computed_tokens == seq.num_tokens:  # the last step sampled a token
            seq.token_ids.append(self.rng.randrange(4))
            if seq.num_output_tokens >= seq.max_tokens:
                self.release(seq)
                self.stats["finished"] += 1
                return
        n = min(seq.num_tokens - seq.num_computed_tokens, self.rng.randint(1, 12))
        before = snapshot(self.bm, self.live)
        candidates = self.free_candidates()
        old_len = len(seq.block_table)
        need = ceil_div(seq.num_computed_tokens + n, self.bs) - old_len
        if not self.bm.allocate(seq, n):
            assert need > len(candidates)
            assert snapshot(self.bm, self.live) == before, "a failed allocate changed state"
            self.stats["alloc_failures"] += 1
            self.preempt(self.rng.choice([self.live[-1], seq]))
            return
        fresh = seq.block_table[old_len:]
        assert len(fresh) == max(need, 0)
        self.check_eviction(fresh, candidates)
        self.write(seq, n)

    def preempt(self, seq: Sequence) -> None:
        self.release(seq)
        seq.reset_for_recompute()
        self.waiting.append(seq)
        self.stats["preemptions"] += 1

    def reset(self) -> None:
        used = self.bm.num_used_blocks
        before = snapshot(self.bm, self.live)
        ok = self.bm.reset_prefix_cache()
        if used:
            assert not ok
            assert snapshot(self.bm, self.live) == before
        else:
            assert ok
            assert self.bm.cached_block_hashes() == []
            assert all(b.hash is None for b in self.bm._blocks)
            assert isinstance(self.bm._events[-1], AllBlocksCleared)
            self.stats["resets"] += 1

    def drain(self) -> None:
        for ev in self.bm.drain_events():
            if isinstance(ev, BlockStored):
                assert self.caching
                assert ev.block_size == self.bs
                assert len(ev.token_ids) == len(ev.block_hashes) * self.bs
                roots = [ns.root_hash() for ns in self.namespaces] if ev.parent_block_hash is None else [ev.parent_block_hash]
                assert any(block_hashes(ev.token_ids, self.bs, parent_hash=r) == list(ev.block_hashes) for r in roots), (
                    "a stored event's tokens do not hash to its block hashes"
                )
                for h in ev.block_hashes:
                    assert h not in self.replayed, "stored a hash that is already stored"
                    self.replayed.add(h)
            elif isinstance(ev, BlockRemoved):
                for h in ev.block_hashes:
                    assert h in self.replayed, "removed a hash that was never stored"
                    self.replayed.remove(h)
            else:
                assert isinstance(ev, AllBlocksCleared)
                self.replayed.clear()
        assert self.replayed == set(self.bm.cached_block_hashes())
        assert self.bm.drain_events() == []

    # ---- invariants ----------------------------------------------------------
    def check(self) -> None:
        bm, bs = self.bm, self.bs
        refs = self.refs()
        for b in range(self.n):
            assert bm._blocks[b].ref_count == refs[b], f"block {b}: ref_count {bm._blocks[b].ref_count} != {refs[b]} holders"
        free = list(bm._free)
        assert len(free) == len(set(free))
        assert set(free) == {b for b in range(self.n) if refs[b] == 0}, "a block is both free and referenced"
        assert bm.num_free_blocks + bm.num_used_blocks == self.n
        assert bm.num_used_blocks == len(refs)
        cached = bm._cached
        assert len(set(cached.values())) == len(cached), "two hashes map to one block"
        assert {b for b in range(self.n) if bm._blocks[b].hash is not None} == set(cached.values())
        assert sorted(bm.cached_block_hashes()) == sorted(cached)
        assert bm.num_cached_free_blocks == sum(1 for b in free if bm._blocks[b].hash is not None)
        if not self.caching:
            assert not cached
        for h, b in cached.items():
            assert bm._blocks[b].hash == h
            ns, prefix = self.written[b]
            assert len(prefix) % bs == 0 and prefix, f"block {b} is cached but not full"
            assert block_hashes(prefix, bs, ns)[-1] == h, f"block {b}'s contents do not hash to {h:#x}"
        for seq in self.live:
            table = seq.block_table
            assert len(set(table)) == len(table)
            assert len(table) == ceil_div(seq.num_computed_tokens, bs)
            assert seq.num_computed_tokens <= seq.num_tokens
            for i, b in enumerate(table):
                want = (seq.namespace, tuple(seq.token_ids[: min(seq.num_computed_tokens, (i + 1) * bs)]))
                assert self.written[b] == want, f"{seq.request_id} block {i} (id {b}) holds another prefix's KV"
        for seq in self.waiting:
            assert seq.block_table == [] and seq.num_computed_tokens == 0

    def run(self, num_ops: int) -> None:
        rng = self.rng
        prefixes = [[rng.randrange(4) for _ in range(24)] for _ in range(3)]
        for _ in range(num_ops):
            r = rng.random()
            if r < 0.3:
                if self.waiting and rng.random() < 0.5:
                    seq = self.waiting[0]
                    if self.admit(seq):
                        self.waiting.pop(0)
                else:
                    seq = self.new_seq(prefixes)
                    if not self.admit(seq):
                        self.waiting.append(seq)
            elif r < 0.78:
                if self.live:
                    self.step(rng.choice(self.live))
            elif r < 0.86:
                if self.live:
                    self.release(rng.choice(self.live))
            elif r < 0.88:
                self.reset()
            else:
                self.drain()
            self.check()
        # finish everything: the pool is empty again and the event stream still matches
        for seq in list(self.live):
            self.release(seq)
        self.check()
        self.drain()
        assert self.bm.num_used_blocks == 0
        assert self.bm.num_free_blocks == self.n


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("caching", [True, False])
def test_random_operations_match_the_model(seed, caching):
    h = Harness(num_blocks=12, block_size=4, caching=caching, seed=seed)
    h.run(400)
    # the run must have exercised the interesting paths, or it proves little
    assert h.stats["alloc_failures"] > 0
    assert h.stats["preemptions"] > 0
    if caching:
        assert h.stats["hit_blocks"] > 0
        assert h.stats["evictions"] > 0


def test_random_operations_block_size_one():
    h = Harness(num_blocks=30, block_size=1, caching=True, seed=99)
    h.run(300)
    assert h.stats["hit_blocks"] > 0 and h.stats["evictions"] > 0


# ---- hand-worked cases ------------------------------------------------------------


def test_eviction_order_is_unhashed_then_least_recently_freed():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = make_seq("a", [1, 2, 3, 4, 5])        # blocks: [1 2] [3 4] [5 .]
    assert bm.allocate(a, 5)
    compute(bm, a, 5)
    b = make_seq("b", [9, 8, 7])              # blocks: [9 8] [7 .]
    assert bm.allocate(b, 3)
    compute(bm, b, 3)
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    assert len(bm.cached_block_hashes()) == 3
    bm.free(a)                                # a's tail is freed before its head
    bm.free(b)
    bm.drain_events()
    h_a = block_hashes([1, 2, 3, 4], 2, NS_A)
    h_b = block_hashes([9, 8], 2, NS_A)
    # 1 block never used, then the two unhashed partial blocks, then hashed ones:
    # a's tail [3 4], a's head [1 2], then b's [9 8]
    c = make_seq("c", [0] * 13)

    def grow(n: int) -> list:
        assert bm.allocate(c, n)
        compute(bm, c, n)
        return [e for e in bm.drain_events() if isinstance(e, BlockRemoved)]

    assert grow(3 * 2) == []                  # 3 blocks: all unhashed, no eviction
    assert set(c.block_table) == {n for n in range(6) if n not in a_blocks[:2] + b_blocks[:1]}
    assert grow(2) == [BlockRemoved((h_a[1],))]   # evicts a's tail
    assert c.block_table[-1] == a_blocks[1]
    assert grow(2) == [BlockRemoved((h_a[0],))]   # then a's head
    assert c.block_table[-1] == a_blocks[0]
    assert grow(2) == [BlockRemoved((h_b[0],))]   # then b's head
    assert c.block_table[-1] == b_blocks[0]
    assert bm.num_free_blocks == 0
    assert not set(bm.cached_block_hashes()) & set(h_a + h_b)


def test_revived_block_moves_to_the_back_of_the_eviction_queue():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq("a", [1, 2, 3])
    assert bm.allocate(a, 3)
    compute(bm, a, 3)
    b = make_seq("b", [5, 6, 7])
    assert bm.allocate(b, 3)
    compute(bm, b, 3)
    block_a, block_b = a.block_table[0], b.block_table[0]
    bm.free(a)
    bm.free(b)                    # b's [5 6] was freed after a's [1 2]
    a2 = make_seq("a2", [1, 2, 9])
    match = bm.match_prefix(a2)
    assert match.block_ids == (block_a,)
    assert bm.allocate(a2, 1, match)  # revives [1 2], takes one unhashed block
    compute(bm, a2, 1)
    bm.free(a2)                   # now [1 2] was freed last
    bm.drain_events()
    c = make_seq("c", [0] * 7)
    assert bm.allocate(c, 6)      # 2 unhashed + the least recently freed hashed block
    assert block_b in c.block_table and block_a not in c.block_table
    assert bm.drain_events() == [BlockRemoved((block_hashes([5, 6], 2, NS_A)[0],))]


def test_failed_allocate_changes_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq("a", list(range(1, 10)))
    assert bm.allocate(a, 9)                   # 3 blocks
    compute(bm, a, 9)
    b = make_seq("b", list(range(1, 10)) + [50, 51, 52, 53, 54])
    match = bm.match_prefix(b)
    assert len(match.block_ids) == 2           # [1..4] [5..8] are cached and in use
    before = snapshot(bm, [a, b])
    # 14 tokens need 4 blocks: 2 hits + 2 fresh, but only 1 block is free
    assert not bm.allocate(b, 6, match)
    assert snapshot(bm, [a, b]) == before
    assert not bm.allocate(a, 8)               # a: 17 tokens need 5 blocks
    assert snapshot(bm, [a, b]) == before
    assert bm.allocate(b, 2, match)            # 10 tokens: 2 hits + 1 fresh block fits
    assert b.num_computed_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    assert bm.num_free_blocks == 0


def test_revived_blocks_count_against_the_free_pool():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = make_seq("a", [1, 2, 3, 4, 5])
    assert bm.allocate(a, 5)
    compute(bm, a, 5)
    bm.free(a)                                  # all 3 blocks free, 2 of them cached
    b = make_seq("b", [1, 2, 3, 4, 6, 7, 8])
    match = bm.match_prefix(b)
    assert len(match.block_ids) == 2
    before = snapshot(bm, [b])
    assert not bm.allocate(b, 3, match)         # 2 revived + 2 fresh > 3 free
    assert snapshot(bm, [b]) == before
    assert bm.allocate(b, 1, match)             # 2 revived + 1 fresh
    assert bm.num_free_blocks == 0


def test_prefix_match_is_longest_chain_and_leaves_the_last_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq("a", list(range(1, 17)))       # exactly 4 full blocks
    assert bm.allocate(a, 16)
    compute(bm, a, 16)
    assert len(bm.cached_block_hashes()) == 4
    cases = {
        # prompt -> expected number of matched blocks
        tuple(range(1, 17)): 3,                 # a full hit still recomputes the last block
        tuple(range(1, 18)): 4,
        tuple(range(1, 13)): 2,
        tuple(range(1, 5)): 0,
        tuple(range(1, 6)): 1,
        tuple(range(1, 9)) + (0, 0, 0, 0, 0): 2,  # diverges in block 2
        (0,) + tuple(range(2, 17)): 0,          # diverges in block 0: later equal blocks don't count
        (1,): 0,
    }
    for prompt, expected in cases.items():
        m = bm.match_prefix(make_seq("q", list(prompt)))
        assert m.block_ids == tuple(a.block_table[:expected]), prompt
        assert m.num_tokens == expected * 4
        assert m.num_tokens < len(prompt)
    # a different namespace shares nothing
    assert bm.match_prefix(make_seq("q", list(range(1, 18)), NS_B)).block_ids == ()
    # disabled caching never matches
    off = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    s = make_seq("s", list(range(1, 18)))
    assert off.allocate(s, 17)
    compute(off, s, 17)
    assert off.cached_block_hashes() == [] and off.drain_events() == []
    assert off.match_prefix(make_seq("q", list(range(1, 18)))).block_ids == ()


def test_concurrent_duplicates_stay_private():
    bm = BlockManager(num_blocks=10, block_size=2)
    a = make_seq("a", [1, 2, 3, 4, 5])
    b = make_seq("b", [1, 2, 3, 4, 5])
    assert bm.allocate(a, 5) and bm.allocate(b, 5)   # admitted together: no hit possible
    compute(bm, a, 5)
    compute(bm, b, 5)
    hashes = block_hashes([1, 2, 3, 4], 2, NS_A)
    assert sorted(bm.cached_block_hashes()) == sorted(hashes)
    assert bm._cached[hashes[0]] == a.block_table[0]
    events = bm.drain_events()
    assert events == [BlockStored(tuple(hashes), None, (1, 2, 3, 4), 2)]
    # b extends past the duplicates: its new block chains onto the shared hash
    b.token_ids += [6]
    assert bm.allocate(b, 1)
    compute(bm, b, 1)
    h3 = block_hashes([1, 2, 3, 4, 5, 6], 2, NS_A)[2]
    assert bm.drain_events() == [BlockStored((h3,), hashes[1], (5, 6), 2)]
    bm.free(a)
    bm.free(b)
    # b's private duplicates were unhashed, so they are the first to be reused
    c = make_seq("c", [9] * 5)
    assert bm.allocate(c, 5)
    assert bm.drain_events() == []
    assert sorted(bm.cached_block_hashes()) == sorted(hashes + [h3])


def test_reset_prefix_cache():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq("a", [1, 2, 3])
    assert bm.allocate(a, 3)
    compute(bm, a, 3)
    assert not bm.reset_prefix_cache()            # a block is still referenced
    assert len(bm.cached_block_hashes()) == 1
    bm.free(a)
    bm.drain_events()
    assert bm.reset_prefix_cache()
    assert bm.cached_block_hashes() == []
    assert bm.drain_events() == [AllBlocksCleared()]
    assert bm.match_prefix(make_seq("b", [1, 2, 3])).block_ids == ()


def test_preempted_sequence_rematches_its_own_blocks():
    """After preemption a sequence's registered blocks stay cached, so recompute
    starts with a prefix hit that includes output tokens."""
    bm = BlockManager(num_blocks=8, block_size=2)
    a = make_seq("a", [1, 2, 3])
    assert bm.allocate(a, 3)
    compute(bm, a, 3)
    a.token_ids += [4]                              # a sampled token
    assert bm.allocate(a, 1)
    compute(bm, a, 1)
    a.token_ids += [5]
    table = list(a.block_table)
    bm.free(a)
    a.reset_for_recompute()
    assert a.status is SequenceStatus.WAITING and a.num_computed_tokens == 0
    m = bm.match_prefix(a)
    assert m.block_ids == tuple(table[:2])          # [1 2] [3 4]; the last token (5) is recomputed
    assert bm.allocate(a, 1, m)
    assert a.num_computed_tokens == 4 and a.num_registered_blocks == 2
