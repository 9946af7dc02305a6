"""``LlamaForCausalLM.fold_norms``: the GPU path's norm-folded model computes the same function.

Folding moves each RMSNorm's scale into the columns of the matmul that reads
it; the folded forward then normalises without a scale and adds residuals in
the output projections (``kernels.linear.norm_linear`` / ``linear_add``; on
CPU their torch forms). Checked in float32 against the unfolded model on the
same weights, where the only difference is rounding order (tolerance 1e-5
relative to the largest logit), with norm scales far from 1 so a fold that
missed a norm, applied one twice or scaled the wrong axis would be off by
~10-50 %.
"""

from __future__ import annotations

import copy

import pytest
import torch

from kernels.linear import linear_add, norm_linear
from kernels.rmsnorm import rms_norm_ref
from worker.models.attention import AttentionMetadata
from worker.models.config import ModelConfig
from worker.models.loader import load_dummy_model, load_model

TOL = 1e-5


def _logits(model, prompt: list[int], block_size: int = 16) -> torch.Tensor:
    """All rows' logits of one prefill of ``prompt`` through the reference attention path."""
    cfg = model.config
    n = len(prompt)
    blocks = (n + block_size - 1) // block_size
    cache = torch.zeros((cfg.num_layers, 2, blocks, block_size, cfg.num_kv_heads, cfg.head_dim))
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n), block_tables=torch.arange(blocks)[None, :], context_lens=[n], query_lens=[n]
    )
    hidden = model(torch.tensor(prompt), torch.arange(n), cache, meta)
    return model.compute_logits(hidden)


def _scramble_norms(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 1.5 + 0.25)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("tied", [False, True])
def test_folded_model_matches_unfolded(tmp_path, tied) -> None:
    raw = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-5,
               tie_word_embeddings=tied)
    cfg = _config(tmp_path, raw)
    model = load_dummy_model(cfg, 128, torch.device("cpu"), torch.float32, seed=3)
    _scramble_norms(model)
    with torch.no_grad():  # dummy weights are small: make the logits spread so argmax is meaningful
        model.lm_head.weight.mul_(20)
    embed_before = model.embed_tokens.weight.clone()
    folded = copy.deepcopy(model)
    folded.fold_norms()
    folded.fold_norms()  # idempotent
    assert folded.norms_folded and not model.norms_folded
    assert torch.equal(folded.embed_tokens.weight, embed_before), "the final norm's scale leaked into tied embeddings"
    for name, p in folded.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
    prompt = [(7 * i + 3) % 300 for i in range(37)]
    ref, out = _logits(model, prompt), _logits(folded, prompt)
    assert _rel(out, ref) < TOL
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def _config(tmp_path, raw) -> ModelConfig:
    import json

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **raw}))
    return ModelConfig.from_dir(tmp_path)


def test_folded_smollm2_matches_unfolded(smollm2_dir) -> None:
    model = load_model(smollm2_dir, 512, torch.device("cpu"), torch.float32)
    folded = copy.deepcopy(model)
    folded.fold_norms()
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2]
    ref, out = _logits(model, prompt), _logits(folded, prompt)
    assert _rel(out, ref) < TOL
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_cpu_forms_of_the_fused_ops() -> None:
    """What the skinny kernel's fused forms mean, in torch: ``linear_add`` is ``x @ W.T + r``
    (no partials off the skinny path) and ``norm_linear`` normalises without a scale."""
    torch.manual_seed(0)
    x, w, r = torch.randn(5, 32), torch.randn(24, 32), torch.randn(5, 24)
    out, sumsq = linear_add(x, w, r)
    assert sumsq is None
    torch.testing.assert_close(out, x @ w.t() + r)
    torch.testing.assert_close(norm_linear(x, w, 1e-6), rms_norm_ref(x, None, 1e-6) @ w.t())
    g = torch.rand(32) + 0.5
    torch.testing.assert_close(norm_linear(x, w * g, 1e-6), rms_norm_ref(x, g, 1e-6) @ w.t(), rtol=1e-5, atol=1e-5)
