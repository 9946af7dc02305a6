"""The ``kvmesh`` command: serve, router, worker, generate, bench, model.

Each subcommand's arguments and entry point live with the component they
start; this module only dispatches, and imports a component only when its
subcommand runs (so ``kvmesh generate`` never imports torch).
"""

from __future__ import annotations

import argparse
import sys


def _serve(args: argparse.Namespace) -> int:
    from orchestrator.local_cluster import run_serve

    return run_serve(args)


def _router(args: argparse.Namespace) -> int:
    from orchestrator.server import run_router

    return run_router(args)


def _worker(args: argparse.Namespace) -> int:
    from worker.cli import run_worker

    return run_worker(args)


def _generate(args: argparse.Namespace) -> int:
    import grpc

    from orchestrator.client import KvmeshClient

    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.top_p is not None:
        sampling["top_p"] = args.top_p
    if args.seed is not None:
        sampling["seed"] = args.seed
    with KvmeshClient(args.router) as client:
        try:
            if args.raw:
                chunks = client.generate(args.prompt, model=args.model, **sampling)
            else:
                chat = ([("system", args.system)] if args.system else []) + [("user", args.prompt)]
                chunks = client.generate(chat=chat, model=args.model, **sampling)
            last = None
            for chunk in chunks:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                last = chunk
            sys.stdout.write("\n")
            if args.usage and last is not None and last.usage is not None:
                u = last.usage
                print(f"[finish={last.finish_reason.value if last.finish_reason else None} prompt_tokens="
                      f"{u.prompt_tokens} completion_tokens={u.completion_tokens} cached_tokens={u.cached_tokens}]",
                      file=sys.stderr)
        except grpc.RpcError as e:
            print(f"kvmesh generate: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


def _bench(args: argparse.Namespace) -> int:
    from orchestrator.bench.cli import run_bench

    return run_bench(args)


def _model(args: argparse.Namespace) -> int:
    import logging

    from worker.models.hub import KNOWN_MODELS, pull

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.model_command == "list":
        for name, spec in KNOWN_MODELS.items():
            print(f"{name}\t{spec.served_name}\t{spec.requirement}")
        return 0
    try:
        print(pull(args.name, force=args.force))
    except (ValueError, RuntimeError) as e:
        print(f"kvmesh model pull: {e}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmesh", description="KV-cache-aware LLM serving: router, workers, tools")
    sub = parser.add_subparsers(dest="command", required=True)

    from orchestrator.local_cluster import add_serve_args
    from orchestrator.server import add_router_args

    p = sub.add_parser("serve", help="router plus local worker(s) on one machine (default model: SmolLM2)")
    add_router_args(p)
    add_serve_args(p)
    p.set_defaults(func=_serve)

    p = sub.add_parser("router", help="the router alone; workers join with `kvmesh worker --router`")
    add_router_args(p)
    p.set_defaults(func=_router)

    p = sub.add_parser("worker", help="one worker; registers with --router if given")
    from worker.cli import add_worker_args

    add_worker_args(p)
    p.set_defaults(func=_worker)

    p = sub.add_parser("generate", help="stream a completion from a running router over gRPC")
    p.add_argument("prompt")
    p.add_argument("--router", default="127.0.0.1:50051", help="router gRPC address (default %(default)s)")
    p.add_argument("--model", default="", help="model name (default: the only one served)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    p.add_argument("--usage", action="store_true", help="print token usage to stderr at the end")
    p.set_defaults(func=_generate)

    from orchestrator.bench.cli import add_bench_args

    p = sub.add_parser("bench", help="load generator (TTFT/ITL/TPOT/goodput); `kvmesh bench compare A.json B.json`")
    add_bench_args(p)
    p.set_defaults(func=_bench)

    p = sub.add_parser("model", help="manage embedded models")
    msub = p.add_subparsers(dest="model_command", required=True)
    pp = msub.add_parser("pull", help="fetch and convert an embedded model into the cache")
    pp.add_argument("name", nargs="?", default="smollm2")
    pp.add_argument("--force", action="store_true", help="convert again even if cached")
    msub.add_parser("list", help="list embedded models")
    p.set_defaults(func=_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
