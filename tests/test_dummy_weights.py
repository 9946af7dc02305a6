"""``load_format="dummy"``: a model from config.json alone, with seeded random weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from worker.cli import add_worker_args, config_from_args
from worker.engine.config import EngineConfig
from worker.engine.engine import LLMEngine
from worker.engine.types import EngineRequest, SamplingOptions
from worker.models.config import ModelConfig
from worker.models.llama import RMSNorm
from worker.models.loader import DUMMY_STD, load_dummy_model

TINY = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)


@pytest.fixture(scope="module")
def config_only_dir(tmp_path_factory) -> Path:
    """A model directory with nothing but config.json."""
    path = tmp_path_factory.mktemp("config-only")
    (path / "config.json").write_text(json.dumps(TINY))
    return path


def dummy(model_dir: Path, seed: int = 0, dtype: torch.dtype = torch.float32):
    return load_dummy_model(ModelConfig.from_dir(model_dir), 256, torch.device("cpu"), dtype, seed=seed)


def test_same_seed_same_weights_other_seed_other_weights(config_only_dir) -> None:
    a, b, c = dummy(config_only_dir), dummy(config_only_dir), dummy(config_only_dir, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    assert not torch.equal(sa["layers.0.self_attn.qkv_proj.weight"], sc["layers.0.self_attn.qkv_proj.weight"])


def test_dummy_weights_distribution_and_dtype(config_only_dir) -> None:
    model = dummy(config_only_dir, dtype=torch.bfloat16)
    for name, param in model.named_parameters():
        assert param.dtype == torch.bfloat16 and param.device.type == "cpu", name
        if isinstance(model.get_submodule(name.rpartition(".")[0]), RMSNorm):
            assert torch.all(param == 1), name
        else:
            assert abs(param.float().std().item() - DUMMY_STD) < 0.1 * DUMMY_STD, name
            assert abs(param.float().mean().item()) < 0.1 * DUMMY_STD, name


def test_engine_generates_with_dummy_weights(config_only_dir) -> None:
    config = EngineConfig(model=str(config_only_dir), load_format="dummy", device="cpu", num_kv_blocks=32,
                          block_size=16)
    outputs = []
    for _ in range(2):   # two engines, same seed: same weights, same greedy tokens
        engine = LLMEngine(config)
        engine.add_request(EngineRequest("r", tuple(range(3, 40)), SamplingOptions(temperature=0.0, max_tokens=8,
                                                                                   ignore_eos=True)))
        tokens: list[int] = []
        while engine.has_unfinished():
            for out in engine.step():
                tokens.extend(out.new_token_ids)
        assert len(tokens) == 8 and all(0 <= t < TINY["vocab_size"] for t in tokens)
        outputs.append(tokens)
    assert outputs[0] == outputs[1]


def test_auto_load_format_still_needs_weight_files(config_only_dir) -> None:
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLMEngine(EngineConfig(model=str(config_only_dir), device="cpu", num_kv_blocks=32))


def test_unknown_load_format_names_the_field_and_choices() -> None:
    with pytest.raises(ValueError, match=r"load_format must be one of auto, dummy; got 'pt'"):
        EngineConfig(model="x", load_format="pt")


def test_worker_cli_load_format(config_only_dir) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_worker_args(parser)
    args = parser.parse_args(["--model", str(config_only_dir), "--load-format", "dummy"])
    assert config_from_args(args).engine.load_format == "dummy"
    assert config_from_args(parser.parse_args(["--model", str(config_only_dir)])).engine.load_format == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", str(config_only_dir), "--load-format", "pt"])
