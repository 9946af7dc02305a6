"""kvstore.index.PrefixIndex against a brute-force model (a set of hashes per worker)."""

from __future__ import annotations

import random

import pytest
from index_reference import brute_overlaps

from kvstore.hashing import block_hashes
from kvstore.index import Applied, NeedsResync, PrefixIndex


@pytest.mark.parametrize("seed", range(6))
def test_random_events_match_brute_force(seed):
    rng = random.Random(seed)
    # a pool of prompts sharing prefixes, so chains overlap across workers
    prompts = []
    for _ in range(12):
        base = [rng.randrange(1000) for _ in range(rng.randrange(16, 80))]
        prompts.append(base)
        prompts.append(base[: rng.randrange(1, len(base))] + [rng.randrange(1000) for _ in range(rng.randrange(0, 40))])
    chains = [block_hashes(p, 8) for p in prompts]
    chains = [c for c in chains if c]
    index = PrefixIndex()
    sets: dict[str, set[int]] = {}
    next_id: dict[str, int] = {}
    capacity = 10_000
    for w in ("a", "b", "c", "d"):
        index.add_worker(w, capacity)
        sets[w] = set()
        next_id[w] = 1
    for _ in range(600):
        w = rng.choice(list(sets))
        op = rng.random()
        eid = next_id[w]
        if op < 0.55:
            chain = rng.choice(chains)
            cut = rng.randrange(1, len(chain) + 1)
            assert isinstance(index.apply_stored(w, eid, chain[:cut]), Applied)
            sets[w].update(chain[:cut])
        elif op < 0.9:
            victims = rng.sample(sorted(sets[w]), min(len(sets[w]), rng.randrange(1, 5))) if sets[w] else [12345]
            index.apply_removed(w, eid, victims)
            sets[w].difference_update(victims)
        elif op < 0.95:
            index.apply_cleared(w, eid)
            sets[w].clear()
        else:
            index.remove_worker(w)
            index.add_worker(w, capacity)
            sets[w].clear()
            next_id[w] = 1
            continue
        next_id[w] += 1
        for chain in rng.sample(chains, 3):
            assert index.overlaps(chain) == brute_overlaps(sets, chain)
    assert index.num_entries() == sum(len(s) for s in sets.values())
    assert index.num_blocks() == len(set().union(*sets.values()))


def test_gap_and_restart_ask_for_resync():
    index = PrefixIndex()
    index.add_worker("w", 100)
    assert isinstance(index.apply_stored("w", 1, [1, 2]), Applied)
    gap = index.apply_stored("w", 3, [3])
    assert gap == NeedsResync("w", 2, 3)
    assert index.overlaps([1, 2, 3]) == {"w": 2}  # the out-of-order event was not applied
    restart = index.apply_stored("w", 1, [9])
    assert isinstance(restart, NeedsResync)
    index.reset_worker("w", [7, 8], last_event_id=10)
    assert index.overlaps([1]) == {}
    assert index.overlaps([7, 8]) == {"w": 2}
    assert isinstance(index.apply_removed("w", 11, [8]), Applied)
    assert index.overlaps([7, 8]) == {"w": 1}


def test_memory_is_bounded_by_worker_capacity():
    index = PrefixIndex()
    index.add_worker("w", 50)
    # a worker whose removals were lost: stored events only, forever
    for i in range(1, 2001):
        index.apply_stored("w", i, [i * 7 + 1])
    assert index.num_entries() == 50
    assert index.num_blocks() == 50
    assert index.num_capacity_evictions == 1950
    # the newest entries survive
    assert index.overlaps([2000 * 7 + 1]) == {"w": 1}


def test_leaving_worker_takes_its_entries():
    index = PrefixIndex()
    index.add_worker("a", 10)
    index.add_worker("b", 10)
    index.apply_stored("a", 1, [1, 2, 3])
    index.apply_stored("b", 1, [1, 2])
    assert index.overlaps([1, 2, 3]) == {"a": 3, "b": 2}
    index.remove_worker("a")
    assert index.overlaps([1, 2, 3]) == {"b": 2}
    assert index.num_entries() == 2
    with pytest.raises(KeyError):
        index.apply_stored("a", 2, [5])
