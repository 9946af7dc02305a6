"""Choosing next tokens from logits, per request settings, in one batched pass.

Greedy rows take the argmax. Sampled rows apply temperature, top-k and top-p
and then draw with the exponential race (``argmax(p / E)`` with ``E ~ Exp(1)``),
which equals a categorical draw but takes its randomness from each request's
own generator: a seeded request yields the same tokens whatever else shares
its batch. Log-probabilities are those of the raw model distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engine.types import SamplingOptions, TokenLogprob


@dataclass(frozen=True)
class SamplerResult:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


def sample(
    logits: torch.Tensor,
    options: list[SamplingOptions],
    generators: list[torch.Generator | None],
) -> SamplerResult:
    """``logits``: ``[S, V]`` float32, one row per sequence that samples this step."""
    num_rows = logits.shape[0]
    greedy_rows = [o.greedy for o in options]  # decided on the host: no device sync
    if all(greedy_rows):
        tokens = logits.argmax(dim=-1)
    else:
        tokens = _sample_random(logits, options, generators)
        if any(greedy_rows):
            greedy = torch.tensor(greedy_rows, device=logits.device)
            tokens = torch.where(greedy, logits.argmax(dim=-1), tokens)
    token_list = tokens.tolist()
    logprobs: list[TokenLogprob | None] = [None] * num_rows
    wants = [i for i, o in enumerate(options) if o.logprobs or o.top_logprobs]
    if wants:
        rows = torch.tensor(wants, device=logits.device)
        lp = torch.log_softmax(logits.index_select(0, rows), dim=-1)
        chosen = lp.gather(1, tokens.index_select(0, rows)[:, None]).squeeze(1).tolist()
        k = max(options[i].top_logprobs for i in wants)
        top_v, top_i = (lp.topk(k, dim=-1) if k else (None, None))
        for j, i in enumerate(wants):
            n = options[i].top_logprobs
            top = tuple(zip(top_i[j, :n].tolist(), top_v[j, :n].tolist())) if n else ()
            logprobs[i] = TokenLogprob(token_list[i], chosen[j], top)
    return SamplerResult(token_list, logprobs)


def _sample_random(
    logits: torch.Tensor, options: list[SamplingOptions], generators: list[torch.Generator | None]
) -> torch.Tensor:
    temps = torch.tensor([o.temperature if o.temperature > 0 else 1.0 for o in options], device=logits.device)
    scaled = logits / temps[:, None]
    top_k = [o.top_k for o in options]
    top_p = [o.top_p for o in options]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        scaled = _apply_top_k_top_p(scaled, top_k, top_p)
    probs = torch.softmax(scaled, dim=-1)
    noise = torch.empty_like(probs)
    for i, g in enumerate(generators):
        noise[i].exponential_(generator=g)
    # an exact 0 draw would turn a filtered-out token (p = 0) into 0/0 = NaN, which argmax picks
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


def _apply_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=logits.device)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    drop = ranks >= ks[:, None]
    ps = torch.tensor(top_p, device=logits.device, dtype=torch.float32)
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # drop a token when the mass before it already reaches top_p (the top token always stays);
    # rows with top_p == 1 keep everything: their float32 cumsum can reach 1.0 before the tail
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= (mass_before >= ps[:, None]) & (ps[:, None] < 1.0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
