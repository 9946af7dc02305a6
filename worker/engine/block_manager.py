"""The paged KV pool's bookkeeping: block tables, reference counts, prefix cache.

Every block is either referenced by running sequences (``ref_count > 0``) or
free. Free blocks sit in one LRU queue; a free block may still hold a cached
full block (it has a hash) and can be revived by a prefix hit until it is
evicted, which happens only when a fresh block is needed. So the cache never
holds more than the pool, and nothing is ever evicted that a running
sequence uses.

Every change to the set of reusable blocks is recorded as a KV event
(stored / removed) for the router's prefix index, in the order it happened.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from kvstore.hashing import max_cacheable_prompt_blocks
from worker.engine.sequence import Sequence
from worker.engine.types import AllBlocksCleared, BlockRemoved, BlockStored, KvCacheEvent


@dataclass
class _Block:
    ref_count: int = 0
    hash: int | None = None


@dataclass(frozen=True)
class PrefixMatch:
    """Cached blocks a new sequence can reuse (block ids in chain order)."""

    block_ids: tuple[int, ...]
    block_size: int

    @property
    def num_tokens(self) -> int:
        return len(self.block_ids) * self.block_size




class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block() for _ in range(num_blocks)]
        # front = evicted first; values unused
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self._events: list[KvCacheEvent] = []

    # ---- queries -------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_free_blocks(self) -> int:
        return sum(1 for b in self._free if self._blocks[b].hash is not None)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> PrefixMatch:
        """Longest run of cached full blocks at the start of ``seq``'s tokens.

        Never covers the last known token (see ``max_cacheable_prompt_blocks``).
        Mutates nothing.
        """
        if not self.enable_prefix_caching:
            return PrefixMatch((), self.block_size)
        limit = max_cacheable_prompt_blocks(seq.num_tokens, self.block_size)
        ids: list[int] = []
        for h in seq.full_block_hashes(limit, self.block_size):
            block_id = self._cached.get(h)
            if block_id is None:
                break
            ids.append(block_id)
        return PrefixMatch(tuple(ids), self.block_size)

    # ---- allocation ------------------------------------------------------
    def allocate(self, seq: Sequence, num_new_tokens: int, match: PrefixMatch | None = None) -> bool:
        """Make room for ``num_new_tokens`` more computed tokens of ``seq``.

        With ``match`` (first admission only), the matched cached blocks are
        taken first and ``seq.num_computed_tokens`` advances past them.
        Returns False, changing nothing, when the pool is too small now.
        """
        hit_ids = match.block_ids if match else ()
        computed = seq.num_computed_tokens + len(hit_ids) * self.block_size
        needed = self.blocks_needed(computed + num_new_tokens) - len(seq.block_table) - len(hit_ids)
        revived = sum(1 for b in hit_ids if self._blocks[b].ref_count == 0)
        if max(needed, 0) + revived > len(self._free):
            return False
        for b in hit_ids:
            block = self._blocks[b]
            if block.ref_count == 0:
                del self._free[b]
            block.ref_count += 1
            seq.block_table.append(b)
        if hit_ids:
            seq.num_computed_tokens = computed
            seq.num_registered_blocks = len(seq.block_table)
        for _ in range(max(needed, 0)):
            seq.block_table.append(self._take_fresh_block())
        return True

    def _take_fresh_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        if block.hash is not None:
            del self._cached[block.hash]
            self._events.append(BlockRemoved((block.hash,)))
            block.hash = None
        block.ref_count = 1
        return block_id

    def register_computed_blocks(self, seq: Sequence) -> None:
        """Enter ``seq``'s newly completed full blocks in the prefix cache.

        Called after a step advanced ``num_computed_tokens``. A block whose
        hash is already cached elsewhere (two sequences computed the same
        prefix at once) stays private and is simply freed later.
        """
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        start = seq.num_registered_blocks
        if full <= start:
            return
        hashes = seq.full_block_hashes(full, self.block_size)
        stored: list[int] = []
        first_parent: int | None = hashes[start - 1] if start > 0 else None
        for i in range(start, full):
            h = hashes[i]
            block_id = seq.block_table[i]
            if h in self._cached or self._blocks[block_id].hash is not None:
                if stored:
                    self._emit_stored(seq, stored, first_parent, i - len(stored))
                    stored = []
                first_parent = h
                continue
            self._blocks[block_id].hash = h
            self._cached[h] = block_id
            stored.append(h)
        if stored:
            self._emit_stored(seq, stored, first_parent, full - len(stored))
        seq.num_registered_blocks = full

    def _emit_stored(self, seq: Sequence, hashes: list[int], parent: int | None, first_block: int) -> None:
        bs = self.block_size
        tokens = tuple(seq.token_ids[first_block * bs : (first_block + len(hashes)) * bs])
        self._events.append(BlockStored(tuple(hashes), parent, tokens, bs))

    def free(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks. Cached blocks stay revivable; the tail of the
        sequence is queued for eviction before its head (heads are shared more)."""
        for block_id in reversed(seq.block_table):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.hash is None:
                    self._free.move_to_end(block_id, last=False)
        seq.block_table = []

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block not in use; False if some block is still referenced."""
        if self.num_used_blocks:
            return False
        for h in list(self._cached):
            self._blocks[self._cached.pop(h)].hash = None
        self._events.append(AllBlocksCleared())
        return True

    @property
    def num_cached_blocks(self) -> int:
        """Blocks entered in the prefix cache (referenced or not)."""
        return len(self._cached)

    def cached_block_hashes(self) -> list[int]:
        return list(self._cached)

    def drain_events(self) -> list[KvCacheEvent]:
        events, self._events = self._events, []
        return events
