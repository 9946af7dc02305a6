"""Helpers for tests on mock workers: a model directory without weights, a
router with an in-process mock fleet, mock worker processes, the expected tokens.

Mock workers are real workers (``worker/service.py``, the real scheduler,
block manager and KV events) whose forward pass is ``MockRunner``: tokens
come from ``TokenFunction``, so a test knows every token a request must
produce, whichever workers produce it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import pytest

from router_fixtures import model_files, start_router, wait_until

from orchestrator.server import RouterServer
from worker.config import WorkerConfig
from worker.engine.config import EngineConfig
from worker.engine.mock_runner import TokenFunction
from worker.engine.mock_timing import TimingModel
from worker.mock_fleet import MockFleet, fleet_configs
from worker.service import WorkerServer

REPO = Path(__file__).resolve().parents[1]

FAST = TimingModel(prefill_s_per_token=20e-6, decode_base_s=4e-3, decode_s_per_seq=0.0,
                   decode_s_per_context_token=0.0)
"""A few ms per step: streams long enough to interrupt, short enough for CI."""


def make_mock_model_dir(path: Path, max_position_embeddings: int = 4096) -> Path:
    """A model directory a mock engine can serve: config.json and tokenizer files, no weights."""
    files = model_files()
    vocab = files.tokenizer.get_vocab_size(with_added_tokens=True)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "max_position_embeddings": max_position_embeddings,
        "bos_token_id": 1, "eos_token_id": files.eos_id,
    }))
    (path / "tokenizer.json").write_text(files.tokenizer_json)
    (path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": files.chat_template, "bos_token": files.bos_token, "eos_token": files.eos_token,
    }))
    return path


def token_function(model_dir: Path) -> TokenFunction:
    """The mock model of ``model_dir``, as its workers run it."""
    from worker.engine.mock_runner import build_mock_engine

    return build_mock_engine(EngineConfig(model=str(model_dir), num_kv_blocks=2)).runner.tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A mock model directory per test module (import this fixture where it is used)."""
    return make_mock_model_dir(tmp_path_factory.mktemp("mock-model"))


@pytest.fixture(scope="module")
def tokens(model_dir) -> TokenFunction:
    """The module's mock model as its workers run it."""
    return token_function(model_dir)


def expected_tokens(tokens: TokenFunction, prompt: list[int], n: int, seed: int = 0) -> list[int]:
    """The ``n`` tokens any mock worker generates after ``prompt``."""
    digest = TokenFunction.extend(0, prompt)
    out = []
    for _ in range(n):
        t = tokens.token(digest, seed)
        out.append(t)
        digest = TokenFunction.extend(digest, [t])
    return out


@dataclass
class MockCluster:
    router: RouterServer
    fleet: MockFleet

    def worker(self, worker_id: str) -> WorkerServer:
        return next(w for w in self.fleet.workers if w.config.worker_id == worker_id)

    def idle(self, worker: WorkerServer) -> bool:
        """No request left on ``worker`` and every KV block released."""
        load = worker.engine.load()
        return (worker.engine.num_in_flight == 0 and load.num_running == 0 and load.num_waiting == 0
                and load.kv_blocks_used == 0)

    def all_idle(self) -> bool:
        return all(self.idle(w) for w in self.fleet.workers) and self.router.router.in_flight == 0

    def metric(self, name: str) -> float:
        """A router metric's value (0 when it has no sample yet)."""
        value = self.router.metrics.registry.get_sample_value(name, {"model": "mock"})
        return value or 0.0


@asynccontextmanager
async def mock_cluster(model_dir: Path, num_workers: int, timing: TimingModel = FAST,
                       num_kv_blocks: int = 512, **router_overrides) -> AsyncIterator[MockCluster]:
    """A router plus ``num_workers`` in-process mock workers (ids m-0, m-1 ...) registered with it.

    Placement is ``least_loaded`` (tests count on ties rotating) unless
    overridden. Heartbeats every second (not router_fixtures' 0.2 s): the
    registry starts a worker's silence clock when registration begins, and
    registering many workers at once on two cores can outlast three short
    periods."""
    router = await start_router([], **{"heartbeat_interval_s": 1.0, "policy": "least_loaded", **router_overrides})
    engine = EngineConfig(model=str(model_dir), served_name="mock", num_kv_blocks=num_kv_blocks)
    base = WorkerConfig(engine=engine, worker_id="m", router_address=router.grpc_address, stop_grace_s=0)
    fleet = MockFleet(fleet_configs(base, num_workers), timing)
    try:
        await fleet.start()
        await wait_until(lambda: router.registry.healthy_count() == num_workers, timeout_s=10)
        yield MockCluster(router, fleet)
    finally:
        await fleet.stop(grace=0)
        await router.stop(grace=0)


class WorkerProcesses:
    """Mock (or model) workers as child processes (``python -m worker.cli``), killable by worker id."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}

    def spawn(self, worker_id: str, router_address: str, *args: str) -> None:
        cmd = [sys.executable, "-m", "worker.cli", "--router", router_address, "--worker-id", worker_id,
               "--heartbeat-interval", "0.2", *args]
        self.procs[worker_id] = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL,
                                                 stderr=subprocess.DEVNULL, env={**os.environ})

    def kill(self, worker_id: str) -> None:
        """SIGKILL: no drain, no deregistration, sockets closed by the kernel."""
        self.procs[worker_id].send_signal(signal.SIGKILL)

    async def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            await asyncio.to_thread(proc.wait, 10)
