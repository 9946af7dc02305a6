"""Programmatic dependent launch (PDL): the decode path's kernels overlap their launch with the previous kernel's tail.

A decode step of a small batch is ~320 short kernels; between two of them the
GPU drains one grid and starts the next, ~1 us each (0.35 ms of a 6.2 ms
batch-1 step on an H100). Launched with PDL (Hopper and later), a kernel may
start while its predecessor is still running; each of ours first waits for
the predecessor to finish and its writes to be visible (``griddepcontrol.wait``),
then lets its own successor start launching. Every kernel that is launched
with PDL calls this prologue unconditionally before touching anything an
earlier kernel writes, so completion stays transitive: when kernel N+1 is
done, so is kernel N. (The skinny matmul loads its first weight tile before
the prologue: weights are constant, and that load is the point of starting
early.) Kernels launched without
PDL (cuBLAS, torch) keep the ordinary full dependency in both directions.

Not a kernel of its own: a helper the kernels call, like ``rounding_triton.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def pdl_prologue(USE_PDL: tl.constexpr):
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
