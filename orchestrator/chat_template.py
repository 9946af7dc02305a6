"""Chat templates rendered the way Hugging Face's ``apply_chat_template`` does.

The template source comes from the worker (``ModelInfo.chat_template``); it is
untrusted text, so it runs in Jinja's immutable sandbox. Like HF it gets
``messages``, ``add_generation_prompt``, ``bos_token`` and ``eos_token``, a
``raise_exception(msg)`` helper, ``strftime_now(fmt)``, a ``tojson`` filter
that keeps non-ASCII text, and the ``loopcontrols`` extension, with
``trim_blocks`` and ``lstrip_blocks`` on.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, NoReturn, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from orchestrator.errors import InvalidArgument
from orchestrator.types import ChatMessage


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled chat template; ``render`` turns messages into prompt text."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        """Raises ``ValueError`` if ``source`` is not a valid Jinja template."""
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"invalid chat template (line {e.lineno}): {e.message}") from e
        self._bos_token = bos_token
        self._eos_token = eos_token

    def render(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True) -> str:
        """Prompt text for ``messages``; a template's own objection
        (``raise_exception``, e.g. roles that do not alternate) becomes an
        ``InvalidArgument`` on ``messages``."""
        try:
            return self._template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos_token,
                eos_token=self._eos_token,
            )
        except jinja2.TemplateError as e:
            raise InvalidArgument("messages", f"rejected by the model's chat template: {e}") from e
