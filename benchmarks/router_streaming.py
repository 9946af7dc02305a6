"""Router CPU per streamed output token: many long streams through one router and one mock worker.

The shape of gpu_serving.py's offline run, with the mock engine in place of
the GPU: ``--num-requests`` requests (prompt lengths uniform in [128, 1024],
token ids in [1000, 40000) from ``random.Random(--seed)``, ``--output-len``
greedy output tokens each, EOS ignored) sent at once to a router process
(``python -m orchestrator.cli router``), which places them on one mock
worker process (``--engine mock``, ``--max-num-seqs`` 256, every step
``1 / --speedup`` of the modelled Llama-3-8B-on-H100 time). The client is
this process (``kvmesh bench``'s gRPC backend and runner).

The router talks to the worker over one Session stream (worker.proto; the
worker sends one update per engine step for all requests), or, with a
worker or router from before that RPC, over one Submit call per request.

Measured over the run (first request sent to last finished): output
tokens/s, the router's CPU (utime + stime from ``/proc/<pid>/stat``) per
output token, the worker's and the client's cores busy, and the chunks the
client received per output token. ``tokens_per_worker_message`` is tokens
per per-request worker message: a Submit response, or a request's entry in
a session update. ``--profile FILE`` runs the router under
cProfile (written when it exits; slower, so not for the CPU figures).

Loopback only; every wait is bounded (``--timeout``), and the processes are
stopped (SIGTERM, then SIGKILL) whatever happens.

Usage (repository root): .venv/bin/python benchmarks/router_streaming.py [--repeats 3]
           [--num-requests 256] [--output-len 256] [--speedup 1] [--profile router.prof] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT / "proto", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

TICKS = os.sysconf("SC_CLK_TCK")
WARMUP_REQUESTS = 16
WARMUP_OUTPUT_LEN = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # fields 14 and 15 of proc(5)


def stop(proc: subprocess.Popen, wait_s: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def prompts(seed: int, count: int) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    return [tuple(rng.randrange(1000, 40000) for _ in range(rng.randint(128, 1024))) for _ in range(count)]


async def wait_for_model(address: str, timeout_s: float) -> None:
    import grpc

    from kvmesh.v1 import generate_pb2, generate_pb2_grpc
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)
        while time.monotonic() < deadline:
            try:
                models = (await stub.ListModels(generate_pb2.ListModelsRequest(), timeout=2)).models
                if models and models[0].num_workers >= 1:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.3)
    raise TimeoutError(f"no worker registered with the router at {address} within {timeout_s:.0f} s")


def router_counts(http_port: int) -> dict[str, float]:
    """Worker messages read, chunks with tokens sent, tokens generated: sums over models from /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10).read().decode()
    wanted = {"kvmesh_router_worker_messages_total": "messages",
              "kvmesh_router_chunk_tokens_count": "chunks",
              "kvmesh_router_generation_tokens_total": "tokens"}
    counts = dict.fromkeys(wanted.values(), 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            counts[wanted[name]] += float(line.rsplit(" ", 1)[1])
    return counts


async def measure(address: str, http_port: int, args: argparse.Namespace, router_pid: int,
                  worker_pid: int) -> dict:
    from orchestrator.bench.arrivals import Arrivals
    from orchestrator.bench.backends.kvmesh_grpc import GrpcBackend
    from orchestrator.bench.records import RequestSpec
    from orchestrator.bench.runner import RunOptions, Runner
    from orchestrator.bench.tokens import TokenSource

    await wait_for_model(address, args.timeout)
    source = TokenSource.load(args.model)
    backend = GrpcBackend(address, timeout_s=args.timeout)
    runner = Runner(backend, source, RunOptions(max_duration_s=args.timeout, request_timeout_s=args.timeout,
                                                ignore_eos=True, temperature=0.0, run_id="streaming",
                                                progress=False))
    at_once = Arrivals.at_rate(math.inf)
    await backend.start()
    try:
        warm = [RequestSpec(i, p, WARMUP_OUTPUT_LEN) for i, p in enumerate(prompts(args.seed + 1, WARMUP_REQUESTS))]
        await runner.run(warm, at_once, seed=0, label="warm-up")
        specs = [RequestSpec(i, p, args.output_len) for i, p in enumerate(prompts(args.seed, args.num_requests))]
        c0 = router_counts(http_port)
        r0, w0 = cpu_seconds(router_pid), cpu_seconds(worker_pid)
        result = await runner.run(specs, at_once, seed=0, label="measured")
        r1, w1 = cpu_seconds(router_pid), cpu_seconds(worker_pid)
    finally:
        await backend.close()
    await asyncio.sleep(0.2)      # the router counts a request's last chunk after sending it
    c1 = router_counts(http_port)
    counted = {k: c1[k] - c0[k] for k in c0}
    records = result.records
    ok = [r for r in records if r.ok]
    tokens = sum(r.result.output_tokens for r in ok)
    chunks = sum(len(r.result.chunk_times) for r in ok)
    first = min(r.result.sent for r in records)
    last = max(r.result.end for r in records)
    seconds = last - first
    return {
        "failed": len(records) - len(ok) + result.not_sent,
        "short": sum(r.result.output_tokens != args.output_len for r in ok),
        "output_tokens": tokens,
        "seconds": seconds,
        "output_tok_s": tokens / seconds,
        "router_cpu_s": r1 - r0,
        "router_cpu_us_per_token": (r1 - r0) / tokens * 1e6 if tokens else None,
        "router_cores": (r1 - r0) / result.wall_s,
        "worker_cores": (w1 - w0) / result.wall_s,
        "client_cores": result.overhead.cpu_utilization,
        "client_chunks_per_token": chunks / tokens if tokens else None,
        "tokens_per_worker_message": counted["tokens"] / counted["messages"] if counted["messages"] else None,
        "tokens_per_router_chunk": counted["tokens"] / counted["chunks"] if counted["chunks"] else None,
    }


def run_once(args: argparse.Namespace, log_dir: Path, repeat: int) -> dict:
    grpc_port, http_port = free_port(), free_port()
    address = f"127.0.0.1:{grpc_port}"
    python = sys.executable
    router_cmd = [python, "-m", "orchestrator.cli", "router", "--grpc-host", "127.0.0.1", "--grpc-port",
                  str(grpc_port), "--http-host", "127.0.0.1", "--http-port", str(http_port)]
    if args.profile:
        router_cmd[1:1] = ["-m", "cProfile", "-o", args.profile]
    worker_cmd = [python, "-m", "orchestrator.cli", "worker", "--engine", "mock", "--model", args.model,
                  "--router", address, "--host", "127.0.0.1", "--port", "0", "--worker-id", f"stream-{repeat}",
                  "--max-num-seqs", "256", "--num-kv-blocks", str(args.kv_blocks), "--block-size", "16",
                  "--speedup", str(args.speedup)]
    hog = None
    if args.starve_router:
        router_cmd = ["taskset", "-c", "0"] + router_cmd
        worker_cmd = ["taskset", "-c", f"1-{os.cpu_count() - 1}"] + worker_cmd
        hog = subprocess.Popen(["taskset", "-c", "0", python, "-c",
                                f"import time\nend = time.monotonic() + {args.timeout * 2}\n"
                                "while time.monotonic() < end: pass"])
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'proto'}"}
    with open(log_dir / f"router-{repeat}.log", "w") as rlog, open(log_dir / f"worker-{repeat}.log", "w") as wlog:
        router = subprocess.Popen(router_cmd, stdout=rlog, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        worker = subprocess.Popen(worker_cmd, stdout=wlog, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            return asyncio.run(asyncio.wait_for(measure(address, http_port, args, router.pid, worker.pid), args.timeout * 2))
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
            stop(worker)
            stop(router)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="its config.json and tokenizer only (mock engine)")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--speedup", type=float, default=1.0, help="mock engine speed-up over the H100 timing model")
    p.add_argument("--kv-blocks", type=int, default=32768)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300.0, help="bound of every wait, seconds")
    p.add_argument("--profile", default=None, help="cProfile output of the router (last repeat)")
    p.add_argument("--starve-router", action="store_true",
                   help="router on CPU 0 beside a busy loop (so about half a core), worker and this client on "
                        "CPUs 1..n-1: the router is the bottleneck while the worker keeps up with the engine, "
                        "as on the H100 host")
    p.add_argument("--log-dir", default=None)
    p.add_argument("--json", default=None, help="write every run and the medians here")
    args = p.parse_args()
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="router-streaming-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    if args.starve_router:
        os.sched_setaffinity(0, range(1, os.cpu_count()))
    runs = []
    for repeat in range(args.repeats):
        row = run_once(args, log_dir, repeat)
        runs.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    keys = ("output_tok_s", "router_cpu_us_per_token", "router_cores", "worker_cores", "client_cores",
            "client_chunks_per_token", "tokens_per_worker_message", "tokens_per_router_chunk")
    medians = {k: statistics.median(r[k] for r in runs) if all(r[k] is not None for r in runs) else None
               for k in keys}
    print("median: " + ", ".join(f"{k} {v:.3f}" for k, v in medians.items() if v is not None), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "median": medians}, indent=2))
    return 1 if any(r["failed"] or r["short"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
