"""``kvmesh bench`` arguments and entry point.

The main CLI calls ``add_bench_args`` on its ``bench`` subparser and
``run_bench`` with the parsed namespace. ``kvmesh bench [OPTIONS]`` runs a
benchmark; ``kvmesh bench compare A.json B.json`` compares two results
(an optional sub-command of the bench parser). ``python -m orchestrator.bench``
runs the same thing standalone.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
from pathlib import Path

from orchestrator.bench.arrivals import Arrivals, load_trace
from orchestrator.bench.backends import BACKENDS, BackendUnavailable
from orchestrator.bench.config import PROMPT_FORMATS, BenchConfig
from orchestrator.bench.metrics import Slo
from orchestrator.bench.workloads import KINDS as WORKLOADS
from orchestrator.bench.workloads import LengthDist, WorkloadConfig

logger = logging.getLogger(__name__)

DEFAULT_GRPC_TARGET = "127.0.0.1:50051"
DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_NUM_REQUESTS = 100


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    """Adds the benchmark options and the ``compare`` sub-command to ``parser``."""
    t = parser.add_argument_group("target")
    t.add_argument("--backend", choices=BACKENDS, default=None,
                   help="grpc: the router's kvmesh.v1.Generation API; openai: an OpenAI-compatible "
                        "/v1/completions (default: openai if --url is given, else grpc)")
    t.add_argument("--target", default=None, metavar="HOST:PORT",
                   help=f"router gRPC address (default {DEFAULT_GRPC_TARGET})")
    t.add_argument("--url", default=None, help=f"base URL of an OpenAI-compatible server (default {DEFAULT_URL})")
    t.add_argument("--model", default="", help="model to request (default: the only one the target lists)")
    t.add_argument("--tokenizer", default=None, metavar="PATH|NAME",
                   help="tokenizer of the target's model: a HF directory, a tokenizer.json or an embedded model "
                        "name (default: the embedded smollm2, pulled if missing)")
    t.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="tokens",
                   help="send prompts as token ids (exact lengths) or as text that re-tokenizes to the same "
                        "ids (default %(default)s)")
    t.add_argument("--cache-salt", default="",
                   help="prefix-cache namespace sent with every request (kvmesh, vLLM): repeat a run's prompts "
                        "on the same server without reusing the earlier run's cache")
    t.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request (default %(default)s)")

    a = parser.add_argument_group("load (one of --rate, --rates, --concurrency, --concurrencies; default --rate inf)")
    load = a.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, default=None, help="requests/s, Poisson or gamma; inf = all at once")
    load.add_argument("--rates", type=_float_list, default=None, metavar="R1,R2,...",
                      help="sweep: one measurement per rate")
    load.add_argument("--concurrency", type=int, default=None, help="closed loop with this many requests in flight")
    load.add_argument("--concurrencies", type=_int_list, default=None, metavar="C1,C2,...",
                      help="sweep: one closed-loop measurement per concurrency")
    a.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the inter-arrival times: 1 = Poisson, < 1 burstier (default %(default)s)")
    a.add_argument("--trace", default=None, metavar="FILE.jsonl",
                   help="Mooncake-style trace (timestamp ms, input_length, output_length, hash_ids): replayed "
                        "at its timestamps unless a rate or concurrency is given; also the default workload")
    a.add_argument("--trace-speedup", type=float, default=1.0, help="replay the trace this many times faster")
    a.add_argument("--num-requests", type=int, default=None,
                   help=f"measured requests per point (default {DEFAULT_NUM_REQUESTS}, or the trace's length)")
    a.add_argument("--warmup", type=int, default=2, help="warm-up requests before each point, not measured "
                                                          "(default %(default)s)")
    a.add_argument("--max-duration", type=float, default=600.0,
                   help="no request is issued later than this many seconds into a point (default %(default)s)")
    a.add_argument("--seed", type=int, default=0, help="seed of prompts and arrivals (default %(default)s)")

    w = parser.add_argument_group("workload")
    w.add_argument("--workload", choices=WORKLOADS, default=None,
                   help="request shapes (default: trace with --trace, else random)")
    w.add_argument("--input-len", default="256",
                   help="prompt (or question / user message) tokens: N, uniform:LO,HI, normal:MEAN,SD[,MIN,MAX] "
                        "(default %(default)s)")
    w.add_argument("--output-len", default="128", help="output tokens, same forms (default %(default)s)")
    w.add_argument("--dataset", default=None, metavar="FILE.jsonl",
                   help='JSONL of {"prompt": text} or {"prompt_token_ids": [...]}, optional "output_len"')
    w.add_argument("--num-prefixes", type=int, default=10, help="shared-prefix: distinct prefixes (default %(default)s)")
    w.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: tokens per prefix (default %(default)s)")
    w.add_argument("--num-turns", type=int, default=4, help="multi-turn: turns per conversation (default %(default)s)")
    w.add_argument("--trace-block-size", type=int, default=512,
                   help="trace: tokens per hash_id block (Mooncake: 512)")
    w.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="ask the server to ignore EOS so outputs have the requested length (default on)")
    w.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default %(default)s)")

    m = parser.add_argument_group("measurement and output")
    m.add_argument("--slo", default="", metavar="ttft_ms=..,tpot_ms=..,e2e_ms=..",
                   help="latency objectives for goodput (requests meeting every one)")
    m.add_argument("--slo-attainment", type=float, default=0.9,
                   help="sweeps: report the highest load where this fraction met the SLOs (default %(default)s)")
    m.add_argument("--late-threshold-ms", type=float, default=10.0,
                   help="warn when requests go out later than this after they were due (default %(default)s)")
    m.add_argument("--output-dir", default="bench-results", help="where results go (default %(default)s)")
    m.add_argument("--name", default="", help="file name stem (default: BACKEND-WORKLOAD-TIMESTAMP)")
    m.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    m.add_argument("--no-progress", action="store_true", help="no live progress line")

    sub = parser.add_subparsers(dest="bench_command", metavar="{compare}")
    c = sub.add_parser("compare", help="print two results side by side with ratios (B/A)")
    c.add_argument("a", metavar="A.json")
    c.add_argument("b", metavar="B.json")


def _points(args: argparse.Namespace, trace) -> tuple[Arrivals, ...]:
    if args.concurrencies:
        return tuple(Arrivals.closed_loop(c) for c in args.concurrencies)
    if args.concurrency is not None:
        return (Arrivals.closed_loop(args.concurrency),)
    if args.rates:
        return tuple(Arrivals.at_rate(r, args.burstiness) for r in args.rates)
    if args.rate is None and trace is not None:
        return (Arrivals.from_trace(trace, args.trace_speedup),)
    return (Arrivals.at_rate(math.inf if args.rate is None else args.rate, args.burstiness),)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Raises ValueError with the offending option in the message."""
    backend = args.backend or ("openai" if args.url else "grpc")
    if backend == "grpc" and args.url:
        raise ValueError("--url is for --backend openai; the grpc backend takes --target HOST:PORT")
    if backend == "openai" and args.target:
        raise ValueError("--target is for the grpc backend; the openai backend takes --url")
    target = (args.url or DEFAULT_URL) if backend == "openai" else (args.target or DEFAULT_GRPC_TARGET)
    if args.dataset and not Path(args.dataset).is_file():
        raise ValueError(f"--dataset {args.dataset}: no such file")
    trace = load_trace(args.trace) if args.trace else None
    workload_kind = args.workload or ("trace" if trace else "random")
    num_requests = args.num_requests or (len(trace) if trace and workload_kind == "trace" else DEFAULT_NUM_REQUESTS)
    workload = WorkloadConfig(
        kind=workload_kind, num_requests=num_requests,
        input_len=LengthDist.parse(args.input_len), output_len=LengthDist.parse(args.output_len),
        dataset=args.dataset, num_prefixes=args.num_prefixes, prefix_len=args.prefix_len,
        num_turns=args.num_turns, trace=tuple(trace or ()), trace_block_size=args.trace_block_size,
        text_prompts=args.prompt_format == "text")
    return BenchConfig(
        backend=backend, target=target, model=args.model, tokenizer=args.tokenizer,
        prompt_format=args.prompt_format, points=_points(args, trace), workload=workload, trace_path=args.trace,
        warmup=args.warmup, seed=args.seed, max_duration_s=args.max_duration,
        request_timeout_s=args.request_timeout, ignore_eos=args.ignore_eos, temperature=args.temperature,
        cache_salt=args.cache_salt,
        slo=Slo.parse(args.slo), slo_attainment=args.slo_attainment, late_threshold_ms=args.late_threshold_ms,
        output_dir=args.output_dir, name=args.name, plots=not args.no_plots, progress=not args.no_progress)


def run_bench(args: argparse.Namespace) -> int:
    """Runs ``kvmesh bench`` or ``kvmesh bench compare``; returns the exit code
    (0 done, 1 the target or the run failed, 2 bad arguments or input files)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "bench_command", None) == "compare":
        from orchestrator.bench.compare import compare, load

        try:
            print(compare(load(args.a), load(args.b)))
        except ValueError as e:
            print(f"kvmesh bench compare: {e}", file=sys.stderr)
            return 2
        return 0
    from orchestrator.bench.session import BenchFailed, run_benchmark

    try:
        config = config_from_args(args)
    except (ValueError, OSError) as e:
        print(f"kvmesh bench: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(run_benchmark(config))
    except (BackendUnavailable, BenchFailed) as e:
        print(f"kvmesh bench: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        print(f"kvmesh bench: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvmesh bench", description="Load generator for LLM serving: "
                                     "TTFT, ITL, TPOT, E2E, throughput, goodput.")
    add_bench_args(parser)
    return run_bench(parser.parse_args(argv))
