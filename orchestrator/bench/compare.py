"""``kvmesh bench compare A.json B.json``: two runs side by side with ratios.

Ratio is B / A. The last column says which run is better on that row
(throughputs: higher; latencies and failures: lower; "=" within 1 %). Two
sweep files are compared point by point, in order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# (label, path into "summary", higher is better)
ROWS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("completed requests", ("completed",), True),
    ("failed requests", ("failed",), False),
    ("duration (s)", ("duration_s",), False),
    ("request throughput (req/s)", ("request_throughput",), True),
    ("output throughput (tok/s)", ("output_throughput",), True),
    ("total throughput (tok/s)", ("total_token_throughput",), True),
    ("goodput (req/s)", ("goodput",), True),
    ("prefix cache hit rate", ("prefix_cache_hit_rate",), True),
) + tuple(
    (f"{name} {q} (ms)", (key, q), False)
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E"))
    for q in ("mean", "p50", "p90", "p99", "max")
)
SAME = 0.01


def load(path: str | Path) -> dict[str, Any]:
    """A bench JSON document; ValueError if it is not one."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not str(doc.get("format", "")).startswith("kvmesh-bench"):
        raise ValueError(f"{path} is not a kvmesh bench result (no kvmesh-bench format tag)")
    return doc


def _get(summary: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = summary
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value if isinstance(value, (int, float)) else None


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def compare_summaries(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Rows of (metric, A, B, B/A, better)."""
    rows = []
    for label, path, higher_better in ROWS:
        va, vb = _get(a, path), _get(b, path)
        if va is None and vb is None:
            continue
        ratio = better = "-"
        if va is not None and vb is not None:
            if va:
                ratio = f"{vb / va:.3f}"
            if abs(vb - va) <= SAME * max(abs(va), abs(vb)):
                better = "="
            else:
                better = "B" if (vb > va) == higher_better else "A"
        rows.append((label, _fmt(va), _fmt(vb), ratio, better))
    return rows


def _table(title: str, rows: list[tuple[str, ...]]) -> str:
    header = ("metric", "A", "B", "B/A", "better")
    lines = [title, f"{header[0]:<30}{header[1]:>12}{header[2]:>12}{header[3]:>9}{header[4]:>8}"]
    lines += [f"{r[0]:<30}{r[1]:>12}{r[2]:>12}{r[3]:>9}{r[4]:>8}" for r in rows]
    return "\n".join(lines)


def _describe(doc: dict[str, Any]) -> str:
    t = doc.get("target", {})
    return f"{doc.get('name', '?')}: {t.get('backend', '?')} {t.get('address', '?')}, {doc.get('load', {}).get('description', '')}"


def compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    """The side-by-side text for two run documents or two sweep documents."""
    a_points, b_points = a.get("points"), b.get("points")
    if (a_points is None) != (b_points is None):
        raise ValueError("compare two single runs or two sweeps, not one of each")
    head = f"A = {_describe(a)}\nB = {_describe(b)}"
    if a_points is None:
        return head + "\n" + _table("", compare_summaries(a["summary"], b["summary"])).lstrip("\n")
    blocks = [head]
    if len(a_points) != len(b_points):
        blocks.append(f"(A has {len(a_points)} points, B {len(b_points)}; comparing the first "
                      f"{min(len(a_points), len(b_points))} in order)")
    for pa, pb in zip(a_points, b_points):
        blocks.append(_table(f"--- point A {pa['label']} vs B {pb['label']} ---",
                             compare_summaries(pa["summary"], pb["summary"])))
    return "\n\n".join(blocks)
