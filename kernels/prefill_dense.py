"""Causal attention of cache-free prompts over their own new keys: the torch reference.

A prompt whose context is exactly this step's rows (no cached prefix) needs no
cache read: its keys and values are the step's own rotated K and V. On a Hopper
GPU ``prefill_dense_triton.py`` runs this through TMA descriptors (the model
runner sends such prompts there, ``worker.models.attention.DenseBatch``); its
tests compare it with this function. Elsewhere the engine reads every prompt
back from the paged cache (``paged_prefill_triton.py`` on CUDA,
``paged_attention.py`` on CPU), which for these prompts computes the same thing
over a 16-bit cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backend import HAS_TRITON, use_triton

if HAS_TRITON:
    from kernels.prefill_dense_triton import dense_prefill_attention as dense_prefill_attention_triton


def dense_prefill_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_start: torch.Tensor,
    query_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """``q``/``out`` ``[T, Hq, D]``, ``k``/``v`` ``[T, Hk, D]``; sequence ``i`` owns rows
    ``query_start[i] : query_start[i] + query_lens[i]`` and attends causally to its own
    rows' keys. Writes those rows of ``out`` (one SDPA call per sequence, in ``q``'s
    dtype; grouped-query heads without copying K/V)."""
    group = q.shape[1] // k.shape[1]
    for start, n in zip(query_start.tolist(), query_lens.tolist()):
        rows = slice(start, start + n)
        o = F.scaled_dot_product_attention(q[rows].transpose(0, 1), k[rows].transpose(0, 1),
                                           v[rows].transpose(0, 1), is_causal=True, scale=scale,
                                           enable_gqa=group > 1)
        out[rows] = o.transpose(0, 1)
    return out


def dense_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_start: torch.Tensor,
    query_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """The Triton kernel on CUDA, else the reference (same arguments; ``max_query_len``
    sizes the kernel's grid)."""
    if use_triton(q):
        return dense_prefill_attention_triton(q, k, v, query_start, query_lens, max_query_len, scale, out)
    return dense_prefill_attention_ref(q, k, v, query_start, query_lens, scale, out)
