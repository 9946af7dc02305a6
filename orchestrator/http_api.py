"""The OpenAI-compatible HTTP server (aiohttp).

Routes: POST ``/v1/completions`` and ``/v1/chat/completions`` (whole or SSE),
GET ``/v1/models``, ``/health`` (200 with a healthy worker, else 503) and
``/metrics`` (Prometheus text); debug: POST ``/v1/route/dry_run`` (a
completions or chat body: where the router would place it and why, as
``kvmesh.v1.DryRunRouteResponse`` in JSON; nothing is routed).

Errors: ``_boundary`` (a middleware) is the one place exceptions become
responses, with the status and OpenAI error JSON declared in errors.py; it
also counts requests. Once an SSE stream has started its status is 200, so
a later failure is sent as a last ``data: {"error": ...}`` event followed by
``data: [DONE]`` (the ``openai`` client raises it as an APIError).

A client that disconnects mid-stream cancels its handler
(``handler_cancellation``), which closes the router stream and so cancels
the worker call. TCP_NODELAY is set on every connection so small SSE writes
are not held back by Nagle's algorithm meeting delayed ACKs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import uuid
from contextlib import aclosing
from typing import Any, Awaitable, Callable

from aiohttp import web

from orchestrator.errors import InvalidArgument, RequestTooLarge, RouterError, error_body, http_error_body
from orchestrator.metrics import CONTENT_TYPE, RouterMetrics
from orchestrator.openai_protocol import ApiRequest, ChatFormat, CompletionFormat, parse_chat, parse_completion
from orchestrator.router import PreparedRequest, Router

logger = logging.getLogger(__name__)

_STATUS_KEY = web.RequestKey("kvmesh_status", int)
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_DONE = b"data: [DONE]\n\n"
_CLIENT_CLOSED = 499


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _error_response(err: RouterError) -> web.Response:
    return web.json_response(http_error_body(err), status=err.http_status)


def set_nodelay(transport: asyncio.BaseTransport | None) -> None:
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class HttpApi:
    def __init__(self, router: Router, metrics: RouterMetrics, *, max_body_bytes: int = 8 * 1024 * 1024) -> None:
        self.router = router
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self._started = int(time.time())

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._boundary])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_text)
        app.router.add_post("/v1/route/dry_run", self.dry_run)
        return app

    @web.middleware
    async def _boundary(self, request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        set_nodelay(request.transport)
        resource = request.match_info.route.resource
        endpoint = resource.canonical if resource is not None else "unmatched"
        try:
            response = await handler(request)
        except RouterError as e:
            response = _error_response(e)
        except web.HTTPException as e:  # aiohttp's own: no route, wrong method, body too large
            response = web.json_response(error_body(e.reason, "invalid_request_error"), status=e.status)
        except asyncio.CancelledError:
            self.metrics.requests.labels(endpoint, str(_CLIENT_CLOSED)).inc()
            raise
        except Exception:
            logger.exception("%s %s failed", request.method, request.path)
            response = web.json_response(error_body("internal error", "internal_error"), status=500)
        self.metrics.requests.labels(endpoint, str(request.get(_STATUS_KEY, response.status))).inc()
        return response

    # --- generation -----------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_completion, "cmpl", CompletionFormat)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_chat, "chatcmpl", ChatFormat)

    async def _generate(self, request: web.Request, parse: Callable[[Any, str], ApiRequest], id_prefix: str,
                        format_cls: type[CompletionFormat] | type[ChatFormat]) -> web.StreamResponse:
        api = parse(await self._json_body(request), f"{id_prefix}-{uuid.uuid4().hex}")
        prepared = await self.router.prepare(api.generate)
        fmt = format_cls(prepared.request_id, prepared.entry.spec.name, prepared.entry.tokenizer,
                         logprobs=api.generate.sampling.logprobs)
        if not api.stream:
            async with aclosing(self.router.stream(prepared)) as chunks:
                collected = [chunk async for chunk in chunks]
            return web.json_response(fmt.whole(collected))
        response = web.StreamResponse(headers=_SSE_HEADERS)
        await response.prepare(request)
        try:
            error = await self._stream_events(response, api, prepared, fmt)
            if error is not None:
                request[_STATUS_KEY] = error.http_status
                await response.write(_sse(http_error_body(error)))
            await response.write(_DONE)
        except ConnectionResetError:
            request[_STATUS_KEY] = _CLIENT_CLOSED
        return response

    async def _stream_events(self, response: web.StreamResponse, api: ApiRequest, prepared: PreparedRequest,
                             fmt: CompletionFormat | ChatFormat) -> RouterError | None:
        """Writes the chunks as SSE events; returns the error that ended the
        stream early, if any (the status line is already sent)."""
        try:
            async with aclosing(self.router.stream(prepared)) as chunks:
                async for chunk in chunks:
                    data = fmt.chunk(chunk, api.include_usage)
                    if data is not None:
                        await response.write(_sse(data))
                    if chunk.usage is not None and api.include_usage:
                        await response.write(_sse(fmt.usage_chunk(chunk.usage)))
        except RouterError as e:
            logger.warning("stream %s failed: %s", prepared.request_id, e.message)
            return e
        except ConnectionResetError:
            raise
        except Exception:
            logger.exception("stream %s failed", prepared.request_id)
            return RouterError("internal error")
        return None

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge as e:
            raise RequestTooLarge(f"request body is larger than the limit of {self.max_body_bytes} bytes") from e
        try:
            body = json.loads(raw)
        except UnicodeDecodeError as e:
            raise InvalidArgument("", "request body is not UTF-8") from e
        except json.JSONDecodeError as e:
            raise InvalidArgument("", f"request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from e
        if not isinstance(body, dict):
            raise InvalidArgument("", "request body must be a JSON object")
        return body

    # --- information ---------------------------------------------------------------

    async def dry_run(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        body.pop("stream", None)
        parse = parse_chat if "messages" in body else parse_completion
        api = parse(body, f"dryrun-{uuid.uuid4().hex}")
        model, decision = await self.router.dry_run(api.generate)
        return web.json_response(decision.to_json(model))

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": card.id, "object": "model", "created": self._started, "owned_by": "kvmesh",
                 "max_model_len": card.max_model_len, "num_workers": card.num_workers}
                for card in self.router.model_cards()]
        return web.json_response({"object": "list", "data": data})

    async def health(self, request: web.Request) -> web.Response:
        healthy = sum(card.num_workers for card in self.router.model_cards())
        return web.json_response({"status": "ok" if healthy else "unavailable", "healthy_workers": healthy},
                                 status=200 if healthy else 503)

    async def metrics_text(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})
