"""One request's state inside the engine.

There is no prefill phase or decode phase: a sequence has ``num_tokens``
known tokens (prompt plus output so far) and ``num_computed_tokens`` whose KV
is in the cache; every step computes some of the difference. Chunked prefill,
prefix-cache hits (which advance ``num_computed_tokens`` without compute) and
recompute after preemption (which resets it to 0) are all the same rule.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from kvstore.hashing import HashNamespace, block_hashes
from worker.engine.types import EngineRequest, FinishReason, SamplingOptions


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request: EngineRequest
    arrival: int
    """Admission order; the scheduler keeps the oldest requests progressing."""
    max_tokens: int
    """Effective output limit (the request's, capped by the context window)."""
    namespace: HashNamespace
    generator: torch.Generator | None = None
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = -1
    """Prompt tokens served from the prefix cache at first admission; -1 until admitted."""
    num_registered_blocks: int = 0
    """Leading blocks of ``block_table`` already entered in the prefix cache."""
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    _hashes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.request.prompt_token_ids)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def sampling(self) -> SamplingOptions:
        return self.request.sampling

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    def full_block_hashes(self, num_blocks: int, block_size: int) -> list[int]:
        """Chained hashes of the first ``num_blocks`` full blocks (memoized, extended on demand)."""
        have = len(self._hashes)
        if num_blocks > have:
            parent = self._hashes[-1] if self._hashes else None
            start = have * block_size
            self._hashes.extend(
                block_hashes(self.token_ids[start : num_blocks * block_size], block_size, self.namespace, parent_hash=parent)
            )
        return self._hashes[:num_blocks]

    def reset_for_recompute(self) -> None:
        """After preemption: the KV is gone, every known token is recomputed."""
        self.num_computed_tokens = 0
        self.block_table = []
        self.num_registered_blocks = 0
        self.status = SequenceStatus.WAITING
