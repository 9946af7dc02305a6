"""What a run leaves behind: the JSON document, the per-request CSV, the
terminal summary, and the warnings about the measurement itself.

The terminal table is rendered from the JSON document, so what is printed is
exactly what is stored. Non-finite numbers are stored as the strings "inf"
and "nan" (strict JSON has no infinity).
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from orchestrator.bench.arrivals import Arrivals
from orchestrator.bench.metrics import Slo, Summary, timings
from orchestrator.bench.records import RequestRecord
from orchestrator.bench.runner import RunResult

FORMAT = "kvmesh-bench/1"
SWEEP_FORMAT = "kvmesh-bench-sweep/1"
LATE_FRACTION_WARN = 0.01
CPU_WARN = 0.9


def jsonable(value: Any) -> Any:
    """Dataclasses, tuples and non-finite floats made strict-JSON friendly."""
    if hasattr(value, "__dataclass_fields__"):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def environment() -> dict[str, Any]:
    return {"python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "pid": os.getpid()}


def measurement_warnings(result: RunResult, summary: Summary, arrivals: Arrivals, *,
                         late_threshold_ms: float, ignore_eos: bool, token_prompts: bool) -> list[str]:
    """Plain-language warnings about how far the run is from what was asked."""
    out = []
    records = [r for r in result.records if r.result.error_kind != "parent_failed"]
    late = [r.lateness * 1e3 for r in records if r.lateness * 1e3 > late_threshold_ms]
    o = result.overhead
    culprit = (f"the benchmark process kept {o.cpu_utilization:.0%} of a core busy: it is the bottleneck"
               if o.cpu_utilization > CPU_WARN else
               f"the benchmark process used only {o.cpu_utilization:.0%} of a core, so other load on this machine "
               "delayed it")
    if records and arrivals.kind in ("poisson", "gamma", "trace") and len(late) / len(records) > LATE_FRACTION_WARN:
        out.append(f"{len(late)} of {len(records)} requests went out more than {late_threshold_ms:g} ms after their "
                   f"scheduled time (max {max(late):.1f} ms; {_rate(o.send_rate)} req/s sent against "
                   f"{_rate(o.scheduled_rate)} scheduled): the offered load was not exactly the load asked for; "
                   f"{culprit}")
    elif records and arrivals.kind == "concurrency" and len(late) / len(records) > LATE_FRACTION_WARN:
        out.append(f"{len(late)} of {len(records)} requests left more than {late_threshold_ms:g} ms after their "
                   f"slot freed (max {max(late):.1f} ms): the client, not the server, limited concurrency; {culprit}")
    if o.cpu_utilization > CPU_WARN:
        out.append(f"the load generator kept {o.cpu_utilization:.0%} of a CPU core busy: its own queueing may be "
                   "in the latencies; run it on a less loaded machine or lower the load")
    if result.not_sent:
        out.append(f"{result.not_sent} requests were never sent: --max-duration ran out")
    if ignore_eos and summary.output_short:
        out.append(f"{summary.output_short} completed requests returned fewer tokens than requested: the server "
                   "may not honour ignore_eos, so output lengths are not the ones asked for")
    if token_prompts:
        off = sum(1 for r in records if r.ok and r.result.prompt_tokens is not None
                  and r.parent is None and r.result.prompt_tokens != r.prompt_len)
        if off:
            out.append(f"the server counted a different prompt length than was sent for {off} requests "
                       "(special tokens added?)")
    return out


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def run_document(*, name: str, config: dict[str, Any], target: dict[str, Any], arrivals: Arrivals,
                 result: RunResult, summary: Summary, warmup: int, warnings: Sequence[str],
                 files: dict[str, Any]) -> dict[str, Any]:
    return jsonable({
        "format": FORMAT,
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
        "target": target,
        "load": {"kind": arrivals.kind, "label": arrivals.label(), "description": arrivals.describe(),
                 "rate": arrivals.rate if arrivals.open_loop else None, "burstiness": arrivals.burstiness,
                 "concurrency": arrivals.concurrency, "warmup_requests": warmup,
                 "not_sent": result.not_sent, "wall_s": result.wall_s},
        "summary": summary.to_json(),
        "client": asdict(result.overhead),
        "warnings": list(warnings),
        "environment": environment(),
        "files": files,
    })


CSV_COLUMNS = ("index", "parent", "scheduled_s", "ready_s", "sent_s", "first_chunk_s", "end_s", "lateness_ms",
               "ttft_ms", "tpot_ms", "e2e_ms", "prompt_tokens_sent", "prompt_tokens", "output_tokens",
               "requested_output_tokens", "cached_tokens", "chunks", "finish_reason", "error_kind", "met_slo",
               "worker_id", "itl_ms")


def write_csv(path: Path, records: Sequence[RequestRecord], t0: float, slo: Slo) -> None:
    """One row per measured request; times in seconds from the schedule's
    zero, latencies in ms, ``itl_ms`` the request's gaps joined by ';'."""
    def rel(t: float) -> str:
        return f"{t - t0:.6f}"

    def ms(x: float | None) -> str:
        return "" if x is None else f"{x * 1e3:.4f}"

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for r in records:
            res, t = r.result, timings(r)
            writer.writerow([
                r.index, "" if r.parent is None else r.parent, rel(r.scheduled), rel(r.ready), rel(res.sent),
                rel(res.chunk_times[0]) if res.chunk_times else "", rel(res.end), ms(r.lateness),
                ms(t and t.ttft), ms(t and t.tpot), ms(t and t.e2e), r.prompt_len,
                "" if res.prompt_tokens is None else res.prompt_tokens, res.output_tokens, r.requested_output_len,
                "" if res.cached_tokens is None else res.cached_tokens, len(res.chunk_times), res.finish_reason,
                res.error_kind or "", int(slo.met(t)) if slo.given else "", res.worker_id,
                ";".join(f"{g * 1e3:.4f}" for g in (t.itls if t else ())),
            ])


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")


# --- terminal ------------------------------------------------------------------------

def _num(value: Any, fmt: str = "{:.2f}") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return fmt.format(value)


def format_run(doc: dict[str, Any]) -> str:
    s, c, load, target = doc["summary"], doc["client"], doc["load"], doc["target"]
    width = 64
    lines = [f" kvmesh bench: {doc['name']} ".center(width, "=")]

    def row(label: str, value: str) -> None:
        lines.append(f"{label:<34}{value}")

    row("Target", f"{target['backend']} {target['address']} (model {target['model']})")
    row("Load", f"{load['description']}; {s['requests']} measured, {load['warmup_requests']} warm-up excluded")
    row("Workload", target.get("workload", ""))
    row("Requests completed / failed", f"{s['completed']} / {s['failed']}")
    row("Duration (s)", _num(s["duration_s"]))
    row("Request throughput (req/s)", _num(s["request_throughput"]))
    row("Output token throughput (tok/s)", _num(s["output_throughput"]))
    row("Total token throughput (tok/s)", _num(s["total_token_throughput"]))
    if s["goodput"] is not None:
        row("Goodput (req/s)", f"{_num(s['goodput'])} ({s['slo_attainment']:.1%} met {doc['config']['slo_text']})")
    if s["prefix_cache_hit_rate"] is not None:
        row("Prefix cache hit rate", f"{s['prefix_cache_hit_rate']:.1%}")
    for key, label in (("input_len", "Input tokens (mean / min / max)"), ("output_len", "Output tokens (mean / min / max)")):
        if s[key]:
            row(label, f"{s[key]['mean']:.1f} / {s[key]['min']:g} / {s[key]['max']:g}")
    lines.append("-" * width)
    lines.append(f"{'Latency (ms)':<14}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}")
    for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E")):
        st = s[key]
        cells = [_num(st[k]) if st else "-" for k in ("mean", "p50", "p90", "p99", "max")]
        lines.append(f"{label:<14}" + "".join(f"{x:>10}" for x in cells))
    lines.append("-" * width)
    late = c["lateness_ms"]
    lag = c["loop_lag_ms"]
    lines.append(f"Client: {c['cpu_ms_per_request']:.3f} ms CPU/request, {c['cpu_utilization']:.0%} of a core; "
                 f"lateness p99 {_num(late and late['p99'])} ms, max {_num(late and late['max'])} ms; "
                 f"loop lag p99 {_num(lag and lag['p99'])} ms")
    if s["errors"]:
        lines.append("Errors: " + ", ".join(f"{k} x{v}" for k, v in s["errors"].items()))
    for w in doc["warnings"]:
        lines.append(f"WARNING: {w}")
    lines.append("=" * width)
    return "\n".join(lines)


SWEEP_COLUMNS = (("point", None), ("req/s", "request_throughput"), ("out tok/s", "output_throughput"),
                 ("TTFT p50", ("ttft_ms", "p50")), ("TTFT p99", ("ttft_ms", "p99")),
                 ("TPOT p50", ("tpot_ms", "p50")), ("TPOT p99", ("tpot_ms", "p99")),
                 ("E2E p50", ("e2e_ms", "p50")), ("goodput", "goodput"), ("failed", "failed"))


def sweep_cell(summary: dict[str, Any], key: Any) -> str:
    if isinstance(key, tuple):
        stats = summary[key[0]]
        return _num(stats[key[1]], "{:.1f}") if stats else "-"
    value = summary[key]
    return str(value) if isinstance(value, int) else _num(value)


def format_sweep(doc: dict[str, Any]) -> str:
    lines = [f" kvmesh bench sweep: {doc['name']} (latencies in ms) ".center(100, "=")]
    lines.append("".join(f"{title:>10}" for title, _ in SWEEP_COLUMNS))
    for point in doc["points"]:
        cells = [point["label"]] + [sweep_cell(point["summary"], key) for _, key in SWEEP_COLUMNS[1:]]
        lines.append("".join(f"{c:>10}" for c in cells))
    best = doc.get("max_rate_meeting_slo")
    if best is not None:
        lines.append(f"Highest swept load with >= {doc['slo_attainment_target']:.0%} of requests within the SLOs: "
                     f"{best['label']} ({best['request_throughput']:.2f} req/s)")
    return "\n".join(lines)
