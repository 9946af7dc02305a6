"""The engine: requests in, token deltas out, one step at a time.

Single-threaded by design; the worker runs it on its own thread and talks to
it through queues (``worker/engine_loop.py``).

Async scheduling (on by default on CUDA, ``EngineConfig.async_scheduling``):
the host never waits for the GPU between steps. A step schedules and launches
step N+1 while step N still runs, then reads N's tokens. Scheduling needs only
token counts, never token values, so a sequence's token sampled by N is held
as a placeholder that N+1's inputs take from N's device tokens; stop checks
run when the value arrives, one step late. A sequence stopped that way has one
extra token computed and dropped (its KV slot is freed with it; later writes to
the block are ordered after N+1 on the stream). One whose length limit is
reached is finished as soon as its last step is launched, so a length-capped
request wastes nothing and frees its place for the next step in time.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kvstore.hashing import HashNamespace
from worker.engine.block_manager import BlockManager
from worker.engine.config import EngineConfig
from worker.engine.model_runner import ModelRunner
from worker.engine.sampler import PendingSample, ReadySample, placeholder
from worker.engine.scheduler import Scheduler, SchedulerOutput
from worker.engine.sequence import Sequence, SequenceStatus
from worker.engine.types import (
    EngineRequest,
    FinishReason,
    KvCacheEvent,
    LoadSnapshot,
    ModelSummary,
    RequestOutput,
)
from worker.models.config import ModelConfig
from worker.models.llama import LlamaForCausalLM

if TYPE_CHECKING:
    from worker.engine.mock_runner import MockRunner

logger = logging.getLogger(__name__)


@dataclass
class _InFlight:
    """A launched step whose sampled tokens the host has not read yet."""

    pending: PendingSample | ReadySample
    rows: list[tuple[Sequence, int, int]]
    """(sequence, its row among the step's sampled tokens, index of its placeholder in token_ids)."""


class LLMEngine:
    def __init__(self, config: EngineConfig, model: LlamaForCausalLM | None = None,
                 runner: ModelRunner | MockRunner | None = None) -> None:
        """``model``: already built weights (benchmarks, tests); default: load ``config.model``.
        ``runner``: replaces the model runner (``mock_runner.MockRunner``: same ``launch``
        contract, plus ``num_blocks``, ``max_model_len`` and ``device``)."""
        self.config = config
        model_dir = Path(config.model)
        self.model_config = ModelConfig.from_dir(model_dir)
        self.runner = runner if runner is not None else ModelRunner(config, self.model_config, model)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        # one sequence must always fit the pool, or preemption could never make room for it
        self.max_model_len = min(self.runner.max_model_len, self.runner.num_blocks * config.block_size)
        name = config.served_name or model_dir.name
        self.model_summary = ModelSummary(
            name=name,
            max_model_len=self.max_model_len,
            block_size=config.block_size,
            vocab_size=self.model_config.vocab_size,
            eos_token_ids=self.model_config.eos_token_ids,
        )
        self._namespace_model = name
        self._arrivals = itertools.count()
        self._seed_rng = random.Random(config.seed)
        self._eos = frozenset(self.model_config.eos_token_ids)
        self._tokenizer_files(model_dir)
        can_async = getattr(self.runner, "supports_async", False)
        self.async_scheduling = config.async_scheduling
        if self.async_scheduling is None:
            self.async_scheduling = can_async and self.runner.device.type == "cuda"
        elif self.async_scheduling and not can_async:
            raise ValueError("async_scheduling: this runner computes tokens from host-side token values "
                             "(the mock runner); use async_scheduling=False")
        self._in_flight: _InFlight | None = None

    def _tokenizer_files(self, model_dir: Path) -> None:
        tok = model_dir / "tokenizer.json"
        self.tokenizer_json = tok.read_text() if tok.exists() else ""
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        template = cfg.get("chat_template") or ""
        jinja = model_dir / "chat_template.jinja"
        if not template and jinja.exists():
            template = jinja.read_text()
        self.chat_template = template if isinstance(template, str) else ""

        def token_str(value) -> str:
            return value.get("content", "") if isinstance(value, dict) else (value or "")

        self.bos_token = token_str(cfg.get("bos_token"))
        self.eos_token = token_str(cfg.get("eos_token"))

    # ---- requests --------------------------------------------------------
    def add_request(self, request: EngineRequest) -> None:
        """Queue a request. Raises ValueError naming the offending field."""
        n = len(request.prompt_token_ids)
        if n == 0:
            raise ValueError("prompt_token_ids: must not be empty")
        if n >= self.max_model_len:
            raise ValueError(
                f"prompt_token_ids: prompt has {n} tokens but the context window is {self.max_model_len} "
                "(prompt plus at least one output token must fit)"
            )
        vocab = self.model_config.vocab_size
        bad = next((t for t in request.prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids: token id {bad} outside the vocabulary [0, {vocab})")
        if self.scheduler.find(request.request_id) is not None:
            raise ValueError(f"request_id: {request.request_id!r} is already running")
        opts = request.sampling
        max_tokens = self.max_model_len - n
        if opts.max_tokens is not None:
            max_tokens = min(max_tokens, opts.max_tokens)
        generator = None
        if not opts.greedy:
            generator = torch.Generator(device=self.runner.device)
            generator.manual_seed(opts.seed if opts.seed is not None else self._seed_rng.getrandbits(63))
        seq = Sequence(
            request=request,
            arrival=next(self._arrivals),
            max_tokens=max_tokens,
            namespace=HashNamespace(model=self._namespace_model, cache_salt=request.cache_salt),
            generator=generator,
        )
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> bool:
        """Drop a request and free its KV blocks now; False if it is not known."""
        seq = self.scheduler.find(request_id)
        if seq is None:
            seq = self._awaiting_last_token(request_id)
            if seq is None:
                return False
            seq.finish_reason = FinishReason.ABORT  # its blocks are free already; its last token is dropped
            return True
        seq.finish_reason = FinishReason.ABORT
        self.scheduler.finish(seq)
        return True

    def _awaiting_last_token(self, request_id: str) -> Sequence | None:
        """A length-capped sequence, already finished, whose last token is in flight."""
        for seq, _, _ in self._in_flight.rows if self._in_flight is not None else ():
            if seq.request_id == request_id and seq.finish_reason is None:
                return seq
        return None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    # ---- the loop ----------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Runs one step; returns the tokens the host learned in it: this step's when
        scheduling is synchronous, the previous step's under async scheduling."""
        plan = self.scheduler.schedule()               # who advances, by how many tokens
        previous, self._in_flight = self._in_flight, None  # a step that raises is not read twice
        launched = self.runner.launch(plan)            # enqueued on the device, not waited for
        outputs = self._resolve(previous)              # the previous step's tokens (async only)
        self._in_flight = self._advance(plan, launched)
        if not self.async_scheduling:
            outputs = self._resolve(self._in_flight)
            self._in_flight = None
        return outputs

    def _advance(self, plan: SchedulerOutput, launched: PendingSample | ReadySample | None) -> _InFlight | None:
        """Counts the launched step's tokens as computed (and caches their full blocks), and
        gives every sampling sequence a placeholder for its new token."""
        rows: list[tuple[Sequence, int, int]] = []
        k = 0
        for item in plan.scheduled:
            seq = item.seq
            samples = item.samples
            row = k
            k += samples
            if seq.status is SequenceStatus.FINISHED:  # stopped by the previous step's token, or aborted
                continue
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.register_computed_blocks(seq)
            if samples:
                seq.token_ids.append(placeholder(row))
                rows.append((seq, row, len(seq.token_ids) - 1))
                if seq.num_output_tokens >= seq.max_tokens:
                    # its last token is in flight: free its place and blocks for the next step now
                    # (later writes to those blocks are ordered after this step on the device)
                    self.scheduler.finish(seq)
        return _InFlight(launched, rows) if launched is not None else None

    def _resolve(self, step: _InFlight | None) -> list[RequestOutput]:
        """Reads a launched step's tokens (waiting for the device), puts them in place of
        the placeholders and finishes the sequences they stop."""
        if step is None:
            return []
        sampled = step.pending.result()
        outputs: list[RequestOutput] = []
        for seq, row, at in step.rows:
            if seq.finish_reason is FinishReason.ABORT:  # aborted while the step ran
                continue
            token = sampled.token_ids[row]
            logprob = sampled.logprobs[row]
            seq.token_ids[at] = token
            produced = at + 1 - seq.num_prompt_tokens
            reason = self._finish_reason(seq, token, produced, self._eos)
            if reason is not None:
                seq.finish_reason = reason
                if seq.status is not SequenceStatus.FINISHED:  # length-capped ones are already
                    self.scheduler.finish(seq)
            first = produced == 1
            outputs.append(
                RequestOutput(
                    request_id=seq.request_id,
                    new_token_ids=(token,),
                    logprobs=(logprob,) if logprob is not None else (),
                    finish_reason=reason,
                    num_prompt_tokens=seq.num_prompt_tokens if first else 0,
                    num_cached_tokens=max(seq.num_cached_tokens, 0) if first else 0,
                )
            )
        return outputs

    @staticmethod
    def _finish_reason(seq: Sequence, token: int, produced: int, eos: frozenset[int]) -> FinishReason | None:
        """Why ``seq`` stops at ``token``, its ``produced``-th output token (None: it goes on)."""
        opts = seq.sampling
        if token in opts.stop_token_ids or (not opts.ignore_eos and token in eos):
            return FinishReason.STOP
        if produced >= seq.max_tokens:
            return FinishReason.LENGTH
        return None

    # ---- introspection -----------------------------------------------------
    def load(self) -> LoadSnapshot:
        bm = self.block_manager
        return LoadSnapshot(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            waiting_prefill_tokens=self.scheduler.waiting_prefill_tokens(),
            kv_blocks_total=bm.num_blocks,
            kv_blocks_used=bm.num_used_blocks,
            kv_blocks_cached=bm.num_cached_blocks,
        )

    def drain_kv_events(self) -> list[KvCacheEvent]:
        return self.block_manager.drain_events()

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

