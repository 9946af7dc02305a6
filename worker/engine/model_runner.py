"""Runs one scheduled step through the model: flat inputs in, sampled tokens out.

Owns the model, the device, and the KV pool tensor
``[num_layers, 2, num_blocks, block_size, kv_heads, head_dim]``. The pool is
allocated once; its size comes from a memory budget (or an exact block count).

Two paths share the step's host-side bookkeeping:

* CPU: the pure-torch reference path (attention from Python lists).
* CUDA: the batch is described as device tensors (decode and prefill
  sub-batches, built with one host-to-device copy) and runs the Triton
  kernels (on an sm_90+ GPU, the cache-free prompts of a step over 512 tokens
  attend to the step's own keys instead of the cache: ``dense_prefill``);
  steps whose sequences all have one new token replay a CUDA graph
  (``cuda_graph.py``), and with ``prefill_cuda_graphs`` so does a step that
  prefills one sequence alone (up to 512 tokens). The KV pool gets what
  ``gpu_memory_utilization`` leaves after the weights, a profiled activation
  peak (of the largest step ``max_num_batched_tokens`` allows) and what the
  graphs will hold (profiled from their largest shapes; logged beside what they
  then hold).
  Before serving, every attention kernel variant is compiled and every logits
  matmul size is run once, so that no step waits for a compiler or a kernel load;
  the hot matmul shapes get the cuBLASLt algorithm timed fastest for them
  (``tune_matmuls``).
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from kernels.kv_quant import FP8_KV_DTYPE
from worker.engine.config import EngineConfig
from worker.engine.cuda_graph import PREFILL_GRAPH_TOKENS, DecodeGraphs, PrefillGraphs
from worker.engine.sampler import PendingSample, fill_placeholders, sample_async, to_device
from worker.engine.scheduler import SchedulerOutput
from worker.engine.types import SamplingOptions
from worker.models.attention import (
    AttentionMetadata,
    DecodeBatch,
    DenseBatch,
    PrefillBatch,
    block_table_width,
    longest_first,
    set_kv_cache_scale,
)
from worker.models.config import ModelConfig
from worker.models.llama import LlamaForCausalLM
from worker.models.loader import load_dummy_model, load_model

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_CPU_KV_BYTES = 1 << 30
MAX_GRAPH_BATCH = 512
_GIB = 2**30
DENSE_MIN_STEP_TOKENS = PREFILL_GRAPH_TOKENS[-1] + 1
"""Steps of this many tokens or more send their cache-free prompts to the dense prefill
kernel (``dense_prefill``). Smaller steps keep the paged kernel: a lone prompt's step
then computes the same whether it replays a prefill CUDA graph or runs eager (the graphs
capture the paged kernel), and launch costs, not attention, dominate such steps."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ModelRunner:
    supports_async = True
    """``launch`` takes placeholder token ids (``sampler.placeholder``) from the previous
    launch's device tokens, so the engine may schedule ahead of the device."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, model: LlamaForCausalLM | None = None) -> None:
        self.config = config
        self.model_config = model_config
        self.device = resolve_device(config.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if config.dtype == "auto":
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            self.dtype = _DTYPES[config.dtype]
        self.kv_dtype = FP8_KV_DTYPE if config.kv_cache_fp8 else self.dtype
        """The KV pool's dtype: the model's, or float8_e4m3fn (``kernels/kv_quant.py``)."""
        self.max_model_len = min(config.max_model_len or model_config.max_position_embeddings, model_config.max_position_embeddings)
        if model is None and config.load_format == "dummy":
            self.model = load_dummy_model(model_config, self.max_model_len, self.device, self.dtype, seed=config.seed)
        elif model is None:
            self.model = load_model(Path(config.model), self.max_model_len, self.device, self.dtype, model_config)
        else:
            self.model = model.to(device=self.device, dtype=self.dtype)
            self.model.init_rope(self.max_model_len, self.device)
        set_kv_cache_scale(self.model, config.kv_cache_scale)
        self.on_gpu = self.device.type == "cuda"
        self.dense_prefill = self.on_gpu and config.dense_prefill and _dense_prefill_fits(
            self.device, self.dtype, model_config.head_dim)
        """Whether eager steps of ``DENSE_MIN_STEP_TOKENS`` or more send their cache-free
        prompts to ``kernels/prefill_dense_triton.py`` (``EngineConfig.dense_prefill``)."""
        self._graph_reserve: int | None = None
        """Bytes the KV budget left for the CUDA graphs (when it was profiled)."""
        if self.on_gpu:
            self._interleave_gate_up(config.fused_gate_up)
        if self.on_gpu and config.tune_matmuls:
            self._tune_matmuls()
        rows = max(config.max_num_seqs, MAX_GRAPH_BATCH)
        self._previous_tokens = torch.zeros(rows, dtype=torch.int64, device=self.device)
        """The last launched step's sampled tokens by row: where placeholders are filled from."""
        self.num_blocks = self._num_kv_blocks()
        self.logits_observer: Callable[[list[str], torch.Tensor], None] | None = None
        """Sees each step's sampling logits (request ids, ``[S, V]`` float32): for parity tests and debugging.
        The tensor may be a CUDA graph's logits buffer, which the next step overwrites: copy what you keep."""
        self.kv_cache = self._allocate_kv(self.num_blocks)
        logger.info(
            "KV pool: %d blocks of %d tokens (%d tokens, %.1f MiB, %s, scale %g) on %s",
            self.num_blocks, config.block_size, self.num_blocks * config.block_size,
            self.kv_cache.numel() * self.kv_cache.element_size() / 2**20, str(self.kv_dtype).removeprefix("torch."),
            config.kv_cache_scale, self.device,
        )
        self._token_host = [torch.zeros(rows, dtype=torch.int64).pin_memory() for _ in range(2)] if self.on_gpu else None
        self._launches = 0
        self.graphs: DecodeGraphs | None = None
        if self.on_gpu:
            self._compile_attention_variants()
            self._compile_gate_up_variants()
            self._load_logits_kernels()
        self.prefill_graphs: PrefillGraphs | None = None
        if self.on_gpu and not config.enforce_eager:
            held, (self.graphs, self.prefill_graphs) = _device_memory_taken(self.device, lambda: self._capture_graphs(
                self.kv_cache))
            self._log_graph_memory(held)

    def _interleave_gate_up(self, fused: bool) -> None:
        """With ``fused`` (``fused_gate_up``), the gate/up weights in the fused gate kernel's
        layout where that kernel can run; without, that kernel off (a model another engine
        interleaved keeps its layout, which the two-pass gate reads as well)."""
        from kernels.gate_up_silu_triton import FUSED_HALF, fused_gate_up_fits

        mc = self.model_config
        if fused and fused_gate_up_fits(mc.hidden_size, mc.intermediate_size, self.dtype, self.device):
            self.model.interleave_gate_up(FUSED_HALF, fused=True)
        else:
            for layer in self.model.layers:
                layer.mlp.fused_gate_up = False

    def _tune_matmuls(self) -> None:
        """Time cuBLASLt's algorithms for the model's matmul shapes at the row counts steps run
        most (``kernels/linear_tuning.py``): each decode graph size above the skinny kernel's
        rows (decode steps are padded to them) and the largest step (``max_num_batched_tokens``
        unless ``max_num_seqs`` x ``max_model_len`` is less); o and down as they run, adding
        into the residual.
        Before the KV budget is profiled, so its workspace counts as held."""
        import time

        from kernels import linear_tuning
        from kernels.linear import MAX_ROWS
        from worker.engine.cuda_graph import capture_sizes

        if self.dtype not in (torch.bfloat16, torch.float16):
            return
        weights: dict[tuple[int, int], list[torch.Tensor]] = {}
        for layer in self.model.layers:
            for w in (layer.self_attn.qkv_proj.weight, layer.self_attn.o_proj.weight,
                      layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight):
                weights.setdefault(tuple(w.shape), []).append(w)
        layer = self.model.layers[0]  # the projections that add into the residual stream
        accumulate = frozenset({tuple(layer.self_attn.o_proj.weight.shape), tuple(layer.mlp.down_proj.weight.shape)})
        rows = [] if self.config.enforce_eager else [s for s in capture_sizes(self._graph_batch_size()) if s > MAX_ROWS]
        largest = sum(self._largest_step())
        prefill_rows = [largest] if largest > MAX_ROWS else []
        began = time.perf_counter()
        cache = self._tuning_cache()
        # where the gate/up product runs the fused gate kernel instead, its matmul is not timed
        skip = frozenset()
        if self.model.layers[0].mlp.fused_gate_up:
            from kernels.gate_up_silu_triton import fused_for_rows

            gate_up = tuple(self.model.layers[0].mlp.gate_up_proj.weight.shape)
            skip = frozenset((gate_up, m) for m in rows + prefill_rows if fused_for_rows(m))
        try:
            results = linear_tuning.tune(weights, sorted(set(rows + prefill_rows)), accumulate=accumulate, cache=cache,
                                         skip=skip)
            # the logits matmul: one row a sampled sequence, so decode graph sizes only
            results += linear_tuning.tune({tuple(self.model.lm_head.weight.shape): [self.model.lm_head.weight]}, rows,
                                          cache=cache)
        except Exception:  # tuning is an optimisation: the engine serves with F.linear without it
            logger.warning("matmul tuning failed; every matmul runs F.linear", exc_info=True)
            linear_tuning.forget([w for ws in weights.values() for w in ws] + [self.model.lm_head.weight])
            gc.collect()
            torch.cuda.empty_cache()
            return
        if cache is not None:
            try:
                cache.save()
            except OSError as e:
                logger.warning("matmul tuning cache %s not written: %s", cache.path, e)
        chosen = [r for r in results if r.choice is not None]
        logger.info("matmul tuning: %d of %d shapes run a cuBLASLt algorithm faster than F.linear "
                    "(%.0f -> %.0f us summed over them) in %.1f s; %d shapes restored from %s", len(chosen),
                    len(results), sum(r.baseline_us for r in chosen), sum(r.best_us for r in chosen),
                    time.perf_counter() - began, sum(r.cached for r in results),
                    cache.path if cache is not None else "no cache")
        gc.collect()
        torch.cuda.empty_cache()

    def _tuning_cache(self):
        """The on-disk tuning outcomes for this device (``matmul_tuning_cache``), or None."""
        if not self.config.matmul_tuning_cache:
            return None
        from kernels.tuning_cache import TuningCache, environment, file_name
        from worker.models.hub import cache_dir

        try:
            return TuningCache(cache_dir() / file_name(), environment(self.device))
        except Exception:  # the cache only saves time: tune without it
            logger.warning("matmul tuning cache unavailable; timing every shape", exc_info=True)
            return None

    def _capture_graphs(self, kv_cache: torch.Tensor) -> tuple[DecodeGraphs, PrefillGraphs | None]:
        """The decode graphs and, with ``prefill_cuda_graphs``, the prefill graphs (one memory pool)."""
        cfg = self.config
        decode = DecodeGraphs(self.model, kv_cache, self._graph_batch_size(), self._blocks_per_seq(),
                              self._previous_tokens)
        prefill = None
        if cfg.prefill_cuda_graphs:
            prefill = PrefillGraphs(self.model, kv_cache, self._blocks_per_seq(), self._previous_tokens,
                                    min(cfg.max_num_batched_tokens, self.max_model_len), decode.pool)
        return decode, prefill

    def _log_graph_memory(self, held: int) -> None:
        """What capturing the graphs took from the device, beside what the KV budget set aside
        for them (the same graphs' memory, measured by a trial capture): a warning if they took
        more, since the KV pool then leaves less headroom than ``gpu_memory_utilization`` promises."""
        if self._graph_reserve is None:
            logger.info("CUDA graphs hold %.3f GiB", held / _GIB)
        elif held <= self._graph_reserve + (16 << 20):  # free memory moves in 2 MiB pages
            logger.info("CUDA graphs hold %.3f GiB of the %.3f GiB set aside for them", held / _GIB,
                        self._graph_reserve / _GIB)
        else:
            logger.warning("CUDA graphs hold %.3f GiB, more than the %.3f GiB set aside for them: the device may run "
                           "out of memory near gpu_memory_utilization 1.0", held / _GIB, self._graph_reserve / _GIB)

    @torch.inference_mode()
    def _compile_attention_variants(self) -> None:
        """Launch the decode kernel once per (tuning, split count) it can choose (on empty
        contexts: nothing is read; the tuning depends on the batch size, ``decode_tuning``) and
        the prefill kernel once per tuning it can choose (a two-token prompt), so no step ever
        waits for Triton's compiler."""
        # CUDA only: CPU machines need no Triton
        from kernels.paged_decode_triton import choose_num_splits, decode_tuning, tuning_table
        from kernels.paged_prefill_triton import LONG_QUERY

        mc, dev = self.model_config, self.device
        i32 = dict(dtype=torch.int32, device=dev)
        attn = self.model.layers[0].self_attn.attn
        cache_dtype = self.kv_cache.dtype
        width = block_table_width(self._blocks_per_seq())  # as every step's tables are
        table = tuning_table(cache_dtype)
        # each tuning at the smallest batch that takes it (a table may name one tuning twice):
        # there it may take the most splits
        smallest = {tuning: max(1, min(least for least, t in table if t == tuning)) for _, tuning in table}
        for batch in sorted({b for b in smallest.values() if b <= self.config.max_num_seqs}):
            q = torch.zeros((batch, mc.num_heads, mc.head_dim), dtype=self.dtype, device=dev)
            most = choose_num_splits(batch, mc.num_kv_heads, width * self.config.block_size, dev,
                                     decode_tuning(batch, cache_dtype))
            splits = 1
            while splits <= most:
                decode = DecodeBatch(rows=torch.arange(batch, **i32), block_tables=torch.zeros((batch, width), **i32),
                                     context_lens=torch.zeros(batch, **i32), num_splits=splits,
                                     order=torch.arange(batch, **i32))
                meta = AttentionMetadata(torch.full((batch,), -1, **i32), decode.block_tables, [], [], decode=decode)
                attn(q, self.kv_cache[0, 0], self.kv_cache[0, 1], meta)
                splits *= 2
        q = torch.zeros((2, mc.num_heads, mc.head_dim), dtype=self.dtype, device=dev)
        for max_query_len in (2, LONG_QUERY):  # the short- and the long-prompt tuning (one, GQA-packed)
            two = torch.tensor([2], **i32)
            prefill = PrefillBatch(query_start=torch.zeros(1, **i32), query_lens=two, context_lens=two,
                                   block_tables=torch.zeros((1, 16), **i32), max_query_len=max_query_len)
            meta = AttentionMetadata(torch.full((2,), -1, **i32), prefill.block_tables, [], [], prefill=prefill)
            attn(q, self.kv_cache[0, 0], self.kv_cache[0, 1], meta)
        if self.dense_prefill:  # step lengths with and without 16 | T (the descriptors' shapes)
            from kernels.rotary_store import rotary_and_store

            for tokens in (16, 17):
                q = torch.zeros((tokens, mc.num_heads, mc.head_dim), dtype=self.dtype, device=dev)
                kv = torch.zeros((tokens, 2, mc.num_kv_heads, mc.head_dim), dtype=self.dtype, device=dev)
                skip = torch.full((tokens,), -1, **i32)  # no slot written
                # the rotary kernel's variant that writes the keys out (a profile of the KV
                # budget would compile it too, but not an engine given its block count)
                q = rotary_and_store(q, kv[:, 0], kv[:, 1], torch.zeros(tokens, **i32), self.model.cos_sin,
                                     self.kv_cache[0, 0], self.kv_cache[0, 1], skip, attn.kv_scale,
                                     torch.empty_like(kv[:, 0]))
                dense = DenseBatch(query_start=torch.zeros(1, **i32), query_lens=torch.tensor([tokens], **i32),
                                   max_query_len=tokens)
                meta = AttentionMetadata(skip, torch.zeros((1, 16), **i32), [], [], dense=dense)
                attn(q, self.kv_cache[0, 0], self.kv_cache[0, 1], meta, kv[:, 0], kv[:, 1])
        torch.cuda.synchronize(dev)

    @torch.inference_mode()
    def _compile_gate_up_variants(self) -> None:
        """Run the fused gate/up kernel once per tuning a batch of this engine can take
        (``rows_per_tuning`` up to its largest step), so that no step compiles one: with
        ``enforce_eager`` nothing else would before the first batch of each band (graph
        capture compiles the decode graphs' ones)."""
        mlp = self.model.layers[0].mlp
        if not mlp.fused_gate_up:
            return
        from kernels.activation import gate_up_silu
        from kernels.gate_up_silu_triton import rows_per_tuning

        for rows in rows_per_tuning(max(sum(self._largest_step()), self.config.max_num_seqs)):
            x = torch.zeros((rows, self.model_config.hidden_size), dtype=self.dtype, device=self.device)
            gate_up_silu(x, mlp.gate_up_proj.weight, mlp.gate_up_interleave, fused=True)
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def _load_logits_kernels(self) -> None:
        """Compute logits (and their argmax) once for every number of rows a step can sample,
        1 to min(``max_num_seqs``, ``max_num_batched_tokens``), so that each matmul kernel
        cuBLAS picks by row count is loaded now. CUDA loads a kernel's module on its first
        launch (lazy loading), and loading allocates device memory, which synchronizes the
        device: in the middle of serving that leaves the host behind the step just launched
        instead of preparing the next. Greedy sampling only: the first non-greedy step still
        loads the sampler's kernels."""
        most = self._sampled_rows()
        hidden = torch.zeros((most, self.model_config.hidden_size), dtype=self.dtype, device=self.device)
        for rows in range(1, most + 1):
            self.model.compute_logits(hidden[:rows]).argmax(dim=-1)
        torch.cuda.synchronize(self.device)

    def bytes_per_block(self) -> int:
        mc = self.model_config
        elem = torch.tensor([], dtype=self.kv_dtype).element_size()
        return mc.num_layers * 2 * self.config.block_size * mc.num_kv_heads * mc.head_dim * elem

    def _allocate_kv(self, num_blocks: int) -> torch.Tensor:
        """A zeroed KV pool ``[num_layers, 2, num_blocks, block_size, kv_heads, head_dim]``.

        On CUDA it is a strided view of ``[..., num_blocks, kv_heads, block_size, head_dim]``
        storage: each KV head's rows of a block lie together (2 KiB for an fp8 head of 128
        at 16 tokens), so attention reads one run of memory per block and head instead of
        16 rows of 128 bytes 1 KiB apart (all KV heads of a slot); the kernels take strides, and a
        block is still one contiguous piece of each layer's pool (what a KV transfer
        moves). Measured on an H100 (``benchmarks/gpu_kernels.py --only decode_graph
        [--heads-major]``): fp8 decode attention at 256 sequences of 128-1280 tokens 140.5
        -> 135.6 us a layer (2.62 -> 2.72 TB/s), 128 sequences 79.7 -> 75.9; bf16 unchanged.
        The CPU pool stays in its natural order (the torch references' fast path)."""
        mc, cfg = self.model_config, self.config
        if not self.on_gpu:
            return torch.zeros((mc.num_layers, 2, num_blocks, cfg.block_size, mc.num_kv_heads, mc.head_dim),
                               dtype=self.kv_dtype, device=self.device)
        storage = torch.zeros((mc.num_layers, 2, num_blocks, mc.num_kv_heads, cfg.block_size, mc.head_dim),
                              dtype=self.kv_dtype, device=self.device)
        return storage.transpose(3, 4)

    def _graph_batch_size(self) -> int:
        return min(self.config.max_num_seqs, MAX_GRAPH_BATCH)

    def _blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.config.block_size)

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        budget = self.config.kv_cache_memory_bytes
        if budget is None:
            budget = self._profile_kv_budget() if self.on_gpu else DEFAULT_CPU_KV_BYTES
        blocks = budget // self.bytes_per_block()
        if blocks < 2:
            raise ValueError(
                f"KV cache budget of {budget} bytes holds {blocks} blocks of {self.bytes_per_block()} bytes; "
                "raise kv_cache_memory_bytes (or gpu_memory_utilization)"
            )
        return int(blocks)

    @torch.inference_mode()
    def _profile_kv_budget(self) -> int:
        """Bytes left for the KV pool: ``total * gpu_memory_utilization`` minus what the
        device holds once the model is loaded and warm (weights, CUDA context, kernels,
        workspaces), the activation peak of the largest step ``max_num_batched_tokens``
        allows or of sampling the most rows a step samples (the larger: the two never
        overlap), and what the CUDA graphs take, measured by capturing them once against a
        scratch cache (``_trial_capture``)."""
        dev, cfg = self.device, self.config
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        weights = torch.cuda.memory_allocated(dev)
        scratch = self._allocate_kv(self._largest_step_blocks())
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        self._run_largest_step(scratch)
        torch.cuda.synchronize(dev)
        step = torch.cuda.max_memory_allocated(dev) - base
        sampling = self._profile_sampling()
        graphs = self._trial_capture(scratch) if not cfg.enforce_eager else 0
        del scratch
        gc.collect()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        held = total - free  # weights, context, kernels, workspaces: what stays
        activations = max(step, sampling)
        self._graph_reserve = graphs
        budget = int(total * cfg.gpu_memory_utilization) - held - activations - graphs
        logger.info(
            "GPU memory: %.2f GiB total x %.2f utilization; held %.2f GiB (weights %.2f), activation peak %.2f GiB "
            "(%d-token step %.2f, sampling %d rows %.2f), CUDA graphs %.2f GiB -> KV pool %.2f GiB",
            total / _GIB, cfg.gpu_memory_utilization, held / _GIB, weights / _GIB, activations / _GIB,
            sum(self._largest_step()), step / _GIB, self._sampled_rows(), sampling / _GIB, graphs / _GIB, budget / _GIB,
        )
        if budget < 2 * self.bytes_per_block():
            raise ValueError(
                f"no GPU memory left for the KV pool: {total * cfg.gpu_memory_utilization / _GIB:.2f} GiB allowed "
                f"(gpu_memory_utilization={cfg.gpu_memory_utilization}), {(held + activations + graphs) / _GIB:.2f} GiB "
                "taken by weights, activations and graphs; raise gpu_memory_utilization or lower max_num_batched_tokens"
            )
        return budget

    def _largest_step(self) -> list[int]:
        """The prompt lengths of the largest step: ``max_num_batched_tokens`` prompt tokens in as
        few sequences as ``max_model_len`` allows (8,192 tokens may be two 4,096-token prompts)."""
        cfg = self.config
        return [min(self.max_model_len, cfg.max_num_batched_tokens - start)
                for start in range(0, cfg.max_num_batched_tokens, self.max_model_len)][: cfg.max_num_seqs]

    def _largest_step_blocks(self) -> int:
        return sum(-(-length // self.config.block_size) for length in self._largest_step())

    @torch.inference_mode()
    def _run_largest_step(self, kv_cache: torch.Tensor) -> None:
        """One forward of the largest step (and its logits' argmax) over blocks ``0..`` of
        ``kv_cache``: the KV budget's activation profile."""
        lens, bs = self._largest_step(), self.config.block_size
        n = sum(lens)
        tables, positions, slots, first = [], [], [], 0
        for length in lens:
            blocks = -(-length // bs)
            tables.append(list(range(first, first + blocks)))
            positions += range(length)
            slots += range(first * bs, first * bs + length)
            first += blocks
        meta, flat = self._gpu_metadata(lens, lens, tables, [0] * n, positions, slots,
                                        [n - 1] * min(self.config.max_num_seqs, n))
        hidden = self.model(flat["ids"], flat["positions"], kv_cache, meta)
        self.model.compute_logits(hidden.index_select(0, flat["logit_rows"])).argmax(dim=-1)

    def _sampled_rows(self) -> int:
        """The most rows one step samples: one per running sequence."""
        return min(self.config.max_num_seqs, self.config.max_num_batched_tokens)

    def _profile_sampling(self) -> int:
        """The memory peak of sampling the most rows a step samples with every option that
        costs memory (temperature, top-k and top-p: a float32 copy, a sort with int64
        indices, masks; log-probabilities with 20 alternatives), logits included."""
        dev = self.device
        lm_head = self.model.lm_head.weight
        rows = self._sampled_rows()
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        logits = torch.zeros((rows, lm_head.shape[0]), dtype=lm_head.dtype, device=dev)
        costly = SamplingOptions(temperature=0.7, top_p=0.9, top_k=50, logprobs=True, top_logprobs=20)
        sample_async(logits, [costly] * rows, [None] * rows).tokens.sum().item()
        peak = torch.cuda.max_memory_allocated(dev) - base
        del logits
        return peak

    def _trial_capture(self, scratch: torch.Tensor) -> int:
        """Bytes the CUDA graphs take: captured once against ``scratch`` (capturing reads no
        cache row and writes none), measured as free device memory before the capture
        against after their release, then released. What the first capture in a process
        also pays for good (the capture stream's cuBLAS workspace, kernels loaded for the
        first time) stays, and the budget counts it among what the device holds. An estimate
        from the largest graph's activation peak missed those: a review measured 77 MiB set
        aside on an H100 for a SmolLM2-shaped engine whose graphs took 174."""
        held, graphs = _device_memory_taken(self.device, lambda: self._capture_graphs(scratch))
        del graphs
        return _device_memory_freed(self.device, held)

    # ---- the step ------------------------------------------------------------
    @torch.inference_mode()
    def launch(self, plan: SchedulerOutput) -> PendingSample | None:
        """Enqueues the forward pass and sampling of ``plan`` without waiting for the device.

        An input token may still be a placeholder (``sampler.placeholder``): the token
        the previous launch sampled into that row, not yet on the host; it is taken
        from that launch's device tokens. Rows are the sampling sequences in plan order."""
        if not plan.scheduled:
            return None
        bs = self.config.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        query_lens: list[int] = []
        logit_rows: list[int] = []
        for item in plan.scheduled:
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            end = start + n
            table = seq.block_table
            if n == 1:  # the common decode case, without generators
                input_ids.append(seq.token_ids[start])
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                input_ids.extend(seq.token_ids[start:end])
                positions.extend(range(start, end))
                slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            context_lens.append(end)
            query_lens.append(n)
            if item.samples:
                logit_rows.append(len(input_ids) - 1)
        tables = [item.seq.block_table for item in plan.scheduled]
        if not self.on_gpu:
            logits = self._forward_reference(input_ids, positions, slots, context_lens, query_lens, tables, logit_rows)
        elif self.graphs is not None and len(input_ids) == len(plan.scheduled) <= self.graphs.max_batch_size:
            # every sequence has one new token: replay the decode graph (it fills placeholders itself)
            logits = self.graphs.run(input_ids, positions, slots, context_lens, tables)
            if len(logit_rows) < len(input_ids):
                logits = logits[to_device(logit_rows, torch.int64, self.device)] if logit_rows else None
        elif (self.prefill_graphs is not None and len(plan.scheduled) == 1
              and len(input_ids) <= self.prefill_graphs.max_tokens):
            # one sequence's prompt (or chunk) alone in the step: replay its token bucket's graph
            logits = self.prefill_graphs.run(input_ids, positions, slots, context_lens[0], tables[0])
            logits = logits if logit_rows else None
        else:
            logits = self._forward_gpu(input_ids, positions, slots, context_lens, query_lens, tables, logit_rows)
        if logits is None:
            return None
        sampling = [item for item in plan.scheduled if item.samples]
        if self.logits_observer is not None:
            self.logits_observer([item.seq.request_id for item in sampling], logits.float())
        host = None
        if self._token_host is not None:
            host = self._token_host[self._launches % 2]  # two steps are unresolved at most
            self._launches += 1
        pending = sample_async(logits, [item.seq.sampling for item in sampling],
                               [item.seq.generator for item in sampling], host)
        self._previous_tokens[: len(sampling)].copy_(pending.tokens)
        return pending

    def _forward_reference(self, input_ids, positions, slots, context_lens, query_lens, tables, logit_rows):
        max_blocks = max(len(t) for t in tables)
        padded = [t + [0] * (max_blocks - len(t)) for t in tables]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(padded, dtype=torch.int64, device=dev),
            context_lens=context_lens,
            query_lens=query_lens,
        )
        ids = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        if min(input_ids) < 0:
            ids = fill_placeholders(ids, self._previous_tokens)
        hidden = self.model(
            ids,
            torch.tensor(positions, dtype=torch.int64, device=dev),
            self.kv_cache,
            meta,
        )
        if not logit_rows:
            return None
        return self.model.compute_logits(hidden.index_select(0, torch.tensor(logit_rows, device=dev)))

    def _forward_gpu(self, input_ids, positions, slots, context_lens, query_lens, tables, logit_rows):
        meta, flat = self._gpu_metadata(query_lens, context_lens, tables, input_ids, positions, slots, logit_rows)
        ids = flat["ids"] if min(input_ids) >= 0 else fill_placeholders(flat["ids"], self._previous_tokens)
        hidden = self.model(ids, flat["positions"], self.kv_cache, meta)
        if not logit_rows:
            return None
        return self.model.compute_logits(hidden.index_select(0, flat["logit_rows"]))

    def _gpu_metadata(
        self,
        query_lens: list[int],
        context_lens: list[int],
        tables: list[list[int]],
        input_ids: list[int],
        positions: list[int],
        slots: list[int],
        logit_rows: list[int],
    ) -> tuple[AttentionMetadata, dict[str, torch.Tensor]]:
        """The step as int32 device tensors, all carved out of one host-to-device copy.

        Every slice starts 16-byte aligned and block tables are padded to a
        multiple of 16 columns (``block_table_width``), so the Triton kernels always
        see the same pointer alignment and stride divisibility: no recompilation mid-run.
        """
        q_lens = np.asarray(query_lens, dtype=np.int32)
        ctx = np.asarray(context_lens, dtype=np.int32)
        starts = np.zeros_like(q_lens)
        np.cumsum(q_lens[:-1], out=starts[1:])
        width = block_table_width(max(len(t) for t in tables))
        table = np.zeros((len(tables), width), dtype=np.int32)
        for i, t in enumerate(tables):
            table[i, : len(t)] = t
        dec = np.flatnonzero(q_lens == 1)
        is_dense = dense_prompts(q_lens, ctx) if self.dense_prefill else np.zeros(q_lens.size, dtype=bool)
        dense = np.flatnonzero(is_dense)
        pre = np.flatnonzero((q_lens > 1) & ~is_dense)
        parts = {
            "ids": np.asarray(input_ids, dtype=np.int32),
            "positions": np.asarray(positions, dtype=np.int32),
            "slots": np.asarray(slots, dtype=np.int32),
            "logit_rows": np.asarray(logit_rows, dtype=np.int32),
            "tables": table.ravel(),
            "dec_rows": starts[dec],
            "dec_ctx": ctx[dec],
            "dec_tables": table[dec].ravel(),
            "dec_order": longest_first(ctx[dec]),
            "pre_start": starts[pre],
            "pre_len": q_lens[pre],
            "pre_ctx": ctx[pre],
            "pre_tables": table[pre].ravel(),
            "dense_start": starts[dense],
            "dense_len": q_lens[dense],
        }
        padded = [np.pad(a, (0, -a.size % 4)) for a in parts.values()]
        host = torch.from_numpy(np.concatenate(padded)).pin_memory()
        flat = host.to(self.device, non_blocking=True)
        out: dict[str, torch.Tensor] = {}
        at = 0
        for (name, arr), pad in zip(parts.items(), padded):
            out[name] = flat[at : at + arr.size]
            at += pad.size
        decode = prefill = dense_batch = None
        if dec.size:
            decode = DecodeBatch(rows=out["dec_rows"], block_tables=out["dec_tables"].view(dec.size, width),
                                 context_lens=out["dec_ctx"], order=out["dec_order"])
        if pre.size:
            prefill = PrefillBatch(query_start=out["pre_start"], query_lens=out["pre_len"], context_lens=out["pre_ctx"],
                                   block_tables=out["pre_tables"].view(pre.size, width),
                                   max_query_len=int(q_lens[pre].max()))
        if dense.size:
            dense_batch = DenseBatch(query_start=out["dense_start"], query_lens=out["dense_len"],
                                     max_query_len=int(q_lens[dense].max()))
        meta = AttentionMetadata(
            slot_mapping=out["slots"],
            block_tables=out["tables"].view(len(tables), width),
            context_lens=context_lens,
            query_lens=query_lens,
            decode=decode,
            prefill=prefill,
            dense=dense_batch,
        )
        return meta, out


def _dense_prefill_fits(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Triton is here and the dense prefill kernel takes this model on this device
    (``prefill_dense_triton.dense_prefill_supported`` owns the conditions)."""
    from kernels.backend import HAS_TRITON

    if not HAS_TRITON:
        return False
    from kernels.prefill_dense_triton import dense_prefill_supported

    return dense_prefill_supported(device, dtype, head_dim)


def dense_prompts(query_lens: np.ndarray, context_lens: np.ndarray) -> np.ndarray:
    """Which sequences of a step go to the dense prefill kernel (bool mask): in a step of
    ``DENSE_MIN_STEP_TOKENS`` or more, those with several new tokens and no cached tokens
    before them (context = this step's tokens: a whole prompt, the first chunk of a long
    one, or a preempted request recomputed from its start). A prefix-cache hit or a later
    chunk has context beyond its new tokens, so it keeps the paged kernel."""
    if int(query_lens.sum()) < DENSE_MIN_STEP_TOKENS:
        return np.zeros(query_lens.size, dtype=bool)
    return (query_lens > 1) & (context_lens == query_lens)


def _device_memory_taken(device: torch.device, make):
    """``make()``'s result, and the device memory it took (free memory before against
    after, so allocations outside PyTorch's allocator count too)."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()  # cached blocks would hide allocations (capturing empties the cache too)
    before, _ = torch.cuda.mem_get_info(device)
    result = make()
    torch.cuda.synchronize(device)
    after, _ = torch.cuda.mem_get_info(device)
    return before - after, result


def _device_memory_freed(device: torch.device, taken: int) -> int:
    """Of ``taken`` bytes just taken, how many collecting garbage and emptying PyTorch's
    cache give back (call after dropping the references)."""
    before, _ = torch.cuda.mem_get_info(device)
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    after, _ = torch.cuda.mem_get_info(device)
    return min(taken, after - before)
