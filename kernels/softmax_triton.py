"""Flash attention's running softmax over one key tile, inside Triton kernels.

The decode, paged prefill and dense prefill kernels walk a query tile's keys
tile by tile, keeping each row's running maximum ``m_i`` and running sum
``l_i`` of ``exp2(score - m_i)``; a new tile's scores may raise the maximum, and
the sum and the output accumulated so far are then rescaled by ``alpha``. This
is that step, once for all three (base-2 scores: the callers fold ``log2 e``
into the scale). Not a kernel of its own: Triton inlines it, so each kernel
compiles to the same instructions as with the lines written out (the attention
kernels' sm_90 SASS was checked identical, ``benchmarks/decode_sass.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def online_softmax(s, m_i, l_i):
    """For scores ``s`` ``[rows, keys]`` (base 2, masked ones ``-inf``) after running maxima
    ``m_i`` and sums ``l_i`` ``[rows]``: the new maxima, the factor ``alpha`` that rescales
    what was accumulated before, the tile's weights ``p`` and the new sums. The caller then
    sets ``acc = acc * alpha[:, None] + p @ v``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return m_new, alpha, p, l_i * alpha + tl.sum(p, 1)
