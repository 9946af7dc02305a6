"""Runs one scheduled step through the model: flat inputs in, sampled tokens out.

Owns the model, the device, and the KV pool tensor
``[num_layers, 2, num_blocks, block_size, kv_heads, head_dim]``. The pool is
allocated once; its size comes from a memory budget (or an exact block count).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from worker.engine.config import EngineConfig
from worker.engine.sampler import SamplerResult, sample
from worker.engine.scheduler import SchedulerOutput
from worker.models.attention import AttentionMetadata
from worker.models.config import ModelConfig
from worker.models.loader import load_model

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_CPU_KV_BYTES = 1 << 30


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig) -> None:
        self.config = config
        self.model_config = model_config
        self.device = resolve_device(config.device)
        if config.dtype == "auto":
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            self.dtype = _DTYPES[config.dtype]
        self.max_model_len = min(config.max_model_len or model_config.max_position_embeddings, model_config.max_position_embeddings)
        self.model = load_model(Path(config.model), self.max_model_len, self.device, self.dtype)
        self.num_blocks = self._num_kv_blocks()
        self.logits_observer: Callable[[list[str], torch.Tensor], None] | None = None
        """Sees each step's sampling logits (request ids, ``[S, V]``): for parity tests and debugging."""
        mc = model_config
        self.kv_cache = torch.zeros(
            (mc.num_layers, 2, self.num_blocks, config.block_size, mc.num_kv_heads, mc.head_dim),
            dtype=self.dtype,
            device=self.device,
        )
        logger.info(
            "KV pool: %d blocks of %d tokens (%d tokens, %.1f MiB) on %s",
            self.num_blocks, config.block_size, self.num_blocks * config.block_size,
            self.kv_cache.numel() * self.kv_cache.element_size() / 2**20, self.device,
        )

    def bytes_per_block(self) -> int:
        mc = self.model_config
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return mc.num_layers * 2 * self.config.block_size * mc.num_kv_heads * mc.head_dim * elem

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        budget = self.config.kv_cache_memory_bytes
        if budget is None:
            if self.device.type == "cuda":
                free, _total = torch.cuda.mem_get_info(self.device)
                budget = int(free * 0.9)
            else:
                budget = DEFAULT_CPU_KV_BYTES
        blocks = budget // self.bytes_per_block()
        if blocks < 2:
            raise ValueError(
                f"KV cache budget of {budget} bytes holds {blocks} blocks of {self.bytes_per_block()} bytes; "
                "raise kv_cache_memory_bytes"
            )
        return int(blocks)

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> SamplerResult | None:
        """Runs the forward pass of ``plan``; samples for sequences whose known tokens are all computed."""
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
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            context_lens.append(end)
            query_lens.append(n)
            if item.samples:
                logit_rows.append(len(input_ids) - 1)
        max_blocks = max(len(item.seq.block_table) for item in plan.scheduled)
        tables = [item.seq.block_table + [0] * (max_blocks - len(item.seq.block_table)) for item in plan.scheduled]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int64, device=dev),
            context_lens=context_lens,
            query_lens=query_lens,
        )
        hidden = self.model(
            torch.tensor(input_ids, dtype=torch.int64, device=dev),
            torch.tensor(positions, dtype=torch.int64, device=dev),
            self.kv_cache,
            meta,
        )
        if not logit_rows:
            return None
        logits = self.model.compute_logits(hidden.index_select(0, torch.tensor(logit_rows, device=dev)))
        sampling = [item for item in plan.scheduled if item.samples]
        if self.logits_observer is not None:
            self.logits_observer([item.seq.request_id for item in sampling], logits)
        return sample(
            logits,
            [item.seq.sampling for item in sampling],
            [item.seq.generator for item in sampling],
        )
