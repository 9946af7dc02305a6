"""kvmesh bench arrival processes: Poisson and gamma statistics, offline,
trace replay, the closed loop, and reproducibility from the seed."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from orchestrator.bench.arrivals import Arrivals, load_trace

N = 20_000


def gaps(offsets):
    return [b - a for a, b in zip(offsets, offsets[1:])]


def test_poisson_mean_inter_arrival_time_is_one_over_rate():
    offsets = Arrivals.at_rate(8.0).offsets(N, seed=1)
    g = gaps(offsets)
    assert offsets[0] == 0.0
    # The sample mean of 20k exponential gaps is within ~3 % of 1/rate (4 sigma).
    assert statistics.fmean(g) == pytest.approx(1 / 8.0, rel=0.03)
    # Exponential: coefficient of variation 1; P(gap > mean) = e^-1.
    assert statistics.stdev(g) / statistics.fmean(g) == pytest.approx(1.0, abs=0.05)
    assert sum(x > 1 / 8.0 for x in g) / len(g) == pytest.approx(math.exp(-1), abs=0.02)


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_keeps_the_rate_and_sets_the_burstiness(burstiness):
    arrivals = Arrivals.at_rate(5.0, burstiness)
    assert arrivals.kind == "gamma"
    g = gaps(arrivals.offsets(N, seed=2))
    assert statistics.fmean(g) == pytest.approx(1 / 5.0, rel=0.05)
    # Gamma with shape k has coefficient of variation 1/sqrt(k): burstier below 1.
    assert statistics.stdev(g) / statistics.fmean(g) == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)


def test_burstiness_one_is_poisson_and_schedules_are_reproducible():
    assert Arrivals.at_rate(3.0, 1.0).kind == "poisson"
    a = Arrivals.at_rate(3.0).offsets(100, seed=7)
    assert a == Arrivals.at_rate(3.0).offsets(100, seed=7)
    assert a != Arrivals.at_rate(3.0).offsets(100, seed=8)
    assert list(a) == sorted(a)


def test_offline_and_closed_loop():
    offline = Arrivals.at_rate(math.inf)
    assert offline.kind == "offline" and offline.offsets(5, seed=0) == (0.0,) * 5
    closed = Arrivals.closed_loop(4)
    assert not closed.open_loop and closed.offsets(5, seed=0) is None
    assert closed.label() == "c4" and Arrivals.at_rate(2.5).label() == "rate-2.5"


@pytest.mark.parametrize("make, message", [
    (lambda: Arrivals.at_rate(0), "rate must be > 0"),
    (lambda: Arrivals.at_rate(1, burstiness=0), "burstiness"),
    (lambda: Arrivals.closed_loop(0), "concurrency"),
])
def test_bad_parameters_are_rejected(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_trace_replay_uses_the_timestamps(tmp_path):
    path = tmp_path / "trace.jsonl"
    rows = [{"timestamp": 3000, "input_length": 10, "output_length": 2, "hash_ids": [1, 2]},
            {"timestamp": 1000, "input_length": 20, "output_length": 3},
            {"timestamp": 1500, "input_length": 30, "output_length": 4, "hash_ids": [1]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    entries = load_trace(path)
    assert [e.input_length for e in entries] == [20, 30, 10]      # sorted by timestamp
    assert entries[2].hash_ids == (1, 2)
    assert Arrivals.from_trace(entries).offsets(10, seed=0) == pytest.approx((0.0, 0.5, 2.0))
    assert Arrivals.from_trace(entries, speedup=2).offsets(2, seed=0) == pytest.approx((0.0, 0.25))


def test_bad_trace_lines_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 5, "output_length": 1}\n{"timestamp": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_trace(path)
