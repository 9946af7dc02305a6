"""Test fixtures for the router: a TEST DOUBLE worker and helpers to start a router.

``FakeWorker`` is a test double of ``worker/service.py``: a real grpc.aio
server speaking the real ``kvmesh.v1.Worker`` protocol, whose "model" replies
with a scripted text (tokenized with a real tokenizer) instead of running an
engine. It records what the router sent it (submits, cancellations, aborts)
so tests can check what reached the worker, and can misbehave on demand (die
after k tokens, hang, refuse).

The tokenizer is the real SmolLM2 one from the model directory when it
exists (``KVMESH_TEST_MODEL_DIR`` or ~/.cache/kvmesh/models/SmolLM2-135M-
Instruct), else a byte-level BPE built here; both are real HF ``tokenizers``.

Run as a script it serves one FakeWorker in its own process (for tests that
SIGKILL a worker) and prints ``PORT <n>`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import grpc
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from kvmesh.v1 import common_pb2, registry_pb2, registry_pb2_grpc, worker_pb2, worker_pb2_grpc
from orchestrator.server import RouterConfig, RouterServer

MODEL_DIR = Path(os.environ.get("KVMESH_TEST_MODEL_DIR",
                                "~/.cache/kvmesh/models/SmolLM2-135M-Instruct")).expanduser()

# SmolLM2-Instruct's chat template (used when the model directory is absent).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_ID = 2     # <|im_end|> in both tokenizers


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ModelFiles:
    tokenizer_json: str
    chat_template: str
    bos_token: str = "<|im_start|>"
    eos_token: str = "<|im_end|>"
    eos_id: int = EOS_ID

    @property
    def tokenizer(self) -> Tokenizer:
        return _tokenizer(self.tokenizer_json)


@lru_cache(maxsize=4)
def _tokenizer(tokenizer_json: str) -> Tokenizer:
    return Tokenizer.from_str(tokenizer_json)


@lru_cache(maxsize=1)
def byte_level_tokenizer_json() -> str:
    """A byte-level BPE: ids 0-2 are SmolLM2's special tokens, 3..258 the 256
    bytes, plus a few merges. Every non-ASCII character spans 2-4 tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in byte_chars:
        vocab[ch] = len(vocab)
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("l", "o"), ("Ġ", "w")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok.to_str()


@lru_cache(maxsize=1)
def model_files() -> ModelFiles:
    """The real SmolLM2 tokenizer + template when present, else the byte-level stand-in."""
    tokenizer_path = MODEL_DIR / "tokenizer.json"
    if tokenizer_path.is_file():
        config_path = MODEL_DIR / "tokenizer_config.json"
        template = SMOLLM2_CHAT_TEMPLATE
        if config_path.is_file():
            template = json.loads(config_path.read_text()).get("chat_template") or template
        return ModelFiles(tokenizer_path.read_text(), template)
    return ModelFiles(byte_level_tokenizer_json(), SMOLLM2_CHAT_TEMPLATE)


def byte_model_files() -> ModelFiles:
    return ModelFiles(byte_level_tokenizer_json(), SMOLLM2_CHAT_TEMPLATE)


# --- the test double ------------------------------------------------------------------

@dataclass
class Behaviour:
    """What the FakeWorker does with each Submit (tests change it between requests)."""

    reply: str = "Hello there, this is the fake worker speaking."
    token_delay_s: float = 0.0          # pause before each message
    tokens_per_message: int = 1
    cached_tokens: int = 0
    die_after_tokens: int | None = None  # stop the whole server after this many tokens
    fail_code: grpc.StatusCode | None = None  # fail every Submit with this status at once
    end_without_finish: bool = False     # close the stream after the reply, no finish_reason
    hang: bool = False                   # never send anything


@dataclass
class Record:
    """What reached the worker."""

    submits: list[worker_pb2.SubmitRequest] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)    # Submit calls cancelled by the router
    aborted: list[str] = field(default_factory=list)      # Abort RPCs received
    finished: list[str] = field(default_factory=list)     # Submits that ran to a finish


class FakeWorker(worker_pb2_grpc.WorkerServicer):
    """TEST DOUBLE of the real worker (see module docstring). Not an engine."""

    def __init__(self, worker_id: str, files: ModelFiles | None = None, *, model: str = "smollm2-test",
                 max_model_len: int = 2048, block_size: int = 16, behaviour: Behaviour | None = None) -> None:
        self.worker_id = worker_id
        self.files = files or model_files()
        self.model = model
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.behaviour = behaviour or Behaviour()
        self.record = Record()
        self.load = worker_pb2.LoadReport(worker_id=worker_id, kv_blocks_total=1000)
        self.server: grpc.aio.Server | None = None
        self._running: dict[str, asyncio.Task] = {}

    async def Submit(self, request: worker_pb2.SubmitRequest, context: grpc.aio.ServicerContext):
        b = self.behaviour
        self.record.submits.append(request)
        if b.fail_code is not None:
            await context.abort(b.fail_code, "fake worker told to fail")
        self._running[request.request_id] = asyncio.current_task()
        try:
            if b.hang:
                await asyncio.sleep(3600)
            async for message in self._generate(request):
                yield message
            self.record.finished.append(request.request_id)
        except asyncio.CancelledError:
            self.record.cancelled.append(request.request_id)
            raise
        finally:
            self._running.pop(request.request_id, None)

    async def _generate(self, request: worker_pb2.SubmitRequest):
        b = self.behaviour
        s = request.sampling
        reply = self.files.tokenizer.encode(b.reply, add_special_tokens=False).ids + [self.files.eos_id]
        budget = s.max_tokens if s.HasField("max_tokens") else self.max_model_len - len(request.prompt_token_ids)
        sent, first = 0, True
        while True:
            ids, finish = [], common_pb2.FINISH_REASON_UNSPECIFIED
            while len(ids) < b.tokens_per_message and not finish:
                token = reply[sent % len(reply)]
                ids.append(token)
                sent += 1
                if (token == self.files.eos_id and not s.ignore_eos) or token in s.stop_token_ids:
                    finish = common_pb2.FINISH_REASON_STOP
                elif sent >= budget:
                    finish = common_pb2.FINISH_REASON_LENGTH
            if b.token_delay_s:
                await asyncio.sleep(b.token_delay_s)
            if b.die_after_tokens is not None and sent > b.die_after_tokens:
                await self.server.stop(None)
                return
            if b.end_without_finish and finish:
                return
            message = worker_pb2.SubmitResponse(token_ids=ids, finish_reason=finish)
            if s.logprobs:
                message.logprobs.extend(_fake_logprobs(ids, s.top_logprobs))
            if first:
                message.cached_tokens = b.cached_tokens
                message.prompt_tokens = len(request.prompt_token_ids)
                first = False
            yield message
            if finish:
                return

    async def Abort(self, request: worker_pb2.WorkerAbortRequest, context: grpc.aio.ServicerContext):
        self.record.aborted.append(request.request_id)
        task = self._running.get(request.request_id)
        if task is not None:
            task.cancel()
        return worker_pb2.WorkerAbortResponse(found=task is not None)

    async def GetLoad(self, request: worker_pb2.GetLoadRequest, context: grpc.aio.ServicerContext):
        return self.load

    async def GetModelInfo(self, request: worker_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext):
        f = self.files
        return worker_pb2.ModelInfo(
            worker_id=self.worker_id, model=self.model, max_model_len=self.max_model_len,
            block_size=self.block_size, eos_token_ids=[f.eos_id], tokenizer_json=f.tokenizer_json,
            chat_template=f.chat_template, bos_token=f.bos_token, eos_token=f.eos_token,
            vocab_size=f.tokenizer.get_vocab_size(with_added_tokens=True), hash_scheme="blake2b64-v1")


def _fake_logprobs(ids: list[int], top: int) -> list[common_pb2.Logprob]:
    return [common_pb2.Logprob(
        token_id=t, logprob=-0.25,
        top=[common_pb2.TokenLogprob(token_id=t + k, logprob=-0.25 - k) for k in range(top)])
        for t in ids]


@dataclass
class RunningWorker:
    servicer: FakeWorker
    server: grpc.aio.Server
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        await self.server.stop(None)


async def start_fake_worker(worker_id: str = "w0", port: int = 0, **kwargs) -> RunningWorker:
    servicer = FakeWorker(worker_id, **kwargs)
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    servicer.server = server
    return RunningWorker(servicer, server, bound)


# --- router helpers ---------------------------------------------------------------------

def router_config(**overrides) -> RouterConfig:
    """A config on free local ports with fast heartbeats."""
    settings = dict(grpc_port=0, http_port=0, heartbeat_interval_s=0.2, missed_heartbeats=3)
    settings.update(overrides)
    return RouterConfig(**settings)


async def start_router(workers: list[RunningWorker | str] = (), **overrides) -> RouterServer:
    """A started router with ``workers`` (test doubles or host:port) as static workers."""
    addresses = tuple(w if isinstance(w, str) else w.address for w in workers)
    server = RouterServer(router_config(workers=addresses, **overrides))
    await server.start()
    return server


class Heartbeats:
    """Registers a worker with a router and heartbeats like a real worker would."""

    def __init__(self, router_address: str, worker: RunningWorker) -> None:
        self._channel = grpc.aio.insecure_channel(router_address)
        self._stub = registry_pb2_grpc.RegistryStub(self._channel)
        self._worker = worker
        self._task: asyncio.Task | None = None
        self.interval_s = 0.0

    async def register(self) -> None:
        w = self._worker
        reply = await self._stub.Register(registry_pb2.RegisterRequest(
            worker_id=w.servicer.worker_id, address=w.address, model=w.servicer.model), timeout=10)
        self.interval_s = reply.heartbeat_interval_s
        self._task = asyncio.create_task(self._beat())

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self._stub.Heartbeat(registry_pb2.HeartbeatRequest(
                worker_id=self._worker.servicer.worker_id, load=self._worker.servicer.load), timeout=5)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def close(self) -> None:
        await self.stop()
        await self._channel.close()


async def wait_until(predicate, timeout_s: float = 5.0, interval_s: float = 0.02) -> None:
    """Polls ``predicate`` until true; fails the test after ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(interval_s)


# --- script mode: one FakeWorker in its own process --------------------------------------------

async def _serve_forever(args: argparse.Namespace) -> None:
    worker = await start_fake_worker(args.worker_id, port=args.port, behaviour=Behaviour(
        reply=args.reply, token_delay_s=args.token_delay))
    print(f"PORT {worker.port}", flush=True)
    await worker.server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="serve one FakeWorker (a test double)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--worker-id", default="subprocess-worker")
    parser.add_argument("--reply", default="one two three four five six seven eight nine ten")
    parser.add_argument("--token-delay", type=float, default=0.05)
    asyncio.run(_serve_forever(parser.parse_args()))
