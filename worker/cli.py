"""``kvmesh worker`` arguments and entry point.

The main CLI (orchestrator/cli.py) calls ``add_worker_args`` on its
``worker`` subparser and ``run_worker`` with the parsed namespace;
``python -m worker.cli`` runs the same thing standalone.

``--engine mock`` replaces the model's forward pass by a timing model
(``worker/engine/mock_runner.py``; only config.json and the tokenizer of
``--model`` are read) and ``--num-workers N`` runs N such workers in this
one process (``worker/mock_fleet.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from worker.config import WorkerConfig, default_worker_id
from worker.engine.config import KV_CACHE_DTYPES, LOAD_FORMATS, EngineConfig
from worker.engine.mock_timing import TimingModel
from worker.mock_fleet import fleet_configs, serve_fleet
from worker.models.hub import resolve_model
from worker.service import serve_worker

ENGINES = ("model", "mock")

logger = logging.getLogger(__name__)


def add_worker_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("worker")
    g.add_argument("--model", default="smollm2",
                   help="model directory, or a name known to worker.models.hub, pulled on first use (default: smollm2)")
    g.add_argument("--served-name", default=None, help="name the model is served under (default: its directory name)")
    g.add_argument("--router", default=None, metavar="HOST:PORT",
                   help="register with this router's Registry service and send heartbeats")
    g.add_argument("--discovery", choices=("router", "redis"), default="router",
                   help="router: register with --router over gRPC; redis: register in Redis at --redis-url "
                        "(shared by every router replica) (default %(default)s)")
    g.add_argument("--redis-url", default=None, metavar="redis://HOST:PORT",
                   help="the shared Redis of discovery backend redis")
    g.add_argument("--redis-prefix", default="kvmesh", help="prefix of this cluster's Redis keys (default %(default)s)")
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
    e.add_argument("--engine", choices=ENGINES, default="model",
                   help="model: run the model (default); mock: the real scheduler and KV cache with the forward "
                        "pass replaced by the timing model below (no weights loaded)")
    e.add_argument("--num-workers", type=int, default=1,
                   help="mock workers in this process, each with its own port and id <worker-id>-<i> (default 1)")
    e.add_argument("--load-format", choices=LOAD_FORMATS, default="auto",
                   help="auto: the checkpoint's *.safetensors; dummy: random weights from --seed, built from "
                        "config.json alone on the device (benchmarks) (default %(default)s)")
    e.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    e.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    e.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    e.add_argument("--num-kv-blocks", type=int, default=None, help="exact KV pool size in blocks")
    e.add_argument("--kv-cache-memory-gib", type=float, default=None, help="KV pool budget in GiB")
    e.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="auto: the model's dtype; fp8_e4m3 (alias fp8): float8 e4m3, half the bytes of bf16, so "
                        "twice the blocks and half the K/V reads of decode attention (default %(default)s)")
    e.add_argument("--kv-cache-scale", type=float, default=1.0,
                   help="scale of an fp8 cache, for K and V of every layer: it stores value/scale, saturated "
                        "to +-448 (default %(default)g)")
    e.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory for weights, activations and the KV pool (default 0.9)")
    e.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    e.add_argument("--no-tune-matmuls", action="store_true",
                   help="on CUDA, run F.linear everywhere instead of timing cuBLASLt's algorithms at start")
    e.add_argument("--no-fused-gate-up", action="store_true",
                   help="on CUDA, run the MLP's gate/up matmul and its SiLU gate as two kernels at every batch size")
    e.add_argument("--no-matmul-tuning-cache", action="store_true",
                   help="time the matmuls at every start instead of restoring earlier outcomes from "
                        "$KVMESH_CACHE_DIR/matmul-tuning-v1.json")
    e.add_argument("--no-prefill-cuda-graphs", action="store_true",
                   help="prefill a lone prompt of up to 512 tokens eagerly instead of replaying a CUDA graph")
    e.add_argument("--no-dense-prefill", action="store_true",
                   help="read every prompt's keys and values back from the paged cache (default on sm_90+ GPUs: "
                        "a step of over 512 tokens sends its cache-free prompts to a kernel that reads the step's "
                        "own keys and values, EngineConfig.dense_prefill)")
    e.add_argument("--no-async-scheduling", action="store_true",
                   help="wait for each step's tokens before scheduling the next (default on CUDA: schedule ahead)")
    e.add_argument("--max-num-seqs", type=int, default=64, help="most requests in one batch")
    e.add_argument("--max-num-batched-tokens", type=int, default=2048, help="per-step token budget")
    e.add_argument("--max-model-len", type=int, default=None, help="context window (default: the model's)")
    e.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    e.add_argument("--seed", type=int, default=0, help="seed for requests without one (and of dummy weights)")
    d = TimingModel()
    m = parser.add_argument_group("mock engine timing (--engine mock; defaults: Llama-3-8B on one H100)")
    m.add_argument("--mock-prefill-us-per-token", type=float, default=d.prefill_s_per_token * 1e6,
                   help="prefill microseconds per uncached prompt token (default %(default)g)")
    m.add_argument("--mock-decode-base-ms", type=float, default=d.decode_base_s * 1e3,
                   help="milliseconds of every decode step (default %(default)g)")
    m.add_argument("--mock-decode-us-per-seq", type=float, default=d.decode_s_per_seq * 1e6,
                   help="decode step microseconds added per sequence in the batch (default %(default)g)")
    m.add_argument("--mock-decode-ns-per-context-token", type=float, default=d.decode_s_per_context_token * 1e9,
                   help="decode step nanoseconds added per context token of the batch (default %(default)g)")
    m.add_argument("--speedup", type=float, default=d.speedup,
                   help="run every mock step this many times faster than modelled (default %(default)g)")


def timing_from_args(args: argparse.Namespace) -> TimingModel:
    return TimingModel(
        prefill_s_per_token=args.mock_prefill_us_per_token * 1e-6,
        decode_base_s=args.mock_decode_base_ms * 1e-3,
        decode_s_per_seq=args.mock_decode_us_per_seq * 1e-6,
        decode_s_per_context_token=args.mock_decode_ns_per_context_token * 1e-9,
        speedup=args.speedup,
    )


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    memory = None if args.kv_cache_memory_gib is None else int(args.kv_cache_memory_gib * 1024**3)
    engine = EngineConfig(
        model=str(resolve_model(args.model)),
        served_name=args.served_name,
        load_format=args.load_format,
        device=args.device,
        dtype=args.dtype,
        block_size=args.block_size,
        kv_cache_memory_bytes=memory,
        kv_cache_dtype=args.kv_cache_dtype,
        kv_cache_scale=args.kv_cache_scale,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        prefill_cuda_graphs=not args.no_prefill_cuda_graphs,
        dense_prefill=not args.no_dense_prefill,
        tune_matmuls=not args.no_tune_matmuls,
        matmul_tuning_cache=not args.no_matmul_tuning_cache,
        fused_gate_up=not args.no_fused_gate_up,
        async_scheduling=False if args.no_async_scheduling else None,
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
        discovery=args.discovery,
        redis_url=args.redis_url,
        redis_prefix=args.redis_prefix,
        heartbeat_interval_s=args.heartbeat_interval,
        drain_timeout_s=args.drain_timeout,
    )


GIL_SWITCH_INTERVAL_S = 0.0005


def run_worker(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        if args.engine == "mock":
            serving = serve_fleet(fleet_configs(config, args.num_workers), timing_from_args(args))
        elif args.num_workers != 1:
            raise ValueError(f"--num-workers {args.num_workers} needs --engine mock (a model engine owns its "
                             "device; start one process per model worker, or use `kvmesh serve --num-workers`)")
        else:
            serving = serve_worker(config)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    # The engine thread and the gRPC event loop share the GIL. Python hands it over
    # every 5 ms by default, so the engine could wait that long to issue the next
    # step while the loop streams tokens, leaving the GPU idle; 0.5 ms keeps the
    # wait well under a decode step.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    try:
        asyncio.run(serving)
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
