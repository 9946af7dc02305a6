"""A live progress line: requests done, errors, in flight, current throughput,
and how many requests went out late (the load generator falling behind).

On a terminal the line redraws four times a second; otherwise (CI logs) a
line is printed every ``LOG_INTERVAL_S`` seconds. Current throughput is over
the last ``WINDOW_S`` seconds.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TextIO

WINDOW_S = 5.0
TTY_INTERVAL_S = 0.25
LOG_INTERVAL_S = 10.0
_BAR = 24


@dataclass
class Counters:
    """Live counts the runner updates and the progress line reads."""

    total: int
    done: int = 0
    errors: int = 0
    late: int = 0
    """Requests sent later than the lateness threshold after they were due."""
    in_flight: int = 0
    started: float = field(default_factory=time.perf_counter)
    recent: deque = field(default_factory=deque)
    """(finish time, output tokens) of recently finished requests."""

    def finished(self, ok: bool, output_tokens: int, now: float) -> None:
        self.done += 1
        self.errors += not ok
        self.recent.append((now, output_tokens))

    def rates(self, now: float) -> tuple[float, float]:
        """Requests/s and output tokens/s over the last WINDOW_S seconds."""
        while self.recent and self.recent[0][0] < now - WINDOW_S:
            self.recent.popleft()
        span = min(WINDOW_S, max(now - self.started, 1e-9))
        return len(self.recent) / span, sum(n for _, n in self.recent) / span


def render(c: Counters, label: str, now: float) -> str:
    req_s, tok_s = c.rates(now)
    filled = int(_BAR * c.done / c.total) if c.total else _BAR
    late = f" | {c.late} LATE" if c.late else ""
    return (f"{label} [{'#' * filled}{'-' * (_BAR - filled)}] {c.done}/{c.total} req | {c.errors} err | "
            f"{c.in_flight} in flight | {req_s:.2f} req/s | {tok_s:.0f} tok/s | {now - c.started:.1f} s{late}")


class Progress:
    def __init__(self, counters: Counters, label: str, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.counters = counters
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self._tty = self.stream.isatty()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.enabled:
            self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        interval = TTY_INTERVAL_S if self._tty else LOG_INTERVAL_S
        while True:
            await asyncio.sleep(interval)
            self._draw()

    def _draw(self, final: bool = False) -> None:
        line = render(self.counters, self.label, time.perf_counter())
        if self._tty:
            self.stream.write("\r\x1b[2K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
            self._draw(final=True)
