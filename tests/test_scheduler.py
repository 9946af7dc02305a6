"""The scheduler and block manager as a pure state machine, no model.

``Driver`` plays the engine: after each ``schedule()`` it advances
``num_computed_tokens`` exactly as ``LLMEngine._update`` does, registers the
completed blocks, appends a made-up token for every sequence that samples
(a pure function of the request and position, so lost or duplicated tokens
show up) and finishes a request at its ``max_tokens``. Every step is checked
against the scheduler's contract: token budget, batch size, KV room for every
scheduled token, FIFO admission, newest-first preemption with recompute from
scratch, and progress of the oldest request.
"""

from __future__ import annotations

import itertools
import random

import pytest

from kvstore.hashing import HashNamespace, max_cacheable_prompt_blocks
from worker.engine.block_manager import BlockManager
from worker.engine.scheduler import Scheduler, SchedulerOutput
from worker.engine.sequence import Sequence, SequenceStatus
from worker.engine.types import EngineRequest, FinishReason, SamplingOptions

NS = HashNamespace(model="m")


def fake_token(seq: Sequence, position: int) -> int:
    """The "model output" at ``position`` of ``seq``: deterministic, so recompute can't change it."""
    return (seq.arrival * 31 + position * 7) % 97 + 1


class Driver:
    def __init__(self, num_blocks: int, block_size: int, max_num_seqs: int, budget: int, caching: bool = True) -> None:
        self.bm = BlockManager(num_blocks, block_size, caching)
        self.sched = Scheduler(self.bm, max_num_seqs, budget)
        self.bs = block_size
        self.caching = caching
        self.budget = budget
        self.max_num_seqs = max_num_seqs
        self.arrivals = itertools.count()
        self.seqs: list[Sequence] = []
        self.finished: list[Sequence] = []
        self.admission_order: list[Sequence] = []
        self.preempted_pending: set[int] = set()  # ids of preempted sequences not yet rescheduled
        self.num_preempted = 0
        self.victims: list[Sequence] = []
        self.steps = 0
        self.max_running = 0
        self.max_step_tokens = 0
        self.log: list[list[tuple[str, int]]] = []  # per step: (request id, num_new_tokens)

    def add(self, prompt: list[int], max_tokens: int) -> Sequence:
        arrival = next(self.arrivals)
        assert len(prompt) + max_tokens <= self.bm.num_blocks * self.bs, "the engine caps requests at the pool size"
        seq = Sequence(
            request=EngineRequest(f"r{arrival}", tuple(prompt), SamplingOptions(temperature=0.0)),
            arrival=arrival,
            max_tokens=max_tokens,
            namespace=NS,
        )
        self.sched.add(seq)
        self.seqs.append(seq)
        return seq

    def step(self) -> SchedulerOutput:
        sched, bm, bs = self.sched, self.bm, self.bs
        running_before = list(sched.running)
        waiting_before = list(sched.waiting)
        plan = sched.schedule()
        self.steps += 1
        self.log.append([(s.seq.request_id, s.num_new_tokens) for s in plan.scheduled])

        # ---- the plan honours the limits
        assert plan.num_tokens <= self.budget, f"step used {plan.num_tokens} tokens, budget {self.budget}"
        assert len(plan.scheduled) <= self.max_num_seqs
        assert len(sched.running) <= self.max_num_seqs
        assert len({id(s.seq) for s in plan.scheduled}) == len(plan.scheduled), "a sequence scheduled twice"
        self.max_running = max(self.max_running, len(sched.running))
        self.max_step_tokens = max(self.max_step_tokens, plan.num_tokens)
        for item in plan.scheduled:
            seq, n = item.seq, item.num_new_tokens
            assert seq.status is SequenceStatus.RUNNING and seq in sched.running
            assert 1 <= n <= seq.num_tokens - seq.num_computed_tokens
            assert len(seq.block_table) == -(-(seq.num_computed_tokens + n) // bs), "KV room does not match the tokens"
            if id(seq) in self.preempted_pending:  # recomputed from scratch (or from a prefix hit)
                self.preempted_pending.discard(id(seq))
                start = seq.num_computed_tokens
                if self.caching:
                    assert start % bs == 0 and start <= max_cacheable_prompt_blocks(seq.num_tokens, bs) * bs
                else:
                    assert start == 0

        # ---- the oldest running request always progresses
        if running_before:
            assert plan.scheduled and plan.scheduled[0].seq is running_before[0]

        # ---- preemption takes the newest running requests and resets them
        for victim in plan.preempted:
            assert victim.status is SequenceStatus.WAITING and victim in sched.waiting
            assert victim.num_computed_tokens == 0 and victim.block_table == []
            assert all(s.arrival < victim.arrival for s in sched.running), "preempted while a newer request runs"
            assert victim in running_before
            self.preempted_pending.add(id(victim))
            self.victims.append(victim)
            self.num_preempted += 1
        assert not set(map(id, plan.preempted)) & {id(s.seq) for s in plan.scheduled}

        # ---- FIFO admission: newcomers are a prefix of the waiting queue, in order
        admitted = [s.seq for s in plan.scheduled if s.seq not in running_before]
        assert admitted == waiting_before[: len(admitted)], "admission skipped an older waiting request"
        if plan.preempted:
            assert admitted == [], "admitted a request in a step that had to preempt"
        for seq in admitted:
            if seq.num_cached_tokens >= 0 and seq not in self.admission_order:
                self.admission_order.append(seq)
        self._check_queues()

        # ---- play the engine: advance, register, sample, finish
        for item in plan.scheduled:
            seq = item.seq
            samples = item.samples
            seq.num_computed_tokens += item.num_new_tokens
            bm.register_computed_blocks(seq)
            if samples:
                seq.token_ids.append(fake_token(seq, seq.num_tokens))
                if seq.num_output_tokens >= seq.max_tokens:
                    seq.finish_reason = FinishReason.LENGTH
                    sched.finish(seq)
                    self.finished.append(seq)
        self._check_queues()
        return plan

    def _check_queues(self) -> None:
        sched = self.sched
        running = [s.arrival for s in sched.running]
        waiting = [s.arrival for s in sched.waiting]
        assert running == sorted(running)
        assert waiting == sorted(waiting), "the waiting queue left arrival order"
        assert all(s.status is SequenceStatus.RUNNING for s in sched.running)
        assert all(s.status is SequenceStatus.WAITING and s.block_table == [] for s in sched.waiting)
        used = {b for s in sched.running for b in s.block_table}
        assert self.bm.num_used_blocks == len(used), "blocks held outside the running sequences"

    def run(self, max_steps: int, arrivals: dict[int, list[tuple[list[int], int]]] | None = None) -> None:
        arrivals = arrivals or {}
        for step in range(max_steps):
            for prompt, max_tokens in arrivals.pop(step, []):
                self.add(prompt, max_tokens)
            if not self.sched.has_unfinished() and not arrivals:
                return
            self.step()
        raise AssertionError(f"requests still unfinished after {max_steps} steps: starvation or livelock")

    def check_all_finished(self) -> None:
        assert not self.sched.has_unfinished()
        assert sorted(s.arrival for s in self.finished) == sorted(s.arrival for s in self.seqs)
        for seq in self.seqs:
            assert seq.status is SequenceStatus.FINISHED and seq.finish_reason is FinishReason.LENGTH
            assert seq.num_output_tokens == seq.max_tokens
            assert seq.output_token_ids == [
                fake_token(seq, seq.num_prompt_tokens + j) for j in range(seq.max_tokens)
            ], f"{seq.request_id}: tokens lost or duplicated"
        assert self.bm.num_used_blocks == 0


def random_workload(seed: int, n: int, max_prompt: int, max_out: int, vocab: int = 5, spread: int = 6):
    """Arrival step -> [(prompt, max_tokens)]; small vocab and shared heads give prefix hits."""
    rng = random.Random(seed)
    heads = [[rng.randrange(vocab) for _ in range(max_prompt)] for _ in range(2)]
    out: dict[int, list[tuple[list[int], int]]] = {}
    for _ in range(n):
        length = rng.randint(1, max_prompt)
        cut = rng.randint(0, length)
        prompt = rng.choice(heads)[:cut] + [rng.randrange(vocab) for _ in range(length - cut)]
        out.setdefault(rng.randrange(spread), []).append((prompt, rng.randint(1, max_out)))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_budget_and_batch_limits(seed):
    d = Driver(num_blocks=256, block_size=4, max_num_seqs=3, budget=10)
    d.run(2000, random_workload(seed, n=12, max_prompt=30, max_out=10))
    d.check_all_finished()
    assert d.max_running == 3, "the batch limit was never reached: the test proves little"
    assert d.max_step_tokens == 10, "the budget was never filled: the test proves little"
    assert d.num_preempted == 0  # a big pool never preempts


def test_long_prompt_is_chunked():
    d = Driver(num_blocks=64, block_size=4, max_num_seqs=8, budget=20)
    long = d.add(list(range(1, 51)), max_tokens=3)
    short = d.add([7, 8, 9, 10, 11], max_tokens=2)
    d.run(100)
    d.check_all_finished()
    # the long prompt takes three steps; the short one waits for budget, then joins
    assert d.log == [
        [("r0", 20)],
        [("r0", 20)],
        [("r0", 10), ("r1", 5)],     # both finish prefill and sample their first token
        [("r0", 1), ("r1", 1)],
        [("r0", 1)],
    ]
    assert long.num_cached_tokens == 0 and short.num_cached_tokens == 0


def test_chunked_prefill_with_random_budgets():
    for budget in (1, 3, 7):
        d = Driver(num_blocks=128, block_size=4, max_num_seqs=4, budget=budget, caching=False)
        d.run(3000, random_workload(budget, n=6, max_prompt=40, max_out=4))
        d.check_all_finished()
        per_request: dict[str, list[int]] = {}
        for step in d.log:
            for rid, n in step:
                per_request.setdefault(rid, []).append(n)
        for seq in d.seqs:
            chunks = per_request[seq.request_id]
            # no preemption here: the chunks add up to exactly the tokens computed
            assert sum(chunks) == seq.num_tokens - 1
            assert len(chunks) >= -(-seq.num_prompt_tokens // budget)


def test_second_identical_prompt_starts_from_a_prefix_hit():
    d = Driver(num_blocks=64, block_size=4, max_num_seqs=4, budget=64)
    a = d.add(list(range(1, 15)), max_tokens=2)
    d.run(50)
    b = d.add(list(range(1, 15)), max_tokens=2)
    d.run(50)
    d.check_all_finished()
    assert a.num_cached_tokens == 0
    assert b.num_cached_tokens == 12            # 3 full blocks; the last prompt token is recomputed
    assert d.log[-2] == [("r1", 2)]


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("seed", range(5))
def test_tiny_pool_preempts_and_everything_finishes(seed, caching):
    # 12 blocks of 4 = 48 tokens; requests of up to 40 tokens: constant pressure
    d = Driver(num_blocks=12, block_size=4, max_num_seqs=6, budget=24, caching=caching)
    d.run(3000, random_workload(100 + seed, n=10, max_prompt=30, max_out=10))
    d.check_all_finished()
    assert d.num_preempted > 0, "the pool never ran out: the test proves little"
    assert d.sched.num_preemptions == d.num_preempted


def test_preemption_victim_is_the_newest():
    # 6 blocks of 2: three requests of 3 prompt tokens each growing to 8 tokens
    d = Driver(num_blocks=6, block_size=2, max_num_seqs=3, budget=16, caching=False)
    a = d.add([1, 2, 3], max_tokens=5)
    b = d.add([4, 5, 6], max_tokens=5)
    c = d.add([7, 8, 9], max_tokens=5)
    plan = d.step()                               # all admitted: 2 blocks each, pool full
    assert [s.seq for s in plan.scheduled] == [a, b, c] and d.bm.num_free_blocks == 0
    d.step()                                      # each appends a 4th token: fits in its 2 blocks
    plan = d.step()                               # 5th token: a needs a 3rd block -> c goes
    assert plan.preempted == [c]
    assert [s.seq for s in plan.scheduled] == [a, b]
    d.run(200)
    d.check_all_finished()
    assert a not in d.victims                     # the oldest is never preempted
    assert c in d.victims and b in d.victims      # b goes once c is out and a still grows
    assert a.num_cached_tokens == 0


def test_fifo_admission_one_at_a_time():
    d = Driver(num_blocks=64, block_size=4, max_num_seqs=1, budget=8)
    for i in range(5):
        d.add([i + 1] * (3 + 2 * i), max_tokens=2)
    d.run(200)
    d.check_all_finished()
    assert [s.request_id for s in d.admission_order] == [f"r{i}" for i in range(5)]
    # with one slot, each request finishes before the next one starts
    order = [rid for step in d.log for rid, _ in step]
    assert order == sorted(order, key=lambda r: int(r[1:]))


def test_blocked_head_is_not_overtaken():
    """When the oldest waiting request does not fit, smaller newer ones wait behind it."""
    d = Driver(num_blocks=8, block_size=4, max_num_seqs=4, budget=64, caching=False)
    big0 = d.add(list(range(1, 21)), max_tokens=6)    # 5 blocks, grows to 7
    big1 = d.add(list(range(21, 41)), max_tokens=2)   # 5 blocks: does not fit beside big0
    small = d.add([1, 2], max_tokens=2)               # would fit, but must not overtake big1
    d.step()
    assert [s.request_id for s in d.sched.running] == ["r0"]
    assert list(d.sched.waiting) == [big1, small]
    d.run(200)
    d.check_all_finished()
    first_step = {rid: i for i, step in reversed(list(enumerate(d.log))) for rid, _ in step}
    assert first_step["r1"] <= first_step["r2"]
    assert big0.num_cached_tokens == 0


def test_finish_waiting_and_running_requests():
    d = Driver(num_blocks=16, block_size=4, max_num_seqs=1, budget=8)
    a = d.add(list(range(1, 10)), max_tokens=5)
    b = d.add([1, 2, 3], max_tokens=5)
    d.step()
    assert a.status is SequenceStatus.RUNNING and b.status is SequenceStatus.WAITING
    assert d.bm.num_used_blocks == 2
    assert d.sched.find("r1") is b and d.sched.find("nope") is None
    d.sched.finish(b)                                   # abort while waiting
    assert b.status is SequenceStatus.FINISHED and d.sched.find("r1") is None
    d.sched.finish(a)                                   # abort while running: blocks come back
    assert d.bm.num_used_blocks == 0 and not d.sched.has_unfinished()
    assert d.sched.schedule().scheduled == []


def test_waiting_prefill_tokens():
    d = Driver(num_blocks=64, block_size=4, max_num_seqs=4, budget=10, caching=False)
    d.add(list(range(1, 26)), max_tokens=2)
    d.add([1, 2, 3], max_tokens=2)
    assert d.sched.waiting_prefill_tokens() == 28
    d.step()                                            # 10 of the first prompt
    assert d.sched.waiting_prefill_tokens() == 15 - 1 + 3
