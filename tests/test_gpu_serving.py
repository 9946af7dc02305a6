"""benchmarks/gpu_serving.py on CPU with its tiny shape: a real router process and a
real worker process (``--load-format dummy``) on loopback gRPC, nothing mocked."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer

from benchmarks import gpu_bench, gpu_serving
from orchestrator.bench.tokens import TokenSource
from orchestrator.detokenize import ByteDetokenizer
from orchestrator.tokenize import TokenizerBundle

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_serving.py"


def run_script(tmp: Path, *argv: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, list[int]]:
    """The script's result and the pids of the processes it started; its work folder
    (kept when a run fails) goes under ``tmp``."""
    done = subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "TMPDIR": str(tmp)})
    pids = [int(p) for p in re.findall(r"started \w+ \(pid (\d+)\)", done.stdout)]
    return done, pids


def assert_gone(pids: list[int]) -> None:
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_synthetic_tokenizer_covers_the_vocabulary(tmp_path) -> None:
    gpu_serving.write_tokenizer(tmp_path / "tokenizer.json", 1000)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == 1000
    ids = list(range(1000))
    assert tok.encode(tok.decode(ids)).ids == ids                  # every id decodes, and back
    assert len(TokenSource(tok).words) == 1000                     # kvmesh bench can draw prompts from it
    # byte-level like Llama 3's, so the router streams it through the byte-table detokenizer
    bundle = TokenizerBundle.build((tmp_path / "tokenizer.json").read_text())
    detok = bundle.detokenizer([])
    assert isinstance(detok, ByteDetokenizer)
    assert detok.add(ids[:3]) + detok.add(ids[3:10]) == tok.decode(ids[:10])


def test_workload_is_gpu_bench_offline_workload() -> None:
    args = SimpleNamespace(warmup=3, num_requests=256)
    warm, prompts = gpu_serving.workloads(args)
    assert prompts == gpu_bench.offline_workload(SimpleNamespace(offline_requests=256))
    assert len(warm) == 3 and not set(map(tuple, warm)) & set(map(tuple, prompts))


def test_tiny_served_and_in_process_end_to_end(tmp_path) -> None:
    out = tmp_path / "serving.json"
    done, pids = run_script(tmp_path, "--tiny", "--num-requests", "4", "--output-len", "8", "--warmup", "1", "--in-process",
                            "--json", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    for key in ("served", "in_process"):
        r = results[key]
        assert r["ok"] and r["failures"] == 0 and r["short_outputs"] == 0, r
        assert r["output_tokens"] == r["expected_output_tokens"] == 4 * 8
        assert r["output_tok_s"] > 0 and r["ttft_p50_ms"] > 0
    assert results["served"]["model"] == "llama3-tiny" and len(results["served"]["workers"]) == 1
    assert results["served_over_in_process"] > 0
    assert len(pids) == 2
    assert_gone(pids)


def test_processes_are_stopped_when_the_worker_is_not_ready_in_time(tmp_path) -> None:
    done, pids = run_script(tmp_path, "--tiny", "--num-requests", "1", "--output-len", "1", "--ready-timeout", "0.5",
                            "--json", str(tmp_path / "r.json"))
    assert done.returncode != 0
    assert "TimeoutError" in done.stderr and "no worker registered" in done.stderr
    assert len(pids) == 2
    assert_gone(pids)


def test_gpu_bench_batch1_medians_and_offline_run_on_an_engine(tmp_path) -> None:
    """gpu_bench's batch-1 figures are medians over fresh prompts, with every run kept, and
    its offline figure is the median of its runs, each counting every output token (run here
    on the CPU engine with gpu_serving's tiny shape and dummy weights)."""
    import random

    from worker.engine.config import EngineConfig
    from worker.engine.engine import LLMEngine

    gpu_serving.write_model_dir(tmp_path, gpu_serving.TINY)
    engine = LLMEngine(EngineConfig(model=str(tmp_path), load_format="dummy", dtype="float32", num_kv_blocks=256))
    results: dict = {}
    gpu_bench.batch1(engine, random.Random(0), "t-", results, suffix="_x")
    runs = results["kvmesh_b1_runs_x"]
    assert len(runs) == gpu_bench.BATCH1_RUNS
    for key, field in (("kvmesh_b1_x", "tok_s"), ("kvmesh_b1_decode_only_x", "decode_only_tok_s"),
                       ("kvmesh_ttft_128_ms_x", "first_token_ms")):
        values = sorted(run[field] for run in runs)
        assert results[key] == pytest.approx(values[1], abs=0.01)  # the middle one of three
    assert all(run["decode_only_tok_s"] > 0 and run["first_token_ms"] > 0 for run in runs)
    assert all(len(run["first_steps_ms"]) == 3 for run in runs)
    assert not engine.has_unfinished()
    workload = [gpu_bench.random_prompt(random.Random(1), n) for n in (5, 9)]
    resets = []
    reset = engine.block_manager.reset_prefix_cache
    engine.block_manager.reset_prefix_cache = lambda: resets.append(engine.has_unfinished()) or reset()
    gpu_bench.offline(engine, workload, "o-", results, suffix="_x", runs=3)
    assert resets == [False] * 3  # each run starts on a cold prefix cache, the engine idle
    assert results["kvmesh_offline_x"] == pytest.approx(2 * 256 / results["kvmesh_offline_x_s"])
    rates = sorted(run["tok_s"] for run in results["kvmesh_offline_x_runs"])
    assert len(rates) == 3 and round(results["kvmesh_offline_x"], 1) == rates[1]  # the median run's figures
    steps = results["kvmesh_offline_x_steps"]
    assert steps["decode_steps"] + steps["mixed_steps"] >= 256
    # the run's start, broken down: adding the requests, then the first launch inside the first call
    assert 0 < steps["add_requests_ms"] and 0 < steps["first_launch_ms"] <= steps["first_call_ms"]
    assert steps["first_launch_mallocs"] == 0  # a CPU engine allocates nothing on a device


def test_gpu_bench_decode_variant_tables() -> None:
    """``--fp8-decode-variants``: a tuning at every batch, or from N sequences up over the
    default table's entries below N (``variant_table``). Needs Triton (the tunings' module)."""
    pytest.importorskip("triton")
    from kernels.paged_decode_triton import DEFAULT_TUNING, FP8_TUNINGS, parse_decode_tuning

    one = parse_decode_tuning("16/1/3+h", DEFAULT_TUNING)
    assert gpu_bench.variant_table("16/1/3+h", FP8_TUNINGS) == ("16/1/3+h", ((0, one),))
    name, table = gpu_bench.variant_table("16/1/3+h@150", FP8_TUNINGS)
    assert name == "16/1/3+h from 150"
    assert table == ((150, one),) + tuple((n, t) for n, t in FP8_TUNINGS if n < 150)
    assert [n for n, _ in table] == sorted((n for n, _ in table), reverse=True)  # decode_tuning takes the first reached
