"""The shared block-hash definition (``kvstore/hashing.py``).

The router and every worker must compute bit-identical chains, so these tests
pin the properties the prefix cache relies on: independence from the process
(Python's ``hash`` is randomized per process), the chain property (a block's
hash covers its whole prefix), namespace separation, full blocks only,
resumable chains, and the "last prompt token is always recomputed" rule.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from kvstore.hashing import HASH_SCHEME, HashNamespace, block_hashes, hash_block, max_cacheable_prompt_blocks

REPO_ROOT = Path(__file__).resolve().parents[1]

NAMESPACES = [
    HashNamespace(),
    HashNamespace(model="smollm2"),
    HashNamespace(model="smollm2", adapter="lora-a"),
    HashNamespace(model="smollm2", cache_salt="tenant-1"),
    HashNamespace(model="smollm2", adapter="lora-a", cache_salt="tenant-1"),
    HashNamespace(model="llama", adapter="", cache_salt="ünïcode"),
]


def _tokens(seed: int, n: int, vocab: int = 50_000) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def test_scheme_matches_an_independent_implementation():
    """Re-derive the documented byte layout with hashlib alone: if this fails, the
    layout changed and ``HASH_SCHEME`` must be bumped (and this test updated)."""
    assert HASH_SCHEME == "blake2b64-v1"
    ns = HashNamespace(model="m", adapter="ad", cache_salt="salt")
    root = hashlib.blake2b(digest_size=8, person=b"kvmesh-root")
    for part in ("m", "ad", "salt"):
        data = part.encode()
        root.update(struct.pack("<I", len(data)) + data)
    expected_root = int.from_bytes(root.digest(), "little")
    assert ns.root_hash() == expected_root

    toks = [1, 2, 3, 70_000]
    h = hashlib.blake2b(digest_size=8, person=b"kvmesh-block")
    h.update(expected_root.to_bytes(8, "little"))
    h.update(b"".join(struct.pack("<i", t) for t in toks))
    assert block_hashes(toks, 4, ns) == [int.from_bytes(h.digest(), "little")]


_CHILD = """
import json, sys
from kvstore.hashing import HashNamespace, block_hashes
cases = json.loads(sys.stdin.read())
out = [block_hashes(c["tokens"], c["block_size"], HashNamespace(**c["ns"])) for c in cases]
print(json.dumps({"py_hash": hash("kvmesh"), "hashes": out}))
"""


def test_deterministic_across_processes():
    cases = [
        {"tokens": _tokens(i, 10 + 37 * i), "block_size": bs, "ns": ns.__dict__}
        for i, (bs, ns) in enumerate(zip([1, 4, 16, 16, 32, 7], NAMESPACES))
    ]
    mine = [block_hashes(c["tokens"], c["block_size"], HashNamespace(**c["ns"])) for c in cases]
    results = []
    for seed in ("1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD],
            input=json.dumps(cases),
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO_ROOT,
            timeout=60,
            check=True,
        )
        results.append(json.loads(proc.stdout))
    # the children really ran with different string-hash randomization...
    assert results[0]["py_hash"] != results[1]["py_hash"]
    # ...and still agree with this process bit for bit
    assert results[0]["hashes"] == mine
    assert results[1]["hashes"] == mine
    # the hashes are real 64-bit values, not small ints
    assert all(0 <= h < 2**64 for hs in mine for h in hs)
    assert max(h for hs in mine for h in hs) > 2**32


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_chain_property(block_size):
    num_blocks = 6
    toks = _tokens(7, num_blocks * block_size + block_size // 2, vocab=1000)
    base = block_hashes(toks, block_size)
    assert len(base) == num_blocks
    assert len(set(base)) == num_blocks
    rng = random.Random(block_size)
    for i in range(num_blocks):
        pos = i * block_size + rng.randrange(block_size)
        changed = list(toks)
        changed[pos] = (changed[pos] + 1) % 1000
        got = block_hashes(changed, block_size)
        assert got[:i] == base[:i], f"changing block {i} altered an earlier block's hash"
        assert all(g != b for g, b in zip(got[i:], base[i:])), f"changing block {i} left a later hash unchanged"
    if block_size > 1:  # a change in the partial trailing block changes nothing
        changed = list(toks)
        changed[-1] += 1
        assert block_hashes(changed, block_size) == base


def test_equal_blocks_at_different_positions_hash_differently():
    block = [5, 6, 7, 8]
    hs = block_hashes(block * 4, 4)
    assert len(set(hs)) == 4


def test_namespaces_separate_chains():
    toks = _tokens(3, 64)
    chains = [block_hashes(toks, 16, ns) for ns in NAMESPACES]
    roots = [ns.root_hash() for ns in NAMESPACES]
    assert len(set(roots)) == len(NAMESPACES)
    flat = [h for c in chains for h in c]
    assert len(set(flat)) == len(flat), "two namespaces share a block hash"
    # equal namespaces share everything
    assert block_hashes(toks, 16, HashNamespace(model="smollm2")) == chains[1]
    # fields are length-delimited: moving characters between fields changes the root
    assert HashNamespace(model="ab").root_hash() != HashNamespace(model="a", adapter="b").root_hash()
    assert HashNamespace(adapter="x").root_hash() != HashNamespace(cache_salt="x").root_hash()
    assert HashNamespace(model="a", adapter="bc").root_hash() != HashNamespace(model="ab", adapter="c").root_hash()


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_only_full_blocks_hashed(block_size):
    toks = _tokens(11, 5 * block_size + block_size - 1 if block_size > 1 else 5)
    full = block_hashes(toks, block_size)
    for n in range(len(toks) + 1):
        hs = block_hashes(toks[:n], block_size)
        assert len(hs) == n // block_size
        assert hs == full[: n // block_size]
    assert block_hashes([], block_size) == []


@pytest.mark.parametrize("block_size", [0, -4])
def test_block_size_must_be_positive(block_size):
    with pytest.raises(ValueError, match="block_size"):
        block_hashes([1, 2, 3], block_size)


@pytest.mark.parametrize("ns", [NAMESPACES[0], NAMESPACES[4]])
def test_parent_hash_continuation_equals_one_shot(ns):
    bs = 4
    toks = _tokens(5, 10 * bs + 3)
    one_shot = block_hashes(toks, bs, ns)
    for k in range(1, 10):
        head = block_hashes(toks[: k * bs], bs, ns)
        tail = block_hashes(toks[k * bs :], bs, ns, parent_hash=head[-1])
        assert head + tail == one_shot
    # block by block with hash_block
    parent = ns.root_hash()
    step = []
    for i in range(len(toks) // bs):
        parent = hash_block(parent, toks[i * bs : (i + 1) * bs])
        step.append(parent)
    assert step == one_shot
    # the parent hash replaces the namespace: the namespace argument is then ignored
    assert block_hashes(toks[bs:], bs, HashNamespace(model="other"), parent_hash=one_shot[0]) == one_shot[1:]


@pytest.mark.parametrize(
    ("num_tokens", "block_size", "expected"),
    [
        (0, 16, 0),
        (-3, 16, 0),
        (1, 16, 0),
        (15, 16, 0),
        (16, 16, 0),   # one full block: its last token must be recomputed
        (17, 16, 1),
        (32, 16, 1),
        (33, 16, 2),
        (48, 16, 2),
        (49, 16, 3),
        (1, 1, 0),
        (2, 1, 1),
        (10, 1, 9),
        (8, 4, 1),
        (9, 4, 2),
    ],
)
def test_max_cacheable_prompt_blocks(num_tokens, block_size, expected):
    assert max_cacheable_prompt_blocks(num_tokens, block_size) == expected


def test_max_cacheable_never_covers_last_token():
    for bs in (1, 2, 4, 16):
        for n in range(1, 100):
            k = max_cacheable_prompt_blocks(n, bs)
            assert k * bs < n  # the last token is always recomputed
            assert (k + 1) * bs >= n  # and no more than one block is recomputed
