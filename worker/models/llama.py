"""A Llama-family decoder (Llama 2/3, Mistral without sliding window, SmolLM2).

Tokens of all sequences in a step are processed as one flat ``[T]`` batch
(no padding); only attention needs to know where sequences begin, and it
reads that from ``AttentionMetadata``. Q/K/V and gate/up projections are
fused into single matmuls at load time (``loader.py``). ``nn.Linear`` modules
hold the weights (their names are the checkpoint's); ``kernels.linear`` runs
the products, choosing the kernel by batch shape.

Two ways to run the same weights. As loaded, every RMSNorm is its own pass
(fused with the residual add before it): the CPU reference path. After
``fold_norms`` (the GPU path) each norm's scale lives in the columns of the
matmul that reads its output, the residual add happens in the epilogue of the
matmul that produces the sublayer output, and that matmul also leaves the
rows' sums of squares, so the next matmul applies ``1/rms`` to its own output:
at decode batch sizes no norm pass runs between matmuls at all (two of ~9
launches per layer fewer; at batch 1 a step is launch-boundary bound once the
weights stream at bandwidth).
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.activation import silu_and_mul
from kernels.linear import linear, linear_add, norm_linear
from kernels.rmsnorm import add_rms_norm, rms_norm
from kernels.rotary import build_cos_sin_cache
from kernels.rotary_store import rotary_and_store
from worker.models.attention import AttentionMetadata, PagedAttention
from worker.models.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)


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

    def forward(self, x, positions, cos_sin, k_cache, v_cache, meta: AttentionMetadata):
        o = self.attend(linear(x, self.qkv_proj.weight), positions, cos_sin, k_cache, v_cache, meta)
        return linear(o, self.o_proj.weight)

    def attend(self, qkv, positions, cos_sin, k_cache, v_cache, meta: AttentionMetadata):
        """Attention output ``[T, Hq * D]`` (before the output projection) from the fused q/k/v."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q = rotary_and_store(q, k, v, positions, cos_sin, k_cache, v_cache, meta.slot_mapping, self.attn.kv_scale)
        o = self.attn(q, k_cache, v_cache, meta)
        return o.reshape(-1, self.q_size)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return linear(silu_and_mul(linear(x, self.gate_up_proj.weight)), self.down_proj.weight)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, residual, positions, cos_sin, k_cache, v_cache, meta):
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, positions, cos_sin, k_cache, v_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual

    def forward_folded(self, x, sumsq, positions, cos_sin, k_cache, v_cache, meta):
        """The layer on norm-folded weights: ``x`` is the residual stream itself, ``sumsq``
        its rows' sum-of-squares partials (None: ``norm_linear`` normalises in a pass).
        Returns the next residual stream and its partials."""
        attn, mlp, eps = self.self_attn, self.mlp, self.input_layernorm.eps
        qkv = norm_linear(x, attn.qkv_proj.weight, eps, sumsq)
        o = attn.attend(qkv, positions, cos_sin, k_cache, v_cache, meta)
        x, sumsq = linear_add(o, attn.o_proj.weight, x)
        gate_up = norm_linear(x, mlp.gate_up_proj.weight, self.post_attention_layernorm.eps, sumsq)
        return linear_add(silu_and_mul(gate_up), mlp.down_proj.weight, x)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.cos_sin: torch.Tensor | None = None
        self.norms_folded = False
        self.requires_grad_(False)

    @torch.no_grad()
    def fold_norms(self) -> None:
        """Moves every RMSNorm's scale into the columns of the matmul that reads the norm's
        output (``W[:, j] *= g[j]``, rounded once to the weight dtype) and sets the norm's
        weight to ones, so the model computes the same function either way; then runs
        the folded form (``forward_folded``). A tied output projection is untied first
        (the final norm's scale must not reach the embeddings). Idempotent."""
        if self.norms_folded:
            return
        if self.lm_head.weight.data_ptr() == self.embed_tokens.weight.data_ptr():
            self.lm_head.weight = nn.Parameter(self.embed_tokens.weight.detach().clone(), requires_grad=False)
        pairs = [(layer.input_layernorm, layer.self_attn.qkv_proj) for layer in self.layers]
        pairs += [(layer.post_attention_layernorm, layer.mlp.gate_up_proj) for layer in self.layers]
        pairs.append((self.norm, self.lm_head))
        for norm, proj in pairs:
            w, g = proj.weight, norm.weight.float()
            for start in range(0, w.shape[0], 8192):  # bounded float32 scratch
                w[start : start + 8192] = (w[start : start + 8192].float() * g).to(w.dtype)
            norm.weight.fill_(1.0)
        self.norms_folded = True

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
        """The residual stream ``[T, hidden]`` after the last layer (before the final
        norm, which ``compute_logits`` applies to the rows it is given).

        ``kv_cache``: ``[num_layers, 2, num_blocks, block_size, Hk, D]``.
        """
        x = self.embed_tokens(input_ids)
        if self.norms_folded:
            sumsq = None
            for i, layer in enumerate(self.layers):
                x, sumsq = layer.forward_folded(x, sumsq, positions, self.cos_sin, kv_cache[i, 0], kv_cache[i, 1], meta)
            return x
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, positions, self.cos_sin, kv_cache[i, 0], kv_cache[i, 1], meta)
        return x + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits of rows of ``forward``'s output: final norm, then the output projection."""
        if self.norms_folded:
            return norm_linear(hidden, self.lm_head.weight, self.norm.eps).float()
        return linear(self.norm(hidden), self.lm_head.weight).float()
