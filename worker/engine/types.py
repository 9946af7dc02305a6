"""Typed values crossing the engine's boundary (worker service <-> engine).

The worker's gRPC servicer converts protos to these with ``from_pb`` helpers
in ``worker/convert.py``; the engine never sees a proto message.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(enum.Enum):
    STOP = "stop"        # EOS or a stop token id
    LENGTH = "length"    # max_tokens or the context window reached
    ABORT = "abort"      # aborted by the caller
    ERROR = "error"      # the engine failed while running the request


@dataclass(frozen=True)
class SamplingOptions:
    """Validated sampling settings of one request (the router validates input;
    the engine re-checks invariants it relies on in ``__post_init__``)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 = off
    seed: int | None = None
    max_tokens: int | None = None       # None = up to the context window
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class EngineRequest:
    """One request as the engine receives it: token ids, never text."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingOptions = SamplingOptions()
    cache_salt: str = ""


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()   # (token_id, logprob), most likely first


@dataclass(frozen=True)
class RequestOutput:
    """What one engine step produced for one request (a delta, not a total)."""

    request_id: str
    new_token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0         # prompt tokens served from the prefix cache

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class LoadSnapshot:
    """The engine's load, read by the worker for heartbeats and GetLoad."""

    num_running: int
    num_waiting: int
    waiting_prefill_tokens: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached: int

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass(frozen=True)
class BlockStored:
    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int


@dataclass(frozen=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]


@dataclass(frozen=True)
class AllBlocksCleared:
    pass


KvCacheEvent = BlockStored | BlockRemoved | AllBlocksCleared
"""A change to the set of reusable cached blocks; the worker numbers them."""


@dataclass
class ModelSummary:
    """What the worker tells routers about the model it serves."""

    name: str
    max_model_len: int
    block_size: int
    vocab_size: int
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
