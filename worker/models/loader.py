"""Build a model from a Hugging Face layout directory.

Weights are read from ``*.safetensors`` through memory maps (``safe_open``),
one tensor at a time, converted to the engine's dtype and device, and fused
where the model runs fused matmuls (q/k/v, gate/up). Names not used by the
model (rotary caches some checkpoints store) are ignored; any parameter the
checkpoint does not provide is an error naming it.

``load_dummy_model`` builds the model from config.json alone with seeded
random weights (vLLM's ``--load-format dummy``), for benchmarks.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from worker.models.config import ModelConfig
from worker.models.llama import LlamaForCausalLM, RMSNorm

logger = logging.getLogger(__name__)

_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def load_model(model_dir: Path, max_positions: int, device: torch.device, dtype: torch.dtype,
               cfg: ModelConfig | None = None) -> LlamaForCausalLM:
    """``cfg``: the directory's already parsed config.json (read here when not given)."""
    cfg = cfg or ModelConfig.from_dir(model_dir)
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    return _build(cfg, tensors(), max_positions, device, dtype, f"checkpoint in {model_dir}")


def load_model_from_state_dict(
    cfg: ModelConfig, state_dict: dict[str, torch.Tensor], max_positions: int, device: torch.device, dtype: torch.dtype
) -> LlamaForCausalLM:
    """The model from tensors named as in a checkpoint (e.g. a transformers model's
    ``state_dict()``), fused and converted exactly as ``load_model`` does."""
    return _build(cfg, iter(state_dict.items()), max_positions, device, dtype, "state dict")


DUMMY_STD = 0.02
"""Standard deviation of dummy matrices and embeddings (transformers' Llama ``initializer_range``)."""


def load_dummy_model(cfg: ModelConfig, max_positions: int, device: torch.device, dtype: torch.dtype,
                     seed: int = 0) -> LlamaForCausalLM:
    """The model of ``cfg`` with random weights: every matrix and the embeddings
    drawn from N(0, ``DUMMY_STD``^2), every norm weight 1, as transformers
    initializes a Llama. Tensors are created directly on ``device`` in
    ``dtype`` (no host copy, no weight files). The same ``seed``, shapes,
    device and dtype give identical weights."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.to(dtype)                       # meta tensors: no memory yet
    model.to_empty(device=device)         # allocated once, in the target dtype
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():   # a fixed order: the draws are reproducible
            if isinstance(model.get_submodule(name.rpartition(".")[0]), RMSNorm):
                param.fill_(1.0)
            else:
                param.normal_(0.0, DUMMY_STD, generator=generator)
    model.init_rope(max_positions, device)
    model.eval()
    logger.info("dummy weights (seed %d) for %d parameters on %s in %s", seed,
                sum(p.numel() for p in model.parameters()), device, dtype)
    return model


def _build(
    cfg: ModelConfig,
    tensors: Iterator[tuple[str, torch.Tensor]],
    max_positions: int,
    device: torch.device,
    dtype: torch.dtype,
    source: str,
) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.to_empty(device=device)
    model.to(dtype)
    model.init_rope(max_positions, device)

    params = dict(model.named_parameters())
    pending: dict[str, list[torch.Tensor | None]] = {}
    loaded: set[str] = set()
    for name, tensor in tensors:
        if _IGNORED.search(name):
            continue
        target = name.removeprefix("model.")
        parts = target.split(".")
        if len(parts) >= 2 and parts[-2] in _FUSED:
            fused, idx = _FUSED[parts[-2]]
            key = ".".join(parts[:-2] + [fused, parts[-1]])
            slots = pending.setdefault(key, [None] * (3 if fused == "qkv_proj" else 2))
            slots[idx] = tensor
            if all(s is not None for s in slots):
                _copy(params, key, torch.cat(slots, dim=0), loaded)  # type: ignore[arg-type]
                del pending[key]
            continue
        if target not in params:
            logger.debug("ignoring checkpoint tensor %s", name)
            continue
        _copy(params, target, tensor, loaded)
    if cfg.tie_word_embeddings or "lm_head.weight" not in loaded:
        if "lm_head.weight" not in loaded and not cfg.tie_word_embeddings:
            logger.warning("checkpoint has no lm_head.weight: tying it to the embeddings")
        model.lm_head.weight = model.embed_tokens.weight
        loaded.add("lm_head.weight")
    missing = sorted(set(params) - loaded)
    if pending or missing:
        raise ValueError(f"{source} lacks tensors: {missing or sorted(pending)}")
    model.eval()
    return model


def _copy(params: dict[str, torch.nn.Parameter], name: str, tensor: torch.Tensor, loaded: set[str]) -> None:
    param = params[name]
    if tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(f"tensor {name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(tensor.to(dtype=param.dtype))
    loaded.add(name)
