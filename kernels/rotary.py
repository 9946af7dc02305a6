"""Rotary position embedding (rotate-half layout, as in Hugging Face Llama).

``cos_sin_cache`` holds ``cos`` and ``sin`` for every position up to the
context window, built once from the model's RoPE settings (base, scaling); the
kernel gathers rows by position, so any mix of positions in one flat batch is
fine (chunked prefill and decode together). The model rotates through
``rotary_store.py``, which also writes the rotated keys into the paged cache;
this file holds the table and the torch reference of the rotation.
"""

from __future__ import annotations

import math

import torch


def rope_inv_freq(head_dim: int, base: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies, with Llama-3 and linear scaling applied.

    Llama-3 scaling keeps high frequencies, divides low frequencies by
    ``factor`` and interpolates smoothly between two wavelength bounds.
    Computed in float32 exactly as the reference implementation does, so
    greedy outputs can be compared token for token.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq.float()
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq.float()
    factor = float(scaling["factor"])
    if kind == "linear":
        return (inv_freq / factor).float()
    if kind == "llama3":
        low_ff = float(scaling.get("low_freq_factor", 1.0))
        high_ff = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen = old_len / low_ff
        high_wavelen = old_len / high_ff
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled).float()
    raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3")


def build_cos_sin_cache(
    head_dim: int, max_positions: int, base: float, scaling: dict | None, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``[max_positions, head_dim]``: cos in the first half, sin in the second."""
    inv_freq = rope_inv_freq(head_dim, base, scaling)
    t = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype=dtype, device=device)


def apply_rotary_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` ``[T, Hq, D]`` and ``k`` ``[T, Hk, D]`` by their token positions ``[T]``."""
    half = q.shape[-1] // 2
    cs = cos_sin_cache.index_select(0, positions)
    cos = cs[:, None, :half].to(q.dtype)
    sin = cs[:, None, half:].to(q.dtype)

    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    return rot(q), rot(k)

