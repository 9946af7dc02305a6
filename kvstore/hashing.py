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

import hashlib
import struct
from array import array
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
        h = hashlib.blake2b(digest_size=8, person=_ROOT_PERSON)
        for part in (self.model, self.adapter, self.cache_salt):
            data = part.encode("utf-8")
            h.update(struct.pack("<I", len(data)))
            h.update(data)
        return int.from_bytes(h.digest(), "little")


def hash_block(parent_hash: int, tokens: Sequence[int]) -> int:
    """Hash one full block given its parent's hash (or the namespace root)."""
    h = hashlib.blake2b(digest_size=8, person=_BLOCK_PERSON)
    h.update(parent_hash.to_bytes(8, "little"))
    h.update(array("i", tokens).tobytes())
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
    starts at the namespace root. Runs in time linear in ``len(token_ids)``.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    parent = namespace.root_hash() if parent_hash is None else parent_hash
    out: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        out.append(parent)
    return out


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
