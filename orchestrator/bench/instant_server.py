"""TEST DOUBLE: an "instant" server that answers at once, to measure the load generator.

It is not a model and not a router. ``InstantGeneration`` speaks the real
``kvmesh.v1.Generation`` gRPC API and the streaming OpenAI ``/v1/completions``
API, and answers every request with ``max_tokens`` copies of one token,
``tokens_per_chunk`` per message, after optional scripted delays. It reports
usage (prompt tokens = token ids sent, or words of a text prompt) and, if
asked, a fixed fraction of the prompt as cached. Every ``fail_every``-th
request fails (gRPC UNAVAILABLE / HTTP 503), for error accounting tests.

Run it in its own process to measure what ``kvmesh bench`` can issue:

    python -m orchestrator.bench.instant_server            # prints its two addresses
    kvmesh bench --target 127.0.0.1:PORT --concurrency 64 --num-requests 5000 \\
        --input-len 128 --output-len 16 --warmup 50

Binds 127.0.0.1 only; port 0 picks free ports.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web

from kvmesh.v1 import common_pb2, generate_pb2, generate_pb2_grpc

MODEL = "instant"
TOKEN_ID = 1000


@dataclass
class InstantBehaviour:
    ttft_s: float = 0.0
    itl_s: float = 0.0
    tokens_per_chunk: int = 1
    cached_fraction: float = 0.0
    fail_every: int = 0
    default_max_tokens: int = 16


class InstantGeneration(generate_pb2_grpc.GenerationServicer):
    """TEST DOUBLE of the router's Generation service (see module docstring)."""

    def __init__(self, behaviour: InstantBehaviour | None = None) -> None:
        self.behaviour = behaviour or InstantBehaviour()
        self.requests = 0
        self.cache_salts: list[str] = []
        """The cache_salt of every request (for tests)."""

    def _admit(self) -> bool:
        """Counts the request; False when this one is scripted to fail."""
        self.requests += 1
        k = self.behaviour.fail_every
        return not (k and self.requests % k == 0)

    async def _deltas(self, max_tokens: int):
        """Yields token counts per message, sleeping as scripted."""
        b = self.behaviour
        if b.ttft_s:
            await asyncio.sleep(b.ttft_s)
        sent = 0
        while sent < max_tokens:
            k = min(b.tokens_per_chunk, max_tokens - sent)
            sent += k
            yield k
            if sent < max_tokens and b.itl_s:
                await asyncio.sleep(b.itl_s)

    async def Generate(self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        self.cache_salts.append(request.cache_salt)
        if not self._admit():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the instant server was told to fail this request")
        prompt = len(request.token_ids.ids) if request.HasField("token_ids") else len(request.text.split())
        sampling = request.sampling
        max_tokens = sampling.max_tokens if sampling.HasField("max_tokens") else self.behaviour.default_max_tokens
        sent = 0
        async for k in self._deltas(max_tokens):
            sent += k
            msg = generate_pb2.GenerateResponse(request_id=request.request_id, text=" tok" * k,
                                                token_ids=[TOKEN_ID] * k, worker_id="instant")
            if sent >= max_tokens:
                msg.finish_reason = common_pb2.FINISH_REASON_LENGTH
                msg.usage.CopyFrom(common_pb2.Usage(prompt_tokens=prompt, completion_tokens=sent,
                                                    cached_tokens=int(prompt * self.behaviour.cached_fraction)))
            yield msg

    async def ListModels(self, request, context):
        return generate_pb2.ListModelsResponse(models=[generate_pb2.ModelCard(id=MODEL, max_model_len=1 << 20,
                                                                              num_workers=1)])

    async def Abort(self, request, context):
        return generate_pb2.AbortResponse(found=False)

    # --- OpenAI HTTP ----------------------------------------------------------------

    def http_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        return app

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.cache_salts.append(body.get("cache_salt", ""))
        if not self._admit():
            return web.json_response({"error": {"message": "told to fail", "type": "unavailable"}}, status=503)
        prompt = body.get("prompt", "")
        prompt_tokens = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
        max_tokens = int(body.get("max_tokens") or self.behaviour.default_max_tokens)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        sent = 0
        async for k in self._deltas(max_tokens):
            sent += k
            finish = "length" if sent >= max_tokens else None
            await response.write(_sse({"object": "text_completion", "model": MODEL,
                                       "choices": [{"index": 0, "text": " tok" * k, "finish_reason": finish}]}))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": sent, "total_tokens": prompt_tokens + sent,
                 "prompt_tokens_details": {"cached_tokens": int(prompt_tokens * self.behaviour.cached_fraction)}}
        await response.write(_sse({"object": "text_completion", "model": MODEL, "choices": [], "usage": usage}))
        await response.write(b"data: [DONE]\n\n")
        return response


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class InstantServer:
    """Both faces of ``InstantGeneration`` on 127.0.0.1; ``async with`` or start/stop."""

    def __init__(self, behaviour: InstantBehaviour | None = None, grpc_port: int = 0, http_port: int = 0) -> None:
        self.servicer = InstantGeneration(behaviour)
        self._ports = (grpc_port, http_port)
        self._grpc: grpc.aio.Server | None = None
        self._http: web.AppRunner | None = None
        self.grpc_port = self.http_port = 0

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    async def start(self) -> None:
        self._grpc = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        generate_pb2_grpc.add_GenerationServicer_to_server(self.servicer, self._grpc)
        self.grpc_port = self._grpc.add_insecure_port(f"127.0.0.1:{self._ports[0]}")
        await self._grpc.start()
        self._http = web.AppRunner(self.servicer.http_app(), access_log=None)
        await self._http.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self._ports[1]))
        await web.SockSite(self._http, sock).start()
        self.http_port = sock.getsockname()[1]

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
        if self._grpc is not None:
            await self._grpc.stop(0)
            self._grpc = None

    async def __aenter__(self) -> InstantServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def _serve(args: argparse.Namespace) -> None:
    behaviour = InstantBehaviour(ttft_s=args.ttft_ms / 1e3, itl_s=args.itl_ms / 1e3,
                                 tokens_per_chunk=args.tokens_per_chunk)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with InstantServer(behaviour, args.grpc_port, args.http_port) as server:
        print(f"GRPC {server.grpc_address} HTTP {server.http_url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.bench.instant_server",
                                     description="TEST DOUBLE: answers every request at once (no model).")
    parser.add_argument("--grpc-port", type=int, default=0)
    parser.add_argument("--http-port", type=int, default=0)
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--itl-ms", type=float, default=0.0)
    parser.add_argument("--tokens-per-chunk", type=int, default=1)
    asyncio.run(_serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
