"""``kvmesh serve``: one router in this process and local workers as child processes.

Workers are separate processes even on one machine, exactly as in a cluster:
each registers with the router over gRPC and the router reaches it only over
gRPC. The model is resolved (pulled and converted if missing) here first, so
several workers never race to convert it and its progress is visible once.

A worker process that exits unexpectedly is restarted (with backoff, a
bounded number of times); the router drops it meanwhile and its in-flight
requests end in clean errors.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass

from orchestrator.server import RouterServer, config_from_args

logger = logging.getLogger(__name__)

MAX_RESTARTS = 3
READY_TIMEOUT_S = 600.0

# engine flags forwarded to every local worker unchanged: (flag, dest, kind)
_ENGINE_FLAGS = (
    ("--load-format", "load_format", str),
    ("--device", "device", str),
    ("--dtype", "dtype", str),
    ("--block-size", "block_size", int),
    ("--num-kv-blocks", "num_kv_blocks", int),
    ("--kv-cache-memory-gib", "kv_cache_memory_gib", float),
    ("--kv-cache-dtype", "kv_cache_dtype", str),
    ("--kv-cache-scale", "kv_cache_scale", float),
    ("--max-num-seqs", "max_num_seqs", int),
    ("--max-num-batched-tokens", "max_num_batched_tokens", int),
    ("--max-model-len", "max_model_len", int),
    ("--served-name", "served_name", str),
    ("--seed", "seed", int),
)


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("local workers")
    g.add_argument("--model", default="smollm2",
                   help="model directory or embedded model name, pulled on first use (default: smollm2)")
    g.add_argument("--num-workers", type=int, default=1, help="local worker processes (default 1)")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching in the workers")
    for flag, dest, kind in _ENGINE_FLAGS:
        g.add_argument(flag, dest=dest, type=kind, default=None, help=f"forwarded to each worker ({flag})")


@dataclass
class _Child:
    index: int
    proc: asyncio.subprocess.Process
    restarts: int = 0


def worker_command(args: argparse.Namespace, model_path: str, router_address: str, index: int) -> list[str]:
    cmd = [sys.executable, "-m", "worker.cli", "--model", model_path, "--router", router_address,
           "--host", "127.0.0.1", "--port", "0", "--worker-id", f"local-{os.getpid()}-{index}"]
    for flag, dest, _kind in _ENGINE_FLAGS:
        value = getattr(args, dest, None)
        if value is not None:
            cmd += [flag, str(value)]
    if args.no_prefix_caching:
        cmd.append("--no-prefix-caching")
    return cmd


def run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.num_workers < 1:
        logger.error("--num-workers must be >= 1, got %d", args.num_workers)
        return 2
    from worker.models.hub import resolve_model

    try:
        model_path = str(resolve_model(args.model))
        config = config_from_args(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        logger.error("%s", e)
        return 2
    try:
        return asyncio.run(_serve(args, config, model_path))
    except OSError as e:
        logger.error("%s", e)
        return 1


async def _serve(args: argparse.Namespace, config, model_path: str) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with RouterServer(config) as server:
        router_address = f"127.0.0.1:{server.grpc_port}"
        children = [await _spawn(args, model_path, router_address, i) for i in range(args.num_workers)]
        supervisors = [asyncio.create_task(_supervise(c, args, model_path, router_address, stop)) for c in children]
        ready = asyncio.create_task(_announce_when_ready(server, args.num_workers))
        await stop.wait()
        ready.cancel()
        logger.info("shutting down: draining %d worker(s)", len(children))
        for task in supervisors:
            task.cancel()
        await asyncio.gather(*(_terminate(c) for c in children))
    return 0


async def _spawn(args, model_path: str, router_address: str, index: int) -> _Child:
    cmd = worker_command(args, model_path, router_address, index)
    proc = await asyncio.create_subprocess_exec(*cmd)
    logger.info("started worker %d (pid %d)", index, proc.pid)
    return _Child(index, proc)


async def _supervise(child: _Child, args, model_path: str, router_address: str, stop: asyncio.Event) -> None:
    while not stop.is_set():
        code = await child.proc.wait()
        if stop.is_set():
            return
        if child.restarts >= MAX_RESTARTS:
            logger.error("worker %d exited with %s and was restarted %d times already: giving up",
                         child.index, code, child.restarts)
            if args.num_workers == 1:
                stop.set()
            return
        delay = 2.0 ** child.restarts
        logger.error("worker %d exited with %s; restarting in %.0f s", child.index, code, delay)
        await asyncio.sleep(delay)
        fresh = await _spawn(args, model_path, router_address, child.index)
        child.proc, child.restarts = fresh.proc, child.restarts + 1


async def _announce_when_ready(server: RouterServer, expected: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.registry.healthy_count() >= expected:
            models = ", ".join(card.id for card in server.registry.model_cards())
            logger.info("ready: %s on HTTP %s/v1 and gRPC %s (%d worker(s))",
                        models, server.http_url, server.grpc_address, expected)
            return
        await asyncio.sleep(0.2)
    logger.warning("only %d of %d workers registered after %.0f s", server.registry.healthy_count(), expected,
                   READY_TIMEOUT_S)


async def _terminate(child: _Child, timeout: float = 30.0) -> None:
    if child.proc.returncode is not None:
        return
    child.proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(child.proc.wait(), timeout)
    except asyncio.TimeoutError:
        logger.warning("worker %d did not stop in %.0f s: killing it", child.index, timeout)
        child.proc.kill()
        await child.proc.wait()
