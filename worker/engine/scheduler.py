"""Continuous batching: which sequences advance in the next step, and by how much.

Invariant: each sequence has known tokens (``num_tokens``) and computed
tokens (``num_computed_tokens``); a step computes up to the per-step token
budget of the difference, oldest sequences first. New requests join as soon
as budget and blocks allow; a long prompt simply takes several steps
(chunked prefill). When the pool runs out, the newest running sequence is
preempted (its blocks freed, recomputed later), so the oldest always
progresses and nothing starves.
"""

from __future__ import annotations

import bisect
import logging
from collections import deque
from dataclasses import dataclass, field

from worker.engine.block_manager import BlockManager
from worker.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this step computes the last known token, so its logits give the next token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # sorted by arrival
        self._by_id: dict[str, Sequence] = {}  # every waiting or running sequence
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self._by_id[seq.request_id] = seq

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def find(self, request_id: str) -> Sequence | None:
        return self._by_id.get(request_id)

    def finish(self, seq: Sequence) -> None:
        """Remove ``seq`` from the queues and free its blocks (finished or aborted)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.bm.free(seq)
        seq.status = SequenceStatus.FINISHED
        if self._by_id.get(seq.request_id) is seq:
            del self._by_id[seq.request_id]

    def waiting_prefill_tokens(self) -> int:
        return sum(s.num_tokens - s.num_computed_tokens for s in self.waiting) + sum(
            s.num_tokens - s.num_computed_tokens - 1 for s in self.running if s.num_tokens - s.num_computed_tokens > 1
        )

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.bm.allocate(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
            i += 1
        if out.preempted:
            return out  # the pool is full: admit nothing new this step
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            match = self.bm.match_prefix(seq) if not seq.block_table else None
            computed = seq.num_computed_tokens + (match.num_tokens if match else 0)
            num_new = min(seq.num_tokens - computed, budget)
            if not self.bm.allocate(seq, num_new, match):
                break
            if seq.num_cached_tokens < 0:
                seq.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.reset_for_recompute()
        self.num_preemptions += 1
        # back to the head of the queue, keeping the waiting queue in arrival order
        pos = 0
        while pos < len(self.waiting) and self.waiting[pos].arrival < seq.arrival:
            pos += 1
        self.waiting.insert(pos, seq)
        logger.debug("preempted %s (%d tokens to recompute)", seq.request_id, seq.num_tokens)
