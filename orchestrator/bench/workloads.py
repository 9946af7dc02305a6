"""Request shapes: what each benchmark request asks for.

Every workload yields ``RequestSpec``s from a ``TokenSource`` and a seed, so
the same arguments always produce the same requests:

- ``random``: prompts of ``input_len`` random whole-word tokens (no reuse).
- ``dataset``: prompts from a JSONL file (``prompt`` text or
  ``prompt_token_ids``; optional ``output_len``), sampled without replacement.
- ``shared-prefix``: N prefixes of P tokens; request i is prefix i mod N
  followed by a fresh question of ``input_len`` tokens, so consecutive
  requests use different prefixes (interleaved: placement decides reuse).
- ``multi-turn``: ceil(n / T) conversations of T turns; each turn's prompt is
  the previous turn's prompt + its answer + a new user message of
  ``input_len`` tokens. Turns are interleaved across conversations (request i
  is conversation i mod C, turn i div C).
- ``trace``: lengths from a Mooncake-style trace; equal ``hash_ids`` become
  equal blocks of tokens, so the trace's prefix reuse is reproduced.

Lengths are a ``LengthDist``: ``128`` (fixed), ``uniform:64,256``
(inclusive), ``normal:128,32`` (clipped to mean +- 3 sd, at least 1) or
``normal:128,32,16,512`` (clipped to [16, 512]).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from orchestrator.bench.arrivals import TraceEntry, read_jsonl
from orchestrator.bench.records import RequestSpec
from orchestrator.bench.tokens import TokenSource

KINDS = ("random", "dataset", "shared-prefix", "multi-turn", "trace")


@dataclass(frozen=True)
class LengthDist:
    kind: str
    """fixed, uniform or normal."""
    a: float
    """fixed: the length; uniform: the low end; normal: the mean."""
    b: float = 0.0
    """uniform: the high end; normal: the standard deviation."""
    lo: int = 1
    hi: int = 0

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        """Raises ValueError quoting the text and the accepted forms."""
        forms = "N, uniform:LO,HI, normal:MEAN,SD or normal:MEAN,SD,MIN,MAX"
        kind, _, rest = text.strip().partition(":")
        try:
            if not rest:
                n = int(kind)
                dist = cls("fixed", n, lo=n, hi=n)
            elif kind == "uniform":
                lo, hi = (int(x) for x in rest.split(","))
                dist = cls("uniform", lo, hi, lo=lo, hi=hi)
            elif kind == "normal":
                parts = [float(x) for x in rest.split(",")]
                if len(parts) == 2:
                    mean, sd = parts
                    dist = cls("normal", mean, sd, lo=max(1, round(mean - 3 * sd)), hi=max(1, round(mean + 3 * sd)))
                elif len(parts) == 4:
                    dist = cls("normal", parts[0], parts[1], lo=int(parts[2]), hi=int(parts[3]))
                else:
                    raise ValueError("normal takes 2 or 4 numbers")
            else:
                raise ValueError(f"unknown distribution {kind!r}")
        except ValueError as e:
            raise ValueError(f"bad length {text!r} ({e}); use {forms}") from None
        if dist.lo < 1 or dist.hi < dist.lo or dist.b < 0:
            raise ValueError(f"bad length {text!r}: lengths must be >= 1 and ranges non-empty ({forms})")
        return dist

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return self.lo
        if self.kind == "uniform":
            return rng.randint(self.lo, self.hi)
        return min(self.hi, max(self.lo, round(rng.gauss(self.a, self.b))))

    def describe(self) -> str:
        if self.kind == "fixed":
            return str(self.lo)
        if self.kind == "uniform":
            return f"uniform[{self.lo}, {self.hi}]"
        return f"normal({self.a:g}, {self.b:g}) clipped to [{self.lo}, {self.hi}]"


@dataclass(frozen=True)
class WorkloadConfig:
    kind: str = "random"
    """One of KINDS."""
    num_requests: int = 100
    """Requests to build (a trace yields at most its own length)."""
    input_len: LengthDist = LengthDist("fixed", 256, lo=256, hi=256)
    """Prompt tokens (random), question tokens (shared-prefix) or user-message tokens (multi-turn)."""
    output_len: LengthDist = LengthDist("fixed", 128, lo=128, hi=128)
    """Output tokens (max_tokens), unless the dataset or trace gives them."""
    dataset: str | None = None
    """JSONL file of the dataset workload."""
    num_prefixes: int = 10
    """shared-prefix: distinct prefixes."""
    prefix_len: int = 512
    """shared-prefix: tokens per prefix."""
    num_turns: int = 4
    """multi-turn: turns per conversation."""
    trace: tuple[TraceEntry, ...] = ()
    """trace: the loaded entries."""
    trace_block_size: int = 512
    """trace: tokens per hash id (Mooncake uses 512)."""
    text_prompts: bool = False
    """Prompts go out as text: make each one survive a text round trip."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown workload {self.kind!r}; valid: {', '.join(KINDS)}")
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        for name in ("num_prefixes", "prefix_len", "num_turns", "trace_block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kind == "dataset" and not self.dataset:
            raise ValueError("the dataset workload needs --dataset FILE.jsonl")
        if self.kind == "trace" and not self.trace:
            raise ValueError("the trace workload needs --trace FILE.jsonl")


def build(config: WorkloadConfig, source: TokenSource, seed: int) -> list[RequestSpec]:
    """The workload's requests, in sending order."""
    rng = random.Random(f"{seed}:workload:{config.kind}")
    specs = _BUILDERS[config.kind](config, source, rng, seed)
    if config.text_prompts:
        specs = [RequestSpec(s.index, tuple(source.fit(s.prompt_ids, rng)), s.output_len, s.parent) for s in specs]
    return specs


def warmup_specs(measured: Sequence[RequestSpec], n: int, source: TokenSource, seed: int) -> list[RequestSpec]:
    """``n`` fresh random prompts shaped like the first measured requests. Their
    content shares nothing with the workload, so they cannot seed a prefix cache."""
    rng = random.Random(f"{seed}:warmup")
    return [RequestSpec(i, tuple(source.sample(len(measured[i % len(measured)].prompt_ids), rng)),
                        measured[i % len(measured)].output_len) for i in range(n)]


def _random(c: WorkloadConfig, source: TokenSource, rng: random.Random, seed: int) -> list[RequestSpec]:
    return [RequestSpec(i, tuple(source.sample(c.input_len.sample(rng), rng)), c.output_len.sample(rng))
            for i in range(c.num_requests)]


def _shared_prefix(c: WorkloadConfig, source: TokenSource, rng: random.Random, seed: int) -> list[RequestSpec]:
    prefixes = [source.sample(c.prefix_len, rng) for _ in range(c.num_prefixes)]
    return [RequestSpec(i, tuple(prefixes[i % c.num_prefixes] + source.sample(c.input_len.sample(rng), rng)),
                        c.output_len.sample(rng)) for i in range(c.num_requests)]


def _multi_turn(c: WorkloadConfig, source: TokenSource, rng: random.Random, seed: int) -> list[RequestSpec]:
    conversations = math.ceil(c.num_requests / c.num_turns)
    return [RequestSpec(i, tuple(source.sample(c.input_len.sample(rng), rng)), c.output_len.sample(rng),
                        parent=i - conversations if i >= conversations else None)
            for i in range(c.num_requests)]


def _dataset(c: WorkloadConfig, source: TokenSource, rng: random.Random, seed: int) -> list[RequestSpec]:
    rows = load_dataset(c.dataset, source)
    order: list[int] = []
    while len(order) < c.num_requests:   # without replacement; again in a new order if too few
        batch = list(range(len(rows)))
        rng.shuffle(batch)
        order += batch
    specs = []
    for i, row in enumerate(order[:c.num_requests]):
        prompt, output_len = rows[row]
        specs.append(RequestSpec(i, prompt, output_len if output_len is not None else c.output_len.sample(rng)))
    return specs


def load_dataset(path: str | Path, source: TokenSource) -> list[tuple[tuple[int, ...], int | None]]:
    """(prompt ids, expected output length or None) per JSONL line; ValueError names the bad line."""

    def parse(row: dict) -> tuple[tuple[int, ...], int | None]:
        if "prompt_token_ids" in row:
            ids = tuple(int(t) for t in row["prompt_token_ids"])
        else:
            ids = tuple(source.encode(str(row["prompt"])))
        out = row.get("output_len")
        out = int(out) if out is not None else None
        if not ids or (out is not None and out < 1):
            raise ValueError("empty prompt or output_len < 1")
        return ids, out

    return read_jsonl(path, parse, '{"prompt": text} or {"prompt_token_ids": [...]} with an optional "output_len"',
                      "dataset")


def _trace(c: WorkloadConfig, source: TokenSource, rng: random.Random, seed: int) -> list[RequestSpec]:
    blocks: dict[int, list[int]] = {}

    def block(h: int) -> list[int]:
        if h not in blocks:
            blocks[h] = source.sample(c.trace_block_size, random.Random(f"{seed}:block:{h}"))
        return blocks[h]

    specs = []
    for i, entry in enumerate(c.trace[:c.num_requests]):
        prompt = [t for h in entry.hash_ids for t in block(h)][:entry.input_length]
        prompt += source.sample(entry.input_length - len(prompt), rng)
        specs.append(RequestSpec(i, tuple(prompt), entry.output_length))
    return specs


_BUILDERS = {
    "random": _random,
    "dataset": _dataset,
    "shared-prefix": _shared_prefix,
    "multi-turn": _multi_turn,
    "trace": _trace,
}
