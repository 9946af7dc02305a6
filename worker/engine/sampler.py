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


class PendingSample:
    """Tokens a launched step sampled, still on the device: ``result()`` brings them to the
    host, waiting for the GPU only then. Between launch and ``result()`` the host is free
    to schedule and launch the next step (``LLMEngine``'s async scheduling).

    Every device op of the sampler (argmax, the random race, log-softmax, top-k) is
    enqueued at launch, right after the forward pass, so the next step may overwrite the
    logits (CUDA-graph memory) freely; only the copies to the host wait."""

    def __init__(self, tokens: torch.Tensor, options: list[SamplingOptions], logprob_parts: tuple | None,
                 host: torch.Tensor | None = None) -> None:
        self.tokens = tokens
        self._options = options
        self._logprob_parts = logprob_parts
        self._host = host
        self._ready: torch.cuda.Event | None = None
        if host is not None:  # start the copies now; result() waits only for them
            host[: tokens.numel()].copy_(tokens, non_blocking=True)
            if logprob_parts is not None:
                wants, *tensors = logprob_parts
                self._logprob_parts = (wants, *(_to_pinned(t) for t in tensors))
            self._ready = torch.cuda.Event()
            self._ready.record()

    def result(self) -> SamplerResult:
        if self._ready is not None:
            self._ready.synchronize()
            token_list = self._host[: self.tokens.numel()].tolist()
        else:
            token_list = self.tokens.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(token_list)
        if self._logprob_parts is not None:
            wants, chosen, top_v, top_i = self._logprob_parts
            chosen = chosen.tolist()
            top_v = top_v.tolist() if top_v is not None else None
            top_i = top_i.tolist() if top_i is not None else None
            for j, i in enumerate(wants):
                n = self._options[i].top_logprobs
                top = tuple(zip(top_i[j][:n], top_v[j][:n])) if n else ()
                logprobs[i] = TokenLogprob(token_list[i], chosen[j], top)
        return SamplerResult(token_list, logprobs)


class ReadySample:
    """A step's tokens that are already on the host (a runner that computes them there);
    read like ``PendingSample``."""

    def __init__(self, result: SamplerResult) -> None:
        self._result = result

    def result(self) -> SamplerResult:
        return self._result


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on ``device`` without waiting for the device: a plain
    ``torch.tensor(..., device=cuda)`` copies from pageable memory and synchronizes the
    stream, which would stall the host behind the step just launched."""
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def placeholder(row: int) -> int:
    """The stand-in a sequence holds for a token its in-flight step sampled into ``row``."""
    return -(row + 1)


def fill_placeholders(ids: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """``ids`` with every placeholder replaced, on the device, by the token the previous
    step sampled into that row (``previous``: those tokens, by row)."""
    rows = (-ids - 1).clamp(min=0)
    return torch.where(ids < 0, previous.index_select(0, rows).to(ids.dtype), ids)


def _to_pinned(t: torch.Tensor | None) -> torch.Tensor | None:
    """A non-blocking copy of ``t`` to pinned host memory (ready once the stream reaches it)."""
    if t is None:
        return None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


def sample(
    logits: torch.Tensor,
    options: list[SamplingOptions],
    generators: list[torch.Generator | None],
) -> SamplerResult:
    """``logits``: ``[S, V]``, one row per sequence that samples this step (``sample_async``)."""
    return sample_async(logits, options, generators).result()


def sample_async(
    logits: torch.Tensor,
    options: list[SamplingOptions],
    generators: list[torch.Generator | None],
    host: torch.Tensor | None = None,
) -> PendingSample:
    """Enqueues the sampling of ``logits`` without waiting for the device; ``host``: a
    pinned int64 buffer of at least ``S`` elements to receive the tokens (CUDA).

    ``logits`` may be 16-bit (the model's dtype): greedy rows take their argmax as is,
    everything else is computed in float32."""
    greedy_rows = [o.greedy for o in options]  # decided on the host: no device sync
    if all(greedy_rows):
        tokens = logits.argmax(dim=-1)
    else:
        logits = logits.float()
        tokens = _sample_random(logits, options, generators)
        if any(greedy_rows):
            greedy = to_device(greedy_rows, torch.bool, logits.device)
            tokens = torch.where(greedy, logits.argmax(dim=-1), tokens)
    parts = None
    wants = [i for i, o in enumerate(options) if o.logprobs or o.top_logprobs]
    if wants:
        rows = to_device(wants, torch.int64, logits.device)
        lp = torch.log_softmax(logits.index_select(0, rows).float(), dim=-1)
        chosen = lp.gather(1, tokens.index_select(0, rows)[:, None]).squeeze(1)
        k = max(options[i].top_logprobs for i in wants)
        top_v, top_i = (lp.topk(k, dim=-1) if k else (None, None))
        parts = (wants, chosen, top_v, top_i)
    return PendingSample(tokens, options, parts, host)


def _sample_random(
    logits: torch.Tensor, options: list[SamplingOptions], generators: list[torch.Generator | None]
) -> torch.Tensor:
    temps = to_device([o.temperature if o.temperature > 0 else 1.0 for o in options], torch.float32, logits.device)
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
    ks = to_device([k if 0 < k < vocab else vocab for k in top_k], torch.int64, logits.device)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    drop = ranks >= ks[:, None]
    ps = to_device(top_p, torch.float32, logits.device)
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # drop a token when the mass before it already reaches top_p (the top token always stays);
    # rows with top_p == 1 keep everything: their float32 cumsum can reach 1.0 before the tail
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= (mass_before >= ps[:, None]) & (ps[:, None] < 1.0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
