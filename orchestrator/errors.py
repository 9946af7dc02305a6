"""Router errors and their one mapping to gRPC status codes and HTTP responses.

Every failure a client can see is a ``RouterError`` subclass; each class
declares its gRPC code, HTTP status and OpenAI error type once, here. The two
transports (``grpc_server.py``, ``http_api.py``) translate with
``grpc_status`` and ``http_error_body`` and never decide codes themselves.

Decisions:

* unknown model: ``NOT_FOUND`` / HTTP 404 ``model_not_found`` (what OpenAI
  answers); the message lists the served models.
* no healthy worker for a known model: ``UNAVAILABLE`` / 503.
* a worker failing mid-request: ``UNAVAILABLE`` / 502 (a stalled worker: 504).
* too many requests in flight: ``RESOURCE_EXHAUSTED`` / 429.
"""

from __future__ import annotations

from typing import Any

import grpc


class RouterError(Exception):
    """Base of every error a client may receive; ``message`` is shown to it."""

    grpc_code = grpc.StatusCode.INTERNAL
    http_status = 500
    error_type = "internal_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidArgument(RouterError):
    """A request field is malformed or out of range; ``field`` names it."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400
    error_type = "invalid_request_error"
    code = "invalid_value"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message, param=field or None)
        self.field = field


class RequestTooLarge(RouterError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class ModelNotFound(RouterError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="model")


class DuplicateRequestId(RouterError):
    grpc_code = grpc.StatusCode.ALREADY_EXISTS
    http_status = 409
    error_type = "invalid_request_error"
    code = "duplicate_request_id"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="request_id")


class Overloaded(RouterError):
    """The router's bound on requests in flight is reached; retry later."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429
    error_type = "rate_limit_error"
    code = "overloaded"


class NoHealthyWorker(RouterError):
    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    error_type = "service_unavailable"
    code = "no_healthy_worker"


class WorkerFailed(RouterError):
    """The worker serving a request died, reset the stream or ended it early.

    ``retriable``: the failure is the worker's, so another worker may take
    the request over (continuing after the tokens already streamed).
    """

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 502
    error_type = "worker_error"
    code = "worker_failed"

    def __init__(self, message: str, *, retriable: bool = True) -> None:
        super().__init__(message)
        self.retriable = retriable


class WorkerTimeout(WorkerFailed):
    """The worker sent nothing for longer than the router's stream timeout
    (a stalled worker: the request may move to another one)."""

    http_status = 504
    code = "worker_timeout"

    def __init__(self, message: str) -> None:
        super().__init__(message, retriable=True)


class WorkerRejected(RouterError):
    """The worker refused the request with a status the router passes on."""

    error_type = "worker_error"
    code = "worker_rejected"

    def __init__(self, message: str, grpc_code: grpc.StatusCode, http_status: int) -> None:
        super().__init__(message)
        self.grpc_code = grpc_code
        self.http_status = http_status


class WorkerUnreachable(RouterError):
    """Registration could not fetch the worker's ModelInfo."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    error_type = "service_unavailable"
    code = "worker_unreachable"


class WorkerIncompatible(RouterError):
    """A worker disagrees with the other workers of its model (tokenizer,
    context window, block size) or sent an unusable tokenizer."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 409
    error_type = "invalid_request_error"
    code = "worker_incompatible"


def grpc_status(err: RouterError) -> tuple[grpc.StatusCode, str]:
    """The status a gRPC call fails with for ``err``."""
    return err.grpc_code, err.message


def http_error_body(err: RouterError) -> dict[str, Any]:
    """OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""
    return error_body(err.message, err.error_type, err.param, err.code)


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The same JSON for an error that is not a ``RouterError`` (aiohttp's own 404/405/413, a bug)."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
