"""kvmesh's GPU engine against Hugging Face transformers on one GPU, same weights, same run.

The model is Llama-3-8B-shaped (32 layers, hidden 4096, 32 heads, 8 KV heads,
FFN 14336, vocabulary 128256; 16.06 GB of bf16 weights) with random weights
from a fixed seed: transformers builds it on the GPU, kvmesh copies its
weights (fusing q/k/v and gate/up as the loader does). transformers runs
first; then its model is freed and the kvmesh engine sizes its KV pool from
what is free (``--gpu-memory-utilization``). EOS is ignored everywhere.

Measured (kvmesh in-process, no gRPC):
* batch-1 decode, 128-token prompt, 256 new tokens (median of three runs): tokens/s, and the
  fraction of the bandwidth limit (bytes one decode step must read, over the
  card's measured device-to-device copy bandwidth, read + write counted);
* offline throughput: 256 requests, prompt lengths uniform in [128, 1024],
  256 output tokens each: output tokens/s, the median of ``--offline-runs`` (3) runs;
* TTFT of one 2,048-token prompt (median of 5, distinct prompts);
* transformers: eager batch-1 decode, batch-1 decode with its static cache
  (which ``generate`` compiles), a static batch of 64 prompts of 512 tokens
  with 256 new tokens (kvmesh runs that batch too), and optionally
  ``generate_batch`` on the offline workload (slow: off by default).

The engines run with 16,384 tokens a step (``--max-num-batched-tokens``), as vLLM's
offline ``LLM`` class does on H100-class GPUs: an offline batch has no request
waiting on its next token, so fewer, larger mixed steps are the throughput
setting (until session 15 this script used 8,192, a server's setting).

``--kv-cache-dtype fp8_e4m3`` runs the engine with an fp8 KV cache;
``--offline-fp8`` then (after the engine above is freed) builds a second
engine on the same weights with an fp8 KV cache and runs the same offline
workload (``kvmesh_offline_fp8``), so one run compares the two caches.
``--fp8-only --fp8-decode-variants 32/2/2+h,...`` runs only that fp8 offline
workload, once per decode-attention tuning on a fresh engine (the default first
and last). Each offline run records its steps' wall times, the garbage
collector's pauses and any Triton compile that happened during it.

Usage: python benchmarks/gpu_bench.py [--json out.json] [--hf none|eager|all] [--kv-cache-dtype auto|fp8_e4m3]
       [--offline-fp8 [--fp8-only] [--fp8-decode-variants BN/W/ST[+h],...]] [--no-prefill-cuda-graphs] [--no-dense-prefill]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import random
import statistics
import subprocess
import tempfile
import time
import traceback
from pathlib import Path

import torch

LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
)


def copy_bandwidth(nbytes: int = 4 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written (median of 10)."""
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times)


def build_hf(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": layers})
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval(), cfg


def random_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000, 120000) for _ in range(n)]


def timed(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


# ---- transformers ------------------------------------------------------------


def hf_generate(model, prompts: list[list[int]], new: int, **kw) -> float:
    """Output tokens/s of one ``generate`` call over equal-length prompts (no padding)."""
    ids = torch.tensor(prompts, device="cuda")
    with torch.inference_mode():
        elapsed, out = timed(lambda: model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
            do_sample=False, pad_token_id=0, **kw))
    assert out.shape[1] - ids.shape[1] == new, out.shape
    return new * len(prompts) / elapsed


def run_hf(model, args, rng, results: dict) -> None:
    prompt = random_prompt(rng, 128)
    hf_generate(model, [prompt], 4)  # warm-up
    results["hf_eager_b1"] = hf_generate(model, [prompt], args.hf_eager_new_tokens)
    print(f"transformers eager batch-1: {results['hf_eager_b1']:.1f} tok/s", flush=True)
    batch = [random_prompt(rng, 512) for _ in range(64)]
    results["hf_static_batch64"] = hf_generate(model, batch, 256)
    print(f"transformers batch 64 x 512/256: {results['hf_static_batch64']:.1f} tok/s", flush=True)


def run_hf_compiled(model, rng, results: dict) -> None:
    """Batch-1 decode with transformers' static cache, which ``generate`` compiles."""
    prompt = random_prompt(rng, 128)
    try:
        start = time.perf_counter()
        hf_generate(model, [prompt], 256, cache_implementation="static")  # compiles
        results["hf_compile_s"] = time.perf_counter() - start
        results["hf_static_compiled_b1"] = hf_generate(model, [prompt], 256, cache_implementation="static")
        print(f"transformers static cache, compiled, batch-1: {results['hf_static_compiled_b1']:.1f} tok/s "
              f"(first call incl. compile {results['hf_compile_s']:.0f} s)", flush=True)
    except Exception as exc:  # reported in the table, not hidden
        traceback.print_exc()
        results["hf_static_compiled_b1_error"] = f"{type(exc).__name__}: {exc}"[:200]


def hf_in_subprocess(args, results: dict, only: str, timeout: float, error_key: str) -> None:
    """Run one transformers measurement (``--hf-only compiled|generate_batch``) in a fresh
    process: its own GPU memory (``generate_batch`` sizes a paged cache to what is free,
    and keeps it after a failure), and a time limit."""
    import sys

    out = Path(tempfile.mkdtemp()) / f"hf_{only}.json"
    cmd = [sys.executable, __file__, "--hf-only", only, "--layers", str(args.layers),
           "--offline-requests", str(args.offline_requests), "--json", str(out)]
    try:
        subprocess.run(cmd, timeout=timeout, check=True)
        sub = json.loads(out.read_text())
        results.update({k: v for k, v in sub.items() if k.startswith("hf_")})
    except (subprocess.SubprocessError, OSError, ValueError) as exc:
        results[error_key] = f"{type(exc).__name__}: {exc}"[:200]
        print(f"transformers {only} run failed: {exc}", flush=True)


def hf_generate_batch(model, workload: list[list[int]]) -> float:
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=256, min_new_tokens=256, do_sample=False, eos_token_id=-1, pad_token_id=0)
    with torch.no_grad():  # not inference_mode: its batching thread updates tensors made here in place
        elapsed, out = timed(lambda: model.generate_batch(inputs=workload, generation_config=cfg))
    produced = sum(len(r.generated_tokens) for r in out.values())
    return produced / elapsed


# ---- kvmesh --------------------------------------------------------------------


def offline_workload(args) -> list[list[int]]:
    rng = random.Random(1)
    return [random_prompt(rng, rng.randint(128, 1024)) for _ in range(args.offline_requests)]


def run_requests(
    engine, prompts: list[list[int]], new: int, tag: str, step_ms: list[float] | None = None,
    timings: dict | None = None,
) -> tuple[float, float, int]:
    """(seconds to the first token of the first request, total seconds, output tokens).
    ``step_ms``, when given, receives the wall time of each of the first three steps;
    ``timings``, when given, the time it took to add the requests (``add_requests_ms``)."""
    from worker.engine.types import EngineRequest, SamplingOptions

    opts = SamplingOptions(temperature=0.0, max_tokens=new, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(f"{tag}-{i}", tuple(p), opts))
    if timings is not None:
        timings["add_requests_ms"] = round(1e3 * (time.perf_counter() - start), 2)
    first = None
    produced = 0
    steps = 0
    while engine.has_unfinished():
        began = time.perf_counter()
        outs = engine.step()
        if step_ms is not None and steps < 3:
            step_ms.append(round(1e3 * (time.perf_counter() - began), 2))
        steps += 1
        if outs and first is None:
            first = time.perf_counter() - start
        produced += sum(len(o.new_token_ids) for o in outs)
    return first or 0.0, time.perf_counter() - start, produced


class StepStats:
    """Wall time of ``engine.step`` per kind of step (decode-only or mixed) while active, and
    of each mixed step.

    A step call ends when the host has read a step's tokens, so the time between the
    ends of two calls is the GPU time of the step read in the second: the one launched
    in that call (synchronous scheduling) or in the call before (async scheduling)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.stats = {"decode_steps": 0, "decode_s": 0.0, "mixed_steps": 0, "mixed_s": 0.0, "mixed_ms": []}

    def __enter__(self):
        engine, runner = self.engine, self.engine.runner
        self.originals = (engine.step, runner.launch)
        launched: list[str | None] = [None]  # kind of each call's launch, newest last

        def launch(plan):
            launched[-1] = "decode" if all(s.num_new_tokens == 1 for s in plan.scheduled) else "mixed"
            if "first_launch_ms" in self.stats:
                return self.originals[1](plan)
            # the run's first launch: nothing is queued on the device yet, so its host time
            # (input preparation, the eager forward's launches, allocations) leaves the GPU idle
            start, mallocs = time.perf_counter(), _device_mallocs()
            try:
                return self.originals[1](plan)
            finally:
                self.stats["first_launch_ms"] = round(1e3 * (time.perf_counter() - start), 2)
                self.stats["first_launch_mallocs"] = _device_mallocs() - mallocs

        def step():
            launched.append(None)
            start = time.perf_counter()
            try:
                return self.originals[0]()
            finally:
                kind = launched[-2] if engine.async_scheduling else launched[-1]
                if "first_call_ms" not in self.stats:  # schedules and launches the first step, reads none
                    self.stats["first_call_ms"] = round(1e3 * (time.perf_counter() - start), 2)
                if kind is not None:
                    elapsed = time.perf_counter() - start
                    self.stats[f"{kind}_steps"] += 1
                    self.stats[f"{kind}_s"] += elapsed
                    if kind == "mixed":  # each one: a slow first step (a one-time cost) shows here
                        self.stats["mixed_ms"].append(round(1e3 * elapsed, 1))
                del launched[:-1]

        engine.step, runner.launch = step, launch
        self.stats["gc_ms"] = {}  # the garbage collector's pauses by generation: a full collection stalls the host
        gc_started = [0.0]

        def on_gc(phase: str, info: dict) -> None:
            if phase == "start":
                gc_started[0] = time.perf_counter()
            else:
                key = f"gen{info['generation']}"
                self.stats["gc_ms"][key] = round(self.stats["gc_ms"].get(key, 0.0) + 1e3 * (time.perf_counter() - gc_started[0]), 2)

        self.on_gc = on_gc
        gc.callbacks.append(on_gc)
        self.mallocs = _device_mallocs()
        return self.stats

    def __exit__(self, *exc) -> None:
        # device allocations PyTorch's caching allocator had to make during the run: a step
        # that mallocs (its first time at that size) waits for it
        self.stats["device_mallocs"] = _device_mallocs() - self.mallocs
        self.engine.step, self.engine.runner.launch = self.originals
        gc.callbacks.remove(self.on_gc)


def _device_mallocs() -> int:
    import torch

    return torch.cuda.memory_stats().get("num_device_alloc", 0) if torch.cuda.is_available() else 0


BATCH1_RUNS = 3


def batch1(engine, rng, tag: str, results: dict, suffix: str = "") -> None:
    """Batch-1 decode (128-token prompt, 256 new tokens) ``BATCH1_RUNS`` times, fresh prompts:
    the medians of overall tok/s, decode-only tok/s and the first token's latency (one slow
    first token, e.g. a GC pause, moves a single run's overall rate by several percent)."""
    first_steps: list[list[float]] = [[] for _ in range(BATCH1_RUNS)]
    runs = [run_requests(engine, [random_prompt(rng, 128)], 256, f"{tag}{i}", first_steps[i]) for i in range(BATCH1_RUNS)]
    overall = [produced / total for _, total, produced in runs]
    decode_only = [(produced - 1) / (total - first) for first, total, produced in runs]
    results[f"kvmesh_b1{suffix}"] = statistics.median(overall)
    results[f"kvmesh_b1_decode_only{suffix}"] = statistics.median(decode_only)
    results[f"kvmesh_ttft_128_ms{suffix}"] = 1e3 * statistics.median(first for first, _, _ in runs)
    results[f"kvmesh_b1_runs{suffix}"] = [
        {"tok_s": round(o, 2), "decode_only_tok_s": round(d, 2), "first_token_ms": round(1e3 * r[0], 2),
         "first_steps_ms": steps} for o, d, r, steps in zip(overall, decode_only, runs, first_steps)]


def warm_up(engine, rng, tag: str) -> None:
    """A short decode and a long prefill, so that nothing a measurement runs is a first time."""
    run_requests(engine, [random_prompt(rng, 128)], 8, f"{tag}warm")
    run_requests(engine, [random_prompt(rng, 2048)], 1, f"{tag}warm-prefill")


def compiled_variants() -> dict[str, int]:
    """Compiled variants of each of our Triton kernels in this process (its specialisations:
    constexprs, and integer arguments by divisibility by 16)."""
    import sys

    try:
        from triton.runtime.jit import JITFunction
    except ImportError:  # a CPU engine (the suite's CPU test of this script) has no Triton
        return {}
    counts = {}
    for name, module in list(sys.modules.items()):
        if name.startswith("kernels.") and module is not None:
            for attr, fn in vars(module).items():
                if isinstance(fn, JITFunction):
                    counts[f"{name}.{attr}"] = sum(len(cache[0]) for cache in fn.device_caches.values())
    return counts


def offline(engine, workload: list[list[int]], tag: str, results: dict, suffix: str = "", runs: int = 1) -> None:
    """The offline workload (256 new tokens each) on ``engine``, ``runs`` times, each on a
    cold prefix cache: the median run's output tok/s, seconds, step stats and preemptions
    into ``results`` as ``kvmesh_offline{suffix}``, ``..._s``, ``..._steps``,
    ``..._preemptions``, every run's rate and seconds as ``..._runs``; and which Triton
    kernels compiled during them (a compile inside a measured run is a stall serving would
    see too). One run moves by up to ~1 % from the next on the same card; the median of
    three is the headline."""
    before = compiled_variants()
    done = []
    for i in range(runs):
        assert engine.block_manager.reset_prefix_cache(), "offline runs start on an idle engine"
        preempted = engine.num_preemptions
        with StepStats(engine) as stats:
            _, total, produced = run_requests(engine, workload, 256, f"{tag}{i}", timings=stats)
        assert produced == 256 * len(workload), produced
        stats["preemptions"] = engine.num_preemptions - preempted
        done.append((produced / total, total, stats))
        print(f"kvmesh offline{suffix} run {i + 1}/{runs}: {produced / total:.0f} output tok/s ({total:.2f} s); "
              f"steps {stats}", flush=True)
    compiled = {k: n - before.get(k, 0) for k, n in compiled_variants().items() if n > before.get(k, 0)}
    results[f"kvmesh_offline{suffix}_compiled"] = compiled
    if compiled:
        print(f"Triton compiled during offline{suffix}: {compiled}", flush=True)
    rate, total, stats = sorted(done, key=lambda run: run[0])[(len(done) - 1) // 2]
    results[f"kvmesh_offline{suffix}"] = rate
    results[f"kvmesh_offline{suffix}_s"] = total
    results[f"kvmesh_offline{suffix}_steps"] = stats
    results[f"kvmesh_offline{suffix}_runs"] = [{"tok_s": round(r, 1), "s": round(t, 4)} for r, t, _ in done]
    results[f"kvmesh_offline{suffix}_preemptions"] = stats["preemptions"]
    print(f"kvmesh offline{suffix}: {rate:.0f} output tok/s (median of {runs}: "
          f"{' / '.join(f'{r:.0f}' for r, _, _ in done)}; {total:.2f} s)", flush=True)


def run_kvmesh(engine, args, rng, results: dict) -> None:
    warm_up(engine, rng, "")
    batch1(engine, rng, "b1-", results)
    print(f"kvmesh batch-1 (median of {BATCH1_RUNS}): {results['kvmesh_b1']:.1f} tok/s "
          f"({results['kvmesh_b1_decode_only']:.1f} decode only, first token {results['kvmesh_ttft_128_ms']:.1f} ms); "
          f"runs {results['kvmesh_b1_runs']}", flush=True)
    ttfts = [run_requests(engine, [random_prompt(rng, 2048)], 1, f"ttft{i}")[0] for i in range(5)]
    results["kvmesh_ttft_2048_ms"] = 1e3 * statistics.median(ttfts)
    results["kvmesh_ttft_runs_ms"] = [round(1e3 * t, 2) for t in ttfts]
    print(f"kvmesh TTFT 2048: {results['kvmesh_ttft_2048_ms']:.1f} ms", flush=True)
    workload = offline_workload(args)
    offline(engine, workload, "offline", results, runs=args.offline_runs)
    if args.sync_ab and engine.async_scheduling:
        engine.async_scheduling = False  # idle engine: nothing in flight, safe to switch
        batch1(engine, rng, "b1-sync-", results, suffix="_sync")
        offline(engine, workload, "offline-sync", results, suffix="_sync", runs=args.offline_runs)
        engine.async_scheduling = True
        print(f"synchronous scheduling, same run: batch-1 {results['kvmesh_b1_sync']:.1f} tok/s "
              f"({results['kvmesh_b1_decode_only_sync']:.1f} decode only)", flush=True)
    batch = [random_prompt(rng, 512) for _ in range(64)]
    _, total, produced = run_requests(engine, batch, 256, "b64")
    results["kvmesh_batch64"] = produced / total
    print(f"kvmesh batch 64 x 512/256: {results['kvmesh_batch64']:.0f} tok/s", flush=True)


def variant_table(text: str, default_tunings: tuple) -> tuple[str, tuple]:
    """A ``--fp8-decode-variants`` entry as (its name, the fp8 batch table it installs):
    ``BN/W/ST[+FLAGS]`` at every batch size, or ``BN/W/ST[+FLAGS]@N`` from ``N`` sequences up
    and the default table below."""
    from kernels import paged_decode_triton

    spec, _, least = text.partition("@")
    tuning = paged_decode_triton.parse_decode_tuning(spec, paged_decode_triton.DEFAULT_TUNING)
    if not least:
        return paged_decode_triton.format_decode_tuning(tuning), ((0, tuning),)
    below = tuple((n, t) for n, t in default_tunings if n < int(least))
    return f"{paged_decode_triton.format_decode_tuning(tuning)} from {least}", ((int(least), tuning),) + below


def run_offline_fp8(engine, args, rng, results: dict) -> None:
    """The offline workload again on ``engine`` (an fp8 KV cache), after the same warm-up."""
    warm_up(engine, rng, "fp8-")
    offline(engine, offline_workload(args), "fp8-offline", results, suffix="_fp8", runs=args.offline_runs)


def profile_decode(engine, batch: int, prompt_len: int, steps: int = 30) -> dict:
    """Per-step wall time of pure decode steps, split into the engine's stages (``resolve``
    includes waiting for the GPU; under async scheduling the others overlap it), and
    torch.profiler's top GPU kernels."""
    from torch.profiler import ProfilerActivity, profile

    from worker.engine.types import EngineRequest, SamplingOptions

    rng = random.Random(batch)
    opts = SamplingOptions(temperature=0.0, max_tokens=4 * steps + 64, ignore_eos=True)
    ids = [f"prof{batch}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(EngineRequest(rid, tuple(random_prompt(rng, prompt_len)), opts))
    started: set[str] = set()
    while len(started) < batch:
        started.update(o.request_id for o in engine.step())
    spent = {"schedule": 0.0, "launch": 0.0, "resolve": 0.0, "advance": 0.0}
    originals = (engine.scheduler.schedule, engine.runner.launch, engine._resolve, engine._advance)

    def clocked(name, fn):
        def run(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] += time.perf_counter() - t
        return run

    engine.scheduler.schedule = clocked("schedule", originals[0])
    engine.runner.launch = clocked("launch", originals[1])
    engine._resolve = clocked("resolve", originals[2])
    engine._advance = clocked("advance", originals[3])
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall = (time.perf_counter() - start) / steps
    engine.scheduler.schedule, engine.runner.launch, engine._resolve, engine._advance = originals
    for k in spent:
        spent[k] = 1e3 * spent[k] / steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            engine.step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=60)
    for rid in ids:
        engine.abort_request(rid)
    print(f"decode batch {batch} (prompt {prompt_len}): {1e3 * wall:.2f} ms/step; per step ms: {spent}", flush=True)
    print(table, flush=True)
    return {"batch": batch, "ms_per_step": 1e3 * wall, **{f"{k}_ms": v for k, v in spent.items()}}


def profile_prefill(engine, prompt_len: int, runs: int = 5) -> dict:
    """Wall time of one request's first token (a ``prompt_len`` prefill step) and where it
    goes: host time of the step's stages against the GPU's kernel time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    rng = random.Random(prompt_len)
    walls = [run_requests(engine, [random_prompt(rng, prompt_len)], 1, f"pp{prompt_len}-{i}")[0] for i in range(runs)]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_requests(engine, [random_prompt(rng, prompt_len)], 1, f"pp{prompt_len}-prof")
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_ms = sum(e.self_device_time_total for e in events) / 1e3
    print(f"prefill {prompt_len}: first token median {1e3 * statistics.median(walls):.2f} ms; "
          f"GPU kernel time {gpu_ms:.2f} ms", flush=True)
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60), flush=True)
    return {"prompt": prompt_len, "first_token_ms": 1e3 * statistics.median(walls), "gpu_kernel_ms": gpu_ms}


def profile_offline(engine, workload: list[list[int]], steps: int) -> dict:
    """The offline workload's first ``steps`` steps (all mixed: prefill chunks with the
    decode rows of the prompts before them) under torch.profiler: wall time per step,
    GPU kernel time per step and the kernels that take it, grouped by name."""
    from torch.profiler import ProfilerActivity, profile

    from worker.engine.types import EngineRequest, SamplingOptions

    opts = SamplingOptions(temperature=0.0, max_tokens=256, ignore_eos=True)
    ids = [f"profmix-{i}" for i in range(len(workload))]
    for rid, p in zip(ids, workload):
        engine.add_request(EngineRequest(rid, tuple(p), opts))
    engine.step()  # the first step outside the profile: it has no decode rows yet
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / steps
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished():
        engine.step()
    kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    gpu_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / steps
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:20]
    print(f"offline mixed steps: {1e3 * wall:.1f} ms/step wall, {gpu_ms:.1f} ms/step GPU kernels", flush=True)
    for e in top:
        print(f"  {e.self_device_time_total / 1e3 / steps:8.2f} ms/step {e.count // steps:5d}x  {e.key[:90]}", flush=True)
    return {"steps": steps, "wall_ms": 1e3 * wall, "gpu_kernel_ms": gpu_ms,
            "top": [{"name": e.key[:120], "ms_per_step": e.self_device_time_total / 1e3 / steps,
                     "calls_per_step": e.count / steps} for e in top]}


def decode_bytes_per_step(weights: int, embed: int, cfg, context: int) -> int:
    """Bytes a batch-1 decode step must read: every weight but the embedding table
    (one row of it), plus the K/V of ``context`` cached tokens."""
    kv = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    return weights - embed + context * kv


def versions() -> dict:
    import transformers
    import triton

    info = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": triton.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
    }
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        info["driver"] = f"unknown ({exc})"
    return info


def main() -> None:
    from worker.engine.config import KV_CACHE_DTYPES, EngineConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", choices=("none", "eager", "all"), default="all",
                        help="transformers runs: none, eager only, or eager and static-cache compiled")
    parser.add_argument("--hf-eager-new-tokens", type=int, default=64, help="new tokens of the eager batch-1 run")
    parser.add_argument("--hf-generate-batch", action="store_true", help="also run transformers generate_batch offline")
    parser.add_argument("--layers", type=int, default=32, help="fewer layers for a quick smoke run")
    parser.add_argument("--offline-requests", type=int, default=256)
    parser.add_argument("--offline-runs", type=int, default=3,
                        help="offline runs on each engine, each on a cold prefix cache; the table shows the median "
                             "(default %(default)s)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384,
                        help="the engines' per-step token budget (default %(default)s: what vLLM's offline LLM class "
                             "takes on H100-class GPUs; its server, and our worker's benchmarks of serving, take 8192)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                        help="KV cache of the engine: auto (bf16) or fp8_e4m3 (default %(default)s)")
    parser.add_argument("--offline-fp8", action="store_true",
                        help="then run the offline workload again on an engine with an fp8 KV cache")
    parser.add_argument("--fp8-decode-variants", default="", metavar="BN/W/ST[+h][@N],...",
                        help="with --offline-fp8: then the fp8 offline run again on a new engine for each of these "
                             "fp8 decode-attention tunings, each at every batch size, or with @N from N sequences up "
                             "(the default table below) (in place of "
                             "kernels.paged_decode_triton.FP8_TUNINGS, the tuning by batch size), and the default "
                             "once more last")
    parser.add_argument("--fp8-only", action="store_true",
                        help="no transformers and no bf16-cache engine: only the --offline-fp8 runs")
    parser.add_argument("--profile", action="store_true", help="profile decode steps at batch 1, 64 and 256 first")
    parser.add_argument("--profile-mixed", type=int, default=0, metavar="STEPS",
                        help="profile the first STEPS mixed steps of the offline workload first")
    parser.add_argument("--sync-ab", action="store_true",
                        help="also run batch-1 and offline with async scheduling off (same engine, same run)")
    parser.add_argument("--hf-compile-timeout", type=int, default=300, help="seconds for the compiled transformers run")
    parser.add_argument("--hf-generate-batch-timeout", type=int, default=300, help="seconds for generate_batch")
    parser.add_argument("--hf-only", choices=("compiled", "generate_batch"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-prefill-cuda-graphs", action="store_true",
                        help="prefill lone prompts eagerly (EngineConfig.prefill_cuda_graphs off)")
    parser.add_argument("--no-dense-prefill", action="store_true",
                        help="every prompt's keys read back from the paged cache (EngineConfig.dense_prefill off)")
    parser.add_argument("--fp8-dense-ab", action="store_true",
                        help="after the fp8 offline run, three more engines: dense prefill off, on, off (one run each "
                             "with --offline-runs 1)")
    parser.add_argument("--no-fused-gate-up", action="store_true",
                        help="the MLP's gate/up matmul and SiLU gate as two kernels at every size (EngineConfig.fused_gate_up)")
    parser.add_argument("--no-tune-matmuls", action="store_true",
                        help="engines run F.linear everywhere instead of timing cuBLASLt's algorithms at start")
    parser.add_argument("--no-gc-freeze", action="store_true",
                        help="leave the startup heap to the garbage collector (a worker process freezes it)")
    parser.add_argument("--json", default=None, help="write all results here")
    args = parser.parse_args()
    if (args.fp8_only or args.fp8_decode_variants) and not args.offline_fp8:
        parser.error("--fp8-only and --fp8-decode-variants need --offline-fp8")
    if args.fp8_only and args.hf_generate_batch:
        parser.error("--fp8-only runs no transformers: leave out --hf-generate-batch")
    if args.fp8_only:
        args.hf = "none"
    if args.offline_runs < 1:
        parser.error(f"--offline-runs must be at least 1, got {args.offline_runs}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from kernels import paged_decode_triton
    from worker.engine.engine import LLMEngine
    from worker.models.config import ModelConfig
    from worker.models.loader import load_model_from_state_dict
    from worker.service import freeze_startup_heap

    if args.hf_only:
        results = {}
        hf, _ = build_hf(args.layers)
        if args.hf_only == "compiled":
            run_hf_compiled(hf, random.Random(2), results)
        else:
            results["hf_generate_batch"] = hf_generate_batch(hf, offline_workload(args))
            print(f"transformers generate_batch offline: {results['hf_generate_batch']:.1f} tok/s", flush=True)
        Path(args.json).write_text(json.dumps(results))
        return
    info = versions()
    print(f"# {info}", flush=True)
    results: dict = {"info": info, "args": vars(args)}

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    bandwidth = copy_bandwidth()
    results["copy_bandwidth_TBps"] = bandwidth / 1e12
    print(f"copy bandwidth: {bandwidth / 1e12:.2f} TB/s", flush=True)

    elapsed, (hf, hf_cfg) = timed(lambda: build_hf(args.layers))
    weights = sum(p.numel() * p.element_size() for p in hf.parameters())
    embed = hf.model.embed_tokens.weight.numel() * 2
    results["weights_GB"] = weights / 1e9
    print(f"built transformers model: {weights / 1e9:.2f} GB of weights in {elapsed:.0f} s", flush=True)
    rng = random.Random(0)
    if args.hf != "none":
        run_hf(hf, args, rng, results)
        save()

    model_dir = Path(tempfile.mkdtemp(prefix="llama3-8b-shaped-"))
    hf_cfg.save_pretrained(model_dir)
    mcfg = ModelConfig.from_dir(model_dir)
    ours = load_model_from_state_dict(mcfg, hf.state_dict(), 4096, torch.device("cuda"), torch.bfloat16)
    del hf
    gc.collect()
    torch.cuda.empty_cache()

    def build_engine(kv_cache_dtype: str, dense_prefill: bool = not args.no_dense_prefill) -> LLMEngine:
        return LLMEngine(EngineConfig(
            model=str(model_dir), device="cuda", dtype="bfloat16", max_model_len=4096, max_num_seqs=args.max_num_seqs,
            block_size=args.block_size,
            max_num_batched_tokens=args.max_num_batched_tokens, gpu_memory_utilization=args.gpu_memory_utilization,
            kv_cache_dtype=kv_cache_dtype, prefill_cuda_graphs=not args.no_prefill_cuda_graphs,
            tune_matmuls=not args.no_tune_matmuls, fused_gate_up=not args.no_fused_gate_up,
            dense_prefill=dense_prefill,
        ), model=ours)

    step_bytes = decode_bytes_per_step(weights, embed, hf_cfg, 128 + 128)
    limit = bandwidth / step_bytes
    results["bandwidth_limit_b1_tok_s"] = limit
    engine = None
    if not args.fp8_only:
        elapsed, engine = timed(lambda: build_engine(args.kv_cache_dtype))
        if not args.no_gc_freeze:
            freeze_startup_heap()  # as a worker process does once its engine is up
        results["kvmesh_init_s"] = elapsed
        results["kv_blocks"] = engine.runner.num_blocks
        results["kv_tokens"] = engine.runner.num_blocks * engine.config.block_size
        print(f"kvmesh engine ready in {elapsed:.0f} s: {results['kv_blocks']} KV blocks, {results['kv_tokens']} tokens", flush=True)
        if args.profile:
            results["profile"] = [profile_decode(engine, b, p) for b, p in ((1, 128), (64, 512), (256, 640))]
            results["profile_prefill"] = profile_prefill(engine, 128)
        if args.profile_mixed:
            warm_up(engine, random.Random(5), "profmix-")
            rng_mix = random.Random(7)  # not the offline workload's prompts: they would be cached for it
            mix = [random_prompt(rng_mix, rng_mix.randint(128, 1024)) for _ in range(args.offline_requests)]
            results["profile_mixed"] = profile_offline(engine, mix, args.profile_mixed)
        run_kvmesh(engine, args, rng, results)
        save()
    if args.offline_fp8:
        variants = [v for v in args.fp8_decode_variants.split(",") if v]
        default_tunings = paged_decode_triton.FP8_TUNINGS
        tunings = [None] + [variant_table(v, default_tunings) for v in variants]
        if variants:
            tunings.append(None)  # the default again: drift over the run shows as the two defaults' spread
        dense = [not args.no_dense_prefill] * len(tunings)
        if args.fp8_dense_ab:  # the default engine, then dense prefill off, on, off (new engine each)
            tunings += [None] * 3
            dense += [False, True, False]
        if len(tunings) > 1:
            results["kvmesh_offline_fp8_variants"] = []
        try:
            for i, tuning in enumerate(tunings):
                gc.unfreeze()  # frozen objects in cycles are never freed
                engine = None  # its KV pool and CUDA graphs go before the fp8 engine sizes its own
                gc.collect()
                torch.cuda.empty_cache()
                # read when the decode graphs are captured
                paged_decode_triton.FP8_TUNINGS = tuning[1] if tuning else default_tunings
                name = (tuning[0] if tuning else "by batch (default)") + ("" if dense[i] else ", dense prefill off")
                elapsed, engine = timed(lambda: build_engine("fp8_e4m3", dense[i]))
                if not args.no_gc_freeze:
                    freeze_startup_heap()
                results["kv_blocks_fp8"] = engine.runner.num_blocks
                print(f"kvmesh engine with fp8 KV cache ready in {elapsed:.0f} s: {results['kv_blocks_fp8']} KV blocks; "
                      f"decode tuning {name}", flush=True)
                if i == 0:
                    run_offline_fp8(engine, args, rng, results)
                else:
                    variant_results: dict = {}
                    run_offline_fp8(engine, args, random.Random(1000 + i), variant_results)
                    results["kvmesh_offline_fp8_variants"].append({"tuning": name, **variant_results})
                save()
        finally:
            paged_decode_triton.FP8_TUNINGS = default_tunings
        if len(tunings) > 1:
            print("fp8 offline by decode tuning and prefill path (same workload, new engine each):", flush=True)
            print(f"  by batch (default){'' if dense[0] else ', dense prefill off'}: "
                  f"{results['kvmesh_offline_fp8']:.0f} tok/s", flush=True)
            for v in results["kvmesh_offline_fp8_variants"]:
                print(f"  {v['tuning']}: {v['kvmesh_offline_fp8']:.0f} tok/s", flush=True)
    gc.unfreeze()
    if args.hf == "all":
        engine = ours = None
        gc.collect()
        torch.cuda.empty_cache()
        hf_in_subprocess(args, results, "compiled", args.hf_compile_timeout, "hf_static_compiled_b1_error")
        save()
    if args.hf_generate_batch:
        if args.hf != "all":
            engine = ours = None
            gc.collect()
            torch.cuda.empty_cache()
        hf_in_subprocess(args, results, "generate_batch", args.hf_generate_batch_timeout, "hf_generate_batch_error")
        save()
    if not args.fp8_only:
        print_table(results, limit)


def print_table(r: dict, limit: float) -> None:
    def f(key: str, fmt: str = "{:.1f}") -> str:
        if key in r:
            return fmt.format(r[key])
        return "error" if f"{key}_error" in r else "not run"

    rows = [
        (f"batch-1 decode, tok/s (128 prompt, 256 new; kvmesh median of {BATCH1_RUNS})", f("kvmesh_b1"), f("hf_eager_b1"), f("hf_static_compiled_b1"),
         f"{limit:.0f} (kvmesh at {100 * r['kvmesh_b1'] / limit:.1f} %, decode only "
         f"{100 * r['kvmesh_b1_decode_only'] / limit:.1f} %)"),
        (f"offline 256 req [128,1024]/256, output tok/s (kvmesh median of {len(r.get('kvmesh_offline_runs', [0]))})",
         f("kvmesh_offline", "{:.0f}"), f("hf_generate_batch", "{:.0f}"), "-", "-"),
        ("  same, fp8 KV cache (--offline-fp8)", f("kvmesh_offline_fp8", "{:.0f}"), "-", "-", "-"),
        ("static batch 64 x 512/256, output tok/s", f("kvmesh_batch64", "{:.0f}"), f("hf_static_batch64", "{:.0f}"), "-", "-"),
        ("TTFT 2048-token prompt, ms", f("kvmesh_ttft_2048_ms"), "-", "-", "-"),
    ]
    head = ("metric", "kvmesh", "HF eager", "HF static+compile", "bandwidth limit")
    widths = [max(len(str(x[i])) for x in rows + [head]) for i in range(5)]
    line = " | ".join("{:<%d}" % w for w in widths)
    print()
    print(line.format(*head))
    print(line.format(*("-" * w for w in widths)))
    for row in rows:
        print(line.format(*row))


if __name__ == "__main__":
    main()
