"""The fp8 KV cache's number format: how keys and values are stored and read back.

A cache of dtype ``float8_e4m3fn`` holds ``value / scale`` rounded to the
nearest e4m3 number and saturated to ``+-448`` (e4m3fn has no infinity: an
unclamped cast of a large value could give NaN); reading gives
``stored * scale``. One per-tensor scale serves keys and values alike; 1.0
(vLLM's default without calibrated scales) suits activations whose K/V stay
well inside ``+-448``. Any other cache dtype stores values as they are.

These are the torch references: ``cache_ops.store_kv_ref`` and
``paged_attention_ref`` call them, and the Triton kernels compute the same
thing (``x * (1/scale)`` in float32, clamp, round to nearest even on the way
in; ``stored * scale`` on the way out, folded into the softmax scale and the
output normalisation).
"""

from __future__ import annotations

import torch

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_KV_DTYPE).max  # 448.0


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8_KV_DTYPE


def inverse_scale(scale: float) -> float:
    """``1 / scale`` rounded to float32, the factor every writer multiplies by."""
    return torch.tensor(1.0 / scale, dtype=torch.float32).item()


def quantize_ref(x: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """``x`` as the cache stores it: for fp8, ``x * (1/scale)`` in float32, clamped to
    ``+-FP8_MAX``, rounded to e4m3; otherwise ``x`` cast to ``cache_dtype``."""
    if not is_fp8(cache_dtype):
        return x.to(cache_dtype)
    return (x.float() * inverse_scale(scale)).clamp(-FP8_MAX, FP8_MAX).to(cache_dtype)


def dequantize_ref(stored: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """What the cache holds, as ``dtype``: fp8 reads back as ``stored * scale`` (in
    float32, rounded once to ``dtype``); other caches are returned unchanged."""
    if not is_fp8(stored.dtype):
        return stored
    return (stored.float() * scale).to(dtype)
