"""A Llama-family decoder (Llama 2/3, Mistral without sliding window, SmolLM2).

Tokens of all sequences in a step are processed as one flat ``[T]`` batch
(no padding); only attention needs to know where sequences begin, and it
reads that from ``AttentionMetadata``. Q/K/V and gate/up projections are
fused into single matmuls at load time (``loader.py``). ``nn.Linear`` modules
hold the weights (their names are the checkpoint's); ``kernels.linear`` runs
the products, choosing the kernel by batch shape.

The residual stream is one tensor per step, updated in place: the o and down
projections add their products into it (``linear(accumulate=True)``, the add in
the matmul's epilogue) and each RMSNorm only reads it. With tensor parallelism
(row-parallel o/down) only one rank may accumulate; the others write their
partial product and the all-reduce sums them.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.activation import gate_up_silu, interleave_gate_up
from kernels.linear import linear
from kernels.rmsnorm import rms_norm
from kernels.rotary import build_cos_sin_cache
from kernels.rotary_store import rotary_and_store
from worker.models.attention import AttentionMetadata, PagedAttention
from worker.models.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.attn = PagedAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)

    def forward(self, x, positions, cos_sin, k_cache, v_cache, meta: AttentionMetadata, residual: torch.Tensor):
        """Adds the layer's attention output to ``residual`` in place (the o projection's own add)."""
        qkv = linear(x, self.qkv_proj.weight)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        # a step with cache-free prompts (``meta.dense``) also keeps the rotated keys, unquantized
        k_rot = None if meta.dense is None else torch.empty(k.shape, dtype=k.dtype, device=k.device)
        q = rotary_and_store(q, k, v, positions, cos_sin, k_cache, v_cache, meta.slot_mapping, self.attn.kv_scale,
                             k_rot)
        o = self.attn(q, k_cache, v_cache, meta, k_rot, v)
        return linear(o.reshape(-1, self.q_size), self.o_proj.weight, out=residual, accumulate=True)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_interleave = 0
        """The order of ``gate_up_proj``'s rows: ``[gate; up]`` (0, as loaded) or runs of
        this many (``kernels.activation.interleave_gate_up``; ``LlamaForCausalLM.interleave_gate_up``)."""
        self.fused_gate_up = False
        """Whether large CUDA batches may run the fused gate/up + SiLU kernel (set by the runner)."""

    def forward(self, x, residual: torch.Tensor):
        """Adds the MLP's output to ``residual`` in place (the down projection's own add)."""
        return linear(gate_up_silu(x, self.gate_up_proj.weight, self.gate_up_interleave, self.fused_gate_up),
                      self.down_proj.weight, out=residual, accumulate=True)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, residual, positions, cos_sin, k_cache, v_cache, meta):
        """Updates the residual stream ``residual`` in place and returns it: each sublayer's
        output projection adds into it (``linear(accumulate=True)``), each norm reads it."""
        self.self_attn(self.input_layernorm(residual), positions, cos_sin, k_cache, v_cache, meta, residual)
        self.mlp(self.post_attention_layernorm(residual), residual)
        return residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.cos_sin: torch.Tensor | None = None
        self.requires_grad_(False)

    def interleave_gate_up(self, interleave: int, fused: bool = False) -> None:
        """Reorder every layer's gate/up weight rows in runs of ``interleave`` (the fused
        gate kernel's layout, ``kernels/gate_up_silu_triton.py``); the MLPs read them so on
        every device, with ``fused`` through that kernel where it applies. Once: a model
        already interleaved keeps its weights. The weights are replaced, not rewritten in
        place: a model serves one live engine (another's CUDA graphs would still read the
        old tensors)."""
        done = {layer.mlp.gate_up_interleave for layer in self.layers} - {0, interleave}
        if done:
            raise ValueError(f"gate/up weights are interleaved by {done.pop()}, not {interleave}")
        for layer in self.layers:
            mlp = layer.mlp
            if mlp.gate_up_interleave == 0:
                mlp.gate_up_proj.weight.data = interleave_gate_up(mlp.gate_up_proj.weight.data, interleave)
                mlp.gate_up_interleave = interleave
            mlp.fused_gate_up = fused

    def init_rope(self, max_positions: int, device: torch.device) -> None:
        """Build the float32 cos/sin table for positions ``[0, max_positions)``."""
        c = self.config
        self.cos_sin = build_cos_sin_cache(c.head_dim, max_positions, c.rope_theta, c.rope_scaling, torch.float32, device)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` after the final norm.

        ``kv_cache``: ``[num_layers, 2, num_blocks, block_size, Hk, D]``.
        """
        residual = self.embed_tokens(input_ids)  # a fresh tensor: the layers add into it in place
        for i, layer in enumerate(self.layers):
            layer(residual, positions, self.cos_sin, kv_cache[i, 0], kv_cache[i, 1], meta)
        return self.norm(residual)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[S, V]`` in the model's dtype (into ``out`` if given: a CUDA graph's
        static buffer). Not widened here: a greedy step's argmax
        reads them as they are (widening is exact, so the argmax is the same), and the
        sampler widens to float32 only where it computes with them (a float32 copy of a
        256 x 128k batch costs a decode step ~0.1 ms on an H100)."""
        return linear(hidden, self.lm_head.weight, out=out)
