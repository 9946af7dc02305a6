"""When requests go out: open-loop schedules and the closed loop.

Open loop (the arrival times do not depend on the server):

- ``poisson``: exponential gaps with mean 1/rate.
- ``gamma``: gamma gaps with shape = burstiness and scale = 1/(rate *
  burstiness), so the mean gap is still 1/rate; burstiness 1 is Poisson, < 1
  burstier (coefficient of variation 1/sqrt(burstiness)), > 1 smoother.
- ``offline``: every request at t = 0 (rate = inf).
- ``trace``: the timestamps of a trace file, shifted to start at 0 and
  divided by a speed-up factor.

Closed loop (``concurrency``): N requests in flight; a new one leaves as soon
as one finishes. It has no schedule (``offsets`` returns None).

The first request of a schedule leaves at 0; every schedule is a pure
function of its parameters and the seed.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

KINDS = ("poisson", "gamma", "offline", "trace", "concurrency")

T = TypeVar("T")


@dataclass(frozen=True)
class TraceEntry:
    """One line of a Mooncake-style trace: ``{"timestamp": ms, "input_length":
    n, "output_length": m, "hash_ids": [...]}`` (hash_ids optional)."""

    timestamp_s: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...] = ()


def read_jsonl(path: str | Path, parse: Callable[[dict], T], expected: str, what: str) -> list[T]:
    """``parse(row)`` of every non-blank line of a JSON-lines file, in file order.

    ``parse`` raises ``ValueError``/``KeyError``/``TypeError`` for a bad row; the error
    then names ``path:line``, what was wrong, and ``expected``. An empty file is an
    error too ("the ``what`` is empty"). Shared by traces and datasets.
    """
    out: list[T] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(parse(json.loads(line)))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: {type(e).__name__}: {e}; expected {expected}") from None
    if not out:
        raise ValueError(f"{path}: the {what} is empty")
    return out


def _trace_entry(row: dict) -> TraceEntry:
    entry = TraceEntry(float(row["timestamp"]) / 1e3, int(row["input_length"]),
                       int(row["output_length"]), tuple(int(h) for h in row.get("hash_ids", ())))
    if entry.input_length < 1 or entry.output_length < 1 or entry.timestamp_s < 0:
        raise ValueError("lengths must be >= 1 and the timestamp >= 0")
    return entry


def load_trace(path: str | Path) -> list[TraceEntry]:
    """Entries in timestamp order. Raises ValueError naming the bad line."""
    entries = read_jsonl(path, _trace_entry, '{"timestamp": ms, "input_length": n, "output_length": m}', "trace")
    entries.sort(key=lambda e: e.timestamp_s)
    return entries


@dataclass(frozen=True)
class Arrivals:
    """An arrival process; build it with one of the class methods."""

    kind: str
    rate: float = math.inf
    """Requests per second (open loop); inf = offline."""
    burstiness: float = 1.0
    concurrency: int | None = None
    trace_times: tuple[float, ...] = ()
    speedup: float = 1.0

    @classmethod
    def at_rate(cls, rate: float, burstiness: float = 1.0) -> Arrivals:
        if not rate > 0:
            raise ValueError(f"the request rate must be > 0 (inf for all at once), got {rate}")
        if not burstiness > 0 or math.isinf(burstiness):
            raise ValueError(f"burstiness must be a finite number > 0 (1 = Poisson), got {burstiness}")
        if math.isinf(rate):
            return cls("offline")
        return cls("poisson" if burstiness == 1 else "gamma", rate, burstiness)

    @classmethod
    def closed_loop(cls, concurrency: int) -> Arrivals:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        return cls("concurrency", concurrency=concurrency)

    @classmethod
    def from_trace(cls, entries: list[TraceEntry], speedup: float = 1.0) -> Arrivals:
        if not speedup > 0:
            raise ValueError(f"the trace speed-up must be > 0, got {speedup}")
        return cls("trace", trace_times=tuple(e.timestamp_s for e in entries), speedup=speedup)

    @property
    def open_loop(self) -> bool:
        return self.kind != "concurrency"

    def offsets(self, n: int, seed: int) -> tuple[float, ...] | None:
        """Send times (seconds after the start) of the first ``n`` requests;
        None for the closed loop. A trace yields at most its own length."""
        if self.kind == "concurrency":
            return None
        if self.kind == "offline":
            return (0.0,) * n
        if self.kind == "trace":
            t0 = self.trace_times[0]
            return tuple((t - t0) / self.speedup for t in self.trace_times[:n])
        rng = random.Random(f"{seed}:arrivals")
        scale = 1.0 / (self.rate * self.burstiness)
        out, t = [], 0.0
        for _ in range(n):
            out.append(t)
            t += rng.gammavariate(self.burstiness, scale)
        return tuple(out)

    def describe(self) -> str:
        if self.kind == "concurrency":
            return f"concurrency {self.concurrency} (closed loop)"
        if self.kind == "offline":
            return "all at once (offline)"
        if self.kind == "trace":
            return f"trace replay x{self.speedup:g}"
        if self.kind == "poisson":
            return f"Poisson {self.rate:g} req/s"
        return f"gamma {self.rate:g} req/s, burstiness {self.burstiness:g}"

    def label(self) -> str:
        """Short tag for file names and sweep tables."""
        if self.kind == "concurrency":
            return f"c{self.concurrency}"
        if self.kind == "offline":
            return "rate-inf"
        if self.kind == "trace":
            return f"trace-x{self.speedup:g}"
        return f"rate-{self.rate:g}"
