"""PNG plots of a run (latency CDFs, throughput over time) and of a sweep
(latency against throughput). matplotlib is imported only here, with the
non-interactive Agg backend, so a run without plots never pays for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from orchestrator.bench.metrics import percentile, timings
from orchestrator.bench.records import RequestRecord


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_cdfs(records: Sequence[RequestRecord], path: Path, title: str) -> None:
    """Empirical CDFs of TTFT, ITL (pooled) and E2E, with P50 and P99 marked."""
    plt = _pyplot()
    done = [t for t in (timings(r) for r in records) if t is not None]
    series = (("TTFT", [t.ttft * 1e3 for t in done]),
              ("ITL", [g * 1e3 for t in done for g in t.itls]),
              ("E2E", [t.e2e * 1e3 for t in done]))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (name, values) in zip(axes, series):
        ax.set_title(f"{name} (n={len(values)})")
        ax.set_xlabel("ms")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if not values:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            continue
        ordered = sorted(values)
        n = len(ordered)
        ax.step(ordered, [(i + 1) / n for i in range(n)], where="post")
        for q, style in ((50, "--"), (99, ":")):
            x = percentile(ordered, q)
            ax.axvline(x, color="grey", linestyle=style, linewidth=1)
            ax.annotate(f"P{q} {x:.1f}", (x, 0.05 if q == 50 else 0.15), fontsize=8, xytext=(3, 0),
                        textcoords="offset points")
    axes[0].set_ylabel("fraction of requests / gaps")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def throughput_over_time(records: Sequence[RequestRecord], t0: float, path: Path, title: str) -> None:
    """Completed requests/s and output tokens/s per time bin, and requests in flight.

    Tokens count at their chunk's arrival; where a protocol does not say how
    many tokens a chunk held, a request's tokens are spread evenly over its chunks.
    """
    plt = _pyplot()
    if records:
        end = max(r.result.end for r in records) - t0
    else:
        end = 1.0
    bin_s = max(0.1, end / 60) if end < 60 else 1.0
    bins = int(end / bin_s) + 1
    req = [0.0] * bins
    tok = [0.0] * bins
    for r in records:
        res = r.result
        if r.ok:
            req[min(bins - 1, max(0, int((res.end - t0) / bin_s)))] += 1 / bin_s
        known = all(res.chunk_tokens) and len(res.chunk_tokens) == len(res.chunk_times)
        per_chunk = res.chunk_tokens if known else [res.output_tokens / max(1, len(res.chunk_times))] * len(res.chunk_times)
        for t, n in zip(res.chunk_times, per_chunk):
            tok[min(bins - 1, max(0, int((t - t0) / bin_s)))] += n / bin_s
    edges = sorted([(r.result.sent - t0, 1) for r in records] + [(r.result.end - t0, -1) for r in records])
    xs, ys, level = [0.0], [0], 0
    for x, step in edges:
        level += step
        xs.append(x)
        ys.append(level)
    centers = [(i + 0.5) * bin_s for i in range(bins)]
    fig, (ax1, ax3) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    ax1.plot(centers, tok, color="tab:blue", label="output tokens/s")
    ax1.set_ylabel("output tokens/s", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(centers, req, color="tab:orange", label="requests/s")
    ax2.set_ylabel("completed requests/s", color="tab:orange")
    ax1.grid(alpha=0.3)
    ax3.step(xs, ys, where="post", color="tab:green")
    ax3.set_ylabel("requests in flight")
    ax3.set_xlabel(f"seconds since start (bins of {bin_s:.2g} s)")
    ax3.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sweep_curve(points: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Latency percentiles against achieved output throughput, one marker per point."""
    plt = _pyplot()
    panels = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E"))
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    xs = [p["summary"]["output_throughput"] for p in points]
    for ax, (key, name) in zip(axes.flat, panels):
        for q, style in (("p50", "o-"), ("p99", "s--")):
            ys = [p["summary"][key][q] if p["summary"][key] else float("nan") for p in points]
            ax.plot(xs, ys, style, label=q.upper())
        for p, x in zip(points, xs):
            stats = p["summary"][key]
            if stats:
                ax.annotate(p["label"], (x, stats["p50"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"{name} (ms)")
        ax.set_xlabel("output tokens/s (achieved)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
