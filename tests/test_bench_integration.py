"""kvmesh bench end to end: a real router (orchestrator.server) and one real
worker on SmolLM2 in this process, the benchmark in its own process (as it
must run), then its JSON, CSV and PNG files checked against each other."""

from __future__ import annotations

import asyncio
import csv
import functools
import json
import statistics
import sys

import pytest
from worker_fixtures import load_real_engine

from orchestrator.bench.metrics import percentile
from orchestrator.server import RouterConfig, RouterServer
from worker.config import WorkerConfig
from worker.engine.config import EngineConfig
from worker.service import WorkerServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def one_torch_thread():
    """The worker shares this process with the router and the test, on a small
    (often shared) CI machine: two intra-op threads there spin against each
    other and run the model several times slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
async def router(smollm2_dir, one_torch_thread):
    worker = WorkerServer(WorkerConfig(engine=EngineConfig(model="unused"), port=0),
                          engine_factory=functools.partial(load_real_engine, smollm2_dir))
    await worker.start()
    server = RouterServer(RouterConfig(grpc_port=0, http_port=0, workers=(f"127.0.0.1:{worker.port}",),
                                       heartbeat_interval_s=0.2))
    try:
        await server.start()
        for _ in range(500):
            if server.registry.healthy_count():
                break
            await asyncio.sleep(0.02)
        assert server.registry.healthy_count() == 1
        yield server
    finally:
        await server.stop(grace=0)
        await worker.stop(grace=0)


async def test_bench_run_against_real_router_writes_consistent_files(router, smollm2_dir, tmp_path):
    argv = ["--target", router.grpc_address, "--tokenizer", str(smollm2_dir),
            "--workload", "shared-prefix", "--num-prefixes", "3", "--prefix-len", "32",
            "--input-len", "uniform:4,12", "--output-len", "4", "--num-requests", "12", "--rate", "16",
            "--warmup", "2", "--slo", "ttft_ms=5000,tpot_ms=1000", "--seed", "3",
            "--output-dir", str(tmp_path), "--name", "real", "--no-progress"]
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "orchestrator.bench", *argv,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, stderr.decode()
    assert "kvmesh bench: real" in stdout.decode() and "TTFT" in stdout.decode()

    doc = json.loads((tmp_path / "real.json").read_text())
    s = doc["summary"]
    assert doc["format"] == "kvmesh-bench/1"
    assert doc["config"]["workload"]["num_requests"] == 12 and doc["config"]["points"][0]["rate"] == 16.0
    assert doc["target"]["model"] == "SmolLM2-135M-Instruct" and doc["load"]["warmup_requests"] == 2
    assert (s["requests"], s["completed"], s["failed"]) == (12, 12, 0)
    assert s["output_tokens"] == 12 * 4 and s["output_short"] == 0           # ignore_eos held
    assert s["prefix_cache_hit_rate"] > 0                                      # later questions reuse prefixes

    with open(tmp_path / doc["files"]["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == s["requests"]
    ok = [r for r in rows if not r["error_kind"]]
    assert len(ok) == s["completed"]
    assert sum(int(r["output_tokens"]) for r in ok) == s["output_tokens"]
    assert all(32 + 4 <= int(r["prompt_tokens_sent"]) <= 32 + 12 for r in rows)
    assert sum(int(r["prompt_tokens"]) for r in ok) == s["input_tokens"]
    ttfts = [float(r["ttft_ms"]) for r in ok]
    assert statistics.fmean(ttfts) == pytest.approx(s["ttft_ms"]["mean"], abs=1e-3)
    assert percentile(ttfts, 99) == pytest.approx(s["ttft_ms"]["p99"], abs=1e-3)
    itls = [float(x) for r in ok for x in r["itl_ms"].split(";") if x]
    assert len(itls) == s["itl_ms"]["count"]
    assert percentile(itls, 50) == pytest.approx(s["itl_ms"]["p50"], abs=1e-3)
    tpots = [float(r["tpot_ms"]) for r in ok]
    assert statistics.fmean(tpots) == pytest.approx(s["tpot_ms"]["mean"], abs=1e-3)
    duration = max(float(r["end_s"]) for r in rows) - min(float(r["sent_s"]) for r in rows)
    assert duration == pytest.approx(s["duration_s"], abs=1e-5)
    assert s["request_throughput"] == pytest.approx(len(ok) / s["duration_s"])
    cached = sum(int(r["cached_tokens"]) for r in ok)
    assert cached / s["input_tokens"] == pytest.approx(s["prefix_cache_hit_rate"])
    met = sum(r["met_slo"] == "1" for r in rows)
    assert met / s["duration_s"] == pytest.approx(s["goodput"])

    assert len(doc["files"]["plots"]) == 2
    for name in doc["files"]["plots"]:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000
