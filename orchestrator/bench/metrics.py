"""Serving metrics from request records, with the field's definitions.

Per request (seconds, from ``time.perf_counter`` on the client):

- TTFT = first output chunk's arrival - send time.
- E2E = end of the stream - send time.
- TPOT = (E2E - TTFT) / (output tokens - 1); undefined for one-token outputs.
- ITL = gaps between consecutive output-carrying chunks; pooled over all
  requests (a request with k chunks contributes k - 1 gaps).

Over a run: duration = last end - first send of the measured requests;
request/output/total-token throughput = completed requests, their output
tokens, their prompt + output tokens, each divided by the duration; goodput =
requests that completed AND met every SLO given, divided by the duration.
Percentiles interpolate linearly between closest ranks (numpy's default, as
``vllm bench serve`` reports them). See docs/BENCHMARKING.md.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

from orchestrator.bench.records import RequestRecord


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, linearly interpolated.

    Rank ``q/100 * (n-1)`` in the sorted values; between two ranks the value
    is interpolated. Raises ValueError on an empty sequence or q outside 0..100.
    """
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


@dataclass(frozen=True)
class Stats:
    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float
    min: float

    @classmethod
    def of(cls, values: Sequence[float], scale: float = 1.0) -> Stats | None:
        """Statistics of ``values`` multiplied by ``scale``; None when empty."""
        if not values:
            return None
        scaled = sorted(v * scale for v in values)
        return cls(len(scaled), math.fsum(scaled) / len(scaled), percentile(scaled, 50), percentile(scaled, 90),
                   percentile(scaled, 99), scaled[-1], scaled[0])


@dataclass(frozen=True)
class Timings:
    """The latencies of one completed request, in seconds."""

    ttft: float
    e2e: float
    tpot: float | None
    itls: tuple[float, ...]


def timings(record: RequestRecord) -> Timings | None:
    """TTFT, E2E, TPOT and ITLs of a completed request; None for a failed one."""
    r = record.result
    if not r.ok or not r.chunk_times:
        return None
    ttft = r.chunk_times[0] - r.sent
    e2e = r.end - r.sent
    tpot = (e2e - ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else None
    itls = tuple(b - a for a, b in zip(r.chunk_times, r.chunk_times[1:]))
    return Timings(ttft, e2e, tpot, itls)


SLO_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms")


@dataclass(frozen=True)
class Slo:
    """Latency objectives in milliseconds; None = no objective on that metric."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    @classmethod
    def parse(cls, text: str) -> Slo:
        """``"ttft_ms=200,tpot_ms=50"`` -> Slo. Raises ValueError naming the bad part."""
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in SLO_KEYS:
                raise ValueError(f"bad SLO {part!r}: expected KEY=MILLISECONDS with KEY one of {', '.join(SLO_KEYS)}")
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"bad SLO {part!r}: {value!r} is not a number") from None
            if not number > 0:
                raise ValueError(f"bad SLO {part!r}: the limit must be > 0 ms")
            values[key] = number
        return cls(**values)

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2e_ms))

    def met(self, t: Timings | None) -> bool:
        """Whether a request met every objective. A failed request (None) never
        does; a one-token output has no TPOT and meets any TPOT objective."""
        if t is None:
            return False
        return ((self.ttft_ms is None or t.ttft * 1e3 <= self.ttft_ms)
                and (self.tpot_ms is None or t.tpot is None or t.tpot * 1e3 <= self.tpot_ms)
                and (self.e2e_ms is None or t.e2e * 1e3 <= self.e2e_ms))

    def describe(self) -> str:
        parts = [f"{k}<={getattr(self, k):g}" for k in SLO_KEYS if getattr(self, k) is not None]
        return ", ".join(parts) if parts else "none"


@dataclass(frozen=True)
class Summary:
    """Every figure of one measured run. Latency stats are in milliseconds."""

    requests: int
    completed: int
    failed: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    input_tokens: int
    output_tokens: int
    ttft_ms: Stats | None
    tpot_ms: Stats | None
    itl_ms: Stats | None
    e2e_ms: Stats | None
    goodput: float | None
    """Requests/s that completed within every SLO; None when no SLO was given."""
    slo_attainment: float | None
    """Fraction of the measured requests that met every SLO; None without SLOs."""
    prefix_cache_hit_rate: float | None
    """Cached prompt tokens / prompt tokens, over requests whose server reported both."""
    errors: dict[str, int]
    input_len: Stats | None
    """Prompt lengths of the completed requests (server's count where reported)."""
    output_len: Stats | None
    output_short: int
    """Completed requests that returned fewer tokens than requested."""

    def to_json(self) -> dict:
        return asdict(self)


def summarize(records: Sequence[RequestRecord], slo: Slo = Slo()) -> Summary:
    """The run's figures from its measured records (warm-up excluded)."""
    all_timings = [timings(r) for r in records]
    done = [(r, t) for r, t in zip(records, all_timings) if t is not None]
    duration = _window(records)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    prompt_lens = [_prompt_tokens(r) for r, _ in done]
    output_lens = [r.result.output_tokens for r, _ in done]
    input_tokens, output_tokens = sum(prompt_lens), sum(output_lens)
    met = sum(slo.met(t) for t in all_timings) if slo.given else None
    return Summary(
        requests=len(records),
        completed=len(done),
        failed=len(records) - len(done),
        duration_s=duration,
        request_throughput=per_s(len(done)),
        output_throughput=per_s(output_tokens),
        total_token_throughput=per_s(input_tokens + output_tokens),
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        ttft_ms=Stats.of([t.ttft for _, t in done], 1e3),
        tpot_ms=Stats.of([t.tpot for _, t in done if t.tpot is not None], 1e3),
        itl_ms=Stats.of([gap for _, t in done for gap in t.itls], 1e3),
        e2e_ms=Stats.of([t.e2e for _, t in done], 1e3),
        goodput=per_s(met) if met is not None else None,
        slo_attainment=(met / len(records) if records else 0.0) if met is not None else None,
        prefix_cache_hit_rate=prefix_cache_hit_rate(r for r, _ in done),
        errors=error_counts(records),
        input_len=Stats.of(prompt_lens),
        output_len=Stats.of(output_lens),
        output_short=sum(r.result.output_tokens < r.requested_output_len for r, _ in done),
    )


def _window(records: Sequence[RequestRecord]) -> float:
    if not records:
        return 0.0
    return max(r.result.end for r in records) - min(r.result.sent for r in records)


def _prompt_tokens(record: RequestRecord) -> int:
    reported = record.result.prompt_tokens
    return reported if reported is not None else record.prompt_len


def prefix_cache_hit_rate(records: Iterable[RequestRecord]) -> float | None:
    """Sum of cached prompt tokens / sum of prompt tokens, over the requests
    whose server reported cached tokens; None if none did."""
    cached = total = 0
    for r in records:
        if r.result.cached_tokens is not None:
            cached += r.result.cached_tokens
            total += _prompt_tokens(r)
    return cached / total if total else None


def error_counts(records: Iterable[RequestRecord]) -> dict[str, int]:
    """Failed requests by error kind, most frequent first."""
    counts = Counter(r.result.error_kind or "no_output" for r in records if timings(r) is None)
    return dict(counts.most_common())
