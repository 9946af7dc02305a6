"""Shared fixtures: a tiny random Llama for fast engine tests, and the real SmolLM2.

The tiny model is built with transformers from a fixed seed (so it is also
its own reference); SmolLM2 is pulled once per machine into the kvmesh cache
(``KVMESH_CACHE_DIR`` when set) by ``worker.models.hub``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=255,
        bos_token_id=0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).float().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_reference(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from worker.models.hub import resolve_model

    return resolve_model("smollm2")


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)
