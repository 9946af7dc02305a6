"""kvmesh bench's runner and backends against the instant server (a TEST
DOUBLE speaking the real gRPC and OpenAI HTTP APIs): schedules kept,
concurrency held, latencies measured as scripted, errors counted, chat turns
chained, runs bounded, late sending detected; the CLI's parsing and compare."""

from __future__ import annotations

import argparse
import json
import math
import time

import pytest

from orchestrator.bench import report, workloads
from orchestrator.bench.arrivals import Arrivals
from orchestrator.bench.backends import BackendUnavailable, make_backend
from orchestrator.bench.cli import add_bench_args, config_from_args, main
from orchestrator.bench.instant_server import InstantBehaviour, InstantServer
from orchestrator.bench.metrics import summarize
from orchestrator.bench.records import RequestRecord, StreamResult
from orchestrator.bench.runner import ClientOverhead, RunOptions, Runner, RunResult
from orchestrator.bench.tokens import TokenSource
from orchestrator.bench.workloads import LengthDist, WorkloadConfig

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def source(smollm2_dir) -> TokenSource:
    return TokenSource.load(str(smollm2_dir))


def specs(source, n=20, input_len="16", output_len="4", **kw):
    config = WorkloadConfig(num_requests=n, input_len=LengthDist.parse(input_len),
                            output_len=LengthDist.parse(output_len), **kw)
    return workloads.build(config, source, seed=0)


async def measure(server, source, requests, arrivals, backend="grpc", **options):
    target = server.grpc_address if backend == "grpc" else server.http_url
    b = make_backend(backend, target, model="", timeout_s=10, tokenize=source.encode)
    await b.start()
    try:
        runner = Runner(b, source, RunOptions(progress=False, **options))
        return await runner.run(requests, arrivals, seed=0)
    finally:
        await b.close()


def max_in_flight(records) -> int:
    events = sorted([(r.result.sent, 1) for r in records] + [(r.result.end, -1) for r in records])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


async def test_closed_loop_holds_the_concurrency(source):
    async with InstantServer(InstantBehaviour(ttft_s=0.01, itl_s=0.002)) as server:
        result = await measure(server, source, specs(source, 20), Arrivals.closed_loop(4))
    assert len(result.records) == 20 and all(r.ok for r in result.records)
    assert max_in_flight(result.records) == 4
    assert [r.result.output_tokens for r in result.records] == [4] * 20
    # in a closed loop a request is "ready" when its slot frees; the tool's turnaround is small
    # (bounds leave room for a loaded CI machine)
    assert result.overhead.lateness_ms.p50 < 20 and result.overhead.lateness_ms.max < 250


async def test_open_loop_sends_on_schedule(source):
    arrivals = Arrivals.at_rate(40.0)
    async with InstantServer() as server:
        result = await measure(server, source, specs(source, 25), arrivals)
    offsets = arrivals.offsets(25, seed=0)
    for r in result.records:
        assert r.scheduled == pytest.approx(result.t0 + offsets[r.index])
        assert 0 <= r.result.sent - r.scheduled < 0.25
    assert result.overhead.lateness_ms.p50 < 20
    assert result.not_sent == 0
    assert result.overhead.scheduled_rate == pytest.approx(24 / offsets[-1])


async def test_latencies_are_measured_as_the_server_scripted_them(source):
    behaviour = InstantBehaviour(ttft_s=0.03, itl_s=0.01)
    async with InstantServer(behaviour) as server:
        result = await measure(server, source, specs(source, 4, output_len="5"), Arrivals.closed_loop(2))
    s = summarize(result.records)
    # sleeps never end early, so the lower bounds are hard; upper bounds leave room for a loaded machine
    assert 30 <= s.ttft_ms.min and s.ttft_ms.p50 < 30 + 40
    assert 9 <= s.itl_ms.p50 < 10 + 25 and s.itl_ms.count == 4 * 4
    assert 10 <= s.tpot_ms.mean < 10 + 25
    assert 70 <= s.e2e_ms.mean < 70 + 100


@pytest.mark.parametrize("backend", ["grpc", "openai"])
async def test_errors_are_counted_by_kind_and_cache_hits_reported(source, backend):
    async with InstantServer(InstantBehaviour(fail_every=3, cached_fraction=0.5)) as server:
        result = await measure(server, source, specs(source, 12), Arrivals.closed_loop(3), backend=backend)
    s = summarize(result.records)
    kind = "grpc:UNAVAILABLE" if backend == "grpc" else "http:503"
    assert s.failed == 4 and s.errors == {kind: 4}
    assert s.completed == 8 and s.prefix_cache_hit_rate == pytest.approx(0.5)


@pytest.mark.parametrize("backend, prompt_format", [("grpc", "tokens"), ("openai", "tokens"), ("openai", "text")])
async def test_multi_turn_prompts_carry_the_history(source, backend, prompt_format):
    text = prompt_format == "text"
    requests = workloads.build(WorkloadConfig(kind="multi-turn", num_requests=6, num_turns=3,
                                              input_len=LengthDist.parse("10"), output_len=LengthDist.parse("3"),
                                              text_prompts=text), source, seed=0)
    async with InstantServer() as server:
        result = await measure(server, source, requests, Arrivals.at_rate(200.0), backend=backend,
                               text_prompts=text)
    by_index = {r.index: r for r in result.records}
    assert all(r.ok for r in result.records)
    # 2 conversations: turn lengths 10, 10 + 3 + 10, 23 + 3 + 10
    assert [by_index[i].prompt_len for i in range(6)] == [10, 10, 23, 23, 36, 36]
    # the server counted the same prompt (text prompts: the double counts words)
    assert [by_index[i].result.prompt_tokens for i in range(6)] == [10, 10, 23, 23, 36, 36]
    for i in range(2, 6):
        assert by_index[i].result.sent >= by_index[i - 2].result.end     # a turn waits for the previous one


@pytest.mark.parametrize("backend", ["grpc", "openai"])
async def test_cache_salt_reaches_the_server(source, backend):
    async with InstantServer() as server:
        await measure(server, source, specs(source, 3), Arrivals.closed_loop(1), backend=backend, cache_salt="run-b")
        assert server.servicer.cache_salts == ["run-b"] * 3


async def test_max_duration_bounds_the_run(source):
    async with InstantServer() as server:
        result = await measure(server, source, specs(source, 100), Arrivals.at_rate(20.0), max_duration_s=0.3)
    assert 1 <= len(result.records) < 20 and result.not_sent == 100 - len(result.records)
    summary = summarize(result.records)
    warnings = report.measurement_warnings(result, summary, Arrivals.at_rate(20.0), late_threshold_ms=10,
                                           ignore_eos=True, token_prompts=True)
    assert any("never sent" in w for w in warnings)


class CpuHoggingBackend:
    """A backend whose client work blocks the event loop for 30 ms per request:
    the load generator itself is the bottleneck."""

    name, target, model = "fake", "nowhere", "m"

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, req) -> StreamResult:
        sent = time.perf_counter()
        while time.perf_counter() < sent + 0.03:   # busy: CPU work on the event loop's thread
            pass
        now = time.perf_counter()
        return StreamResult(sent, now, (now,), (1,), 1, finish_reason="length")


async def test_late_sending_is_measured_and_warned(source):
    runner = Runner(CpuHoggingBackend(), source, RunOptions(progress=False))
    arrivals = Arrivals.at_rate(200.0)
    result = await runner.run(specs(source, 15, output_len="1"), arrivals, seed=0)
    assert result.overhead.lateness_ms.max > 100
    assert result.overhead.send_rate < result.overhead.scheduled_rate / 2
    warnings = report.measurement_warnings(result, summarize(result.records), arrivals, late_threshold_ms=10,
                                           ignore_eos=True, token_prompts=True)
    assert any("offered load was not exactly the load asked for" in w for w in warnings)
    assert result.overhead.loop_lag_ms.max > 20


@pytest.mark.parametrize("cpu, culprit", [(0.97, "it is the bottleneck"), (0.05, "other load on this machine")])
def test_late_warning_names_the_culprit(cpu, culprit):
    late = [RequestRecord(i, 1.0 * i, 1.0 * i, 10, 1, StreamResult(1.0 * i + 0.05, 1.0 * i + 0.1, (1.0 * i + 0.1,),
                                                                      (1,), 1, finish_reason="length"))
            for i in range(5)]
    overhead = ClientOverhead(cpu_s=1, cpu_ms_per_request=200, cpu_utilization=cpu, lateness_ms=None,
                              loop_lag_ms=None, scheduled_rate=1.0, send_rate=1.0)
    result = RunResult(late, 0, 5.0, overhead, 0.0)
    warnings = report.measurement_warnings(result, summarize(late), Arrivals.at_rate(1.0), late_threshold_ms=10,
                                           ignore_eos=True, token_prompts=False)
    assert any("5 of 5 requests went out more than 10 ms" in w and culprit in w for w in warnings)


async def test_unreachable_target_fails_fast(source):
    backend = make_backend("openai", "http://127.0.0.1:9", model="", timeout_s=5, tokenize=source.encode)
    with pytest.raises(BackendUnavailable, match="cannot reach"):
        await backend.start()
    await backend.close()


# --- the command line ---------------------------------------------------------------

def parse(*argv: str):
    parser = argparse.ArgumentParser()
    add_bench_args(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_cli_builds_points_and_targets(tmp_path):
    c = parse()
    assert c.backend == "grpc" and c.target == "127.0.0.1:50051" and c.points[0].kind == "offline"
    c = parse("--url", "http://127.0.0.1:8000/v1", "--rates", "1,2,inf", "--burstiness", "0.5")
    assert c.backend == "openai" and [p.kind for p in c.points] == ["gamma", "gamma", "offline"] and c.sweep
    assert [p.concurrency for p in parse("--concurrencies", "1,8").points] == [1, 8]
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 5, "output_length": 2}\n'
                     '{"timestamp": 10, "input_length": 5, "output_length": 2}\n')
    c = parse("--trace", str(trace))
    assert c.points[0].kind == "trace" and c.workload.kind == "trace" and c.workload.num_requests == 2
    c = parse("--trace", str(trace), "--rate", "3")            # trace shapes, Poisson arrivals
    assert c.points[0].kind == "poisson" and c.workload.kind == "trace"
    with pytest.raises(ValueError, match="--target"):
        parse("--url", "http://x", "--backend", "grpc")
    with pytest.raises(ValueError, match="bad length"):
        parse("--input-len", "uniform:9")
    with pytest.raises(SystemExit):
        parse("--rate", "1", "--concurrency", "2")


def test_compare_prints_ratios(tmp_path, capsys):
    def doc(name, tput, ttft):
        s = {"completed": 10, "failed": 0, "request_throughput": tput, "output_throughput": tput * 8,
             "ttft_ms": {"mean": ttft, "p50": ttft, "p90": ttft, "p99": ttft, "max": ttft}}
        return {"format": report.FORMAT, "name": name, "summary": s,
                "target": {"backend": "grpc", "address": "a"}, "load": {"description": "x"}}
    (tmp_path / "a.json").write_text(json.dumps(doc("a", 2.0, 100.0)))
    (tmp_path / "b.json").write_text(json.dumps(doc("b", 3.0, 50.0)))
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    tput = next(line for line in out.splitlines() if line.startswith("request throughput"))
    assert tput.split()[-4:] == ["2.000", "3.000", "1.500", "B"]
    ttft = next(line for line in out.splitlines() if line.startswith("TTFT p99"))
    assert ttft.split()[-2:] == ["0.500", "B"]
    (tmp_path / "c.json").write_text("{}")
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "c.json")]) == 2


def test_jsonable_has_no_infinities():
    assert report.jsonable({"rate": math.inf, "xs": (1.0, math.nan)}) == {"rate": "inf", "xs": [1.0, "nan"]}


async def test_sweep_writes_points_and_the_curve(source, tmp_path, smollm2_dir):
    from orchestrator.bench.session import run_benchmark

    async with InstantServer(InstantBehaviour(itl_s=0.001)) as server:
        config = parse("--target", server.grpc_address, "--rates", "50,100", "--num-requests", "10",
                       "--input-len", "8", "--output-len", "4", "--tokenizer", str(smollm2_dir),
                       "--output-dir", str(tmp_path), "--name", "sw", "--slo", "ttft_ms=1000", "--no-progress",
                       "--warmup", "1")
        doc = await run_benchmark(config, out=open(tmp_path / "stdout.txt", "w"))
    assert [p["label"] for p in doc["points"]] == ["rate-50", "rate-100"]
    assert doc["max_rate_meeting_slo"]["label"] in ("rate-50", "rate-100")
    for name in ("sw-sweep.json", "sw-sweep.png", "sw-rate-50.json", "sw-rate-100.csv", "sw-rate-100-throughput.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "sw-rate-50.json").read_text())["config"]["seed"] == 0
    assert "rate-100" in (tmp_path / "stdout.txt").read_text()
