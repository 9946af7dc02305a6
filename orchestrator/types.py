"""Typed values the router core speaks, with their proto conversions.

The transports turn client input (a ``kvmesh.v1.GenerateRequest`` or an
OpenAI JSON body) into a ``GenerateRequest`` and turn the router's ``Chunk``s
back into their wire form; the router core never touches a proto or a dict.
``from_pb``/``to_pb`` live beside each type, never inside a servicer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kvmesh.v1 import common_pb2, generate_pb2


class FinishReason(enum.Enum):
    """Why a request finished; values are OpenAI's ``finish_reason`` strings."""

    STOP = "stop"        # EOS, a stop token id or a stop string
    LENGTH = "length"    # max_tokens or the context window reached
    ABORT = "abort"      # cancelled by the client or the router
    ERROR = "error"      # the worker failed the request

    @classmethod
    def from_pb(cls, value: int) -> FinishReason | None:
        return _FINISH_FROM_PB.get(value)

    def to_pb(self) -> int:
        return _FINISH_TO_PB[self]


_FINISH_TO_PB = {
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
}
_FINISH_FROM_PB = {v: k for k, v in _FINISH_TO_PB.items()}


@dataclass(frozen=True)
class Sampling:
    """Sampling settings as the client gave them; ``None`` means the default.

    Ranges are checked by ``validation.validate_sampling``, not here, so that
    the error names the client's field.
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0

    @classmethod
    def from_pb(cls, pb: common_pb2.SamplingParams) -> Sampling:
        return cls(
            temperature=pb.temperature if pb.HasField("temperature") else None,
            top_p=pb.top_p if pb.HasField("top_p") else None,
            top_k=pb.top_k if pb.HasField("top_k") else None,
            seed=pb.seed if pb.HasField("seed") else None,
            max_tokens=pb.max_tokens if pb.HasField("max_tokens") else None,
            stop=tuple(pb.stop),
            stop_token_ids=tuple(pb.stop_token_ids),
            ignore_eos=pb.ignore_eos,
            logprobs=pb.logprobs,
            top_logprobs=pb.top_logprobs,
        )

    def to_pb(self, *, with_stop: bool = True) -> common_pb2.SamplingParams:
        """``with_stop=False`` leaves out stop strings (workers never see text)."""
        pb = common_pb2.SamplingParams(
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs,
        )
        if with_stop:
            pb.stop.extend(self.stop)
        for name in ("temperature", "top_p", "top_k", "seed", "max_tokens"):
            value = getattr(self, name)
            if value is not None:
                setattr(pb, name, value)
        return pb


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class TextPrompt:
    """Raw text, tokenized as is (no chat template)."""

    text: str


@dataclass(frozen=True)
class TokenPrompt:
    """An already tokenized prompt."""

    ids: tuple[int, ...]


@dataclass(frozen=True)
class ChatPrompt:
    """Chat turns, rendered with the model's chat template plus the
    assistant generation prompt."""

    messages: tuple[ChatMessage, ...]


Prompt = TextPrompt | TokenPrompt | ChatPrompt


@dataclass(frozen=True)
class GenerateRequest:
    """One client request; ``prompt`` is None only when the client sent none
    (validation rejects it)."""

    prompt: Prompt | None
    model: str = ""
    sampling: Sampling = Sampling()
    request_id: str = ""
    cache_salt: str = ""

    @classmethod
    def from_pb(cls, pb: generate_pb2.GenerateRequest) -> GenerateRequest:
        kind = pb.WhichOneof("input")
        prompt: Prompt | None
        if kind == "text":
            prompt = TextPrompt(pb.text)
        elif kind == "token_ids":
            prompt = TokenPrompt(tuple(pb.token_ids.ids))
        elif kind == "messages":
            prompt = ChatPrompt(tuple(ChatMessage(m.role, m.content) for m in pb.messages.messages))
        else:
            prompt = None
        return cls(
            prompt=prompt,
            model=pb.model,
            sampling=Sampling.from_pb(pb.sampling),
            request_id=pb.request_id,
            cache_salt=pb.cache_salt,
        )

    def to_pb(self) -> generate_pb2.GenerateRequest:
        pb = generate_pb2.GenerateRequest(
            request_id=self.request_id,
            model=self.model,
            sampling=self.sampling.to_pb(),
            cache_salt=self.cache_salt,
        )
        if isinstance(self.prompt, TextPrompt):
            pb.text = self.prompt.text
        elif isinstance(self.prompt, TokenPrompt):
            pb.token_ids.ids.extend(self.prompt.ids)
        elif isinstance(self.prompt, ChatPrompt):
            pb.messages.messages.extend(
                generate_pb2.ChatMessage(role=m.role, content=m.content) for m in self.prompt.messages
            )
        return pb


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of one sampled token and its most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()   # (token_id, logprob), most likely first

    @classmethod
    def from_pb(cls, pb: common_pb2.Logprob) -> TokenLogprob:
        return cls(pb.token_id, pb.logprob, tuple((t.token_id, t.logprob) for t in pb.top))

    def to_pb(self) -> common_pb2.Logprob:
        return common_pb2.Logprob(
            token_id=self.token_id,
            logprob=self.logprob,
            top=[common_pb2.TokenLogprob(token_id=t, logprob=lp) for t, lp in self.top],
        )


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @classmethod
    def from_pb(cls, pb: common_pb2.Usage) -> Usage:
        return cls(pb.prompt_tokens, pb.completion_tokens, pb.cached_tokens)

    def to_pb(self) -> common_pb2.Usage:
        return common_pb2.Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_tokens=self.cached_tokens,
        )


@dataclass(frozen=True)
class Chunk:
    """One streamed piece of a response: a delta, not a total.

    ``finish_reason`` and ``usage`` are set on the last chunk only.
    """

    request_id: str
    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    worker_id: str = ""

    @classmethod
    def from_pb(cls, pb: generate_pb2.GenerateResponse) -> Chunk:
        return cls(
            request_id=pb.request_id,
            text=pb.text,
            token_ids=tuple(pb.token_ids),
            logprobs=tuple(TokenLogprob.from_pb(lp) for lp in pb.logprobs),
            finish_reason=FinishReason.from_pb(pb.finish_reason),
            usage=Usage.from_pb(pb.usage) if pb.HasField("usage") else None,
            worker_id=pb.worker_id,
        )

    def to_pb(self) -> generate_pb2.GenerateResponse:
        pb = generate_pb2.GenerateResponse(
            request_id=self.request_id,
            text=self.text,
            token_ids=self.token_ids,
            logprobs=[lp.to_pb() for lp in self.logprobs],
            worker_id=self.worker_id,
        )
        if self.finish_reason is not None:
            pb.finish_reason = self.finish_reason.to_pb()
        if self.usage is not None:
            pb.usage.CopyFrom(self.usage.to_pb())
        return pb


@dataclass(frozen=True)
class ModelCard:
    id: str
    max_model_len: int
    num_workers: int

    @classmethod
    def from_pb(cls, pb: generate_pb2.ModelCard) -> ModelCard:
        return cls(pb.id, pb.max_model_len, pb.num_workers)

    def to_pb(self) -> generate_pb2.ModelCard:
        return generate_pb2.ModelCard(id=self.id, max_model_len=self.max_model_len, num_workers=self.num_workers)


@dataclass(frozen=True)
class ModelSpec:
    """What the router knows about a served model, from a worker's ModelInfo
    (the tokenizer itself is held by ``tokenize.TokenizerBundle``)."""

    name: str
    max_model_len: int
    block_size: int
    vocab_size: int
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    hash_scheme: str = ""
