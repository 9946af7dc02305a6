"""How many requests per second ``kvmesh bench`` can issue: its overhead figure.

Starts the instant server (a TEST DOUBLE, ``instant_server.py``) in one
process and runs ``python -m orchestrator.bench`` against it in another, in a
closed loop, for each backend and output length; prints one Markdown table
row per run (the table in docs/PERFORMANCE.md)::

    python -m orchestrator.bench.overhead --tokenizer PATH [--num-requests 3000]

Requests/s is what the tool sustained; "bench CPU" is its process CPU time
per request and its share of one core. When that share is near 100 % the
tool is the limit and 1000 / (CPU ms per request) is its capacity; below, the
server double was the limit and the capacity is higher than the rate shown.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HEADER = ("| backend | output tokens | concurrency | requests/s | output tokens/s (1 per chunk) | bench CPU ms/request "
          "| bench CPU (1 core = 100 %) | TTFT p50 ms | lateness p99 ms |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")


def _start_server() -> tuple[subprocess.Popen, str, str]:
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.bench.instant_server"],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()   # "GRPC host:port HTTP url"
    if len(line) != 4:
        proc.kill()
        raise RuntimeError(f"the instant server did not start (said {line!r})")
    return proc, line[1], line[3]


def _run(backend: str, target: str, output_len: int, args: argparse.Namespace, out_dir: str) -> dict:
    name = f"{backend}-o{output_len}"
    where = ["--target", target] if backend == "grpc" else ["--url", target]
    cmd = [sys.executable, "-m", "orchestrator.bench", *where, "--concurrency", str(args.concurrency),
           "--num-requests", str(args.num_requests), "--input-len", str(args.input_len),
           "--output-len", str(output_len), "--warmup", "50", "--no-plots", "--no-progress",
           "--output-dir", out_dir, "--name", name] + (["--tokenizer", args.tokenizer] if args.tokenizer else [])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((Path(out_dir) / f"{name}.json").read_text())


def _row(doc: dict, concurrency: int) -> str:
    s, c = doc["summary"], doc["client"]
    chunks = s["completed"] * (s["output_len"]["mean"] if s["output_len"] else 0) / s["duration_s"]
    return (f"| {doc['target']['backend']} | {s['output_len']['mean']:.0f} | {concurrency} "
            f"| {s['request_throughput']:.0f} | {chunks:.0f} | {c['cpu_ms_per_request']:.3f} "
            f"| {c['cpu_utilization']:.0%} | {s['ttft_ms']['p50']:.2f} | {c['lateness_ms']['p99']:.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.bench.overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", default=None, help="as for kvmesh bench (default: embedded smollm2)")
    parser.add_argument("--num-requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-lens", default="1,16,128")
    args = parser.parse_args(argv)
    proc, grpc_target, http_url = _start_server()
    try:
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} before the runs")
        print(HEADER)
        with tempfile.TemporaryDirectory() as out_dir:
            for backend, target in (("grpc", grpc_target), ("openai", http_url)):
                for output_len in (int(x) for x in args.output_lens.split(",")):
                    print(_row(_run(backend, target, output_len, args, out_dir), args.concurrency), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
