"""KV-aware placement against other policies, end to end, on mock workers.

For each ``--policies`` entry: start a router with that policy and a fresh
fleet of ``--workers`` mock workers (``kvmesh worker --engine mock``: the real
scheduler, block manager, prefix cache and KV events, with the forward pass
replaced by the timing model), run the same ``kvmesh bench`` shared-prefix
workload against it, stop everything. Then print the runs side by side.

The workload is built so that placement decides the hit rate: ``--num-prefixes``
prefixes of ``--prefix-len`` tokens (coprime with the worker count, so round
robin does not pin a prefix to one worker by accident), each worker's KV pool
(``--kv-blocks``) holding about a quarter of them, and a fresh question per
request.

``--workload random`` instead sends prompts with no reuse at all (``--input-len``
random tokens each, no prefix): the control, where ``kv`` can only balance load
and must not lose to ``least_loaded``. ``--repeats N`` runs the policies N times,
interleaved (kv, least_loaded, kv, least_loaded, ...), each run with a fresh
router and fleet, to show the run-to-run spread.

Usage: python benchmarks/routing_e2e.py [--workers 8] [--policies kv,round_robin]
           [--workload shared-prefix|random] [--repeats 1] [--out-dir DIR]
           [--router-arg=--log-placement ...]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc

from kvmesh.v1 import generate_pb2, generate_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_workers(address: str, count: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)
        while time.monotonic() < deadline:
            try:
                models = stub.ListModels(generate_pb2.ListModelsRequest(), timeout=2).models
                if models and models[0].num_workers >= count:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise RuntimeError(f"{count} workers did not register with {address} within {timeout_s}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_name(policy: str, args: argparse.Namespace, repeat: int) -> str:
    name = f"{policy}-{args.workers}mock"
    if args.workload != "shared-prefix":
        name += f"-{args.workload}"
    return name if args.repeats == 1 else f"{name}-r{repeat}"


def run_policy(policy: str, args: argparse.Namespace, out_dir: Path, repeat: int = 0) -> dict:
    grpc_port, http_port = free_port(), free_port()
    address = f"127.0.0.1:{grpc_port}"
    name = run_name(policy, args, repeat)
    logs = out_dir / f"{name}.log"
    with open(logs, "w") as log:
        router = subprocess.Popen(["kvmesh", "router", "--grpc-port", str(grpc_port), "--http-port", str(http_port),
                                   "--policy", policy, *args.router_arg], stdout=log, stderr=subprocess.STDOUT)
        fleet = subprocess.Popen(["kvmesh", "worker", "--engine", "mock", "--num-workers", str(args.workers),
                                  "--router", address, "--worker-id", f"{policy}-w", "--model", args.model,
                                  "--num-kv-blocks", str(args.kv_blocks), "--block-size", "16",
                                  "--speedup", str(args.speedup)], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_workers(address, args.workers)
            workload = ["--workload", args.workload]
            if args.workload == "shared-prefix":
                workload += ["--num-prefixes", str(args.num_prefixes), "--prefix-len", str(args.prefix_len)]
            subprocess.run(["kvmesh", "bench", "--target", address, "--tokenizer", args.model, *workload,
                            "--input-len", str(args.input_len),
                            "--output-len", str(args.output_len), "--num-requests", str(args.num_requests),
                            "--rate", str(args.rate), "--seed", str(args.seed), "--name", name,
                            "--max-duration", str(args.max_duration),
                            "--output-dir", str(out_dir), "--no-progress", "--no-plots"], check=True,
                           timeout=args.max_duration + 300)
        finally:
            stop(fleet)
            stop(router)
    return json.loads((out_dir / f"{name}.json").read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policies", default="kv,round_robin")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--model", default="smollm2", help="its config.json and tokenizer only (mock engine)")
    p.add_argument("--workload", choices=("shared-prefix", "random"), default="shared-prefix",
                   help="random: --input-len random tokens per prompt, no reuse (the control)")
    p.add_argument("--repeats", type=int, default=1, help="run the policies this many times, interleaved")
    p.add_argument("--max-duration", type=float, default=300.0, help="no request is issued later than this (s)")
    p.add_argument("--kv-blocks", type=int, default=2048, help="KV pool per worker, blocks of 16 tokens")
    p.add_argument("--num-prefixes", type=int, default=31)
    p.add_argument("--prefix-len", type=int, default=4096)
    p.add_argument("--input-len", type=int, default=256, help="question tokens after the prefix (random: prompt tokens)")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--num-requests", type=int, default=248)
    p.add_argument("--rate", type=float, default=12.0)
    p.add_argument("--speedup", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out-dir", default="bench-results/routing-e2e")
    p.add_argument("--router-arg", action="append", default=[],
                   help="extra argument for every router, repeatable (e.g. --router-arg=--log-placement)")
    args = p.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    policies = args.policies.split(",")
    for repeat in range(args.repeats):
        names = []
        for policy in policies:
            run_policy(policy, args, out_dir, repeat)
            names.append(out_dir / f"{run_name(policy, args, repeat)}.json")
        if len(names) == 2:
            subprocess.run(["kvmesh", "bench", "compare", str(names[1]), str(names[0])], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
