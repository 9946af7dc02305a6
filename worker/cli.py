"""``kvmesh worker`` arguments and entry point.

The main CLI (orchestrator/cli.py) calls ``add_worker_args`` on its
``worker`` subparser and ``run_worker`` with the parsed namespace;
``python -m worker.cli`` runs the same thing standalone.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from worker.config import WorkerConfig, default_worker_id
from worker.engine.config import EngineConfig
from worker.models.hub import resolve_model
from worker.service import serve_worker

logger = logging.getLogger(__name__)


def add_worker_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("worker")
    g.add_argument("--model", default="smollm2",
                   help="model directory, or a name known to worker.models.hub, pulled on first use (default: smollm2)")
    g.add_argument("--served-name", default=None, help="name the model is served under (default: its directory name)")
    g.add_argument("--router", default=None, metavar="HOST:PORT",
                   help="register with this router's Registry service and send heartbeats")
    g.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 for remote routers)")
    g.add_argument("--port", type=int, default=0, help="gRPC port; 0 picks a free one (default)")
    g.add_argument("--worker-id", default=None, help="identity towards the router (default: hostname-pid-random)")
    g.add_argument("--advertise-address", default=None, metavar="HOST:PORT",
                   help="address the router dials back (default: host:bound port)")
    g.add_argument("--heartbeat-interval", type=float, default=2.0,
                   help="seconds between heartbeats until the router says otherwise")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running requests may take before stop")
    e = parser.add_argument_group("engine")
    e.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    e.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    e.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    e.add_argument("--num-kv-blocks", type=int, default=None, help="exact KV pool size in blocks")
    e.add_argument("--kv-cache-memory-gib", type=float, default=None, help="KV pool budget in GiB")
    e.add_argument("--max-num-seqs", type=int, default=64, help="most requests in one batch")
    e.add_argument("--max-num-batched-tokens", type=int, default=2048, help="per-step token budget")
    e.add_argument("--max-model-len", type=int, default=None, help="context window (default: the model's)")
    e.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    e.add_argument("--seed", type=int, default=0, help="seed for requests without one")


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    memory = None if args.kv_cache_memory_gib is None else int(args.kv_cache_memory_gib * 1024**3)
    engine = EngineConfig(
        model=str(resolve_model(args.model)),
        served_name=args.served_name,
        device=args.device,
        dtype=args.dtype,
        block_size=args.block_size,
        kv_cache_memory_bytes=memory,
        num_kv_blocks=args.num_kv_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
        seed=args.seed,
    )
    return WorkerConfig(
        engine=engine,
        host=args.host,
        port=args.port,
        worker_id=args.worker_id or default_worker_id(),
        advertise_address=args.advertise_address,
        router_address=args.router,
        heartbeat_interval_s=args.heartbeat_interval,
        drain_timeout_s=args.drain_timeout,
    )


def run_worker(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    try:
        asyncio.run(serve_worker(config))
    except RuntimeError as exc:
        logger.error("worker %s failed: %s", config.worker_id, exc)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvmesh worker", description="Run one kvmesh worker.")
    add_worker_args(parser)
    return run_worker(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
