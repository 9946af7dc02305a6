"""Helpers for the worker service tests: a fake engine, the real one, a tiny Registry.

``FakeEngine`` speaks ``LLMEngine``'s API (the ``worker.engine_loop.Engine``
protocol) with no model, so the service's plumbing is tested in
milliseconds; the same tests then run on the real engine and model.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
import pytest

from kvmesh.v1 import registry_pb2, registry_pb2_grpc
from kvstore.hashing import HashNamespace, block_hashes
from worker.engine.config import EngineConfig
from worker.engine.types import (
    BlockStored,
    EngineRequest,
    FinishReason,
    KvCacheEvent,
    LoadSnapshot,
    ModelSummary,
    RequestOutput,
    TokenLogprob,
)

@dataclass
class _FakeSeq:
    request: EngineRequest
    generated: list[int] = field(default_factory=list)
    prefilled: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_token_ids) + len(self.generated)


class FakeEngine:
    """Each step appends one deterministic token to every request, after
    sleeping ``step_delay_s`` to stand in for the model. The first step of a
    request stores its full prompt blocks (BlockStored events with the real
    chained hashes); nothing is ever evicted."""

    def __init__(self, block_size: int = 4, num_blocks: int = 256, step_delay_s: float = 0.003) -> None:
        self.model_summary = ModelSummary(name="fake-model", max_model_len=512, block_size=block_size,
                                          vocab_size=1000, eos_token_ids=(2,))
        self.tokenizer_json = json.dumps({"version": "1.0", "model": {"type": "WordLevel", "vocab": {}}})
        self.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        self.bos_token, self.eos_token = "<s>", "</s>"
        self._num_blocks = num_blocks
        self._delay = step_delay_s
        self._seqs: dict[str, _FakeSeq] = {}
        self._cached: set[int] = set()
        self._events: list[KvCacheEvent] = []

    def add_request(self, req: EngineRequest) -> None:
        if not req.prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        if req.request_id in self._seqs:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        if any(not 0 <= t < self.model_summary.vocab_size for t in req.prompt_token_ids):
            raise ValueError("prompt_token_ids: a token id is outside the vocabulary")
        if len(req.prompt_token_ids) >= self.model_summary.max_model_len:
            raise ValueError(f"prompt_token_ids has {len(req.prompt_token_ids)} tokens; "
                             f"max_model_len is {self.model_summary.max_model_len}")
        self._seqs[req.request_id] = _FakeSeq(req)

    def abort_request(self, request_id: str) -> bool:
        return self._seqs.pop(request_id, None) is not None

    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    def step(self) -> list[RequestOutput]:
        time.sleep(self._delay)
        outputs = []
        for seq in list(self._seqs.values()):
            outputs.append(self._advance(seq))
            if outputs[-1].finished:
                del self._seqs[seq.request.request_id]
        return outputs

    def _advance(self, seq: _FakeSeq) -> RequestOutput:
        req, bs = seq.request, self.model_summary.block_size
        cached = 0
        if not seq.prefilled:
            seq.prefilled = True
            hashes = block_hashes(req.prompt_token_ids, bs, HashNamespace(cache_salt=req.cache_salt))
            cached = sum(h in self._cached for h in hashes) * bs
            new = [i for i, h in enumerate(hashes) if h not in self._cached]
            if new:
                first = new[0]
                self._events.append(BlockStored(
                    block_hashes=tuple(hashes[first:]),
                    parent_block_hash=hashes[first - 1] if first else None,
                    token_ids=tuple(req.prompt_token_ids[first * bs:len(hashes) * bs]),
                    block_size=bs))
                self._cached.update(hashes)
        token = 10 + (req.prompt_token_ids[-1] + len(seq.generated) + 1) % 900
        seq.generated.append(token)
        sampling = req.sampling
        finish = None
        if (sampling.max_tokens is not None and len(seq.generated) >= sampling.max_tokens) \
                or seq.num_tokens >= self.model_summary.max_model_len:
            finish = FinishReason.LENGTH
        logprobs = ()
        if sampling.logprobs:
            top = tuple((token + i, -0.25 - i) for i in range(sampling.top_logprobs))
            logprobs = (TokenLogprob(token, -0.25, top),)
        first = len(seq.generated) == 1  # prompt accounting on a request's first output only, as LLMEngine does
        return RequestOutput(req.request_id, (token,), logprobs, finish,
                             num_prompt_tokens=len(req.prompt_token_ids) if first else 0,
                             num_cached_tokens=cached if first else 0)

    def load(self) -> LoadSnapshot:
        bs = self.model_summary.block_size
        used = sum(-(-seq.num_tokens // bs) for seq in self._seqs.values())
        return LoadSnapshot(num_running=len(self._seqs), num_waiting=0, waiting_prefill_tokens=0,
                            kv_blocks_total=self._num_blocks, kv_blocks_used=used,
                            kv_blocks_cached=len(self._cached))

    def drain_kv_events(self) -> list[KvCacheEvent]:
        events, self._events = self._events, []
        return events


def load_real_engine(model_dir: Path):
    """The real LLMEngine on SmolLM2-135M-Instruct, sized for 2 CPU cores: a
    512-token window bounds any runaway request to seconds."""
    from worker.engine.engine import LLMEngine  # imports torch; only the slow tests pay for it

    config = EngineConfig(model=str(model_dir), device="cpu", dtype="float32",
                          num_kv_blocks=256, max_num_seqs=32, max_model_len=512)
    return LLMEngine(config)


class FakeRegistry(registry_pb2_grpc.RegistryServicer):
    """A router's Registry reduced to bookkeeping, to watch a worker register and beat."""

    def __init__(self, heartbeat_interval_s: float) -> None:
        self.interval = heartbeat_interval_s
        self.workers: dict[str, str] = {}
        self.registers: list[registry_pb2.RegisterRequest] = []
        self.heartbeats: list[registry_pb2.HeartbeatRequest] = []
        self.deregisters: list[str] = []

    async def Register(self, request, context):
        self.workers[request.worker_id] = request.address
        self.registers.append(request)
        return registry_pb2.RegisterResponse(heartbeat_interval_s=self.interval)

    async def Heartbeat(self, request, context):
        self.heartbeats.append(request)
        return registry_pb2.HeartbeatResponse(known=request.worker_id in self.workers)

    async def Deregister(self, request, context):
        self.workers.pop(request.worker_id, None)
        self.deregisters.append(request.worker_id)
        return registry_pb2.DeregisterResponse()


async def start_registry(registry: FakeRegistry, port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    registry_pb2_grpc.add_RegistryServicer_to_server(registry, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, bound


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
