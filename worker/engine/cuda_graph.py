"""CUDA graphs of steps: decode steps by batch-size bucket, and lone short prefills.

A decode step (one new token per sequence) launches ~10 kernels per layer;
replaying a captured graph removes their launch cost. Graphs are captured
for the bucket sizes of ``capture_sizes``, largest first, into one shared
memory pool; a batch is padded up to the next bucket. Padding rows carry slot
-1 (the K/V store skips them) and context length 0 (attention writes zeros),
so they touch no sequence's cache and their logits are never read.

Every input lives in two static tensors: ``[5, max_bs]`` int32 (token ids,
positions, slots, context lengths, the attention's launch order) and ``[max_bs, max_blocks]`` int32 block
tables, filled through pinned host mirrors with one copy each per step. A
token id may be a placeholder for a token the previous step sampled but the
host has not read yet (async scheduling): the graph's first op takes it from
that step's device tokens. The
decode kernel's context split depends only on the bucket size, so it is
fixed at capture.

Block tables are copied into the host mirror only where they changed: a row
remembers the list it was filled from and its length. This relies on the
block manager's contract that a sequence's ``block_table`` list only grows
(appends) until the sequence is freed or reset, which gives it a new list.

``PrefillGraphs`` captures the step of one sequence's prefill (a prompt, or a
chunk of one) by token-count bucket up to 512 tokens: see its docstring.
"""

from __future__ import annotations

import logging
import time

import torch

from worker.engine.sampler import fill_placeholders
from worker.models.attention import AttentionMetadata, DecodeBatch, PrefillBatch, block_table_width, longest_first
from worker.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

_IDS, _POS, _SLOTS, _CTX, _ORDER = range(5)


def capture_by_size(sizes, forward, pool) -> tuple[dict, dict, object]:
    """Captures ``forward(size)`` once per size, largest first, into one memory pool (``pool``,
    or a new one); each size runs once eagerly first, which compiles its kernels and plans its
    cuBLAS calls outside the capture. Returns the graphs and their outputs by size, and the pool."""
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    outputs: dict[int, torch.Tensor] = {}
    for size in sorted(sizes, reverse=True):
        forward(size)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs[size] = forward(size)
        pool = graph.pool() if pool is None else pool
        graphs[size] = graph
    torch.cuda.synchronize()
    return graphs, outputs, pool


def logit_buffer(model: LlamaForCausalLM, rows: int) -> torch.Tensor:
    """The logits every graph of a set writes, ``[rows, V]``, allocated outside the graphs'
    memory pool: one buffer for all sizes instead of one output per captured graph (at
    Llama-3-8B's 128k vocabulary the 20 decode graphs' own outputs held 0.55 GiB). A
    replay's logits are read before the next replay starts (``run`` says so), so sharing
    costs nothing."""
    weight = model.lm_head.weight
    return torch.empty((rows, weight.shape[0]), dtype=weight.dtype, device=weight.device)


def fill_token_rows(host, input_ids: list[int], positions: list[int], slots: list[int], size: int) -> None:
    """Rows ``_IDS``, ``_POS``, ``_SLOTS`` of a host mirror for ``len(input_ids)`` real rows
    padded to ``size``: every row of the padding zeroed, its slot -1 (nothing is stored)."""
    n = len(input_ids)
    host[_IDS, :n] = input_ids
    host[_POS, :n] = positions
    host[_SLOTS, :n] = slots
    host[:, n:size] = 0
    host[_SLOTS, n:size] = -1


def smallest_holding(sizes, n: int, what: str) -> int:
    """The smallest of the (ascending) captured ``sizes`` that holds ``n`` rows."""
    for size in sizes:
        if size >= n:
            return size
    raise ValueError(f"{what} of {n} exceeds the largest captured size {sizes[-1]}")


def capture_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to ``max_batch_size`` (itself included)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    return sizes + [max_batch_size]


class DecodeGraphs:
    def __init__(
        self, model: LlamaForCausalLM, kv_cache: torch.Tensor, max_batch_size: int, max_blocks_per_seq: int,
        previous_tokens: torch.Tensor,
    ) -> None:
        """``previous_tokens``: the runner's device tokens of its last launch, where the graph
        fills placeholder input ids from (``sampler.fill_placeholders``)."""
        self._previous_tokens = previous_tokens
        self.sizes = capture_sizes(max_batch_size)
        self.max_batch_size = self.sizes[-1]
        n, width = -(-self.max_batch_size // 4) * 4, block_table_width(max_blocks_per_seq)  # aligned rows
        device = kv_cache.device
        self._host = torch.zeros((5, n), dtype=torch.int32).pin_memory()
        self._host_tables = torch.zeros((n, width), dtype=torch.int32).pin_memory()
        self._np = self._host.numpy()
        self._np_tables = self._host_tables.numpy()
        self._inputs = torch.zeros((5, n), dtype=torch.int32, device=device)
        self._tables = torch.zeros((n, width), dtype=torch.int32, device=device)
        self._rows = torch.arange(n, dtype=torch.int32, device=device)
        self._copied = torch.cuda.Event()
        self._row_source: list[list[int] | None] = [None] * n  # the list each host row was filled from
        self._row_len = [0] * n
        self._logit_buffer = logit_buffer(model, self.max_batch_size)
        self._capture(model, kv_cache)

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self._inputs[_SLOTS, :size],
            block_tables=self._tables[:size],
            context_lens=[],
            query_lens=[],
            decode=DecodeBatch(rows=self._rows[:size], block_tables=self._tables[:size],
                               context_lens=self._inputs[_CTX, :size], order=self._inputs[_ORDER, :size]),
        )

    @torch.inference_mode()
    def _capture(self, model: LlamaForCausalLM, kv_cache: torch.Tensor) -> None:
        start = time.perf_counter()
        self._inputs[_SLOTS].fill_(-1)  # nothing is written to the cache while capturing
        self._inputs[_ORDER] = self._rows  # any permutation will do: every context is empty
        self._graphs, self._logits, self.pool = capture_by_size(
            self.sizes, lambda size: self._forward(model, kv_cache, size, self._metadata(size)), None)
        """``pool``: the graphs' memory pool; ``PrefillGraphs`` captures into it too (one step runs at a time)."""
        logger.info("captured %d decode CUDA graphs (batch sizes %s) in %.1f s",
                    len(self.sizes), self.sizes, time.perf_counter() - start)

    def _forward(self, model: LlamaForCausalLM, kv_cache: torch.Tensor, size: int, meta: AttentionMetadata):
        ids = fill_placeholders(self._inputs[_IDS, :size], self._previous_tokens)
        hidden = model(ids, self._inputs[_POS, :size], kv_cache, meta)
        return model.compute_logits(hidden, out=self._logit_buffer[:size])

    def bucket(self, batch_size: int) -> int:
        return smallest_holding(self.sizes, batch_size, "batch")

    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        slots: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
    ) -> torch.Tensor:
        """Replays the step for ``len(input_ids)`` sequences; returns their logits ``[B, V]``.

        The returned tensor is graph memory: read it before the next ``run``.
        """
        batch = len(input_ids)
        size = self.bucket(batch)
        self._copied.synchronize()  # the previous step's copies have left the host mirrors
        host = self._np
        fill_token_rows(host, input_ids, positions, slots, size)
        host[_CTX, :batch] = context_lens
        host[_ORDER, :size] = longest_first(host[_CTX, :size])
        for i, table in enumerate(block_tables):
            have = self._row_len[i] if self._row_source[i] is table else 0
            if have != len(table):
                self._np_tables[i, have : len(table)] = table[have:]
                self._row_source[i] = table
                self._row_len[i] = len(table)
        self._inputs.copy_(self._host, non_blocking=True)
        self._tables[:size].copy_(self._host_tables[:size], non_blocking=True)
        self._copied.record()
        self._graphs[size].replay()
        return self._logits[size][:batch]


PREFILL_GRAPH_TOKENS = (16, 32, 64, 128, 256, 512)
"""Token-count buckets of ``PrefillGraphs``; a prefill of more tokens runs eager. All below
``paged_prefill_triton.LONG_QUERY``: captured and eager prefills of these sizes use the same
kernel tuning."""


def prefill_graph_sizes(max_step_tokens: int) -> tuple[int, ...]:
    """The buckets of ``PREFILL_GRAPH_TOKENS`` a step of at most ``max_step_tokens`` tokens can
    use: those below it and the first that holds it (all of them when it is over 512)."""
    needed = next((s for s in PREFILL_GRAPH_TOKENS if s >= max_step_tokens), PREFILL_GRAPH_TOKENS[-1])
    return tuple(s for s in PREFILL_GRAPH_TOKENS if s <= needed)


class PrefillGraphs:
    """CUDA graphs of a step that prefills one sequence (no other sequence in the step), one
    per token bucket of ``PREFILL_GRAPH_TOKENS``; the step is padded to its bucket.

    Why: an eager step launches ~10 kernels a layer through Python. For a short prompt alone
    on the engine that host time is the first token's latency: a 128-token prompt of a
    Llama-3-8B-shaped model is ~7 ms of GPU work but took 17-38 ms to its first token on an
    H100, the rest spent launching. Replayed, the host fills the inputs and launches once.
    Only lone sequences: a step with several is long enough on the GPU for async
    scheduling to hide its launches, and one sequence keeps the inputs simple.

    Padding rows carry slot -1 (nothing is stored) and are no sequence's query rows
    (attention never reads or writes them, so their attention output is whatever the
    buffer held: their hidden states are garbage, possibly NaN, which is harmless only
    because every op of the model works row by row); the logits row is the last real one. The
    attention kernel's grid and tuning follow the bucket (``max_query_len``), its work the
    real query length. Inputs may be placeholders, filled from the previous step's device
    tokens as in the decode graphs.
    """

    def __init__(
        self, model: LlamaForCausalLM, kv_cache: torch.Tensor, max_blocks_per_seq: int,
        previous_tokens: torch.Tensor, max_step_tokens: int, pool=None,
    ) -> None:
        """``max_step_tokens``: the most tokens a step can prefill (the engine's token budget
        and context window): buckets above the first that holds it are never captured (they
        would never run, and their activations would sit outside the memory reserved for graphs)."""
        self._previous_tokens = previous_tokens
        self.sizes = prefill_graph_sizes(max_step_tokens)
        self.max_tokens = self.sizes[-1]
        width = block_table_width(max_blocks_per_seq)
        device = kv_cache.device
        # host mirrors: rows _IDS, _POS, _SLOTS; then query length, context length, logit row (and padding)
        self._host = torch.zeros((3, self.max_tokens), dtype=torch.int32).pin_memory()
        self._host_meta = torch.zeros(4, dtype=torch.int32).pin_memory()
        self._host_table = torch.zeros((1, width), dtype=torch.int32).pin_memory()
        self._np, self._np_meta, self._np_table = self._host.numpy(), self._host_meta.numpy(), self._host_table.numpy()
        self._inputs = torch.zeros((3, self.max_tokens), dtype=torch.int32, device=device)
        self._meta = torch.zeros(4, dtype=torch.int32, device=device)
        self._table = torch.zeros((1, width), dtype=torch.int32, device=device)
        self._zero = torch.zeros(1, dtype=torch.int32, device=device)
        self._copied = torch.cuda.Event()
        self._logit_buffer = logit_buffer(model, 1)
        self._capture(model, kv_cache, pool)

    def _metadata(self, size: int) -> AttentionMetadata:
        prefill = PrefillBatch(query_start=self._zero, query_lens=self._meta[0:1], context_lens=self._meta[1:2],
                               block_tables=self._table, max_query_len=size)
        return AttentionMetadata(slot_mapping=self._inputs[_SLOTS, :size], block_tables=self._table, context_lens=[],
                                 query_lens=[], prefill=prefill)

    @torch.inference_mode()
    def _capture(self, model: LlamaForCausalLM, kv_cache: torch.Tensor, pool) -> None:
        start = time.perf_counter()
        self._inputs[_SLOTS].fill_(-1)  # nothing is written to the cache while capturing
        self._meta.copy_(torch.tensor([1, 1, 0, 0], dtype=torch.int32))  # a one-token prompt: reads one cache row
        self._graphs, self._logits, _ = capture_by_size(
            self.sizes, lambda size: self._forward(model, kv_cache, size, self._metadata(size)), pool)
        logger.info("captured %d prefill CUDA graphs (token buckets %s) in %.1f s",
                    len(self.sizes), list(self.sizes), time.perf_counter() - start)

    def _forward(self, model: LlamaForCausalLM, kv_cache: torch.Tensor, size: int, meta: AttentionMetadata):
        ids = fill_placeholders(self._inputs[_IDS, :size], self._previous_tokens)
        hidden = model(ids, self._inputs[_POS, :size], kv_cache, meta)
        return model.compute_logits(hidden.index_select(0, self._meta[2:3]), out=self._logit_buffer)

    def bucket(self, num_tokens: int) -> int:
        return smallest_holding(self.sizes, num_tokens, "prefill")

    def run(self, input_ids: list[int], positions: list[int], slots: list[int], context_len: int,
            block_table: list[int]) -> torch.Tensor:
        """Replays the prefill of ``len(input_ids)`` tokens (at most ``max_tokens``) of one
        sequence whose context holds ``context_len`` tokens after them; returns the logits of
        its last token, ``[1, V]`` (graph memory: read it before the next replay)."""
        n = len(input_ids)
        size = self.bucket(n)
        self._copied.synchronize()  # the previous replay's copies have left the host mirrors
        fill_token_rows(self._np, input_ids, positions, slots, size)
        self._np_meta[:3] = (n, context_len, n - 1)
        self._np_table[0, : len(block_table)] = block_table
        self._inputs.copy_(self._host, non_blocking=True)  # a few KB: whole, contiguous copies
        self._meta.copy_(self._host_meta, non_blocking=True)
        self._table.copy_(self._host_table, non_blocking=True)
        self._copied.record()
        self._graphs[size].replay()
        return self._logits[size]
