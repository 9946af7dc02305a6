"""Which cuBLASLt algorithm each hot matmul shape runs: timed once at start, looked up by ``linear``.

cuBLAS picks one algorithm per shape by heuristic. At the shapes an engine runs
most -- a full decode batch (every decode step is padded to a captured graph
size) and a full prefill step (``max_num_batched_tokens`` rows) -- the heuristic's
first pick is not always the fastest of the candidates it ranks: on an H100 at
256 rows of a Llama-3-8B layer the down projection ran 54.5 µs with cuBLASLt's
fourth candidate against 60.0 µs through ``F.linear`` (benchmarks/gpu_cublaslt_algos.py,
docs/PERFORMANCE.md). ``tune`` times ``F.linear`` and every candidate (and its
split-K variants) on the model's own weights, inside a CUDA graph over distinct
layers' weights as a step runs them, and records a candidate only where it beats
``F.linear`` by ``min_gain``; everything else keeps ``F.linear``. The outcomes can be
kept on disk (``tuning_cache.py``): a restarted engine restores them instead of timing.

The table is keyed by row count and weight (its address), so each engine runs its
own choices. Results differ from ``F.linear``'s in summation order only (checked
against it at ``tune`` time).
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.tuning_cache import TuningCache, shape_key

logger = logging.getLogger(__name__)

_Key = tuple[int, int, torch.dtype, int]  # rows, the weight's address, dtype, device index
_table: dict[_Key, tuple] = {}
ALIGNMENT = 256
"""Bytes every operand's address must be a multiple of for a tuned algorithm to run: cuBLASLt's
heuristic assumes 256 unless told otherwise, and the algorithms were timed on such tensors
(fresh allocations are; a view with an offset may not be, and falls back to ``F.linear``)."""
_workspaces: dict[int, torch.Tensor] = {}
TUNER_VERSION = 1
"""Part of every cached entry's key: raise it when what ``tune`` times or how it decides
changes (candidates, replays, margins), so older outcomes are not restored."""
SPLITS: tuple[int, ...] = ()
"""Split-K variants tried of each heuristic candidate (besides its other CTA swizzling). None
at start: at the Llama-3-8B shapes no split-K variant was ever kept (three H100 runs of
``gpu_cublaslt_algos.py`` at 128-8,192 rows), where the heuristic itself offers split-K when
it pays; timing them doubled the start-up tuning (13-16 s for 79 shapes)."""


@dataclass(frozen=True)
class Tuned:
    """One shape's outcome: ``choice`` is None when ``F.linear`` stays."""

    rows: int
    n: int
    k: int
    baseline_us: float
    best_us: float
    choice: str | None
    tried: int
    kept_ratio: float | None = None
    """The kept algorithm's time over ``F.linear``'s in the confirming replays."""
    cached: bool = False
    """Taken from the tuning cache (timed in an earlier run, re-checked, not timed again)."""


def lookup(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None):
    """The tuned ``(LtMatmul, Candidate, workspace)`` for ``x @ weight.T``, or None.

    Keyed by the weight's address, so the choices are the tuning engine's own: another
    engine in the process (or one built with ``tune_matmuls=False``) has other weights. A
    freed engine's entries may come to match a new weight of the same shape at the same
    address; the algorithm is valid for that shape, whatever the values."""
    if not _table or x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        return None
    entry = _table.get((x.shape[0], weight.data_ptr(), x.dtype, x.device.index))
    if entry is None or weight.device != x.device or weight.dtype != x.dtype:
        return None
    if any(t.data_ptr() % ALIGNMENT for t in (x, weight) + (() if out is None else (out,))):
        return None
    if not (x.is_contiguous() and weight.is_contiguous()):
        return None
    return entry


def run(entry, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None,
        accumulate: bool = False) -> torch.Tensor:
    mm, candidate, workspace = entry
    if out is None:
        out = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    return mm.run(x, weight, out, candidate, workspace, accumulate)


def forget(weights: list[torch.Tensor]) -> None:
    """Drop the tuned entries of these weights (tests; an engine's teardown)."""
    addresses = {w.data_ptr() for w in weights}
    for key in [key for key in _table if key[1] in addresses]:
        del _table[key]


def clear() -> None:
    """Forget every tuned shape."""
    _table.clear()


def choose(baseline_us: float, timed: list[tuple[float, object]], min_gain: float):
    """The fastest of ``timed`` (``(µs, candidate)``) if it beats ``baseline_us`` by at
    least the fraction ``min_gain``, else None (keep the baseline): a gain within the
    timing noise is not worth a second code path."""
    if not timed:
        return None
    us, best = min(timed, key=lambda t: t[0])
    return best if us <= baseline_us * (1 - min_gain) else None


def _capture(fn, weights: list[torch.Tensor]) -> torch.cuda.CUDAGraph:
    """A CUDA graph running ``fn(w)`` once per weight (warmed up first on the current
    stream: a new side stream per shape would give PyTorch's cuBLAS a new workspace each)."""
    for w in weights:
        fn(w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(w)
    return graph


def _interleaved(base: torch.cuda.CUDAGraph, other: torch.cuda.CUDAGraph, replays: int) -> tuple[float, float]:
    """Median ms of a replay of ``base`` and of ``other``, replayed alternately (after one
    replay each to warm up): at prefill sizes an H100 runs at its power limit and its clock
    drifts, so only back-to-back timings compare."""
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(2)] for _ in range(2 * replays + 2)]
    for i, (start, end) in enumerate(events):
        start.record()
        (base if i % 2 == 0 else other).replay()
        end.record()
    events[-1][1].synchronize()
    times = [start.elapsed_time(end) for start, end in events[2:]]
    return statistics.median(times[0::2]), statistics.median(times[1::2])


def _weights_timed(m: int, n: int, k: int, count: int, max_weights: int) -> int:
    """How many of a shape's ``count`` distinct weights one timing runs over: enough that
    nothing stays in L2 (big products need few)."""
    return min(count, max(1, min(max_weights, (256 << 20) // (m * k * 2 + n * k * 2) + 1)))


class _Probe:
    """One shape's operands for timing and for checking a candidate against ``F.linear``.

    Checked on the first and last rows only: a wrong algorithm is wrong everywhere, and
    float32 copies of a whole 16k x 28k product would take GBs before the KV budget exists."""

    def __init__(self, m: int, n: int, k: int, ws: list[torch.Tensor], accumulate: bool, max_weights: int) -> None:
        dev, dtype = ws[0].device, ws[0].dtype
        self.accumulate = accumulate
        self.use = ws[: _weights_timed(m, n, k, len(ws), max_weights)]
        self.x = torch.randn(m, k, dtype=dtype, device=dev)
        self.out = torch.zeros(m, n, dtype=dtype, device=dev)
        self.rows = torch.cat([torch.arange(min(m, 256)), torch.arange(max(0, m - 256), m)]).unique().to(dev)
        self.residual = torch.randn(len(self.rows), n, dtype=dtype, device=dev) if accumulate else None
        self.want = F.linear(self.x.index_select(0, self.rows), self.use[0]).float()
        if accumulate:
            self.want += self.residual.float()
        self.scale = self.want.abs().max().item() or 1.0

    def correct(self, mm, cand, workspace: torch.Tensor) -> bool:
        """Whether ``cand`` computes the product (NaN is wrong too)."""
        if self.accumulate:
            self.out.index_copy_(0, self.rows, self.residual)
        got = mm.run(self.x, self.use[0], self.out, cand, workspace, self.accumulate).index_select(0, self.rows)
        return bool((got.float() - self.want).abs().max().item() <= 1e-2 * self.scale)

    def graph(self, fn) -> torch.cuda.CUDAGraph:
        return _capture(fn, self.use)

    def baseline(self) -> torch.cuda.CUDAGraph:
        x, out = self.x, self.out
        if self.accumulate:
            return self.graph(lambda w: out.addmm_(x, w.t()))
        return self.graph(lambda w: torch.mm(x, w.t(), out=out))


def _time_shape(probe: _Probe, mm, workspace: torch.Tensor, replays: int, min_gain: float,
                search: bool) -> tuple[Tuned, object]:
    """Time ``F.linear`` against every correct candidate of ``mm``'s shape (interleaved
    replays), confirm the fastest with more; ``(outcome, kept candidate or None)``."""
    from kernels.cublaslt import WORKSPACE_BYTES

    per = 1e3 / len(probe.use)  # ms a replay -> µs a matmul
    base = probe.baseline()
    found = mm.candidates()
    found += mm.variants(found, SPLITS)
    if search:
        seen = {c.algo for c in found}
        found += [c for c in mm.search({c.config[0] for c in found}) if c.algo not in seen]
    timed, baseline, confirmed = [], [], None
    for cand in found:
        if cand.workspace > WORKSPACE_BYTES:
            continue
        if not probe.correct(mm, cand, workspace):
            logger.warning("cuBLASLt algorithm %s is wrong at %dx%dx%d; skipped", cand.config, mm.m, mm.n, mm.k)
            continue
        graph = probe.graph(lambda w, c=cand: mm.run(probe.x, w, probe.out, c, workspace, probe.accumulate))
        b, c = _interleaved(base, graph, replays)
        del graph
        baseline.append(b * per)
        timed.append((c / b, c * per, cand))
    best = choose(1.0, [(ratio, cand) for ratio, _, cand in timed], min_gain)
    if best is not None:  # confirm with more replays: one fast set is not a win
        graph = probe.graph(lambda w: mm.run(probe.x, w, probe.out, best, workspace, probe.accumulate))
        b, c = _interleaved(base, graph, 3 * replays)
        del graph
        confirmed = c / b
        best = choose(1.0, [(confirmed, best)], min_gain)
    baseline_us = statistics.median(baseline) if baseline else float("nan")
    fastest = min((us for _, us, _ in timed), default=float("nan"))
    return Tuned(mm.m, mm.n, mm.k, baseline_us, fastest, None if best is None else str(best.config), len(timed),
                 confirmed if best is not None else None), best


def _restore(entry: dict, probe, mm, workspace: torch.Tensor) -> tuple[Tuned, object] | None:
    """A cached outcome, if it still holds: no algorithm kept, or one cuBLASLt accepts for
    the shape and that computes the product (checked on ``probe()``, made only then); None
    to time the shape again."""
    try:
        algo = None if entry["algo"] is None else bytes.fromhex(entry["algo"])
        choice, ratio = entry["choice"], entry["kept_ratio"]
        if not (choice is None or isinstance(choice, str)) or not (ratio is None or isinstance(ratio, (int, float))):
            return None
        tuned = Tuned(mm.m, mm.n, mm.k, float(entry["baseline_us"]), float(entry["best_us"]), choice,
                      int(entry["tried"]), ratio, cached=True)
    except (KeyError, TypeError, ValueError):
        return None
    if algo is None:
        return tuned, None
    try:  # cuBLASLt may still refuse to run what its check accepted: then time the shape again
        cand = mm.restore(algo)
        ok = cand is not None and probe().correct(mm, cand, workspace)
    except Exception:
        ok = False
    if not ok:
        logger.warning("cached cuBLASLt algorithm %s for %dx%dx%d no longer holds: timing again", entry["choice"],
                       mm.m, mm.n, mm.k)
        return None
    return tuned, cand


def _entry(tuned: Tuned, best) -> dict:
    return {"algo": None if best is None else best.algo.hex(), "baseline_us": tuned.baseline_us,
            "best_us": tuned.best_us, "choice": tuned.choice, "tried": tuned.tried, "kept_ratio": tuned.kept_ratio}


@torch.inference_mode()
def tune(weights: dict[tuple[int, int], list[torch.Tensor]], rows: list[int], *, replays: int = 5,
         min_gain: float = 0.02, max_weights: int = 32, search: bool = False,
         accumulate: frozenset[tuple[int, int]] = frozenset(), cache: TuningCache | None = None,
         skip: frozenset[tuple[tuple[int, int], int]] = frozenset()) -> list[Tuned]:
    """Time ``F.linear`` against cuBLASLt's candidates for every ``(n, k)`` weight shape in
    ``weights`` (the model's weights of that shape, one per layer) at every row count in
    ``rows``; record the winners for ``lookup``. CUDA, bf16/fp16 weights only. ``search``
    also times every configuration ``LtMatmul.search`` finds (slow: benchmarks only). Shapes
    in ``accumulate`` run as the model runs them, ``out += x @ w.T`` (baseline ``addmm_``,
    candidates with beta 1 in place). The choice is recorded for every weight of the shape.
    With ``cache`` (``tuning_cache.py``), a shape it holds is restored instead of timed, and
    a timed one is added to it (the caller saves it). ``skip``: ``((n, k), rows)`` pairs
    left alone (products some other kernel computes at that size)."""
    from kernels.cublaslt import WORKSPACE_BYTES, LtMatmul

    results = []
    for (n, k), ws in weights.items():
        dev, dtype = ws[0].device, ws[0].dtype
        workspace = _workspaces.get(dev.index)
        if workspace is None:
            workspace = _workspaces[dev.index] = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
        acc = (n, k) in accumulate
        for m in rows:
            if ((n, k), m) in skip:
                continue
            for w in ws:
                _table.pop((m, w.data_ptr(), dtype, dev.index), None)
            mm = LtMatmul(m, n, k, dtype)
            probes: list[_Probe] = []  # operands, made only when a check or a timing needs them

            def probe() -> _Probe:
                if not probes:
                    probes.append(_Probe(m, n, k, ws, acc, max_weights))
                return probes[0]

            key = shape_key(m, n, k, dtype, acc, min_gain, _weights_timed(m, n, k, len(ws), max_weights),
                            TUNER_VERSION)
            entry = cache.get(key) if cache is not None and not search else None
            outcome = _restore(entry, probe, mm, workspace) if entry is not None else None
            if outcome is None:
                outcome = _time_shape(probe(), mm, workspace, replays, min_gain, search)
                if cache is not None and not search:
                    cache.put(key, _entry(*outcome))
            tuned, best = outcome
            probes.clear()
            if best is not None:
                for w in ws:
                    _table[(m, w.data_ptr(), dtype, dev.index)] = (mm, best, workspace)
            results.append(tuned)
    return results
