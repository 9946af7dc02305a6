"""OpenAI JSON <-> router types, for ``/v1/completions`` and ``/v1/chat/completions``.

``parse_completion``/``parse_chat`` turn a JSON body into an ``ApiRequest``
(type errors name the field; ranges are checked by the router).
``CompletionFormat``/``ChatFormat`` turn router ``Chunk``s into OpenAI's
response objects, streamed or whole.

Defaults and extensions: completions default to ``max_tokens=16`` (OpenAI's
legacy default), chat to the rest of the context window. Extensions:
``top_k``, ``ignore_eos``, ``stop_token_ids``, ``cache_salt``. Fields kvmesh
does not implement (penalties, ``logit_bias``, ``echo``, ``suffix``, tools)
fail with 400 instead of being ignored.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from orchestrator import validation as v
from orchestrator.errors import InvalidArgument
from orchestrator.tokenize import TokenizerBundle
from orchestrator.types import (ChatMessage, ChatPrompt, Chunk, GenerateRequest, Prompt, Sampling, TextPrompt,
                                TokenLogprob, TokenPrompt, Usage)

COMPLETION_DEFAULT_MAX_TOKENS = 16
_UNSUPPORTED_COMMON = ("presence_penalty", "frequency_penalty", "logit_bias")
_UNSUPPORTED_COMPLETION = _UNSUPPORTED_COMMON + ("echo", "suffix")
_UNSUPPORTED_CHAT = _UNSUPPORTED_COMMON + ("tools", "functions", "tool_choice", "function_call", "audio")


@dataclass(frozen=True)
class ApiRequest:
    """A parsed OpenAI request: the router request plus response options."""

    generate: GenerateRequest
    stream: bool
    include_usage: bool


# --- parsing ---------------------------------------------------------------------

def parse_completion(body: Mapping[str, Any], request_id: str) -> ApiRequest:
    v.reject_unsupported(body, _UNSUPPORTED_COMPLETION)
    best_of = v.opt_int(body, "best_of")
    if best_of not in (None, 1):
        raise InvalidArgument("best_of", f"only best_of=1 is supported, got {best_of}")
    logprobs = v.opt_int(body, "logprobs", lo=0, hi=v.TOP_LOGPROBS_MAX)
    max_tokens = v.opt_int(body, "max_tokens")
    sampling = _sampling(
        body,
        max_tokens=COMPLETION_DEFAULT_MAX_TOKENS if "max_tokens" not in body else max_tokens,
        logprobs=logprobs is not None,
        top_logprobs=logprobs or 0,
    )
    return _api_request(body, request_id, _completion_prompt(body.get("prompt")), sampling)


def parse_chat(body: Mapping[str, Any], request_id: str) -> ApiRequest:
    v.reject_unsupported(body, _UNSUPPORTED_CHAT)
    response_format = v.opt_object(body, "response_format")
    if response_format is not None and response_format.get("type", "text") != "text":
        raise InvalidArgument("response_format", "only type 'text' is supported")
    max_tokens = v.opt_int(body, "max_completion_tokens", lo=1)
    if max_tokens is None:
        max_tokens = v.opt_int(body, "max_tokens")
    logprobs = bool(v.opt_bool(body, "logprobs"))
    top_logprobs = v.opt_int(body, "top_logprobs") or 0
    sampling = _sampling(body, max_tokens=max_tokens, logprobs=logprobs, top_logprobs=top_logprobs)
    return _api_request(body, request_id, _chat_prompt(body.get("messages")), sampling)


def _sampling(body: Mapping[str, Any], *, max_tokens: int | None, logprobs: bool, top_logprobs: int) -> Sampling:
    v.require_n_is_one(body)
    return Sampling(
        temperature=v.opt_float(body, "temperature"),
        top_p=v.opt_float(body, "top_p"),
        top_k=v.opt_int(body, "top_k"),
        seed=v.opt_int(body, "seed"),
        max_tokens=max_tokens,
        stop=v.str_or_list(body, "stop"),
        stop_token_ids=v.int_list(body, "stop_token_ids"),
        ignore_eos=bool(v.opt_bool(body, "ignore_eos")),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


def _api_request(body: Mapping[str, Any], request_id: str, prompt: Prompt, sampling: Sampling) -> ApiRequest:
    stream = bool(v.opt_bool(body, "stream"))
    options = v.opt_object(body, "stream_options") or {}
    include_usage = bool(v.opt_bool(options, "include_usage"))
    if include_usage and not stream:
        raise InvalidArgument("stream_options", "is only allowed when stream is true")
    generate = GenerateRequest(
        prompt=prompt,
        model=v.opt_str(body, "model") or "",
        sampling=sampling,
        request_id=request_id,
        cache_salt=v.opt_str(body, "cache_salt") or "",
    )
    return ApiRequest(generate, stream, include_usage)


def _completion_prompt(prompt: Any) -> Prompt:
    # OpenAI also accepts a batch (a list of prompts); kvmesh takes one.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return TextPrompt(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return TokenPrompt(tuple(prompt))
    if prompt is None:
        raise InvalidArgument("prompt", "is required")
    raise InvalidArgument("prompt", "must be a string or an array of token ids (one prompt per request)")


def _chat_prompt(messages: Any) -> ChatPrompt:
    if not isinstance(messages, list):
        raise InvalidArgument("messages", "must be an array of {role, content} objects")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidArgument(f"messages[{i}]", "must be an object with role and content")
        role = message.get("role")
        if not isinstance(role, str):
            raise InvalidArgument(f"messages[{i}].role", "must be a string")
        turns.append(ChatMessage(role, _message_text(message.get("content"), f"messages[{i}].content")))
    return ChatPrompt(tuple(turns))


def _message_text(content: Any, field: str) -> str:
    """A message's text: a string, or an array of ``{"type": "text"}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise InvalidArgument(field, "only text parts ({\"type\": \"text\", \"text\": ...}) are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidArgument(field, "must be a string or an array of text parts")


# --- formatting --------------------------------------------------------------------

def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


class _Format(ABC):
    """Shared shape of one response: id, model, creation time."""

    object_whole = ""
    object_chunk = ""

    def __init__(self, response_id: str, model: str, tokenizer: TokenizerBundle) -> None:
        self.response_id = response_id
        self.model = model
        self.created = int(time.time())
        self._tokenizer = tokenizer

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.response_id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        """The extra last chunk of ``stream_options.include_usage``."""
        out = self._envelope(self.object_chunk, [])
        out["usage"] = usage_json(usage)
        return out

    def chunk(self, chunk: Chunk, include_usage: bool) -> dict[str, Any] | None:
        """One SSE event's JSON, or None when the chunk carries nothing to send."""
        if not chunk.text and not chunk.logprobs and chunk.finish_reason is None:
            return None
        out = self._envelope(self.object_chunk, [self._choice_delta(chunk)])
        if include_usage:
            out["usage"] = None
        return out

    def whole(self, chunks: Sequence[Chunk]) -> dict[str, Any]:
        """The non-streamed response from all chunks of one request."""
        last = chunks[-1]
        text = "".join(c.text for c in chunks)
        logprobs = tuple(lp for c in chunks for lp in c.logprobs)
        out = self._envelope(self.object_whole, [self._choice_whole(text, logprobs, last)])
        if last.usage is not None:
            out["usage"] = usage_json(last.usage)
        return out

    @abstractmethod
    def _choice_delta(self, chunk: Chunk) -> dict[str, Any]:
        """The one choice of a streamed chunk."""

    @abstractmethod
    def _choice_whole(self, text: str, logprobs: tuple[TokenLogprob, ...], last: Chunk) -> dict[str, Any]:
        """The one choice of a whole response."""


class CompletionFormat(_Format):
    object_whole = object_chunk = "text_completion"

    def __init__(self, response_id: str, model: str, tokenizer: TokenizerBundle, *, logprobs: bool) -> None:
        super().__init__(response_id, model, tokenizer)
        self._logprobs = logprobs
        self._offset = 0

    def _choice_delta(self, chunk: Chunk) -> dict[str, Any]:
        return {"index": 0, "text": chunk.text, "logprobs": self._logprobs_json(chunk.logprobs),
                "finish_reason": _finish(chunk)}

    def _choice_whole(self, text: str, logprobs: tuple[TokenLogprob, ...], last: Chunk) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": self._logprobs_json(logprobs), "finish_reason": _finish(last)}

    def _logprobs_json(self, logprobs: tuple[TokenLogprob, ...]) -> dict[str, Any] | None:
        if not self._logprobs:
            return None
        tok = self._tokenizer.token_text
        tokens = [tok(lp.token_id) for lp in logprobs]
        offsets = []
        for t in tokens:
            offsets.append(self._offset)
            self._offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{tok(t): p for t, p in lp.top} for lp in logprobs],
            "text_offset": offsets,
        }


class ChatFormat(_Format):
    object_whole = "chat.completion"
    object_chunk = "chat.completion.chunk"

    def __init__(self, response_id: str, model: str, tokenizer: TokenizerBundle, *, logprobs: bool) -> None:
        super().__init__(response_id, model, tokenizer)
        self._logprobs = logprobs
        self._sent_role = False

    def _choice_delta(self, chunk: Chunk) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if not self._sent_role:
            delta["role"] = "assistant"
            self._sent_role = True
        if chunk.text or chunk.finish_reason is None:
            delta["content"] = chunk.text
        return {"index": 0, "delta": delta, "logprobs": self._logprobs_json(chunk.logprobs),
                "finish_reason": _finish(chunk)}

    def _choice_whole(self, text: str, logprobs: tuple[TokenLogprob, ...], last: Chunk) -> dict[str, Any]:
        return {"index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": self._logprobs_json(logprobs), "finish_reason": _finish(last)}

    def _logprobs_json(self, logprobs: tuple[TokenLogprob, ...]) -> dict[str, Any] | None:
        if not self._logprobs:
            return None
        return {"content": [
            {**self._token(lp.token_id, lp.logprob), "top_logprobs": [self._token(t, p) for t, p in lp.top]}
            for lp in logprobs]}

    def _token(self, token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": self._tokenizer.token_text(token_id), "logprob": logprob,
                "bytes": list(self._tokenizer.token_bytes(token_id))}


def _finish(chunk: Chunk) -> str | None:
    return chunk.finish_reason.value if chunk.finish_reason is not None else None
