"""A model runner with no model: a timing model and a deterministic token function.

``MockRunner`` keeps ``ModelRunner``'s contract (``launch(plan)`` gives the
sampled tokens of the sequences that sample this step, or None; here already
on the host, so the engine never schedules ahead of it) so the real
scheduler, block manager, prefix cache and KV events run unchanged around
it. What it replaces:

* the forward pass, by a sleep of ``TimingModel.step_seconds(plan)``
  (``mock_timing.py``) on the engine thread (no CPU burnt);
* the KV pool tensor, by nothing: blocks are bookkeeping only;
* sampling, by ``next_token``: a 64-bit hash of every token before the
  position (and the request's seed). It depends on the context, not on
  where the prompt ends, so a request resubmitted with its prompt plus the
  tokens already generated continues exactly as an uninterrupted run would
  (the failover tests rely on it). It never emits an EOS or a special
  token: a request ends at ``max_tokens``, a stop token id or the context
  window.

``build_mock_engine`` wires it into a real ``LLMEngine`` from a model
directory of which only ``config.json`` and the tokenizer files are read.
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

from worker.engine.config import EngineConfig
from worker.engine.engine import LLMEngine
from worker.engine.mock_timing import TimingModel
from worker.engine.sampler import ReadySample, SamplerResult
from worker.engine.scheduler import SchedulerOutput
from worker.engine.sequence import Sequence
from worker.engine.types import TokenLogprob
from worker.models.config import ModelConfig

logger = logging.getLogger(__name__)

DEFAULT_MOCK_KV_BLOCKS = 8192
"""KV pool of a mock worker when neither ``num_kv_blocks`` nor a memory budget
is given: 131k tokens at block size 16 (about 16 GiB of Llama-3-8B bf16 KV)."""

_MASK64 = (1 << 64) - 1
_MOCK_LOGPROB = -0.5
"""Log-probability reported for mock tokens (alternatives get lower values)."""


def _mix(x: int) -> int:
    """splitmix64's finaliser: a fast, well-spread 64-bit hash step."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class TokenFunction:
    """``next_token(context, seed)``: the mock model's deterministic "forward pass".

    Tokens lie in ``[0, vocab_size)`` minus ``excluded`` (special and EOS
    ids), so mock outputs never contain special tokens and never stop by EOS.
    """

    def __init__(self, vocab_size: int, excluded: frozenset[int] = frozenset()) -> None:
        if len({t for t in excluded if 0 <= t < vocab_size}) >= vocab_size:
            raise ValueError(f"every token id in [0, {vocab_size}) is excluded")
        self._vocab_size = vocab_size
        self._excluded = excluded

    @staticmethod
    def extend(digest: int, tokens: list[int] | tuple[int, ...]) -> int:
        """The digest of a context after appending ``tokens`` (start from 0)."""
        for t in tokens:
            digest = _mix(digest ^ t)
        return digest

    def token(self, digest: int, seed: int) -> int:
        """The token following a context with ``digest``, for a request seed."""
        h = _mix(digest ^ _mix(seed))
        while h % self._vocab_size in self._excluded:
            h = _mix(h)
        return h % self._vocab_size

    def next_token(self, context: list[int] | tuple[int, ...], seed: int = 0) -> int:
        return self.token(self.extend(0, context), seed)


class MockRunner:
    """Stands in for ``ModelRunner``: same ``launch`` contract, no model, no KV tensor.

    ``sleep`` is injectable so tests can record step times instead of waiting.
    """

    def __init__(self, config: EngineConfig, model_config: ModelConfig, timing: TimingModel = TimingModel(), *,
                 special_token_ids: frozenset[int] = frozenset(),
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config
        self.model_config = model_config
        self.timing = timing
        self.device = torch.device("cpu")            # where LLMEngine puts per-request generators
        self.max_model_len = min(config.max_model_len or model_config.max_position_embeddings,
                                 model_config.max_position_embeddings)
        self.num_blocks = self._num_kv_blocks()
        self.tokens = TokenFunction(model_config.vocab_size, special_token_ids | frozenset(model_config.eos_token_ids))
        self._sleep = sleep
        # per sequence: (tokens hashed so far, their digest); a sequence only ever appends tokens
        self._digests: weakref.WeakKeyDictionary[Sequence, tuple[int, int]] = weakref.WeakKeyDictionary()
        self.busy_s = 0.0
        """Modelled seconds of all steps so far (what a real device would have spent)."""
        logger.info("mock runner: %d KV blocks of %d tokens, context window %d, %s",
                    self.num_blocks, config.block_size, self.max_model_len, timing)

    def bytes_per_block(self) -> int:
        """What a block would take on a GPU (bf16, or fp8 with ``kv_cache_dtype`` fp8_e4m3), for
        ``kv_cache_memory_bytes`` budgets."""
        mc = self.model_config
        elem = 1 if self.config.kv_cache_fp8 else 2
        return mc.num_layers * 2 * self.config.block_size * mc.num_kv_heads * mc.head_dim * elem

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.config.kv_cache_memory_bytes is None:
            return DEFAULT_MOCK_KV_BLOCKS
        blocks = self.config.kv_cache_memory_bytes // self.bytes_per_block()
        if blocks < 2:
            raise ValueError(
                f"KV cache budget of {self.config.kv_cache_memory_bytes} bytes holds {blocks} blocks of "
                f"{self.bytes_per_block()} bytes; raise kv_cache_memory_bytes or set num_kv_blocks")
        return int(blocks)

    supports_async = False
    """Tokens are computed from the host's token values, so steps cannot be launched
    before the previous step's tokens are read (``LLMEngine.async_scheduling``)."""

    def launch(self, plan: SchedulerOutput) -> ReadySample | None:
        """Sleeps for the modelled step time; samples for sequences whose known tokens are all
        computed (``ModelRunner.launch``'s contract, already resolved)."""
        if not plan.scheduled:
            return None
        seconds = self.timing.step_seconds(plan)
        started = time.monotonic()
        sampling = [item.seq for item in plan.scheduled if item.samples]
        token_ids = [self._next_token(seq) for seq in sampling]
        logprobs = [self._logprob(seq, t) for seq, t in zip(sampling, token_ids)]
        self.busy_s += seconds
        remaining = seconds - (time.monotonic() - started)
        if remaining > 0:
            self._sleep(remaining)
        return ReadySample(SamplerResult(token_ids, logprobs)) if sampling else None

    def _next_token(self, seq: Sequence) -> int:
        hashed, digest = self._digests.get(seq, (0, 0))
        digest = self.tokens.extend(digest, seq.token_ids[hashed:])
        self._digests[seq] = (seq.num_tokens, digest)
        return self.tokens.token(digest, seq.sampling.seed or 0)

    def _logprob(self, seq: Sequence, token: int) -> TokenLogprob | None:
        opts = seq.sampling
        if not (opts.logprobs or opts.top_logprobs):
            return None
        vocab = self.model_config.vocab_size
        top = tuple(((token + k) % vocab, _MOCK_LOGPROB - k) for k in range(opts.top_logprobs))
        return TokenLogprob(token, _MOCK_LOGPROB, top)


@lru_cache(maxsize=8)
def _special_token_ids(model_dir: str) -> frozenset[int]:
    """Ids of the tokenizer's special (added) tokens; none without a tokenizer.json."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return frozenset()
    added = json.loads(path.read_text()).get("added_tokens") or []
    return frozenset(t["id"] for t in added if t.get("special"))


@lru_cache(maxsize=8)
def _shared_text(path: str) -> str:
    """One copy per process of a model's tokenizer.json, however many mock workers serve it."""
    return Path(path).read_text()


def build_mock_engine(config: EngineConfig, timing: TimingModel = TimingModel()) -> LLMEngine:
    """A real ``LLMEngine`` over a ``MockRunner``; reads only config.json and the tokenizer files."""
    model_dir = Path(config.model)
    runner = MockRunner(config, ModelConfig.from_dir(model_dir), timing,
                        special_token_ids=_special_token_ids(str(model_dir)))
    engine = LLMEngine(config, runner=runner)
    if engine.tokenizer_json:
        engine.tokenizer_json = _shared_text(str(model_dir / "tokenizer.json"))
    return engine
