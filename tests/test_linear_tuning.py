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


def test_cpu_linear_ignores_the_table(monkeypatch):
    """Even with an entry for exactly this product, a CPU tensor never reaches cuBLASLt."""
    x, w = torch.randn(32, 8), torch.randn(4, 8)
    monkeypatch.setattr(linear_tuning, "ALIGNMENT", 1)  # so only the CUDA check stands between x and the entry
    monkeypatch.setitem(linear_tuning._table, (32, w.data_ptr(), x.dtype, None), ("mm", "candidate", "workspace"))
    assert linear_tuning.lookup(x, w) is not None

    def fail(*args, **kwargs):
        raise AssertionError("the tuned path ran for a CPU tensor")

    monkeypatch.setattr(linear_tuning, "run", fail)
    torch.testing.assert_close(linear(x, w), x @ w.t())
    into = torch.zeros(32, 4)
    torch.testing.assert_close(linear(x, w, out=into, accumulate=True), x @ w.t())


def test_forget_drops_only_those_weights(monkeypatch):
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    monkeypatch.setattr(linear_tuning, "_table", {(32, a.data_ptr(), a.dtype, 0): 1, (64, a.data_ptr(), a.dtype, 0): 2,
                                                  (32, b.data_ptr(), b.dtype, 0): 3})
    linear_tuning.forget([a])
    assert list(linear_tuning._table.values()) == [3]


def test_cpu_linear_accumulates_into_out():
    x, w, residual = torch.randn(5, 8), torch.randn(4, 8), torch.randn(5, 4)
    into = residual.clone()
    assert linear(x, w, out=into, accumulate=True) is into
    torch.testing.assert_close(into, residual + x @ w.t())
