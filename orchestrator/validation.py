"""The one place request fields are checked.

Two layers, both here:

* JSON field readers (``opt_int``, ``opt_float`` ...) used by the OpenAI
  parser: a wrong JSON type fails with the field's name and expected type.
  ``bool`` is rejected where a number is expected (Python's ``True`` is an
  ``int``; JSON's ``true`` is not a number).
* range checks on the typed request (``validate_sampling``,
  ``validate_prompt``, ``check_context_window``), shared by gRPC and HTTP.

Every failure is an ``InvalidArgument`` naming the field and the allowed
values. Bounds (documented, OpenAI's where OpenAI has one):

* temperature in [0, 2] (0 = greedy); top_p in (0, 1]; top_k in [0, 2**31) (0 = off)
* max_tokens >= 1 and prompt + max_tokens <= the model's context window
* top_logprobs in [0, 20] and only with logprobs on
* at most 16 stop strings of 1..256 characters; at most 64 stop token ids
* seed in [0, 2**64)
* n = 1 only (one choice per request)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from orchestrator.errors import InvalidArgument
from orchestrator.types import ChatPrompt, Prompt, Sampling, TextPrompt, TokenPrompt

TEMPERATURE_MAX = 2.0
TOP_LOGPROBS_MAX = 20
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_STOP_TOKEN_IDS = 64
SEED_LIMIT = 2**64
INT32_MAX = 2**31 - 1
CHAT_ROLES = ("system", "user", "assistant")


# --- JSON field readers -------------------------------------------------------

def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string",
            list: "array", dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def _opt(body: Mapping[str, Any], field: str, ok: Callable[[Any], bool], expected: str, show: bool = True) -> Any:
    """``body[field]``, or None when absent or null; anything ``ok`` rejects is an
    error naming the field, what it must be, and what came (its value when ``show``)."""
    value = body.get(field)
    if value is None or ok(value):
        return value
    raise InvalidArgument(field, f"must be {expected}, got {_type_name(value)}" + (f" {value!r}" if show else ""))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def opt_int(body: Mapping[str, Any], field: str, *, lo: int | None = None, hi: int | None = None) -> int | None:
    """An optional integer in [lo, hi]. Bounds are given here only where the
    JSON name differs from the typed field, so the error names what the client sent."""
    value = _opt(body, field, _is_int, "an integer")
    if value is not None and (lo is not None and value < lo or hi is not None and value > hi):
        allowed = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise InvalidArgument(field, f"must be {allowed}, got {value}")
    return value


def opt_float(body: Mapping[str, Any], field: str) -> float | None:
    value = _opt(body, field, _is_number, "a number")
    if value is None:
        return None
    if not math.isfinite(value):
        raise InvalidArgument(field, f"must be a finite number, got {value!r}")
    return float(value)


def opt_bool(body: Mapping[str, Any], field: str) -> bool | None:
    return _opt(body, field, lambda v: isinstance(v, bool), "a boolean")


def opt_str(body: Mapping[str, Any], field: str) -> str | None:
    return _opt(body, field, lambda v: isinstance(v, str), "a string", show=False)


def opt_object(body: Mapping[str, Any], field: str) -> Mapping[str, Any] | None:
    return _opt(body, field, lambda v: isinstance(v, dict), "an object", show=False)


def str_or_list(body: Mapping[str, Any], field: str) -> tuple[str, ...]:
    """A string or an array of strings (OpenAI's ``stop``)."""
    value = body.get(field)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise InvalidArgument(field, "must be a string or an array of strings")


def int_list(body: Mapping[str, Any], field: str) -> tuple[int, ...]:
    value = body.get(field)
    if value is None:
        return ()
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise InvalidArgument(field, "must be an array of integers")


def require_n_is_one(body: Mapping[str, Any]) -> None:
    n = opt_int(body, "n")
    if n is not None and n != 1:
        raise InvalidArgument("n", f"only n=1 is supported, got {n}")


def reject_unsupported(body: Mapping[str, Any], fields: tuple[str, ...]) -> None:
    """Fields kvmesh does not implement fail loudly instead of being ignored."""
    for field in fields:
        value = body.get(field)
        if value not in (None, False, 0, [], {}, ""):
            raise InvalidArgument(field, "is not supported by kvmesh")


# --- range checks on the typed request ---------------------------------------

def validate_sampling(s: Sampling, *, vocab_size: int) -> None:
    if s.temperature is not None and not 0.0 <= s.temperature <= TEMPERATURE_MAX:
        raise InvalidArgument("temperature", f"must be in [0, {TEMPERATURE_MAX:g}], got {s.temperature:g}")
    if s.top_p is not None and not 0.0 < s.top_p <= 1.0:
        raise InvalidArgument("top_p", f"must be in (0, 1], got {s.top_p:g}")
    if s.top_k is not None and not 0 <= s.top_k <= INT32_MAX:
        raise InvalidArgument("top_k", f"must be in [0, {INT32_MAX}] (0 = off), got {s.top_k}")
    if s.max_tokens is not None and s.max_tokens < 1:
        raise InvalidArgument("max_tokens", f"must be >= 1, got {s.max_tokens}")
    if s.seed is not None and not 0 <= s.seed < SEED_LIMIT:
        raise InvalidArgument("seed", f"must be in [0, 2**64), got {s.seed}")
    if not 0 <= s.top_logprobs <= TOP_LOGPROBS_MAX:
        raise InvalidArgument("top_logprobs", f"must be in [0, {TOP_LOGPROBS_MAX}], got {s.top_logprobs}")
    if s.top_logprobs and not s.logprobs:
        raise InvalidArgument("top_logprobs", "requires logprobs to be enabled")
    if len(s.stop) > MAX_STOP_STRINGS:
        raise InvalidArgument("stop", f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(s.stop)}")
    for stop in s.stop:
        if not 1 <= len(stop) <= MAX_STOP_LENGTH:
            raise InvalidArgument("stop", f"each stop string must have 1..{MAX_STOP_LENGTH} characters, got {len(stop)}")
    if len(s.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidArgument(
            "stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} are allowed, got {len(s.stop_token_ids)}")
    _check_token_ids("stop_token_ids", s.stop_token_ids, vocab_size)


def validate_prompt(prompt: Prompt | None, *, vocab_size: int) -> None:
    """Checks what can be checked before tokenization."""
    if prompt is None:
        raise InvalidArgument("prompt", "is required (text, token ids or chat messages)")
    if isinstance(prompt, TextPrompt) and not prompt.text:
        raise InvalidArgument("prompt", "must not be empty")
    if isinstance(prompt, TokenPrompt):
        if not prompt.ids:
            raise InvalidArgument("prompt", "must not be empty")
        _check_token_ids("prompt", prompt.ids, vocab_size)
    if isinstance(prompt, ChatPrompt):
        if not prompt.messages:
            raise InvalidArgument("messages", "must contain at least one message")
        for i, message in enumerate(prompt.messages):
            if message.role not in CHAT_ROLES:
                raise InvalidArgument(
                    f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}; got {message.role!r}")


def check_context_window(prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
    """The prompt plus the tokens asked for must fit the context window.
    Blames ``prompt`` when it leaves no room for even one token, else ``max_tokens``."""
    field = "prompt" if max_tokens is None or prompt_tokens >= max_model_len else "max_tokens"
    wanted = prompt_tokens + (max_tokens or 1)
    if wanted > max_model_len:
        raise InvalidArgument(
            field,
            f"this model's context window is {max_model_len} tokens, but {wanted} were requested "
            f"({prompt_tokens} in the prompt, {max_tokens or 1} to generate); "
            f"shorten the prompt or lower max_tokens",
        )


def _check_token_ids(field: str, ids: tuple[int, ...], vocab_size: int) -> None:
    for token_id in ids:
        if not 0 <= token_id < vocab_size:
            raise InvalidArgument(field, f"token id {token_id} is outside the vocabulary [0, {vocab_size})")
