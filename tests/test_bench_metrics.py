"""kvmesh bench statistics against hand-computed values: percentiles, TTFT,
TPOT, ITL, throughput, goodput, prefix-cache hit rate and error counts."""

from __future__ import annotations

import pytest

from orchestrator.bench.metrics import Slo, Stats, percentile, prefix_cache_hit_rate, summarize, timings
from orchestrator.bench.records import RequestRecord, StreamResult


def record(index: int, sent: float, chunks: list[float], end: float, *, tokens: list[int] | None = None,
           prompt_len: int = 10, requested: int | None = None, error_kind: str | None = None,
           prompt_tokens: int | None = None, cached: int | None = None) -> RequestRecord:
    tokens = tokens if tokens is not None else [1] * len(chunks)
    result = StreamResult(sent, end, tuple(chunks), tuple(tokens), sum(tokens), prompt_tokens=prompt_tokens,
                          cached_tokens=cached, finish_reason="" if error_kind else "length", error_kind=error_kind)
    return RequestRecord(index, sent, sent, prompt_len, requested if requested is not None else sum(tokens), result)


# --- percentiles ---------------------------------------------------------------------

@pytest.mark.parametrize("values, q, expected", [
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 50, 5.5),     # rank 4.5: halfway between 5 and 6
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 90, 9.1),     # rank 8.1
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 99, 9.91),    # rank 8.91
    ([50, 15, 40, 20, 35], 50, 35),                # unsorted input; rank 2
    ([50, 15, 40, 20, 35], 90, 46),                # rank 3.6: 40 + 0.6 * 10
    ([50, 15, 40, 20, 35], 99, 49.6),              # rank 3.96
    ([50, 15, 40, 20, 35], 0, 15),
    ([50, 15, 40, 20, 35], 100, 50),
    ([7.0], 99, 7.0),
])
def test_percentile_matches_hand_computed_values(values, q, expected):
    assert percentile(values, q) == pytest.approx(expected)


def test_percentile_rejects_empty_input_and_bad_q():
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1.0], 101)


def test_stats_scale_and_fields():
    s = Stats.of([0.001, 0.002, 0.003, 0.004], scale=1e3)
    assert (s.count, s.min, s.max) == (4, pytest.approx(1.0), pytest.approx(4.0))
    assert s.mean == pytest.approx(2.5)
    assert s.p50 == pytest.approx(2.5)
    assert s.p90 == pytest.approx(3.7)     # rank 2.7
    assert Stats.of([]) is None


# --- per-request timings ----------------------------------------------------------------

def test_ttft_tpot_itl_e2e_of_one_request():
    r = record(0, 10.0, [10.1, 10.15, 10.25, 10.30], 10.31)
    t = timings(r)
    assert t.ttft == pytest.approx(0.1)
    assert t.e2e == pytest.approx(0.31)
    assert t.tpot == pytest.approx((0.31 - 0.1) / 3)         # (E2E - TTFT) / (4 tokens - 1)
    assert t.itls == pytest.approx((0.05, 0.1, 0.05))


def test_tpot_counts_tokens_not_chunks():
    # 2 chunks carrying 1 + 4 tokens: TPOT divides by 4 (5 tokens - 1), ITL has one gap.
    t = timings(record(0, 0.0, [0.2, 0.6], 0.6, tokens=[1, 4]))
    assert t.tpot == pytest.approx(0.4 / 4)
    assert t.itls == pytest.approx((0.4,))


def test_one_token_output_has_no_tpot_and_failed_requests_have_no_timings():
    assert timings(record(0, 0.0, [0.3], 0.3)).tpot is None
    assert timings(record(1, 0.0, [], 0.1, error_kind="grpc:UNAVAILABLE")) is None


# --- a constructed run --------------------------------------------------------------

@pytest.fixture
def run():
    return [
        record(0, 10.0, [10.1, 10.15, 10.25, 10.30], 10.31, prompt_len=100, prompt_tokens=100, cached=50),
        record(1, 10.2, [10.5], 10.5, prompt_len=60),                              # TTFT 300 ms, 1 token
        record(2, 10.3, [], 10.35, error_kind="grpc:UNAVAILABLE"),
        record(3, 10.4, [10.42], 10.45, error_kind="timeout"),                     # partial then failed
    ]


def test_summary_throughputs_over_the_measurement_window(run):
    s = summarize(run)
    assert (s.requests, s.completed, s.failed) == (4, 2, 2)
    assert s.duration_s == pytest.approx(0.5)               # first send 10.0 .. last end 10.5
    assert s.request_throughput == pytest.approx(2 / 0.5)
    assert s.output_tokens == 5
    assert s.output_throughput == pytest.approx(5 / 0.5)
    assert s.input_tokens == 160                              # completed requests only
    assert s.total_token_throughput == pytest.approx(165 / 0.5)


def test_summary_pools_itl_and_reports_latency_stats_in_ms(run):
    s = summarize(run)
    assert s.ttft_ms.count == 2 and s.ttft_ms.mean == pytest.approx(200.0)
    assert s.ttft_ms.p50 == pytest.approx(200.0) and s.ttft_ms.max == pytest.approx(300.0)
    assert s.itl_ms.count == 3 and s.itl_ms.max == pytest.approx(100.0)
    assert s.tpot_ms.count == 1 and s.tpot_ms.mean == pytest.approx(70.0)
    assert s.e2e_ms.mean == pytest.approx((310.0 + 300.0) / 2)


def test_goodput_counts_requests_meeting_every_slo(run):
    s = summarize(run, Slo(ttft_ms=200))
    assert s.goodput == pytest.approx(1 / 0.5)               # only request 0 (TTFT 100 ms)
    assert s.slo_attainment == pytest.approx(1 / 4)          # failed requests never meet an SLO
    s = summarize(run, Slo(ttft_ms=400, tpot_ms=50))
    # request 0 misses TPOT (70 ms); request 1 has no TPOT (one token) and meets TTFT.
    assert s.goodput == pytest.approx(1 / 0.5)
    s = summarize(run, Slo(ttft_ms=400, tpot_ms=80, e2e_ms=305))
    assert s.goodput == pytest.approx(1 / 0.5)               # request 0 misses E2E (310 ms)
    assert summarize(run).goodput is None and summarize(run).slo_attainment is None


def test_prefix_cache_hit_rate_only_over_requests_that_report_it(run):
    assert prefix_cache_hit_rate(run) == pytest.approx(50 / 100)
    assert summarize(run).prefix_cache_hit_rate == pytest.approx(0.5)
    assert prefix_cache_hit_rate([run[1]]) is None


def test_error_kinds_and_short_outputs(run):
    s = summarize(run)
    assert s.errors == {"grpc:UNAVAILABLE": 1, "timeout": 1}
    short = record(5, 11.0, [11.1, 11.2], 11.2, requested=8)
    assert summarize(run + [short]).output_short == 1


def test_slo_parsing():
    assert Slo.parse("ttft_ms=200, tpot_ms=50") == Slo(ttft_ms=200, tpot_ms=50)
    assert Slo.parse("") == Slo() and not Slo.parse("").given
    for bad in ("ttft=200", "ttft_ms", "ttft_ms=fast", "e2e_ms=0"):
        with pytest.raises(ValueError, match="bad SLO"):
            Slo.parse(bad)
