"""Python clients of a kvmesh router's gRPC API (``kvmesh.v1.Generation``).

    with KvmeshClient("127.0.0.1:50051") as client:
        for chunk in client.generate("Once upon a time", max_tokens=32, temperature=0):
            print(chunk.text, end="")
        print(client.complete(chat=[{"role": "user", "content": "Hi!"}], max_tokens=16))

``AsyncKvmeshClient`` has the same methods for asyncio. Sampling keywords are
the fields of ``types.Sampling`` (``stop`` may be a string). Failures raise
``grpc.RpcError`` with the router's status (INVALID_ARGUMENT names the
field). Leaving a ``generate`` loop early cancels the request on the worker.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterable, Iterator, Mapping, Sequence

import grpc

from kvmesh.v1 import generate_pb2, generate_pb2_grpc
from orchestrator.types import (ChatMessage, ChatPrompt, Chunk, GenerateRequest, ModelCard, Prompt, Sampling,
                                TextPrompt, TokenPrompt)

ChatInput = Iterable[ChatMessage | Mapping[str, str] | tuple[str, str]]


def build_request(prompt: str | Sequence[int] | None = None, *, chat: ChatInput | None = None, model: str = "",
                  request_id: str = "", cache_salt: str = "", **sampling: Any) -> generate_pb2.GenerateRequest:
    """A GenerateRequest from text, token ids or ``chat`` turns (exactly one)."""
    if (prompt is None) == (chat is None):
        raise ValueError("give exactly one of prompt (text or token ids) and chat")
    body: Prompt
    if chat is not None:
        body = ChatPrompt(tuple(_chat_message(m) for m in chat))
    elif isinstance(prompt, str):
        body = TextPrompt(prompt)
    else:
        body = TokenPrompt(tuple(prompt))
    if isinstance(sampling.get("stop"), str):
        sampling["stop"] = (sampling["stop"],)
    for key in ("stop", "stop_token_ids"):
        if key in sampling:
            sampling[key] = tuple(sampling[key])
    request = GenerateRequest(body, model=model, sampling=Sampling(**sampling), request_id=request_id,
                              cache_salt=cache_salt)
    return request.to_pb()


def _chat_message(message: ChatMessage | Mapping[str, str] | tuple[str, str]) -> ChatMessage:
    if isinstance(message, ChatMessage):
        return message
    if isinstance(message, tuple):
        return ChatMessage(*message)
    return ChatMessage(message["role"], message["content"])


class KvmeshClient:
    """Blocking client; one channel, safe to share between threads."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(address)
        self._stub = generate_pb2_grpc.GenerationStub(self._channel)

    def generate(self, prompt: str | Sequence[int] | None = None, *, chat: ChatInput | None = None,
                 timeout: float | None = None, **kwargs: Any) -> Iterator[Chunk]:
        """Streams chunks; the last carries ``finish_reason`` and ``usage``."""
        call = self._stub.Generate(build_request(prompt, chat=chat, **kwargs), timeout=timeout)
        try:
            for response in call:
                yield Chunk.from_pb(response)
        finally:
            call.cancel()

    def complete(self, prompt: str | Sequence[int] | None = None, **kwargs: Any) -> str:
        """The whole generated text."""
        return "".join(chunk.text for chunk in self.generate(prompt, **kwargs))

    def list_models(self) -> list[ModelCard]:
        return [ModelCard.from_pb(m) for m in self._stub.ListModels(generate_pb2.ListModelsRequest()).models]

    def abort(self, request_id: str) -> bool:
        return self._stub.Abort(generate_pb2.AbortRequest(request_id=request_id)).found

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> KvmeshClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncKvmeshClient:
    """asyncio client; create it inside the event loop that uses it."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = generate_pb2_grpc.GenerationStub(self._channel)

    async def generate(self, prompt: str | Sequence[int] | None = None, *, chat: ChatInput | None = None,
                       timeout: float | None = None, **kwargs: Any) -> AsyncIterator[Chunk]:
        call = self._stub.Generate(build_request(prompt, chat=chat, **kwargs), timeout=timeout)
        try:
            async for response in call:
                yield Chunk.from_pb(response)
        finally:
            call.cancel()

    async def complete(self, prompt: str | Sequence[int] | None = None, **kwargs: Any) -> str:
        return "".join([chunk.text async for chunk in self.generate(prompt, **kwargs)])

    async def list_models(self) -> list[ModelCard]:
        response = await self._stub.ListModels(generate_pb2.ListModelsRequest())
        return [ModelCard.from_pb(m) for m in response.models]

    async def abort(self, request_id: str) -> bool:
        return (await self._stub.Abort(generate_pb2.AbortRequest(request_id=request_id))).found

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncKvmeshClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
