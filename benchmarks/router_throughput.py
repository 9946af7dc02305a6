"""Requests per second one router process sustains, with near-instant mock workers.

Starts a router (``--policy``), one process of ``--workers`` mock workers with
a very high ``--speedup`` (every engine step takes ~no time, so what is left is
the gRPC relays and the router's own work), and ``kvmesh bench`` in its own
process: closed loop at ``--concurrency``, ``--input-len``-token random prompts,
``--output-len`` tokens each. The router's CPU time is read from
``/proc/<pid>/stat`` (utime + stime) just before and just after the bench, and
divided by the requests sent in that window (measured + warm-up). Everything
binds 127.0.0.1; every load loop is bounded by ``--num-requests`` and
``--max-duration``.

Usage: python benchmarks/router_throughput.py [--policy kv] [--workers 8]
           [--concurrency 64] [--num-requests 4000] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from routing_e2e import free_port, stop, wait_for_workers  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # fields 14 and 15 of proc(5)


def run_once(args: argparse.Namespace, out_dir: Path, repeat: int) -> dict:
    grpc_port, http_port = free_port(), free_port()
    address = f"127.0.0.1:{grpc_port}"
    name = f"router-{args.policy}-{args.workers}w-c{args.concurrency}-r{repeat}"
    with open(out_dir / f"{name}.log", "w") as log:
        router = subprocess.Popen(["kvmesh", "router", "--grpc-port", str(grpc_port), "--http-port", str(http_port),
                                   "--policy", args.policy], stdout=log, stderr=subprocess.STDOUT)
        fleet = subprocess.Popen(["kvmesh", "worker", "--engine", "mock", "--num-workers", str(args.workers),
                                  "--router", address, "--worker-id", f"tp{repeat}", "--model", args.model,
                                  "--num-kv-blocks", str(args.kv_blocks), "--block-size", "16",
                                  "--speedup", str(args.speedup)], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_workers(address, args.workers)
            time.sleep(1.0)
            r0, f0, t0 = cpu_seconds(router.pid), cpu_seconds(fleet.pid), time.monotonic()
            subprocess.run(["kvmesh", "bench", "--target", address, "--tokenizer", args.model,
                            "--workload", "random", "--input-len", str(args.input_len),
                            "--output-len", str(args.output_len), "--concurrency", str(args.concurrency),
                            "--num-requests", str(args.num_requests), "--warmup", str(args.warmup),
                            "--max-duration", str(args.max_duration), "--seed", str(args.seed + repeat),
                            "--name", name, "--output-dir", str(out_dir), "--no-progress", "--no-plots"],
                           check=True, timeout=args.max_duration + 300, stdout=log, stderr=subprocess.STDOUT)
            r1, f1, t1 = cpu_seconds(router.pid), cpu_seconds(fleet.pid), time.monotonic()
        finally:
            stop(fleet)
            stop(router)
    result = json.loads((out_dir / f"{name}.json").read_text())
    s = result["summary"]
    sent = s["requests"] + result["load"]["warmup_requests"]
    row = {
        "name": name,
        "requests": s["requests"], "failed": s["failed"], "duration_s": s["duration_s"],
        "req_per_s": s["request_throughput"], "output_tok_per_s": s["output_throughput"],
        "ttft_p50_ms": s["ttft_ms"]["p50"], "ttft_p99_ms": s["ttft_ms"]["p99"],
        "e2e_p50_ms": s["e2e_ms"]["p50"], "e2e_p99_ms": s["e2e_ms"]["p99"],
        "router_cpu_s": r1 - r0, "router_cpu_us_per_req": (r1 - r0) / sent * 1e6,
        "router_cores": (r1 - r0) / (t1 - t0),
        "fleet_cpu_us_per_req": (f1 - f0) / sent * 1e6, "fleet_cores": (f1 - f0) / (t1 - t0),
        "client_cpu_us_per_req": result["client"]["cpu_ms_per_request"] * 1e3,
        "client_cores": result["client"]["cpu_utilization"],
        "window_s": t1 - t0,
    }
    (out_dir / f"{name}.summary.json").write_text(json.dumps(row, indent=2))
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="kv")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--model", default="smollm2", help="its config.json and tokenizer only (mock engine)")
    p.add_argument("--kv-blocks", type=int, default=2048)
    p.add_argument("--speedup", type=float, default=1000.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--input-len", default="16")
    p.add_argument("--output-len", default="4")
    p.add_argument("--num-requests", type=int, default=4000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--max-duration", type=float, default=120.0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out-dir", default="bench-results/router-throughput")
    args = p.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for repeat in range(args.repeats):
        row = run_once(args, out_dir, repeat)
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
