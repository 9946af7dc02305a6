"""Failover on the real engine: SmolLM2 worker processes, one SIGKILLed mid-stream.

Greedy decoding makes continuity checkable against an uninterrupted run: the
migrated request (prompt plus the tokens already streamed, prefilled at once
on the second worker) must produce the same tokens and text. Marked slow
(loads the model in two processes); kept apart from test_failover.py so that
each file stays under a minute on two cores.
"""

from __future__ import annotations

import pytest
from mock_fixtures import WorkerProcesses
from router_fixtures import start_router, wait_until

from orchestrator.client import AsyncKvmeshClient

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

MIGRATIONS = "kvmesh_router_request_migrations_total"


def ids_of(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


async def test_sigkilled_model_worker_process_mid_stream_continues_greedy_exactly(smollm2_dir):
    """The real engine: greedy output after a SIGKILL and a migration equals an uninterrupted run."""
    router = await start_router([], heartbeat_interval_s=1.0)
    procs = WorkerProcesses()
    try:
        for worker_id in ("ra", "rb"):
            procs.spawn(worker_id, router.grpc_address, "--model", str(smollm2_dir), "--device", "cpu",
                        "--num-kv-blocks", "64", "--max-num-seqs", "2")
        await wait_until(lambda: router.registry.healthy_count() == 2, timeout_s=50)
        request = dict(prompt="The three primary colors are", max_tokens=16, temperature=0, ignore_eos=True)
        async with AsyncKvmeshClient(router.grpc_address) as client:
            reference = [c async for c in client.generate(**request)]
            chunks = []
            async for chunk in client.generate(**request):
                chunks.append(chunk)
                if len(chunks) == 4:
                    procs.kill(chunk.worker_id)
        assert ids_of(chunks) == ids_of(reference) and len(ids_of(chunks)) == 16
        assert "".join(c.text for c in chunks) == "".join(c.text for c in reference)
        assert len({c.worker_id for c in chunks if c.worker_id}) == 2
        assert router.metrics.registry.get_sample_value(MIGRATIONS, {"model": "SmolLM2-135M-Instruct"}) == 1
    finally:
        await procs.close()
        await router.stop(grace=0)
