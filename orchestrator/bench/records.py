"""What one benchmark request was and what happened to it.

``RequestSpec`` is produced by a workload before anything is sent;
``OutgoingRequest`` is what a backend sends; ``StreamResult`` is what a
backend observed (timestamps from ``time.perf_counter()``); ``RequestRecord``
joins the three with the schedule, and is what metrics, CSV and plots read.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload.

    For a follow-up chat turn (``parent`` set), ``prompt_ids`` holds only the
    new user message: the sent prompt is the parent's prompt, then the
    parent's output, then ``prompt_ids``.
    """

    index: int
    prompt_ids: tuple[int, ...]
    output_len: int
    parent: int | None = None


@dataclass(frozen=True)
class OutgoingRequest:
    """One request as a backend sends it."""

    request_id: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    ignore_eos: bool
    temperature: float
    prompt_text: str | None = None
    """Set when prompts go out as text (``--prompt-format text``); else token ids are sent."""
    keep_output: bool = False
    """Return the generated token ids (a later chat turn needs them)."""
    cache_salt: str = ""
    """Prefix-cache namespace (kvmesh and vLLM): equal prompts with other salts share no cache."""


@dataclass(frozen=True)
class StreamResult:
    """What a backend saw of one streamed request.

    ``chunk_times`` are the arrival times of the chunks that carried output
    (at least one token, or non-empty text over HTTP), ``chunk_tokens`` the
    number of tokens in each when the protocol says so (0 = unknown).
    ``error_kind`` is None on success, else a short stable label such as
    ``grpc:UNAVAILABLE``, ``http:503``, ``timeout``, ``finish:abort``.
    """

    sent: float
    end: float
    chunk_times: tuple[float, ...] = ()
    chunk_tokens: tuple[int, ...] = ()
    output_tokens: int = 0
    prompt_tokens: int | None = None
    """As reported by the server (usage), when it does."""
    cached_tokens: int | None = None
    """Prompt tokens served from the server's prefix cache, when it reports them."""
    finish_reason: str = ""
    error_kind: str | None = None
    error: str = ""
    worker_id: str = ""
    output_ids: tuple[int, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error_kind is None


@dataclass(frozen=True)
class RequestRecord:
    """One measured request: its schedule, what was sent and what came back.

    Times are ``perf_counter`` seconds. ``scheduled`` is when the arrival
    process wanted the request out; ``ready`` is when it could go (later for a
    chat turn waiting on its previous turn, or a closed-loop slot freeing);
    ``lateness = sent - ready`` is the load generator's own delay.
    """

    index: int
    scheduled: float
    ready: float
    prompt_len: int
    """Prompt tokens the tool sent (token-id prompts) or meant to send (text)."""
    requested_output_len: int
    result: StreamResult
    parent: int | None = None

    @property
    def ok(self) -> bool:
        return self.result.ok

    @property
    def lateness(self) -> float:
        return self.result.sent - self.ready
