"""Transports the benchmark speaks: the router's gRPC API and OpenAI HTTP.

A backend sends one ``OutgoingRequest`` as a stream and returns a
``StreamResult`` with the client-side arrival time of every chunk. Request
failures (status codes, timeouts, broken streams) are results with an
``error_kind``, never exceptions: a benchmark counts them.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

from orchestrator.bench.records import OutgoingRequest, StreamResult


class BackendUnavailable(Exception):
    """The target cannot be reached or serves no usable model (before any load)."""


class Backend(Protocol):
    name: str
    target: str
    """Where requests go (host:port or URL), for the report."""
    model: str
    """The model requests name (resolved by ``start`` when not given)."""

    async def start(self) -> None:
        """Connects and checks the target lists a model; raises BackendUnavailable."""

    async def send(self, request: OutgoingRequest) -> StreamResult:
        """Streams one request to its end; failures come back as ``error_kind``."""

    async def close(self) -> None:
        """Closes connections; running sends fail."""


def pick_model(available: Sequence[str], wanted: str, target: str) -> str:
    """``wanted`` if served (or the only model when ``wanted`` is empty)."""
    if wanted:
        if available and wanted not in available:
            raise BackendUnavailable(f"{target} does not serve model {wanted!r}; it serves {', '.join(available)}")
        return wanted
    if not available:
        raise BackendUnavailable(f"{target} lists no models (no healthy worker yet?)")
    if len(available) > 1:
        raise BackendUnavailable(f"{target} serves several models ({', '.join(available)}); pick one with --model")
    return available[0]


def make_backend(name: str, target: str, *, model: str, timeout_s: float,
                 tokenize: Callable[[str], list[int]]) -> Backend:
    """A backend by name. ``tokenize`` counts the tokens of streamed text, for
    servers that send no usage."""
    from orchestrator.bench.backends.kvmesh_grpc import GrpcBackend
    from orchestrator.bench.backends.openai_http import OpenAIBackend

    backends: dict[str, type] = {"grpc": GrpcBackend, "openai": OpenAIBackend}
    if name not in backends:
        raise ValueError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}")
    return backends[name](target, model=model, timeout_s=timeout_s, tokenize=tokenize)


BACKENDS = ("grpc", "openai")
