"""Turning a stream of token ids into a stream of text, and cutting it at stop strings.

``IncrementalDetokenizer`` emits text only once it is complete: a character
split over several byte-level tokens comes out whole, with the token that
completes it. It decodes a short sliding window (a few tokens of context plus
the new ones) and emits the part of the window's text that is new, so
tokenizers that change a token's text by its neighbours (SentencePiece's
leading space) decode as they would in one piece. Cost per step: one decode
of at most ``MAX_WINDOW`` tokens, plus one more each time the window is cut
back to ``CONTEXT_TOKENS``.

``ByteDetokenizer`` does the same for byte-level BPE tokenizers (GPT-2's
``ByteLevel`` decoder: SmolLM2, Llama 3, Qwen), where a token's text is a fixed
byte string whatever its neighbours: the text is the incremental UTF-8
decoding of the tokens' bytes, so no window and no call into the tokenizer
(whose ``decode`` releases the GIL: in a router busy with gRPC that hand-off
to grpc's poller thread cost ~20 µs of CPU per call, more than the decode).

``StopMatcher`` finds the first stop string in the text, holding back any
tail that could still become the start of one. Invariant: a stop string
never begins inside text already emitted, so searching the held-back tail
plus the new text is enough.
"""

from __future__ import annotations

import codecs
from typing import Callable, Protocol, Sequence

_REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5
"""Tokens of already emitted text kept when the decode window is cut back."""
MAX_WINDOW = 32
"""The window is cut back once it is longer than this."""


class IncrementalDetokenizer:
    """Feed generated token ids with ``add``; it returns newly completed text."""

    def __init__(self, decode: Callable[[list[int]], str], prompt_ids: Sequence[int]) -> None:
        self._decode = decode
        self._window: list[int] = list(prompt_ids[-CONTEXT_TOKENS:])
        self._read_text = decode(self._window)     # text of the window's emitted part

    def add(self, token_ids: Sequence[int]) -> str:
        if not token_ids:
            return ""
        self._window.extend(token_ids)
        text = self._decode(self._window)
        if len(text) <= len(self._read_text) or text.endswith(_REPLACEMENT):
            return ""                              # an incomplete character: wait
        delta = text[len(self._read_text):]
        if len(self._window) > MAX_WINDOW:
            self._window = self._window[-CONTEXT_TOKENS:]
            self._read_text = self._decode(self._window)
        else:
            self._read_text = text
        return delta

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes to U+FFFD)."""
        text = self._decode(self._window)
        delta = text[len(self._read_text):] if len(text) > len(self._read_text) else ""
        self._read_text = text
        return delta


class Detokenizer(Protocol):
    def add(self, token_ids: Sequence[int]) -> str:
        """Text completed by ``token_ids`` (the next generated tokens)."""

    def flush(self) -> str:
        """Whatever is still held back, once no more tokens will come."""


class ByteDetokenizer:
    """``IncrementalDetokenizer``'s output for a byte-level tokenizer, from a
    per-token byte table: ``token_bytes(id)`` is the token's bytes (``b""``
    for a special token, which decoding skips)."""

    def __init__(self, token_bytes: Callable[[int], bytes]) -> None:
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, token_ids: Sequence[int]) -> str:
        if not token_ids:
            return ""
        return self._utf8.decode(b"".join(map(self._token_bytes, token_ids)))

    def flush(self) -> str:
        """An incomplete character at the end comes out as U+FFFD."""
        return self._utf8.decode(b"", final=True)


class StopMatcher:
    """Applies stop strings to streamed text; the stop string itself is dropped."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._held = ""
        self.stopped = False
        self.active = bool(self._stops)
        """Whether there are stop strings at all (if not, ``feed`` returns its text as is)."""

    def feed(self, text: str) -> str:
        """The text that is safe to emit now; sets ``stopped`` when a stop
        string was found (the returned text then ends right before it)."""
        if not self._stops:
            return text
        buf = self._held + text
        first = -1
        for stop in self._stops:
            i = buf.find(stop)
            if i != -1 and (first == -1 or i < first):
                first = i
        if first != -1:
            self._held = ""
            self.stopped = True
            return buf[:first]
        hold = self._longest_partial_match(buf)
        self._held = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold]

    def flush(self) -> str:
        """The held-back tail, once no more text will come."""
        held, self._held = self._held, ""
        return held

    def _longest_partial_match(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best
