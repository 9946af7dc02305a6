"""Fixtures for the KV routing tests: an engine over the real block manager, real
workers around it, a scripted KV-event worker, and a real ``redis-server``.

``BlockEngine`` speaks the ``worker.engine_loop.Engine`` protocol with no
model: each admitted request is prefilled in one step (prefix hits through
the real ``BlockManager``), then gets one deterministic token per step. Its
KV events, evictions and ``cached_block_hashes`` are therefore the real
block manager's, hashed in the engine's namespace (served model name + cache
salt), which is what the router must match.

``ScriptedKvWorker`` is a TEST DOUBLE of a worker whose KV events and
snapshots the test writes by hand, to produce gaps and restarts on demand.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import socket
import subprocess
import time
from collections import deque
from pathlib import Path

import grpc
import pytest
from router_fixtures import SMOLLM2_CHAT_TEMPLATE, FakeWorker, byte_level_tokenizer_json, free_port

from kvmesh.v1 import worker_pb2, worker_pb2_grpc
from kvstore.hashing import HashNamespace
from orchestrator.client import AsyncKvmeshClient
from orchestrator.types import Chunk
from worker.config import WorkerConfig
from worker.engine.block_manager import BlockManager
from worker.engine.config import EngineConfig
from worker.engine.sequence import Sequence
from worker.engine.types import BlockRemoved, EngineRequest, FinishReason, KvCacheEvent, LoadSnapshot, ModelSummary, RequestOutput
from worker.service import WorkerServer

VOCAB = 264          # the byte-level test tokenizer: ids 3..258 are bytes
MODEL = "sim-model"


class BlockEngine:
    """Engine protocol over the real BlockManager (see module docstring)."""

    def __init__(self, *, name: str = MODEL, block_size: int = 4, num_blocks: int = 128, max_num_seqs: int = 16,
                 max_model_len: int = 1024, step_delay_s: float = 0.002) -> None:
        self.model_summary = ModelSummary(name=name, max_model_len=max_model_len, block_size=block_size,
                                          vocab_size=VOCAB, eos_token_ids=(2,))
        self.tokenizer_json = byte_level_tokenizer_json()
        self.chat_template = SMOLLM2_CHAT_TEMPLATE
        self.bos_token, self.eos_token = "<|im_start|>", "<|im_end|>"
        self.block_manager = BlockManager(num_blocks, block_size)
        self._max_num_seqs = max_num_seqs
        self._delay = step_delay_s
        self._arrivals = itertools.count()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self.num_removed_events = 0

    def add_request(self, req: EngineRequest) -> None:
        n = len(req.prompt_token_ids)
        if n == 0 or n >= self.model_summary.max_model_len:
            raise ValueError(f"prompt_token_ids: {n} tokens do not fit the window")
        if any(not 0 <= t < VOCAB for t in req.prompt_token_ids):
            raise ValueError("prompt_token_ids: a token id is outside the vocabulary")
        if self._find(req.request_id) is not None:
            raise ValueError(f"request_id {req.request_id!r} is already running")
        max_tokens = self.model_summary.max_model_len - n
        if req.sampling.max_tokens is not None:
            max_tokens = min(max_tokens, req.sampling.max_tokens)
        self._waiting.append(Sequence(request=req, arrival=next(self._arrivals), max_tokens=max_tokens,
                                      namespace=HashNamespace(model=self.model_summary.name,
                                                              cache_salt=req.cache_salt)))

    def abort_request(self, request_id: str) -> bool:
        seq = self._find(request_id)
        if seq is None:
            return False
        if seq in self._running:
            self._running.remove(seq)
            self.block_manager.free(seq)
        else:
            self._waiting.remove(seq)
        return True

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    def step(self) -> list[RequestOutput]:
        if self._delay:
            time.sleep(self._delay)
        bm = self.block_manager
        admitted: set[int] = set()
        while self._waiting and len(self._running) < self._max_num_seqs:
            seq = self._waiting[0]
            match = bm.match_prefix(seq)
            if not bm.allocate(seq, seq.num_tokens - match.num_tokens, match):
                break
            seq.num_cached_tokens = match.num_tokens
            self._waiting.popleft()
            self._running.append(seq)
            admitted.add(id(seq))
        outputs = []
        for seq in list(self._running):
            if id(seq) not in admitted and not bm.allocate(seq, seq.num_tokens - seq.num_computed_tokens):
                outputs.append(self._finish(seq, (), FinishReason.LENGTH))   # pool full: end it
                continue
            seq.num_computed_tokens = seq.num_tokens
            bm.register_computed_blocks(seq)
            token = 3 + (seq.token_ids[-1] * 31 + seq.num_tokens) % 250
            seq.token_ids.append(token)
            if seq.num_output_tokens >= seq.max_tokens:
                outputs.append(self._finish(seq, (token,), FinishReason.LENGTH))
            else:
                outputs.append(RequestOutput(seq.request_id, (token,), num_prompt_tokens=seq.num_prompt_tokens,
                                             num_cached_tokens=seq.num_cached_tokens))
        return outputs

    def _finish(self, seq: Sequence, tokens: tuple[int, ...], reason: FinishReason) -> RequestOutput:
        self._running.remove(seq)
        self.block_manager.free(seq)
        return RequestOutput(seq.request_id, tokens, finish_reason=reason, num_prompt_tokens=seq.num_prompt_tokens,
                             num_cached_tokens=seq.num_cached_tokens)

    def _find(self, request_id: str) -> Sequence | None:
        return next((s for s in itertools.chain(self._running, self._waiting) if s.request_id == request_id), None)

    def load(self) -> LoadSnapshot:
        bm = self.block_manager
        return LoadSnapshot(num_running=len(self._running), num_waiting=len(self._waiting),
                            waiting_prefill_tokens=sum(s.num_tokens for s in self._waiting),
                            kv_blocks_total=bm.num_blocks, kv_blocks_used=bm.num_used_blocks,
                            kv_blocks_cached=len(bm.cached_block_hashes()))

    def drain_kv_events(self) -> list[KvCacheEvent]:
        events = self.block_manager.drain_events()
        self.num_removed_events += sum(isinstance(e, BlockRemoved) for e in events)
        return events


def worker_config(worker_id: str, **overrides) -> WorkerConfig:
    settings = dict(engine=EngineConfig(model="unused"), port=0, worker_id=worker_id, heartbeat_interval_s=0.2,
                    retry_initial_s=0.05, retry_max_s=0.5, stop_grace_s=0.5)
    settings.update(overrides)
    return WorkerConfig(**settings)


async def start_block_worker(worker_id: str, engine: BlockEngine | None = None, **overrides) -> WorkerServer:
    engine = engine or BlockEngine()
    server = WorkerServer(worker_config(worker_id, **overrides), engine_factory=lambda: engine)
    await server.start()
    server.test_engine = engine           # the tests read the engine's real cache
    return server


async def worker_cache(server: WorkerServer) -> tuple[int, set[int]]:
    """(last event id, cached block hashes) of a worker's real prefix cache, taken on its
    engine thread (the same path as GetKvSnapshot)."""
    snap = await server.engine.kv_snapshot(lambda: server.events.last_event_id)
    return snap.last_event_id, set(snap.block_hashes)


async def run(client: AsyncKvmeshClient, tokens: list[int], max_tokens: int = 3, **kwargs) -> Chunk:
    """One request to completion; returns its last chunk (worker_id, usage)."""
    last = None
    async for chunk in client.generate(tokens, max_tokens=max_tokens, ignore_eos=True, temperature=0.0, **kwargs):
        last = chunk
    assert last is not None and last.finish_reason is not None
    return last


async def eventually(predicate, timeout_s: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)


# --- a worker whose KV events the test writes ----------------------------------------------------------

class ScriptedKvWorker(FakeWorker):
    """TEST DOUBLE: FakeWorker plus hand-written GetKvSnapshot / StreamKvEvents."""

    def __init__(self, worker_id: str, **kwargs) -> None:
        super().__init__(worker_id, **kwargs)
        self.epoch = "epoch-1"
        self.snapshot = worker_pb2.KvSnapshot(kv_blocks_total=1000, epoch=self.epoch)
        self.snapshot_calls = 0
        self.stream_requests: list[worker_pb2.StreamKvEventsRequest] = []
        self._batches: asyncio.Queue[worker_pb2.KvEventBatch] = asyncio.Queue()

    def push(self, *events: worker_pb2.KvEvent) -> None:
        self._batches.put_nowait(worker_pb2.KvEventBatch(events=events))

    async def GetKvSnapshot(self, request, context):
        self.snapshot_calls += 1
        return self.snapshot

    async def StreamKvEvents(self, request, context):
        self.stream_requests.append(request)
        if request.epoch and request.epoch != self.epoch:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, "epoch changed")
        while True:
            yield await self._batches.get()


def stored(event_id: int, *hashes: int) -> worker_pb2.KvEvent:
    return worker_pb2.KvEvent(event_id=event_id, stored=worker_pb2.BlockStored(block_hashes=hashes))


def removed(event_id: int, *hashes: int) -> worker_pb2.KvEvent:
    return worker_pb2.KvEvent(event_id=event_id, removed=worker_pb2.BlockRemoved(block_hashes=hashes))


async def start_scripted_worker(worker_id: str, **kwargs) -> tuple[ScriptedKvWorker, grpc.aio.Server, str]:
    servicer = ScriptedKvWorker(worker_id, **kwargs)
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    servicer.server = server
    return servicer, server, f"127.0.0.1:{port}"


# --- a real redis-server -----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server on a free local port for the whole session (no persistence)."""
    binary = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server")
                                               else None)
    if binary is None:
        message = ("redis-server is not installed (apt-get install redis-server; `make test` does it); "
                   "the Redis discovery tests need a real one")
        if os.environ.get("CI"):
            pytest.fail(message)   # CI runs `make test`, which installs it: a skip there would hide a broken step
        pytest.skip(message)
    port = free_port()
    workdir: Path = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"redis-server did not start on port {port}")
        time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
