"""The one block-hash definition shared by the engine's prefix cache and the router.

A prompt is cut into full blocks of ``block_size`` tokens. Block ``i``'s hash
covers block ``i-1``'s hash and its own tokens, so equal hashes mean equal
whole prefixes, not just equal blocks. The router and every worker must agree
bit for bit, across processes and machines, so the hash is a keyed BLAKE2b
(never Python's randomized ``hash``) truncated to 64 bits, and the scheme name
is exchanged in ``ModelInfo.hash_scheme`` so a mismatch is detected, not
silently missed.

Extra keys (the model name, a LoRA adapter, a per-tenant cache salt) are mixed
into the root of every chain, so different namespaces never share blocks.

Only full blocks are hashed: a partial trailing block is never shared.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

HASH_SCHEME = "blake2b64-v1"
"""Identifies this function; bump it whenever the byte layout below changes."""

_ROOT_PERSON = b"kvmesh-root"
_BLOCK_PERSON = b"kvmesh-block"


@dataclass(frozen=True)
class HashNamespace:
    """Keys that separate prefix-cache namespaces.

    Two requests can share cached blocks only if every field is equal.
    """

    model: str = ""
    adapter: str = ""
    cache_salt: str = ""

    def root_hash(self) -> int:
        """The parent hash of the first block of every chain in this namespace."""
        return _root_hash(self.model, self.adapter, self.cache_salt)


@functools.lru_cache(maxsize=4096)
def _root_hash(*parts: str) -> int:
    # Memoized: the router hashes every prompt from its namespace root, and
    # the set of (model, adapter, cache_salt) in use is small.
    h = hashlib.blake2b(digest_size=8, person=_ROOT_PERSON)
    for part in parts:
        data = part.encode("utf-8")
        h.update(struct.pack("<I", len(data)))
        h.update(data)
    return int.from_bytes(h.digest(), "little")


_BLOCK_HASHER = hashlib.blake2b(digest_size=8, person=_BLOCK_PERSON)
"""Keyed once; every block hash starts from a copy (cheaper than re-keying)."""


def hash_block(parent_hash: int, tokens: Sequence[int]) -> int:
    """Hash one full block given its parent's hash (or the namespace root)."""
    h = _BLOCK_HASHER.copy()
    h.update(parent_hash.to_bytes(8, "little"))
    h.update(struct.pack(f"<{len(tokens)}i", *tokens))
    return int.from_bytes(h.digest(), "little")


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    namespace: HashNamespace = HashNamespace(),
    *,
    parent_hash: int | None = None,
) -> list[int]:
    """Chained hashes of every full block of ``token_ids``.

    ``parent_hash`` continues an existing chain (for appending blocks to a
    sequence whose earlier blocks are already hashed); by default the chain
    starts at the namespace root. Runs in time linear in ``len(token_ids)``:
    the tokens are packed once (int32 little-endian), each block's digest (8 little-endian bytes)
    is fed to the next block as its parent as is, and the digests become
    ints in one ``struct.unpack``. On the router this is the dominant cost of
    a KV-aware placement (docs/PERFORMANCE.md, "KV routing"), so keep it lean.
    """
    num_blocks, data = _full_blocks(token_ids, block_size)
    if num_blocks == 0:
        return []
    parent = namespace.root_hash() if parent_hash is None else parent_hash
    digests = _chain(parent.to_bytes(8, "little"), data, 4 * block_size)
    return list(struct.unpack(f"<{num_blocks}Q", digests))


def _full_blocks(token_ids: Sequence[int], block_size: int) -> tuple[int, bytes]:
    """(number of full blocks, their tokens packed as int32 little-endian): the preamble of
    every chain hash. Packs all ids and cuts the bytes: slicing the id list first would
    double the cost; ``struct`` is twice as fast as ``array("i")`` here."""
    if block_size <= 0:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    num_blocks = len(token_ids) // block_size
    if num_blocks == 0:
        return 0, b""
    data = struct.pack(f"<{len(token_ids)}i", *token_ids)
    return num_blocks, data[: 4 * num_blocks * block_size] if len(token_ids) % block_size else data


def _chain(parent_digest: bytes, data: bytes, step: int) -> bytes:
    """The digests (8 bytes each, concatenated) of the blocks of ``data``, ``step`` bytes
    each, chained from ``parent_digest``: each digest is fed to the next block as is."""
    copy = _BLOCK_HASHER.copy
    digest = parent_digest
    digests: list[bytes] = []
    for start in range(0, len(data), step):
        h = copy()
        h.update(digest + data[start : start + step])     # parent_le64 || tokens_le32
        digest = h.digest()
        digests.append(digest)
    return b"".join(digests)


class CachedBlockHasher:
    """``block_hashes`` with a memo of recently hashed prompt segments (the router's).

    Prompts that share a prefix (the premise of KV-aware routing) share its
    hashes; the router hashes every prompt from its root. This memo keys each
    run of ``segment_blocks`` full blocks by (its parent's digest, its token
    bytes) and keeps its digests, so a segment seen before costs one dict
    lookup (Python's hash of ~2 KiB and a compare) instead of
    ``segment_blocks`` BLAKE2b calls. Results are identical to
    ``block_hashes`` (a key holds every input of the segment's hashes). The
    memo is an LRU of at most ``max_segments`` entries
    (~``segment_blocks * (4 * block_size + 8)`` bytes each); a segment enters it
    on its second sighting, so one-off text (a unique question) does not push
    shared prefixes out.
    """

    def __init__(self, segment_blocks: int = 32, max_segments: int = 4096) -> None:
        if segment_blocks < 1 or max_segments < 1:
            raise ValueError(f"segment_blocks and max_segments must be >= 1, got {segment_blocks}, {max_segments}")
        self.segment_blocks = segment_blocks
        self.max_segments = max_segments
        self._memo: OrderedDict[bytes, bytes] = OrderedDict()
        self._seen: set[int] = set()             # hash() of segments seen once (the doorkeeper)
        self.hits = 0
        self.misses = 0

    def __call__(self, token_ids: Sequence[int], block_size: int,
                 namespace: HashNamespace = HashNamespace()) -> list[int]:
        num_blocks, data = _full_blocks(token_ids, block_size)
        if num_blocks == 0:
            return []
        step = 4 * block_size
        seg = self.segment_blocks * step
        memo = self._memo
        parent = namespace.root_hash().to_bytes(8, "little")
        pieces: list[bytes] = []
        full = len(data) - len(data) % seg
        for start in range(0, full, seg):
            key = parent + data[start : start + seg]
            digests = memo.get(key)
            if digests is None:
                self.misses += 1
                digests = _chain(parent, key[8:], step)
                self._admit(key, digests)
            else:
                self.hits += 1
                memo.move_to_end(key)
            pieces.append(digests)
            parent = digests[-8:]
        if full < len(data):
            pieces.append(_chain(parent, data[full:], step))
        return list(struct.unpack(f"<{num_blocks}Q", b"".join(pieces)))

    def _admit(self, key: bytes, digests: bytes) -> None:
        seen = self._seen
        fingerprint = hash(key)                  # cached by the bytes object since memo.get
        if fingerprint not in seen:
            if len(seen) >= 4 * self.max_segments:
                seen.clear()
            seen.add(fingerprint)
            return
        seen.discard(fingerprint)
        self._memo[key] = digests
        if len(self._memo) > self.max_segments:
            self._memo.popitem(last=False)


def max_cacheable_prompt_blocks(num_prompt_tokens: int, block_size: int) -> int:
    """How many leading full prompt blocks may be served from the cache.

    The rule every engine re-derives: even on a full hit, the last prompt
    token must be recomputed, because its logits produce the first output
    token and logits are not cached. So a prompt of exactly ``k`` full blocks
    may reuse at most ``k - 1`` of them (recomputing the whole last block keeps
    the cache block-granular). The router uses the same rule to estimate the
    prefill work a worker still has to do.
    """
    if num_prompt_tokens <= 0:
        return 0
    return (num_prompt_tokens - 1) // block_size
