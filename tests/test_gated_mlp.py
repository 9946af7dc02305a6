"""The MLP's gate with the gate/up weight interleaved (``kernels/activation.py``): the layout,
the reference over it, and a model that keeps it (CPU; the fused Triton kernel over the same
layout is tested against this reference on a GPU, tests/test_kernels_gpu.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.activation import gate_up_silu, gate_up_silu_ref, interleave_gate_up, silu_and_mul, silu_and_mul_ref
from worker.engine.config import EngineConfig
from worker.engine.engine import LLMEngine
from worker.engine.types import EngineRequest, SamplingOptions


def test_interleaved_rows_alternate_gate_and_up_runs():
    inter, k, run = 8, 3, 2
    w = torch.arange(2 * inter, dtype=torch.float32)[:, None].expand(2 * inter, k).contiguous()
    got = interleave_gate_up(w, run)[:, 0].tolist()
    assert got == [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15]
    with pytest.raises(ValueError, match="interleave must divide the intermediate size 8"):
        interleave_gate_up(w, 3)


@pytest.mark.parametrize("run", [1, 4, 16, 64])
def test_gate_over_the_interleaved_layout_equals_the_plain_one(run):
    torch.manual_seed(0)
    x, w = torch.randn(5, 32), torch.randn(2 * 64, 32)
    want = F.silu(x @ w[:64].t()) * (x @ w[64:].t())
    torch.testing.assert_close(gate_up_silu_ref(x, w), want)
    torch.testing.assert_close(gate_up_silu_ref(x, interleave_gate_up(w, run), run), want)
    torch.testing.assert_close(gate_up_silu(x, interleave_gate_up(w, run), run), want)  # CPU: the reference path
    product = x @ interleave_gate_up(w, run).t()
    torch.testing.assert_close(silu_and_mul(product, run), want)
    torch.testing.assert_close(silu_and_mul_ref(product.unsqueeze(0), run)[0], want)  # leading dims kept


def _generate(engine: LLMEngine, prompts: list[list[int]]) -> dict[str, list[int]]:
    opts = SamplingOptions(temperature=0.0, max_tokens=8, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(f"r{i}", tuple(p), opts))
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return out


def test_a_model_with_interleaved_weights_generates_the_same(tiny_model_dir):
    """The engine's model with its gate/up weights interleaved (as the CUDA runner keeps
    them for the fused kernel) generates what the model as loaded does; interleaving
    twice changes nothing, another run length is refused."""
    prompts = [[5, 17, 33, 2, 9], list(range(1, 40)), [200, 100, 50]]
    config = EngineConfig(model=str(tiny_model_dir), device="cpu", block_size=4, num_kv_blocks=64,
                          max_num_batched_tokens=16)
    plain = _generate(LLMEngine(config), prompts)
    engine = LLMEngine(config)
    model = engine.runner.model
    before = model.layers[0].mlp.gate_up_proj.weight.clone()
    model.interleave_gate_up(32)
    model.interleave_gate_up(32)
    assert all(layer.mlp.gate_up_interleave == 32 for layer in model.layers)
    torch.testing.assert_close(model.layers[0].mlp.gate_up_proj.weight, interleave_gate_up(before, 32))
    with pytest.raises(ValueError, match="interleaved by 32, not 64"):
        model.interleave_gate_up(64, fused=True)
    assert not any(layer.mlp.fused_gate_up for layer in model.layers)  # refused before any change
    assert _generate(engine, prompts) == plain
