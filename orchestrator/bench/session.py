"""One ``kvmesh bench`` invocation: connect, then warm up, measure and report
each load point; a sweep adds its own JSON, table and latency-throughput plot.

Files (in ``output_dir``): a single run writes ``NAME.json``, ``NAME.csv``,
``NAME-latency-cdf.png`` and ``NAME-throughput.png``; a sweep writes those per
point as ``NAME-LABEL.*`` plus ``NAME-sweep.json`` and ``NAME-sweep.png``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from orchestrator.bench import plots, report, workloads
from orchestrator.bench.arrivals import Arrivals
from orchestrator.bench.backends import Backend, make_backend
from orchestrator.bench.config import BenchConfig
from orchestrator.bench.metrics import summarize
from orchestrator.bench.runner import RunOptions, Runner
from orchestrator.bench.tokens import TokenSource

logger = logging.getLogger(__name__)


class BenchFailed(Exception):
    """The benchmark could not measure anything (e.g. every warm-up request failed)."""


def default_name(config: BenchConfig) -> str:
    return f"{config.backend}-{config.workload.kind}-{time.strftime('%Y%m%d-%H%M%S')}"


async def run_benchmark(config: BenchConfig, out: TextIO | None = None) -> dict[str, Any]:
    """Runs every load point; returns the last document written (the sweep's for a sweep).
    Raises BackendUnavailable, BenchFailed, ValueError (bad input files)."""
    out = out or sys.stdout
    source = await asyncio.to_thread(TokenSource.load, config.tokenizer)
    backend = make_backend(config.backend, config.target, model=config.model,
                           timeout_s=config.request_timeout_s, tokenize=source.encode)
    name = config.name or default_name(config)
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        await backend.start()
        setup_warnings = _tokenizer_warnings(source, backend)
        for w in setup_warnings:
            logger.warning("%s", w)
        points = []
        for i, arrivals in enumerate(config.points):
            stem = name if not config.sweep else f"{name}-{arrivals.label()}"
            doc = await _measure(config, backend, source, arrivals, config.seed + i, out_dir / stem, setup_warnings)
            print(report.format_run(doc), file=out, flush=True)
            points.append({"label": arrivals.label(), "json": doc["files"]["json"], "load": doc["load"],
                           "summary": doc["summary"], "client": doc["client"]})
        if not config.sweep:
            return doc
        sweep = _sweep_document(config, name, backend, source, points, out_dir)
        print(report.format_sweep(sweep), file=out, flush=True)
        return sweep
    finally:
        await backend.close()


def _target(config: BenchConfig, backend: Backend, source: TokenSource) -> dict[str, Any]:
    return {"backend": backend.name, "address": backend.target, "model": backend.model, "tokenizer": source.name,
            "prompt_format": config.prompt_format, "workload": config.describe_workload()}


def _tokenizer_warnings(source: TokenSource, backend: Backend) -> list[str]:
    tok_dir = Path(source.name).parent.name.lower()
    model = backend.model.lower()
    if tok_dir and model and tok_dir not in model and model not in tok_dir:
        return [f"the tokenizer ({source.name}) may not be the served model's ({backend.model}); synthetic prompts "
                "would then not have the intended lengths: pass --tokenizer"]
    return []


async def _measure(config: BenchConfig, backend: Backend, source: TokenSource, arrivals: Arrivals, seed: int,
                   stem: Path, setup_warnings: list[str]) -> dict[str, Any]:
    specs = await asyncio.to_thread(workloads.build, config.workload, source, seed)
    runner = Runner(backend, source, RunOptions(
        max_duration_s=config.max_duration_s, request_timeout_s=config.request_timeout_s,
        ignore_eos=config.ignore_eos, temperature=config.temperature,
        text_prompts=config.prompt_format == "text", run_id=f"bench-{secrets.token_hex(4)}",
        progress=config.progress, late_threshold_s=config.late_threshold_ms / 1e3, cache_salt=config.cache_salt))
    warm = workloads.warmup_specs(specs, config.warmup, source, seed)
    if warm:
        results = await runner.warm_up(warm)
        if not any(r.ok for r in results):
            first = results[0]
            raise BenchFailed(f"all {len(results)} warm-up requests failed; the first: {first.error_kind}: "
                              f"{first.error}")
    result = await runner.run(specs, arrivals, seed, label=arrivals.label())
    summary = summarize(result.records, config.slo)
    warnings = setup_warnings + report.measurement_warnings(
        result, summary, arrivals, late_threshold_ms=config.late_threshold_ms, ignore_eos=config.ignore_eos,
        token_prompts=config.prompt_format == "tokens")
    files: dict[str, Any] = {"json": f"{stem.name}.json", "csv": f"{stem.name}.csv", "plots": []}
    report.write_csv(stem.with_name(files["csv"]), result.records, result.t0, config.slo)
    title = f"{stem.name}: {arrivals.describe()}"
    if config.plots:
        cdf, tput = f"{stem.name}-latency-cdf.png", f"{stem.name}-throughput.png"
        await asyncio.to_thread(plots.latency_cdfs, result.records, stem.with_name(cdf), title)
        await asyncio.to_thread(plots.throughput_over_time, result.records, result.t0, stem.with_name(tput), title)
        files["plots"] = [cdf, tput]
    doc = report.run_document(name=stem.name, config=config.to_json(), target=_target(config, backend, source),
                              arrivals=arrivals, result=result, summary=summary, warmup=len(warm),
                              warnings=warnings, files=files)
    report.write_json(stem.with_name(files["json"]), doc)
    return doc


def _sweep_document(config: BenchConfig, name: str, backend: Backend, source: TokenSource,
                    points: list[dict[str, Any]], out_dir: Path) -> dict[str, Any]:
    files: dict[str, Any] = {"json": f"{name}-sweep.json", "points": [p["json"] for p in points], "plots": []}
    if config.plots:
        files["plots"] = [f"{name}-sweep.png"]
        plots.sweep_curve(points, out_dir / files["plots"][0], f"{name}: latency against throughput")
    best = None
    if config.slo.given:
        meeting = [p for p in points if (p["summary"]["slo_attainment"] or 0) >= config.slo_attainment]
        if meeting:
            top = max(meeting, key=lambda p: p["summary"]["request_throughput"])
            best = {"label": top["label"], "request_throughput": top["summary"]["request_throughput"]}
    doc = report.jsonable({
        "format": report.SWEEP_FORMAT, "name": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config.to_json(), "target": _target(config, backend, source), "points": points,
        "slo_attainment_target": config.slo_attainment, "max_rate_meeting_slo": best,
        "environment": report.environment(), "files": files,
    })
    report.write_json(out_dir / files["json"], doc)
    return doc
