"""The router's state for KV-aware placement, and its settings.

``KvState`` bundles what the ``kv`` policy reads and what keeps it current:

* ``index`` (``kvstore.PrefixIndex``): which worker caches which block, fed
  by the workers' KV events (``kv_indexer.py``);
* ``recent`` (``kvstore.RecentPrefixes``): this router's own placements for
  ``predict_ttl_s`` seconds, the blocks the chosen worker is about to cache;
* ``ledger`` (``load_ledger.py``): the load this router itself put on each worker;
* ``hasher`` (``kvstore.CachedBlockHasher``): prompts to block hashes, in the
  engine's namespace, with shared prefixes memoized.

The index and the predictions share one ``WorkerSlots``, so a single walk over
a prompt's blocks reads both. Everything here runs on the event loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from kvstore.hashing import CachedBlockHasher, HashNamespace
from kvstore.index import PrefixIndex, RecentPrefixes, WorkerSlots
from orchestrator.load_ledger import LoadLedger


class PromptView(Protocol):
    """What hashing a prompt needs (``placement.RequestView`` has it)."""

    model: str
    prompt_token_ids: Sequence[int]
    cache_salt: str
    block_size: int


@dataclass(frozen=True)
class KvSettings:
    """Settings of the ``kv`` policy (see the formula in this module's docstring)."""

    prefill_weight: float = 1.0
    """Weight of the prefill term (blocks the worker must compute before this request's first token)."""

    decode_weight: float = 0.25
    """Weight of the decode term (KV blocks of the requests decoding there). The ratio
    prefill_weight / decode_weight is how many prompt-sized requests of extra decode load a
    full prefix hit is worth."""

    overlap_credit: float = 1.0
    """How much of a cached block is subtracted from the prompt's prefill (0 = ignore caches)."""

    temperature: float = 0.0
    """0 picks the lowest cost; > 0 samples from a softmax over normalized costs."""

    predict_ttl_s: float = 5.0
    """How long the router counts its own placements as cached on the chosen worker
    (until the worker's "stored" events take over); 0 turns prediction off."""

    prefill_timeout_s: float = 30.0
    """After this long a placed request stops counting as queued prefill even if no
    "stored" event said so (its worker publishes none, or its blocks were already cached)."""

    hash_cache_segments: int = 4096
    """Prompt segments of 32 blocks whose hashes the router memoizes (an LRU, ~2.4 KiB
    each at block size 16): a shared prefix is hashed once, not per request."""

    index_max_blocks_per_worker: int = 1_000_000
    """Cap on one worker's entries in the router's prefix index (its KV pool size is used
    when smaller): bounds the index's memory (~170 B per entry + ~100 B per distinct block)."""

    log_decisions: bool = False
    """Log every decision with its terms at INFO (else at DEBUG)."""

    def __post_init__(self) -> None:
        for name in ("prefill_weight", "decode_weight", "overlap_credit", "temperature", "predict_ttl_s"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"kv {name} must be a finite number >= 0, got {value}")
        if self.prefill_weight == 0 and self.decode_weight == 0:
            raise ValueError("kv prefill_weight and decode_weight are both 0; give one a positive weight")
        if self.prefill_timeout_s <= 0:
            raise ValueError(f"kv prefill_timeout_s must be > 0, got {self.prefill_timeout_s}")
        if self.hash_cache_segments < 1:
            raise ValueError(f"kv hash_cache_segments must be >= 1, got {self.hash_cache_segments}")
        if self.index_max_blocks_per_worker < 1:
            raise ValueError(f"kv index_max_blocks_per_worker must be >= 1, got {self.index_max_blocks_per_worker}")

    @property
    def formula(self) -> str:
        return f"cost = {self.prefill_weight:g} * prefill_blocks + {self.decode_weight:g} * decode_blocks"


class KvState:
    """The router-side state KV-aware placement reads: the event-fed prefix index,
    this router's recent placements, and its load ledger."""

    def __init__(self, settings: KvSettings = KvSettings(), clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self._slots = WorkerSlots()       # one bit per worker in both indexes: one walk reads both
        self.index = PrefixIndex(self._slots)
        self.recent = RecentPrefixes(settings.predict_ttl_s, slots=self._slots)
        self.ledger = LoadLedger(settings.prefill_timeout_s, holds=self.index.holds_on)
        self.hasher = CachedBlockHasher(max_segments=settings.hash_cache_segments)

    def prompt_hashes(self, request: PromptView) -> list[int]:
        """The prompt's block hashes, exactly as the engine computes them (same namespace)."""
        namespace = HashNamespace(model=request.model, cache_salt=request.cache_salt)
        return self.hasher(request.prompt_token_ids, request.block_size, namespace)

    def overlaps(self, hashes: Sequence[int], now: float) -> tuple[dict[str, int], dict[str, int]]:
        """(cached, predicted) leading blocks per worker; predicted counts a block
        that is cached or placed there by this router within predict_ttl_s."""
        return self.index.overlaps_with(self.recent, hashes, now)

    def forget_worker(self, worker_id: str) -> None:
        self.index.remove_worker(worker_id)
        self.recent.remove_worker(worker_id)
        self.ledger.drop_worker(worker_id)
        self._slots.release(worker_id)
