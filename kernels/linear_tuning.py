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
``F.linear`` by ``min_gain``; everything else keeps ``F.linear``.

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

logger = logging.getLogger(__name__)

_Key = tuple[int, int, torch.dtype, int]  # rows, the weight's address, dtype, device index
_table: dict[_Key, tuple] = {}
ALIGNMENT = 256
"""Bytes every operand's address must be a multiple of for a tuned algorithm to run: cuBLASLt's
heuristic assumes 256 unless told otherwise, and the algorithms were timed on such tensors
(fresh allocations are; a view with an offset may not be, and falls back to ``F.linear``)."""
_workspaces: dict[int, torch.Tensor] = {}
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


@torch.inference_mode()
def tune(weights: dict[tuple[int, int], list[torch.Tensor]], rows: list[int], *, replays: int = 5,
         min_gain: float = 0.02, max_weights: int = 32, search: bool = False,
         accumulate: frozenset[tuple[int, int]] = frozenset()) -> list[Tuned]:
    """Time ``F.linear`` against cuBLASLt's candidates for every ``(n, k)`` weight shape in
    ``weights`` (the model's weights of that shape, one per layer) at every row count in
    ``rows``; record the winners for ``lookup``. CUDA, bf16/fp16 weights only. ``search``
    also times every configuration ``LtMatmul.search`` finds (slow: benchmarks only). Shapes
    in ``accumulate`` run as the model runs them, ``out += x @ w.T`` (baseline ``addmm_``,
    candidates with beta 1 in place). The choice is recorded for every weight of the shape."""
    from kernels.cublaslt import WORKSPACE_BYTES, LtMatmul

    results = []
    for (n, k), ws in weights.items():
        dev, dtype = ws[0].device, ws[0].dtype
        workspace = _workspaces.get(dev.index)
        if workspace is None:
            workspace = _workspaces[dev.index] = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
        for m in rows:
            forget_rows = [(m, w.data_ptr(), dtype, dev.index) for w in ws]
            for key in forget_rows:
                _table.pop(key, None)
            # enough distinct weights that nothing stays in L2 (big products need few)
            use = ws[: max(1, min(max_weights, (256 << 20) // (m * k * 2 + n * k * 2) + 1))]
            acc = (n, k) in accumulate
            x = torch.randn(m, k, dtype=dtype, device=dev)
            out = torch.zeros(m, n, dtype=dtype, device=dev)
            # checked on the first and last rows only: a wrong algorithm is wrong everywhere,
            # and float32 copies of a whole 16k x 28k product would take GBs before the KV budget
            rows_checked = torch.cat([torch.arange(min(m, 256)), torch.arange(max(0, m - 256), m)]).unique().to(dev)
            residual = torch.randn(len(rows_checked), n, dtype=dtype, device=dev) if acc else None
            want = F.linear(x.index_select(0, rows_checked), use[0]).float()
            if acc:
                want += residual.float()
            scale = want.abs().max().item() or 1.0
            per = 1e3 / len(use)  # ms a replay -> µs a matmul
            if acc:
                base = _capture(lambda w: out.addmm_(x, w.t()), use)
            else:
                base = _capture(lambda w: torch.mm(x, w.t(), out=out), use)
            mm = LtMatmul(m, n, k, dtype)
            found = mm.candidates()
            found += mm.variants(found, SPLITS)
            if search:
                seen = {c.algo for c in found}
                found += [c for c in mm.search({c.config[0] for c in found}) if c.algo not in seen]
            timed, baseline, confirmed = [], [], None
            for cand in found:
                if cand.workspace > WORKSPACE_BYTES:
                    continue
                if acc:
                    out.index_copy_(0, rows_checked, residual)
                got = mm.run(x, use[0], out, cand, workspace, acc).index_select(0, rows_checked).float()
                wrong = not (got - want).abs().max().item() <= 1e-2 * scale  # NaN is wrong too
                del got
                if wrong:
                    logger.warning("cuBLASLt algorithm %s is wrong at %dx%dx%d; skipped", cand.config, m, n, k)
                    continue
                graph = _capture(lambda w, c=cand: mm.run(x, w, out, c, workspace, acc), use)
                b, c = _interleaved(base, graph, replays)
                del graph
                baseline.append(b * per)
                timed.append((c / b, c * per, cand))
            best = choose(1.0, [(ratio, cand) for ratio, _, cand in timed], min_gain)
            if best is not None:  # confirm with more replays: one fast set is not a win
                graph = _capture(lambda w: mm.run(x, w, out, best, workspace, acc), use)
                b, c = _interleaved(base, graph, 3 * replays)
                del graph
                confirmed = c / b
                best = choose(1.0, [(confirmed, best)], min_gain)
            del base
            if best is not None:
                for w in ws:
                    _table[(m, w.data_ptr(), dtype, dev.index)] = (mm, best, workspace)
            baseline_us = statistics.median(baseline) if baseline else float("nan")
            fastest = min((us for _, us, _ in timed), default=float("nan"))
            results.append(Tuned(m, n, k, baseline_us, fastest, None if best is None else str(best.config), len(timed),
                                 confirmed if best is not None else None))
    return results
