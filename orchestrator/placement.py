"""Where a request runs: placement policies behind one small interface.

A policy sees a ``RequestView`` (what a policy may look at: prompt token
ids, cache salt and block size are there for KV-aware placement) and the
model's available workers, and returns one of them. Policies are looked up
by name in ``POLICIES``; adding one is adding an entry.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from orchestrator.workers import WorkerHandle

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestView:
    request_id: str
    model: str
    prompt_token_ids: Sequence[int]
    cache_salt: str
    block_size: int


class PlacementPolicy(Protocol):
    name: str

    def choose(self, request: RequestView, candidates: Sequence[WorkerHandle]) -> WorkerHandle:
        """One of ``candidates`` (never empty, all ``available``). Must not
        await or block: it runs on the event loop for every request."""
        ...


class LeastLoaded:
    """Lowest ``in_flight + num_waiting`` wins.

    ``in_flight`` is this router's own count (exact, never stale);
    ``num_waiting`` is the worker's last report and adds the queue other
    routers put there, so a worker that cannot admit more counts as fuller.
    Ties rotate, so equal workers share a burst.
    """

    name = "least_loaded"

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, request: RequestView, candidates: Sequence[WorkerHandle]) -> WorkerHandle:
        costs = [w.in_flight + w.load.num_waiting for w in candidates]
        best = min(costs)
        tied = [w for w, c in zip(candidates, costs) if c == best]
        chosen = tied[next(self._turn) % len(tied)]
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("least_loaded %s -> %s; cost = in_flight + waiting: %s", request.request_id,
                         chosen.worker_id, ", ".join(
                             f"{w.worker_id}: {c} = {w.in_flight} + {w.load.num_waiting}"
                             for w, c in zip(candidates, costs)))
        return chosen


class RoundRobin:
    """Each request goes to the next worker in turn, ignoring load."""

    name = "round_robin"

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, request: RequestView, candidates: Sequence[WorkerHandle]) -> WorkerHandle:
        return candidates[next(self._turn) % len(candidates)]


POLICIES: dict[str, Callable[[], PlacementPolicy]] = {
    LeastLoaded.name: LeastLoaded,
    RoundRobin.name: RoundRobin,
}


def make_policy(name: str) -> PlacementPolicy:
    """A new policy by name; ``ValueError`` lists the valid names."""
    factory = POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown placement policy {name!r}; valid: {', '.join(sorted(POLICIES))}")
    return factory()
