"""Sends a workload on an arrival schedule and records what came back.

Open loop: one dispatcher sleeps until each request's scheduled time and
starts it as its own task, whatever the server is doing. Closed loop: N slot
tasks each send their next request as soon as their previous one ends. A
chat turn never leaves before its previous turn has ended; that wait is not
counted against the tool (``RequestRecord.ready``).

Honesty: every request's lateness (sent - ready) is recorded; so are the
process's CPU time over the measured phase and the event loop's lag (a
10 ms sleeper's oversleep). Every loop is bounded: no request is issued after
``max_duration_s``, and each one ends within the backend's request timeout
(stragglers past that plus a grace period are cancelled and counted).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Sequence

from orchestrator.bench.arrivals import Arrivals
from orchestrator.bench.backends import Backend
from orchestrator.bench.metrics import Stats
from orchestrator.bench.progress import Counters, Progress
from orchestrator.bench.records import OutgoingRequest, RequestRecord, RequestSpec, StreamResult
from orchestrator.bench.tokens import TokenSource

logger = logging.getLogger(__name__)

START_LEAD_S = 0.02
"""The first request is scheduled this long after the dispatcher starts."""
LAG_PROBE_S = 0.01
STRAGGLER_GRACE_S = 5.0
WARMUP_CONCURRENCY = 4


@dataclass(frozen=True)
class RunOptions:
    max_duration_s: float = 600.0
    """No request is issued later than this after the start."""
    request_timeout_s: float = 300.0
    """The backends' per-request limit; the runner waits this plus a grace period."""
    ignore_eos: bool = True
    temperature: float = 0.0
    text_prompts: bool = False
    run_id: str = "bench"
    progress: bool = True
    late_threshold_s: float = 0.010
    """Sent later than this after being due counts as late (shown live)."""
    cache_salt: str = ""


@dataclass(frozen=True)
class ClientOverhead:
    """What the load generator itself cost and how punctual it was."""

    cpu_s: float
    """Process CPU time (all threads) over the measured phase."""
    cpu_ms_per_request: float
    cpu_utilization: float
    """cpu_s / wall time of the measured phase (1.0 = one core busy)."""
    lateness_ms: Stats | None
    """sent - ready per request: how late the tool sent what was due."""
    loop_lag_ms: Stats | None
    scheduled_rate: float | None
    """Requests/s of the schedule itself (open loop), for comparison with ``send_rate``."""
    send_rate: float | None
    """Requests/s actually sent: (n - 1) / (last send - first send)."""


@dataclass(frozen=True)
class RunResult:
    records: list[RequestRecord]
    not_sent: int
    """Requests never issued because ``max_duration_s`` ran out."""
    wall_s: float
    overhead: ClientOverhead
    t0: float
    """perf_counter time of the schedule's zero (CSV times are relative to it)."""


class Runner:
    """Runs workloads against one backend; one ``run`` at a time."""

    def __init__(self, backend: Backend, source: TokenSource, options: RunOptions) -> None:
        self.backend = backend
        self.source = source
        self.options = options
        self._counter = 0

    async def warm_up(self, specs: Sequence[RequestSpec]) -> list[StreamResult]:
        """Sends ``specs`` (a few at a time) outside any measurement."""
        queue = list(specs)
        results: list[StreamResult] = []

        async def slot() -> None:
            while queue:
                spec = queue.pop(0)
                text = self.source.decode(spec.prompt_ids) if self.options.text_prompts else None
                results.append(await self.backend.send(self._outgoing(spec, spec.prompt_ids, text, False)))

        await asyncio.gather(*(slot() for _ in range(min(WARMUP_CONCURRENCY, len(specs)))))
        return results

    async def run(self, specs: Sequence[RequestSpec], arrivals: Arrivals, seed: int, label: str = "") -> RunResult:
        state = _RunState(specs, self.options.text_prompts, self.source)
        offsets = arrivals.offsets(len(specs), seed)
        counters = Counters(total=len(specs))
        progress = Progress(counters, label, enabled=self.options.progress)
        lags: list[float] = []
        lag_task = asyncio.create_task(_watch_loop(lags))
        cpu0 = time.process_time()
        t0 = time.perf_counter() + START_LEAD_S
        counters.started = t0
        stop_at = t0 + self.options.max_duration_s
        progress.start()
        try:
            if offsets is None:
                await self._closed_loop(state, counters, arrivals.concurrency or 1, t0, stop_at)
            else:
                await self._open_loop(state, counters, offsets, t0, stop_at)
        finally:
            await progress.stop()
            lag_task.cancel()
            await asyncio.gather(lag_task, return_exceptions=True)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        records = sorted(state.records, key=lambda r: r.index)
        return RunResult(records, len(specs) - len(records), wall,
                         _overhead(records, cpu, wall, lags, offsets), t0)

    # --- the two loops ------------------------------------------------------------

    async def _open_loop(self, state: _RunState, counters: Counters, offsets: Sequence[float],
                         t0: float, stop_at: float) -> None:
        tasks: set[asyncio.Task] = set()
        for spec, offset in zip(state.specs, offsets):
            target = t0 + offset
            if target > stop_at:
                break
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.add(asyncio.create_task(self._one(state, counters, spec, target)))
        await self._drain(tasks)

    async def _closed_loop(self, state: _RunState, counters: Counters, concurrency: int,
                           t0: float, stop_at: float) -> None:
        pending = iter(state.specs)

        async def slot() -> None:
            free_at = t0
            delay = t0 - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            while time.perf_counter() < stop_at:
                spec = next(pending, None)
                if spec is None:
                    return
                free_at = (await self._one(state, counters, spec, free_at)).result.end

        tasks = {asyncio.create_task(slot()) for _ in range(min(concurrency, len(state.specs)))}
        await self._drain(tasks)

    async def _drain(self, tasks: set[asyncio.Task]) -> None:
        """Waits for everything issued; cancels what outlives timeout + grace."""
        if not tasks:
            return
        limit = self.options.max_duration_s + self.options.request_timeout_s + STRAGGLER_GRACE_S
        done, stuck = await asyncio.wait(tasks, timeout=limit)
        for task in stuck:
            task.cancel()
        await asyncio.gather(*stuck, return_exceptions=True)
        for task in done:
            task.result()   # a bug in the runner or a backend surfaces here
        if stuck:
            logger.warning("%d requests outlived the request timeout and were cancelled", len(stuck))

    # --- one request -----------------------------------------------------------------

    async def _one(self, state: _RunState, counters: Counters, spec: RequestSpec, scheduled: float) -> RequestRecord:
        ready, prompt = scheduled, spec.prompt_ids
        if spec.parent is not None:
            history = await state.history(spec.parent)
            if history is None:
                now = time.perf_counter()
                return state.add(counters, RequestRecord(
                    spec.index, scheduled, max(scheduled, now), len(spec.prompt_ids), spec.output_len,
                    StreamResult(now, now, error_kind="parent_failed", error=f"turn {spec.parent} failed"),
                    spec.parent))
            parent_prompt, parent_output, parent_end = history
            ready = max(scheduled, parent_end)
            prompt = parent_prompt + parent_output + spec.prompt_ids
        req = self._outgoing(spec, prompt, state.text(spec, prompt), state.has_children(spec.index))
        counters.in_flight += 1
        try:
            result = await self.backend.send(req)
        except asyncio.CancelledError:
            now = time.perf_counter()
            state.add(counters, RequestRecord(spec.index, scheduled, ready, len(prompt), spec.output_len,
                                              StreamResult(ready, now, error_kind="cancelled"), spec.parent))
            raise
        finally:
            counters.in_flight -= 1
        record = RequestRecord(spec.index, scheduled, ready, len(prompt), spec.output_len, result, spec.parent)
        counters.late += record.lateness > self.options.late_threshold_s
        state.finish_history(spec.index, prompt, result)
        return state.add(counters, record)

    def _outgoing(self, spec: RequestSpec, prompt: tuple[int, ...], text: str | None,
                  keep_output: bool) -> OutgoingRequest:
        self._counter += 1
        o = self.options
        return OutgoingRequest(f"{o.run_id}-{self._counter}", prompt, spec.output_len, o.ignore_eos,
                               o.temperature, prompt_text=text, keep_output=keep_output, cache_salt=o.cache_salt)


class _RunState:
    """Records of one run, and the conversation history chat turns build on."""

    def __init__(self, specs: Sequence[RequestSpec], text_prompts: bool, source: TokenSource) -> None:
        self.specs = specs
        self.records: list[RequestRecord] = []
        self._source = source if text_prompts else None
        self._parents = {s.parent for s in specs if s.parent is not None}
        self._histories: dict[int, asyncio.Future] = {}
        # Texts of independent prompts are decoded before the clock starts.
        self._texts = {s.index: source.decode(s.prompt_ids) for s in specs
                       if text_prompts and s.parent is None}

    def has_children(self, index: int) -> bool:
        return index in self._parents

    def text(self, spec: RequestSpec, prompt: tuple[int, ...]) -> str | None:
        if self._source is None:
            return None
        cached = self._texts.pop(spec.index, None)
        return cached if cached is not None else self._source.decode(prompt)

    def _future(self, index: int) -> asyncio.Future:
        if index not in self._histories:
            self._histories[index] = asyncio.get_running_loop().create_future()
        return self._histories[index]

    async def history(self, parent: int) -> tuple[tuple[int, ...], tuple[int, ...], float] | None:
        """(prompt, output ids, end time) of a finished turn; None if it failed."""
        return await self._future(parent)

    def finish_history(self, index: int, prompt: tuple[int, ...], result: StreamResult) -> None:
        if index in self._parents:
            self._future(index).set_result((prompt, result.output_ids, result.end) if result.ok else None)

    def add(self, counters: Counters, record: RequestRecord) -> RequestRecord:
        self.records.append(record)
        if record.index in self._parents and not self._future(record.index).done():
            self._future(record.index).set_result(None)
        counters.finished(record.ok, record.result.output_tokens, record.result.end)
        return record


async def _watch_loop(lags: list[float]) -> None:
    while True:
        t = time.perf_counter()
        await asyncio.sleep(LAG_PROBE_S)
        lags.append(max(0.0, time.perf_counter() - t - LAG_PROBE_S))


def _overhead(records: Sequence[RequestRecord], cpu: float, wall: float, lags: Sequence[float],
              offsets: Sequence[float] | None) -> ClientOverhead:
    sent = sorted(r.result.sent for r in records if r.result.error_kind != "parent_failed")
    send_rate = (len(sent) - 1) / (sent[-1] - sent[0]) if len(sent) > 1 and sent[-1] > sent[0] else None
    scheduled_rate = None
    if offsets and len(offsets) > 1 and offsets[-1] > 0:
        scheduled_rate = (len(offsets) - 1) / offsets[-1]
    elif offsets and len(offsets) > 1:
        scheduled_rate = math.inf
    return ClientOverhead(
        cpu_s=cpu,
        cpu_ms_per_request=cpu / len(records) * 1e3 if records else 0.0,
        cpu_utilization=cpu / wall if wall > 0 else 0.0,
        lateness_ms=Stats.of([r.lateness for r in records if r.result.error_kind != "parent_failed"], 1e3),
        loop_lag_ms=Stats.of(lags, 1e3),
        scheduled_rate=scheduled_rate,
        send_rate=send_rate,
    )
