"""The tuner's selection rule (CPU: the timing itself needs CUDA, tests/test_kernels_gpu.py)."""

from __future__ import annotations

import torch

from kernels import linear_tuning
from kernels.linear import linear


def test_choose_keeps_the_baseline_unless_the_fastest_clears_the_margin():
    assert linear_tuning.choose(100.0, [], 0.02) is None
    assert linear_tuning.choose(100.0, [(99.0, "a"), (98.5, "b")], 0.02) is None  # within noise
    assert linear_tuning.choose(100.0, [(99.0, "a"), (97.0, "b"), (98.0, "c")], 0.02) == "b"
    assert linear_tuning.choose(100.0, [(150.0, "a")], -1.0) == "a"  # negative margin: always the fastest


def test_cpu_linear_ignores_the_table():
    x, w = torch.randn(32, 8), torch.randn(4, 8)
    assert linear_tuning.lookup(x, w) is None
    torch.testing.assert_close(linear(x, w), x @ w.t())


def test_cpu_linear_accumulates_into_out():
    x, w, residual = torch.randn(5, 8), torch.randn(4, 8), torch.randn(5, 4)
    into = residual.clone()
    assert linear(x, w, out=into, accumulate=True) is into
    torch.testing.assert_close(into, residual + x @ w.t())
