"""Synthetic prompt tokens drawn from the target model's real vocabulary.

Prompts are built from whole-word tokens of the tokenizer (a space followed
by letters, e.g. ``Ġgarden``): their text re-tokenizes to exactly the same
ids, so a prompt of n tokens is n tokens whether it is sent as token ids or
as text. ``fit`` checks that by a round trip and fixes the tail up when a
tokenizer merges differently.

The tokenizer comes from ``--tokenizer`` (a Hugging Face directory holding
tokenizer.json, the file itself, or an embedded model name). Without it the
embedded SmolLM2's tokenizer is used, resolved through ``worker.models.hub``
(imported only then: the one place this tool reaches into the worker
package, like ``kvmesh model pull`` does).
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_TOKENIZER_MODEL = "smollm2"
_WORD = re.compile(r"^ [A-Za-z]{2,16}$")
_LOOSE_WORD = re.compile(r"^ ?[A-Za-z]{2,16}$")
MIN_WORDS = 256
_FIT_ATTEMPTS = 32


def resolve_tokenizer(spec: str | None) -> Path:
    """The tokenizer.json for ``spec`` (see module docstring). Raises
    FileNotFoundError/ValueError with the fix in the message."""
    if spec is None:
        spec = DEFAULT_TOKENIZER_MODEL
        logger.info("no --tokenizer given: using the embedded %s model's tokenizer", spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{spec} has no tokenizer.json; pass a Hugging Face model directory "
                                    "or the tokenizer.json file itself")
        return path
    if path.is_file():
        return path
    from worker.models.hub import resolve_model  # an embedded model name (pulled on first use)

    try:
        return resolve_model(spec) / "tokenizer.json"
    except ValueError as e:
        raise ValueError(f"--tokenizer {spec!r} is neither a file, a directory nor a known model name: {e}") from None


class TokenSource:
    """Draws prompt tokens from a tokenizer's whole-word tokens."""

    def __init__(self, tokenizer: Tokenizer, name: str = "") -> None:
        self.tokenizer = tokenizer
        self.name = name
        self.words = self._word_ids()
        if len(self.words) < MIN_WORDS:
            raise ValueError(f"tokenizer {name!r} has only {len(self.words)} whole-word tokens; "
                             f"synthetic prompts need at least {MIN_WORDS}")

    @classmethod
    def load(cls, spec: str | None) -> TokenSource:
        path = resolve_tokenizer(spec)
        return cls(Tokenizer.from_file(str(path)), str(path))

    def _word_ids(self) -> list[int]:
        tok = self.tokenizer
        special = set(tok.get_added_tokens_decoder()) if hasattr(tok, "get_added_tokens_decoder") else set()
        ids = [i for i in range(tok.get_vocab_size(with_added_tokens=False)) if i not in special]
        texts = tok.decode_batch([[i] for i in ids], skip_special_tokens=True)
        candidates = [(i, t) for i, t in zip(ids, texts) if _WORD.match(t)]
        if len(candidates) < MIN_WORDS:   # e.g. SentencePiece decoders strip a leading space
            candidates = [(i, t) for i, t in zip(ids, texts) if _LOOSE_WORD.match(t)]
        encoded = tok.encode_batch([t for _, t in candidates], add_special_tokens=False)
        exact = [i for (i, _), enc in zip(candidates, encoded) if enc.ids == [i]]
        return exact if len(exact) >= MIN_WORDS else [i for i, _ in candidates]

    def sample(self, n: int, rng: random.Random) -> list[int]:
        """``n`` random whole-word token ids."""
        words = self.words
        return [words[int(rng.random() * len(words))] for _ in range(n)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def fit(self, ids: Sequence[int], rng: random.Random) -> list[int]:
        """Ids of the same length whose text re-tokenizes to exactly them.

        Usually ``ids`` itself; otherwise the tail is trimmed or extended with
        fresh words until the round trip holds. Raises ValueError if it cannot.
        """
        n = len(ids)
        current = list(ids)
        for _ in range(_FIT_ATTEMPTS):
            again = self.encode(self.decode(current))
            if again == current:
                return current
            if len(again) > n:
                current = again[:n]
            else:
                current = again + self.sample(n - len(again), rng)
        raise ValueError(f"could not build a {n}-token prompt that survives a text round trip with "
                         f"tokenizer {self.name!r}; send token ids (--prompt-format tokens)")
