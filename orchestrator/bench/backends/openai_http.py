"""Any OpenAI-compatible server's ``/v1/completions`` as a benchmark target.

Requests stream (``stream: true``, ``stream_options.include_usage``) and send
the prompt as a list of token ids, or as text with ``--prompt-format text``.
``ignore_eos`` and ``cache_salt`` are added only when asked for (vLLM and
kvmesh accept both, SGLang ``ignore_eos``). An SSE event with non-empty ``text`` is an output chunk; the token count
comes from the final ``usage`` (else the streamed text is tokenized locally),
and cached prompt tokens from ``usage.prompt_tokens_details.cached_tokens``
when the server reports them. Connections are pooled and kept alive.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Callable

import aiohttp

from orchestrator.bench.backends import BackendUnavailable, pick_model
from orchestrator.bench.records import OutgoingRequest, StreamResult

CONNECT_TIMEOUT_S = 10.0
_FAILED_FINISH = ("abort", "error")


class OpenAIBackend:
    name = "openai"

    def __init__(self, target: str, *, model: str = "", timeout_s: float = 300.0,
                 tokenize: Callable[[str], list[int]]) -> None:
        base = target.rstrip("/")
        for suffix in ("/v1/completions", "/v1"):
            if base.endswith(suffix):
                base = base[: -len(suffix)]
                break
        self.target = base
        self.model = model
        self._endpoint = f"{base}/v1/completions"
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._tokenize = tokenize
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=self._timeout)
        try:
            async with self._session.get(f"{self.target}/v1/models",
                                         timeout=aiohttp.ClientTimeout(total=CONNECT_TIMEOUT_S)) as resp:
                if resp.status != 200:
                    raise BackendUnavailable(f"{self.target}/v1/models answered HTTP {resp.status}")
                listed = await resp.json()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise BackendUnavailable(f"cannot reach {self.target}: {type(e).__name__}: {e}") from None
        self.model = pick_model([m.get("id", "") for m in listed.get("data", [])], self.model, self.target)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _body(self, req: OutgoingRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": req.prompt_text if req.prompt_text is not None else list(req.prompt_ids),
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if req.ignore_eos:
            body["ignore_eos"] = True
        if req.cache_salt:
            body["cache_salt"] = req.cache_salt
        return body

    async def send(self, req: OutgoingRequest) -> StreamResult:
        assert self._session is not None, "start() first"
        body = self._body(req)
        times: list[float] = []
        texts: list[str] = []
        finish = ""
        usage: dict[str, Any] | None = None
        perf = time.perf_counter
        sent = perf()
        try:
            async with self._session.post(self._endpoint, json=body) as resp:
                if resp.status != 200:
                    detail = (await resp.text())[:300]
                    return StreamResult(sent, perf(), error_kind=f"http:{resp.status}", error=detail)
                async for line in resp.content:
                    now = perf()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        message = str(event["error"].get("message", event["error"]))[:300]
                        return StreamResult(sent, perf(), tuple(times), error_kind="stream_error", error=message)
                    for choice in event.get("choices") or ():
                        text = choice.get("text")
                        if text:
                            times.append(now)
                            texts.append(text)
                        finish = choice.get("finish_reason") or finish
                    usage = event.get("usage") or usage
        except asyncio.TimeoutError:
            return StreamResult(sent, perf(), tuple(times), error_kind="timeout", error="request timed out")
        except aiohttp.ClientError as e:
            return StreamResult(sent, perf(), tuple(times), error_kind="connection", error=f"{type(e).__name__}: {e}")
        except ValueError as e:   # bad SSE JSON, or a line longer than the reader's limit
            return StreamResult(sent, perf(), tuple(times), error_kind="protocol", error=f"bad SSE stream: {e}")
        end = perf()
        return self._result(req, sent, end, times, texts, finish, usage)

    def _result(self, req: OutgoingRequest, sent: float, end: float, times: list[float], texts: list[str],
                finish: str, usage: dict[str, Any] | None) -> StreamResult:
        output_ids: tuple[int, ...] = ()
        if req.keep_output or not usage:
            output_ids = tuple(self._tokenize("".join(texts)))
        output_tokens = int(usage["completion_tokens"]) if usage else len(output_ids)
        prompt_tokens = int(usage["prompt_tokens"]) if usage and "prompt_tokens" in usage else None
        details = (usage or {}).get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens")
        if not finish:
            error_kind = "incomplete"
        elif finish in _FAILED_FINISH:
            error_kind = f"finish:{finish}"
        else:
            error_kind = None if times else "no_output"
        return StreamResult(sent, end, tuple(times), (0,) * len(times), output_tokens,
                            prompt_tokens=prompt_tokens, cached_tokens=int(cached) if cached is not None else None,
                            finish_reason=finish, error_kind=error_kind,
                            error="the stream ended without a finish reason" if not finish else "",
                            output_ids=output_ids if req.keep_output else ())
