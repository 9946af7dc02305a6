"""gpu_bench.py's offline workload served through a router and a worker over gRPC (tracker issue 5).

What the serving path costs: the same 256 requests as ``gpu_bench.py``'s
offline run (prompt lengths uniform in [128, 1024] and token ids in
[1000, 120000) from ``random.Random(1)``, 256 greedy output tokens each, EOS
ignored, all sent at once) go through a router process and a worker process
on loopback gRPC, the way clients reach kvmesh; ``--in-process`` also runs
them through an ``LLMEngine`` in a process of its own first (nothing else on
the GPU then; its memory is freed when it exits), so one run gives both
numbers and their ratio. Goal: served within 10 % of in-process.

The model is Llama-3-8B-shaped (``--tiny`` or ``--layers N`` for smoke runs)
with random weights: the worker runs ``--load-format dummy`` on a model
directory written here (config.json, and a synthetic word-level
tokenizer.json with one letters-only word per id, so the router detokenizes
any sampled id and ``kvmesh bench --tokenizer DIR`` works against it). Engine
settings are gpu_bench's: max_num_seqs 256, max_num_batched_tokens 16384,
max_model_len 4096, gpu_memory_utilization 0.9; ``--kv-cache-dtype fp8_e4m3`` serves
with the fp8 KV cache of gpu_bench's ``--offline-fp8`` row.

Before each measurement ``--warmup`` requests (other prompts, same lengths
distribution, 16 output tokens, all at once) run unmeasured. Measured: output
tokens/s = output tokens / seconds from the first request sent to the last
one finished, TTFT p50/p99 (served: at the client, over gRPC), failed
requests (must be 0), output tokens (must be requests x output length).
Every wait is bounded and the processes are stopped (SIGTERM, then SIGKILL)
whatever happens. Exit status 1 when any request failed or came back short.

Usage (repository root): PYTHONPATH=.:proto python benchmarks/gpu_serving.py --in-process --json serving.json
           [--tiny | --layers N] [--num-requests 256] [--output-len 256] [--log-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import math
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT / "proto", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from benchmarks.gpu_bench import LLAMA3_8B, offline_workload, random_prompt  # noqa: E402
from orchestrator.bench.metrics import percentile  # noqa: E402
from worker.engine.config import KV_CACHE_DTYPES  # noqa: E402

TINY = {**LLAMA3_8B, "num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512,
        "num_attention_heads": 4, "num_key_value_heads": 2}
"""Smoke shape: the full vocabulary (the workload's ids reach 120000), a tiny body."""
WARMUP_OUTPUT_LEN = 16
WARMUP_SEED = 2
READY_POLL_S = 0.5
STOP_WAIT_S = {"worker": 45.0, "router": 15.0}
"""SIGTERM, then this long before SIGKILL (the worker drains its requests first)."""
ENGINE_FLAGS = ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "gpu_memory_utilization", "device",
                "dtype", "kv_cache_dtype", "seed")
"""EngineConfig fields set from this script's arguments, the same for the worker and in-process."""
REQUIRED = {"torch": "torch", "numpy": "numpy", "safetensors": "safetensors", "grpc": "grpcio",
            "grpc_health": "grpcio-health-checking", "grpc_reflection": "grpcio-reflection",
            "google.protobuf": "protobuf", "tokenizers": "tokenizers", "jinja2": "jinja2", "aiohttp": "aiohttp",
            "prometheus_client": "prometheus-client"}
"""Modules the worker, the router and this script import, with their pip names."""


def missing_packages() -> list[str]:
    missing = []
    for module, package in REQUIRED.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:   # the parent package (google) is missing
            found = False
        if not found:
            missing.append(package)
    return missing


# ---- the model directory and the workload ---------------------------------------------------


def word(i: int, width: int) -> str:
    """The ``i``-th ``width``-letter lowercase word (base 26)."""
    letters = []
    for _ in range(width):
        i, r = divmod(i, 26)
        letters.append(chr(ord("a") + r))
    return "".join(reversed(letters))


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer.json with one whole word per id: every id decodes,
    and every word encodes back to its id (what ``kvmesh bench`` needs).

    Byte-level like the tokenizers of real Llama-3-class models (each word is
    stored with its leading space as ``Ġ``, a ``ByteLevel`` pre-tokenizer and
    decoder), so the router streams its text through the same byte-table
    detokenizer it uses for those models, not the slower decode-window one."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel

    width = 2
    while 26**width < vocab_size:
        width += 1
    vocab = {"\u0120" + word(i, width): i for i in range(vocab_size)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="\u0120" + word(0, width)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(path))


def write_model_dir(path: Path, shape: dict) -> None:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16", **shape}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(path / "tokenizer.json", shape["vocab_size"])


def workloads(args) -> tuple[list[list[int]], list[list[int]]]:
    """(warm-up prompts, measured prompts): the measured ones are gpu_bench's offline workload."""
    rng = random.Random(WARMUP_SEED)
    warm = [random_prompt(rng, rng.randint(128, 1024)) for _ in range(args.warmup)]
    return warm, offline_workload(SimpleNamespace(offline_requests=args.num_requests))


def figures(seconds: float, ttfts_s: list[float], output_tokens: int, failures: int, short: int,
            args) -> dict:
    expected = args.num_requests * args.output_len
    return {
        "output_tok_s": output_tokens / seconds if seconds > 0 else 0.0,
        "seconds": seconds,
        "ttft_p50_ms": 1e3 * percentile(ttfts_s, 50) if ttfts_s else None,
        "ttft_p99_ms": 1e3 * percentile(ttfts_s, 99) if ttfts_s else None,
        "failures": failures,
        "short_outputs": short,
        "output_tokens": output_tokens,
        "expected_output_tokens": expected,
        "ok": failures == 0 and short == 0 and output_tokens == expected,
    }


# ---- in-process ----------------------------------------------------------------------------


def run_in_process(model_dir: Path, args) -> dict:
    """The workload through an LLMEngine in this process, timed as the served run is."""
    import torch

    from worker.engine.config import EngineConfig
    from worker.engine.engine import LLMEngine
    from worker.service import freeze_startup_heap

    config = EngineConfig(model=str(model_dir), load_format="dummy",
                          **{name: getattr(args, name) for name in ENGINE_FLAGS})
    engine = LLMEngine(config)
    freeze_startup_heap()  # as the served worker process does (worker.service.serve_worker)
    warm, prompts = workloads(args)
    if warm:
        engine_run(engine, warm, WARMUP_OUTPUT_LEN, "warm")
    seconds, ttfts, counts = engine_run(engine, prompts, args.output_len, "offline")
    short = sum(n != args.output_len for n in counts)
    result = figures(seconds, ttfts, sum(counts), 0, short, args)
    result["preemptions"] = engine.num_preemptions
    result["kv_blocks"] = engine.runner.num_blocks
    if torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name()
    return result


def engine_run(engine, prompts: list[list[int]], output_len: int, tag: str) -> tuple[float, list[float], list[int]]:
    """(seconds, TTFT per request, output tokens per request) with every request added at once."""
    from worker.engine.types import EngineRequest, SamplingOptions

    opts = SamplingOptions(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(EngineRequest(f"{tag}-{i}", tuple(prompt), opts))
    first: dict[str, float] = {}
    counts = dict.fromkeys((f"{tag}-{i}" for i in range(len(prompts))), 0)
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.new_token_ids:
                first.setdefault(out.request_id, now - start)
                counts[out.request_id] += len(out.new_token_ids)
    return time.perf_counter() - start, list(first.values()), list(counts.values())


def in_process_in_subprocess(model_dir: Path, args, work: Path) -> dict:
    out = work / "in_process.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--in-process-only", "--model-dir", str(model_dir),
           "--json", str(out), *passthrough_args(args)]
    subprocess.run(cmd, env=child_env(), cwd=ROOT, timeout=args.in_process_timeout, check=True)
    return json.loads(out.read_text())


def passthrough_args(args) -> list[str]:
    argv = ["--num-requests", str(args.num_requests), "--output-len", str(args.output_len),
            "--warmup", str(args.warmup)]
    for name in ENGINE_FLAGS:
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return argv


# ---- served: router + worker processes -------------------------------------------------------


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "proto"), env.get("PYTHONPATH")]))
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Child processes with their logs; ``stop_all`` ends them in reverse start order, bounded."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = self.log_dir / f"{name}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT)
        self.procs.append((name, proc, log))
        print(f"started {name} (pid {proc.pid}), log {log}", flush=True)
        return proc

    def check_alive(self) -> None:
        for name, proc, log in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode}; see {log}:\n{tail(log)}")

    def stop_all(self) -> None:
        for name, proc, _ in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_WAIT_S[name])
                except subprocess.TimeoutExpired:
                    print(f"{name} did not stop within {STOP_WAIT_S[name]:.0f} s: killing it", flush=True)
                    proc.kill()
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:  # go on stopping the others; report it
                        print(f"{name} (pid {proc.pid}) did not exit after SIGKILL", flush=True)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(unreadable: {exc})"


def start_cluster(procs: Processes, model_dir: Path, args) -> str:
    """Starts the router, then the worker registering with it; returns the router's gRPC address."""
    grpc_port, http_port = free_port(), free_port()
    address = f"127.0.0.1:{grpc_port}"
    procs.start("router", [sys.executable, "-m", "orchestrator.cli", "router", "--grpc-host", "127.0.0.1",
                           "--grpc-port", str(grpc_port), "--http-host", "127.0.0.1", "--http-port", str(http_port)])
    worker = [sys.executable, "-m", "worker.cli", "--model", str(model_dir), "--load-format", "dummy",
              "--router", address, "--host", "127.0.0.1", "--port", "0", "--worker-id", f"gpu-serving-{os.getpid()}"]
    for name in ENGINE_FLAGS:
        worker += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    procs.start("worker", worker)
    return address


def wait_ready(address: str, procs: Processes, timeout_s: float) -> str:
    """The served model's name, once the router lists it with a worker; bounded by ``timeout_s``."""
    import grpc

    from kvmesh.v1 import generate_pb2, generate_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)
        while time.monotonic() < deadline:
            procs.check_alive()
            try:
                models = stub.ListModels(generate_pb2.ListModelsRequest(), timeout=2).models
                ready = [m.id for m in models if m.num_workers > 0]
                if ready:
                    return ready[0]
            except grpc.RpcError:
                pass
            time.sleep(READY_POLL_S)
    raise TimeoutError(f"no worker registered with the router at {address} within {timeout_s:.0f} s")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc), None where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


async def measure_served(address: str, model_dir: Path, args, pids: dict[str, int] | None = None) -> dict:
    """Warm-up, then the workload, through the router with ``kvmesh bench``'s gRPC backend and runner.
    ``pids``: processes whose CPU time over the measured run is reported (cores busy on average)."""
    from tokenizers import Tokenizer

    from orchestrator.bench.arrivals import Arrivals
    from orchestrator.bench.backends.kvmesh_grpc import GrpcBackend
    from orchestrator.bench.metrics import summarize
    from orchestrator.bench.records import RequestSpec
    from orchestrator.bench.runner import RunOptions, Runner
    from orchestrator.bench.tokens import TokenSource

    source = TokenSource(Tokenizer.from_file(str(model_dir / "tokenizer.json")), "synthetic")
    backend = GrpcBackend(address, timeout_s=args.request_timeout)
    runner = Runner(backend, source, RunOptions(max_duration_s=args.request_timeout,
                                                request_timeout_s=args.request_timeout, ignore_eos=True,
                                                temperature=0.0, run_id="serving", progress=False))
    warm, prompts = workloads(args)
    offline = Arrivals.at_rate(math.inf)
    await backend.start()
    try:
        if warm:
            warm_specs = [RequestSpec(i, tuple(p), WARMUP_OUTPUT_LEN) for i, p in enumerate(warm)]
            failed = [r for r in (await runner.run(warm_specs, offline, seed=0, label="warm-up")).records if not r.ok]
            if failed:
                raise RuntimeError(f"{len(failed)} of {len(warm)} warm-up requests failed; the first: "
                                   f"{failed[0].result.error_kind}: {failed[0].result.error}")
        specs = [RequestSpec(i, tuple(p), args.output_len) for i, p in enumerate(prompts)]
        cpu0 = {name: cpu_seconds(pid) for name, pid in (pids or {}).items()}
        result = await runner.run(specs, offline, seed=0, label="offline")
        cpu1 = {name: cpu_seconds(pid) for name, pid in (pids or {}).items()}
    finally:
        await backend.close()
    s = summarize(result.records)
    records = result.records
    ttfts = [r.result.chunk_times[0] - r.result.sent for r in records if r.ok and r.result.chunk_times]
    short = sum(r.ok and r.result.output_tokens != args.output_len for r in records)
    out = figures(s.duration_s, ttfts, s.output_tokens, s.failed + result.not_sent, short, args)
    cores = {name: (cpu1[name] - cpu0[name]) / result.wall_s for name in cpu0
             if cpu0[name] is not None and cpu1[name] is not None and result.wall_s > 0}
    cores["client"] = result.overhead.cpu_utilization
    out.update(model=backend.model, errors=s.errors, cpu_cores_busy=cores,
               tpot_p50_ms=s.tpot_ms.p50 if s.tpot_ms else None, itl_p50_ms=s.itl_ms.p50 if s.itl_ms else None,
               workers=sorted({r.result.worker_id for r in records if r.result.worker_id}))
    return out


def run_served(model_dir: Path, args, log_dir: Path) -> dict:
    procs = Processes(log_dir)
    try:
        address = start_cluster(procs, model_dir, args)
        start = time.monotonic()
        model = wait_ready(address, procs, args.ready_timeout)
        print(f"router {address} serves {model} after {time.monotonic() - start:.0f} s", flush=True)
        pids = {name: proc.pid for name, proc, _ in procs.procs}
        return asyncio.run(measure_served(address, model_dir, args, pids))
    except BaseException:
        for name, _, log in procs.procs:
            print(f"--- last lines of {name} ({log}):\n{tail(log)}", flush=True)
        raise
    finally:
        procs.stop_all()


# ---- main ---------------------------------------------------------------------------------


def environment() -> dict:
    info = {"python": platform.python_version(), "host": platform.node()}
    try:
        info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=30).stdout.strip() or "none"
    except (OSError, subprocess.SubprocessError):
        info["gpu"] = "none (no nvidia-smi)"
    return info


def report(results: dict) -> str:
    rows = [("", "output tok/s", "seconds", "TTFT p50 ms", "TTFT p99 ms", "failures", "output tokens")]
    for key in ("in_process", "served"):
        r = results.get(key)
        if r:
            ttft = [f"{r[k]:.1f}" if r[k] is not None else "-" for k in ("ttft_p50_ms", "ttft_p99_ms")]
            rows.append((key, f"{r['output_tok_s']:.0f}", f"{r['seconds']:.2f}", *ttft, str(r["failures"]),
                         f"{r['output_tokens']} / {r['expected_output_tokens']}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    if "served_over_in_process" in results:
        lines.append(f"served / in-process: {results['served_over_in_process']:.3f} "
                     f"(goal >= 0.9: {'met' if results['served_over_in_process'] >= 0.9 else 'NOT met'})")
    cores = results.get("served", {}).get("cpu_cores_busy")
    if cores:
        lines.append("served run, CPU cores busy on average: " + ", ".join(f"{k} {v:.2f}" for k, v in cores.items()))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--in-process", action="store_true", help="also run the workload in-process first, and compare")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--tiny", action="store_true", help="2 layers, hidden 256, full vocabulary (CPU smoke runs)")
    shape.add_argument("--layers", type=int, default=None, help="Llama-3-8B shape with this many layers")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=16, help="unmeasured requests before each run (default 16: "
                                                          "more prompt tokens than one step takes)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384,
                   help="tokens a step (default 16384, gpu_bench's; sessions 8-14 and 19's first run used 8192)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="KV cache dtype of both engines (fp8_e4m3: gpu_bench's --offline-fp8 row)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dummy weights")
    p.add_argument("--ready-timeout", type=float, default=900.0, help="seconds for the worker to load and register")
    p.add_argument("--request-timeout", type=float, default=900.0, help="seconds per request (and per run)")
    p.add_argument("--in-process-timeout", type=float, default=1800.0, help="seconds for the whole in-process run")
    p.add_argument("--log-dir", default=None, help="router and worker logs (default: the temporary work folder)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder (model dir, logs)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--in-process-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("num_requests", "output_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def model_shape(args) -> dict:
    if args.tiny:
        return dict(TINY)
    return {**LLAMA3_8B, "num_hidden_layers": args.layers or LLAMA3_8B["num_hidden_layers"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.in_process_only:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        Path(args.json).write_text(json.dumps(run_in_process(Path(args.model_dir), args), indent=2))
        return 0
    missing = missing_packages()
    if missing:
        print(f"missing Python packages: {' '.join(missing)} (pip install {' '.join(missing)})", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # so the finally blocks stop the children
    work = Path(tempfile.mkdtemp(prefix="kvmesh-gpu-serving-"))
    log_dir = Path(args.log_dir) if args.log_dir else work / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    model_dir = work / ("llama3-8b-shaped" if not args.tiny else "llama3-tiny")
    model_dir.mkdir()
    shape = model_shape(args)
    results: dict = {"environment": environment(), "args": vars(args), "shape": shape}
    ok = False
    try:
        write_model_dir(model_dir, shape)
        if args.in_process:
            results["in_process"] = in_process_in_subprocess(model_dir, args, work)
            print(f"in-process: {results['in_process']['output_tok_s']:.0f} output tok/s", flush=True)
        results["served"] = run_served(model_dir, args, log_dir)
        if "in_process" in results:
            results["served_over_in_process"] = results["served"]["output_tok_s"] / results["in_process"]["output_tok_s"]
        print(report(results), flush=True)
        ok = all(results[k]["ok"] for k in ("in_process", "served") if k in results)
        return 0 if ok else 1
    finally:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work folder kept: {work}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
