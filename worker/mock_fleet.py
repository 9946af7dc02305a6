"""Many mock workers in one process (``kvmesh worker --engine mock --num-workers N``).

Each mock worker is a complete ``WorkerServer``: its own gRPC port, engine
thread (the real scheduler, block manager and prefix cache over a
``MockRunner``), KV event stream and router registration. Only the process,
its event loop and one copy of the tokenizer are shared, so a machine holds
dozens of workers in a few processes (docs/PERFORMANCE.md, "Mock fleet").

Worker ``i`` of a fleet gets id ``<worker_id>-<i>`` and port ``<port> + i``
(or a free port when ``port`` is 0).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from worker.config import WorkerConfig
from worker.engine.mock_timing import TimingModel
from worker.engine_loop import Engine
from worker.service import WorkerServer

if TYPE_CHECKING:
    from worker.engine.engine import LLMEngine

logger = logging.getLogger(__name__)


def fleet_configs(base: WorkerConfig, num_workers: int) -> list[WorkerConfig]:
    """One config per worker, derived from ``base``; ValueError names the conflicting setting."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if num_workers == 1:
        return [base]
    if base.advertise_address:
        raise ValueError(f"advertise_address {base.advertise_address!r} names one port, but {num_workers} "
                         "workers need one each; leave it unset (each worker advertises host:its port)")
    if base.port and base.port + num_workers - 1 > 65535:
        raise ValueError(f"ports {base.port}..{base.port + num_workers - 1} exceed 65535; lower --port")
    return [replace(base, worker_id=f"{base.worker_id}-{i}", port=base.port + i if base.port else 0)
            for i in range(num_workers)]


def _given(engine: LLMEngine) -> Engine:
    return engine


class MockFleet:
    """Mock ``WorkerServer``s on this event loop; ``start``, then ``stop``.

    The engines are built one after another on one helper thread, not each
    on its own engine thread: every thread that allocates gets its own
    malloc arena, and sixteen arenas each keeping the garbage of a
    tokenizer read cost ~13 MiB per worker (592 against 378 MiB for 16).
    """

    def __init__(self, configs: list[WorkerConfig], timing: TimingModel = TimingModel()) -> None:
        self.configs = configs
        self.timing = timing
        self.workers: list[WorkerServer] = []
        self.engines: list[LLMEngine] = []
        """The workers' engines, in order (for introspection; only their engine threads may call them)."""

    async def start(self) -> None:
        """Builds every engine, then starts every worker at once; if one fails,
        stops the others and raises its error."""
        # Imported here so that importing this module (and the CLI) stays torch-free.
        from worker.engine.mock_runner import build_mock_engine

        for config in self.configs:
            engine = await asyncio.to_thread(build_mock_engine, config.engine, self.timing)
            self.engines.append(engine)
            self.workers.append(WorkerServer(config, functools.partial(_given, engine)))
        results = await asyncio.gather(*(w.start() for w in self.workers), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.stop(grace=0)
            raise errors[0]

    async def wait_any_exited(self) -> None:
        """Returns once some worker's engine thread has exited."""
        waits = [asyncio.ensure_future(w.engine.wait_exited()) for w in self.workers]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()

    async def drain(self, timeout: float | None) -> None:
        await asyncio.gather(*(w.drain(timeout) for w in self.workers))

    async def stop(self, grace: float | None = None) -> None:
        await asyncio.gather(*(w.stop(grace) for w in self.workers), return_exceptions=True)


async def serve_fleet(configs: list[WorkerConfig], timing: TimingModel = TimingModel()) -> None:
    """Run the fleet until SIGINT/SIGTERM, then drain and stop every worker.

    Raises RuntimeError if an engine thread dies (the process exits non-zero,
    as ``serve_worker`` does for one worker).
    """
    fleet = MockFleet(configs, timing)
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signalled.set)
    try:
        started = time.monotonic()
        await fleet.start()
        logger.info("%d mock workers serving on ports %s (started in %.2f s)", len(fleet.workers),
                    ", ".join(str(w.port) for w in fleet.workers), time.monotonic() - started)
        stop = asyncio.ensure_future(signalled.wait())
        exited = asyncio.ensure_future(fleet.wait_any_exited())
        await asyncio.wait((stop, exited), return_when=asyncio.FIRST_COMPLETED)
        for task in (stop, exited):
            task.cancel()
        if not signalled.is_set():
            raise RuntimeError("an engine thread exited unexpectedly; see the log above")
        logger.info("shutdown signal received; draining %d mock workers", len(fleet.workers))
        await fleet.drain(configs[0].drain_timeout_s)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await fleet.stop()
