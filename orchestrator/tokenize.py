"""A model's tokenizer and chat template, built from what a worker sends.

The router holds no model files: ``TokenizerBundle.from_model_info`` builds
the HF ``tokenizers`` tokenizer from ``ModelInfo.tokenizer_json`` and the chat
template from ``ModelInfo.chat_template``. One bundle serves every worker of a
model (``fingerprint`` tells whether two workers agree).

Encoding a long prompt takes milliseconds, so ``encode_prompt`` moves prompts
above ``INLINE_ENCODE_CHARS`` to a thread instead of blocking the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from typing import Sequence

from tokenizers import Tokenizer, decoders

from kvmesh.v1 import worker_pb2
from orchestrator.chat_template import ChatTemplate
from orchestrator.detokenize import ByteDetokenizer, Detokenizer, IncrementalDetokenizer
from orchestrator.errors import InvalidArgument
from orchestrator.types import ChatMessage, ChatPrompt, Prompt, TextPrompt, TokenPrompt

INLINE_ENCODE_CHARS = 2048
"""Prompts up to this many characters are encoded on the event loop."""

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte <-> printable-character table, inverted (char -> byte)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class TokenizerBundle:
    """Encode prompts, render chat, and make detokenizers for one model."""

    def __init__(self, tokenizer: Tokenizer, chat_template: ChatTemplate | None, fingerprint: str) -> None:
        self._tokenizer = tokenizer
        self._chat_template = chat_template
        self.fingerprint = fingerprint
        self._byte_level = _byte_level_alphabet() if isinstance(tokenizer.decoder, decoders.ByteLevel) else None
        self._special_ids = frozenset(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)
        self._decoded_bytes: dict[int, bytes] = {}   # id -> bytes as decode() renders them (ByteDetokenizer)

    @classmethod
    def from_model_info(cls, info: worker_pb2.ModelInfo) -> TokenizerBundle:
        """Raises ``ValueError`` when the tokenizer or the template is invalid.
        Slow (parses a multi-megabyte JSON): call it off the event loop."""
        return cls.build(info.tokenizer_json, info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)

    @classmethod
    def build(cls, tokenizer_json: str, chat_template: str = "", *, bos_token: str = "",
              eos_token: str = "") -> TokenizerBundle:
        try:
            tokenizer = Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # the tokenizers library raises a bare Exception
            raise ValueError(f"invalid tokenizer_json: {e}") from e
        template = ChatTemplate(chat_template, bos_token=bos_token, eos_token=eos_token) if chat_template else None
        return cls(tokenizer, template, fingerprint_of(tokenizer_json, chat_template, bos_token, eos_token))

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template is not None

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text of ``messages`` with the assistant generation prompt."""
        if self._chat_template is None:
            raise InvalidArgument("messages", "this model has no chat template; send a text prompt instead")
        return self._chat_template.render(messages, add_generation_prompt=True)

    async def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of any prompt form. Chat text already holds its special
        tokens, so it is encoded without adding any (as HF does)."""
        if isinstance(prompt, TokenPrompt):
            return list(prompt.ids)
        if isinstance(prompt, ChatPrompt):
            text, special = self.render_chat(prompt.messages), False
        elif isinstance(prompt, TextPrompt):
            text, special = prompt.text, True
        else:
            raise TypeError(f"unknown prompt type {type(prompt).__name__}")
        if len(text) <= INLINE_ENCODE_CHARS:
            return self.encode(text, add_special_tokens=special)
        return await asyncio.to_thread(self.encode, text, add_special_tokens=special)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def detokenizer(self, prompt_ids: Sequence[int]) -> Detokenizer:
        """The byte-table detokenizer for a byte-level tokenizer (same text, no
        tokenizer call per chunk), else the decode-window one."""
        if self._byte_level is not None:
            return ByteDetokenizer(self._decoded_token_bytes)
        return IncrementalDetokenizer(self.decode, prompt_ids)

    def _decoded_token_bytes(self, token_id: int) -> bytes:
        """What ``decode`` makes of ``token_id`` in bytes: nothing for a special token."""
        data = self._decoded_bytes.get(token_id)
        if data is None:
            data = b"" if token_id in self._special_ids else self.token_bytes(token_id)
            self._decoded_bytes[token_id] = data
        return data

    def token_text(self, token_id: int) -> str:
        """The text of one token alone (for logprobs); special tokens included."""
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token, also when it holds part of a character."""
        piece = self._tokenizer.id_to_token(token_id)
        if piece is not None and self._byte_level is not None and all(c in self._byte_level for c in piece):
            return bytes(self._byte_level[c] for c in piece)
        if piece is not None and (m := _BYTE_FALLBACK.match(piece)):
            return bytes([int(m.group(1), 16)])
        return self.token_text(token_id).encode("utf-8")


def fingerprint_of(tokenizer_json: str, chat_template: str, bos_token: str, eos_token: str) -> str:
    """Identifies a tokenizer + template; workers of one model must agree on it."""
    h = hashlib.sha256()
    for part in (tokenizer_json, chat_template, bos_token, eos_token):
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:16]
