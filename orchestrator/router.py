"""The router core: request in, chunks out, independent of any transport.

A request goes ``prepare`` (admission bound, model, validation, tokenizing,
context window: every client error surfaces here, before a transport has
committed to a response) then ``stream`` (placement, the request sent to a
worker, token ids -> text deltas, stop strings, usage). ``generate`` does both.

Transport: a request goes over the router's one Session with its worker
(``session.py``: one bidirectional stream per worker; the worker sends one
message per engine step for all of this router's requests on it, and the
router hands each request its part). A worker without the Session RPC gets
one Submit call per request instead; both fail the same way, by gRPC status.

Failure rules:

* closing the chunk iterator (a client that went away) aborts the request
  on the worker (an abort on the session, or cancelling its Submit call);
* ``abort(request_id)`` does the same and ends the stream with finish reason
  ``abort``;
* a worker that fails (connection refused or reset, process gone, stream
  ended without a finish, engine error, refused for load, dropped by the
  registry, silent for ``worker_timeout_s``) is replaced by another worker,
  at most ``max_migrations`` times per request; then the stream fails with
  the last ``WorkerFailed`` (a ``WorkerTimeout`` for a silent worker: never a
  hang). The failed call is cancelled, so a worker still alive frees the
  request's blocks;
* a stop string ends the stream with finish reason ``stop`` and cancels the
  worker call.

Migration (failover without loss). A request that fails after some tokens
were streamed continues elsewhere as a new Submit of the original prompt
plus every token streamed so far, with ``max_tokens`` lowered by their
number and the same sampling settings; ``_Output`` (detokenizer, stop
strings, usage) carries on across workers, so the client's stream goes on
with no token lost or repeated. Greedy requests continue exactly as an
uninterrupted run would; sampled ones continue with a valid sample that need
not match an uninterrupted run token for token (the seed restarts its
stream). Usage counts the original prompt, every generated token, and the
cached tokens the first worker reported.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import AsyncIterator, Callable, Sequence

import grpc

from kvmesh.v1 import worker_pb2
from orchestrator import validation
from orchestrator.detokenize import StopMatcher
from orchestrator.errors import (DuplicateRequestId, InvalidArgument, NoHealthyWorker, Overloaded, RouterError,
                                 WorkerFailed, WorkerRejected, WorkerTimeout)
from orchestrator.metrics import RouterMetrics
from orchestrator.placement import PlacementDecision, PlacementPolicy, RequestView
from orchestrator.read_ahead import ReadAhead
from orchestrator.registry import ModelEntry, WorkerRegistry
from orchestrator.session import RouterSession, SessionError, SessionStream
from orchestrator.tokenize import TokenizerBundle
from orchestrator.types import Chunk, FinishReason, GenerateRequest, ModelCard, Sampling, TokenLogprob, Usage
from orchestrator.workers import WorkerHandle

logger = logging.getLogger(__name__)

_RETRIABLE_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED,
})
_REJECTION_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE})
_FINISH_ERROR = FinishReason.ERROR.to_pb()


def _has_finish(resp: worker_pb2.SubmitResponse) -> bool:
    return resp.finish_reason != 0     # FINISH_REASON_UNSPECIFIED


@dataclass(frozen=True)
class RouterLimits:
    max_in_flight: int = 1024
    """Requests streaming at once; a request arriving when this many stream
    is refused with ``Overloaded`` (429 / RESOURCE_EXHAUSTED), not queued."""

    worker_timeout_s: float = 120.0
    """Longest wait for a worker's next message (queueing and prefill
    included) before the worker counts as failed (``WorkerTimeout``)."""

    max_migrations: int = 2
    """How many times one request may move to another worker after a worker
    failure (before or after its first token); 0 fails it on the first."""

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {self.max_in_flight}")
        if self.worker_timeout_s <= 0:
            raise ValueError(f"worker_timeout_s must be > 0, got {self.worker_timeout_s}")
        if self.max_migrations < 0:
            raise ValueError(f"max_migrations must be >= 0, got {self.max_migrations}")


@dataclass(frozen=True)
class PreparedRequest:
    """A validated, tokenized request, ready to be placed."""

    request_id: str
    entry: ModelEntry
    prompt_ids: list[int]
    sampling: Sampling
    cache_salt: str
    arrival: float                      # time.monotonic() at prepare


class _AbortRequested(RouterError):
    """Internal: ``Router.abort`` was called for a running request."""


class _Attempt:
    """One request on one worker (a session stream or a Submit call); ``fail``
    stops it (``stop``: abort the stream, cancel the call) and records why
    (workers.WorkerStream)."""

    def __init__(self, stop: Callable[[], object]) -> None:
        self._stop = stop
        self.failure: RouterError | None = None

    def fail(self, error: RouterError) -> None:
        if self.failure is None:
            self.failure = error
            self._stop()


class _Active:
    """A running request as ``abort`` finds it."""

    def __init__(self) -> None:
        self.attempt: _Attempt | None = None
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        if self.attempt is not None:
            self.attempt.fail(_AbortRequested("aborted"))


class _Watchdog:
    """Calls ``on_expire`` when one wait (``arm`` .. ``disarm``) lasts ``timeout`` seconds.

    One timer per request, re-armed lazily: touching it costs a clock read."""

    def __init__(self, timeout: float, on_expire: Callable[[], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._on_expire = on_expire
        self._since: float | None = None
        self._timer = self._loop.call_later(timeout, self._check)

    def arm(self) -> None:
        self._since = self._loop.time()

    def disarm(self) -> None:
        self._since = None

    def cancel(self) -> None:
        self._timer.cancel()

    def _check(self) -> None:
        now = self._loop.time()
        if self._since is not None and now - self._since >= self._timeout:
            self._on_expire()
            return
        due = self._timeout if self._since is None else self._since + self._timeout - now
        self._timer = self._loop.call_later(due, self._check)


class _Output:
    """Turns worker messages into client chunks: text, stop strings, usage, timings."""

    def __init__(self, p: PreparedRequest, tokenizer: TokenizerBundle, metrics: RouterMetrics) -> None:
        self._p = p
        self._detok = tokenizer.detokenizer(p.prompt_ids)
        self._stops = StopMatcher(p.sampling.stop)
        self._metrics = metrics
        self._model = p.entry.spec.name
        self._ttft = metrics.ttft.labels(self._model)          # resolved once: labels() costs µs per call
        self._itl = metrics.itl.labels(self._model)
        self._chunk_tokens = metrics.chunk_tokens.labels(self._model)
        self.messages = 0
        """Worker messages taken so far, from all workers (``Router.stream`` counts them into the metric)."""
        self.generated: list[int] = []
        """Every token id streamed so far, from all workers (a migration resubmits them)."""
        self.cached_tokens = 0
        self._last_token_at: float | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.generated)

    @property
    def started(self) -> bool:
        """Whether any token arrived (a failure from now on is a migration)."""
        return bool(self.generated)

    def on_batch(self, batch: list[worker_pb2.SubmitResponse], worker_id: str) -> Chunk:
        """One chunk for worker messages that arrived together, the same as the
        concatenation of the chunks a stream of one token per message would
        have made: with stop strings, tokens go through the detokenizer and the
        stop matcher one by one, and the token that completes a stop string is
        the last one sent and counted (ids, logprobs, usage, ``generated``)."""
        ids: list[int] = []
        logprobs: list[TokenLogprob] = []
        want_logprobs = self._p.sampling.logprobs
        text = ""
        stopped = False
        for resp in batch:
            if resp.cached_tokens and not self.started:    # a migrated request's later workers don't count
                self.cached_tokens = resp.cached_tokens
            new = resp.token_ids
            if self._stops.active:         # token by token: where a stop string ends matters
                delta, used = self._feed_until_stop(new)
                text += delta
                if self._stops.stopped:
                    stopped = True
                    new = new[:used]
            self.generated.extend(new)
            ids.extend(new)
            if want_logprobs:
                logprobs.extend(TokenLogprob.from_pb(lp) for lp in resp.logprobs[:len(new)])
            if stopped:
                break
        self.messages += len(batch)
        if ids:
            self._observe_chunk(len(ids))
        if not self._stops.active:
            text = self._detok.add(ids)
        if stopped:
            finish: FinishReason | None = FinishReason.STOP
        else:
            finish = FinishReason.from_pb(batch[-1].finish_reason)
            if finish is not None:
                text += self._stops.feed(self._detok.flush())
                if self._stops.stopped:
                    finish = FinishReason.STOP
                else:
                    text += self._stops.flush()
        if finish is None:
            return Chunk(self._p.request_id, text, tuple(ids), tuple(logprobs), worker_id=worker_id)
        return self.final(finish, worker_id, text=text, token_ids=tuple(ids), logprobs=tuple(logprobs))

    def _feed_until_stop(self, token_ids: Sequence[int]) -> tuple[str, int]:
        """(text, used): ``token_ids`` fed one at a time to the detokenizer and
        the stop matcher, up to the one that completes a stop string (``used``
        counts it) or all of them."""
        text = ""
        for i, token in enumerate(token_ids):
            text += self._stops.feed(self._detok.add((token,)))
            if self._stops.stopped:
                return text, i + 1
        return text, len(token_ids)

    def final(self, finish: FinishReason, worker_id: str, *, text: str = "", token_ids: tuple[int, ...] = (),
              logprobs: tuple[TokenLogprob, ...] = ()) -> Chunk:
        usage = Usage(len(self._p.prompt_ids), self.completion_tokens, self.cached_tokens)
        m = self._metrics
        m.finished.labels(self._model, finish.value).inc()
        m.e2e.labels(self._model).observe(time.monotonic() - self._p.arrival)
        m.prompt_tokens.labels(self._model).inc(usage.prompt_tokens)
        m.generation_tokens.labels(self._model).inc(usage.completion_tokens)
        m.cached_prompt_tokens.labels(self._model).inc(usage.cached_tokens)
        return Chunk(self._p.request_id, text, token_ids, logprobs, finish, usage, worker_id)

    def _observe_chunk(self, tokens: int) -> None:
        """TTFT at the first chunk with tokens; then, per token, the gap since
        the previous such chunk shared by its ``tokens`` (a gap g before a chunk
        of n tokens is n observations of g/n), so the ITL histogram counts
        tokens whether the worker or the router merged them."""
        now = time.monotonic()
        self._chunk_tokens.observe(tokens)
        if self._last_token_at is None:
            self._ttft.observe(now - self._p.arrival)
        else:
            gap = (now - self._last_token_at) / tokens
            for _ in range(tokens):
                self._itl.observe(gap)
        self._last_token_at = now


class Router:
    def __init__(self, registry: WorkerRegistry, policy: PlacementPolicy, metrics: RouterMetrics,
                 limits: RouterLimits = RouterLimits()) -> None:
        self._registry = registry
        self._policy = policy
        self._metrics = metrics
        self._limits = limits
        self._active: dict[str, _Active] = {}
        self._placement_seconds = metrics.placement_seconds.labels(policy.name)

    # --- queries ---------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._active)

    def model_cards(self) -> list[ModelCard]:
        return self._registry.model_cards()

    def is_running(self, request_id: str) -> bool:
        """Whether ``request_id`` is streaming now (the kv policy's load ledger asks)."""
        return request_id in self._active

    async def dry_run(self, request: GenerateRequest) -> tuple[str, PlacementDecision]:
        """(model, decision): where ``request`` would be placed now and why, without
        routing it. Raises the errors ``prepare`` raises, except for admission."""
        entry, prompt_ids = await self._validated(request)
        spec = entry.spec
        view = RequestView(request.request_id or "dry-run", spec.name, prompt_ids, request.cache_salt,
                           spec.block_size)
        return spec.name, self._policy.explain(view, entry.candidates())

    # --- the request path -------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """``prepare`` then ``stream``; every error surfaces at the first chunk."""
        prepared = await self.prepare(request)
        async with aclosing(self.stream(prepared)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def prepare(self, request: GenerateRequest) -> PreparedRequest:
        """Admits, validates and tokenizes; raises the client's error, if any."""
        arrival = time.monotonic()
        if len(self._active) >= self._limits.max_in_flight:
            self._metrics.rejected.inc()
            raise Overloaded(f"the router has {len(self._active)} requests in flight "
                             f"(max_in_flight={self._limits.max_in_flight}); retry later")
        if request.request_id in self._active:
            raise DuplicateRequestId(f"request id {request.request_id!r} is already running")
        entry, prompt_ids = await self._validated(request)
        return PreparedRequest(request.request_id or uuid.uuid4().hex, entry, prompt_ids,
                               request.sampling, request.cache_salt, arrival)

    async def stream(self, p: PreparedRequest) -> AsyncIterator[Chunk]:
        """Places ``p`` and streams its chunks; the last one has a finish reason."""
        if p.request_id in self._active:
            raise DuplicateRequestId(f"request id {p.request_id!r} is already running")
        active = _Active()
        self._active[p.request_id] = active
        self._metrics.in_flight.inc()
        output = _Output(p, p.entry.tokenizer, self._metrics)
        failed: list[str] = []
        try:
            while not active.aborted:
                submit = _continuation(p, output.generated)
                if submit is None:      # the budget was used up; only the finish got lost
                    yield output.final(FinishReason.LENGTH, "")
                    return
                worker = self._place(p, exclude=failed)
                try:
                    async with aclosing(self._submit(submit, worker, active)) as batches:
                        async for batch in batches:
                            chunk = output.on_batch(batch, worker.worker_id)
                            yield chunk
                            if chunk.finish_reason is not None:
                                return
                except WorkerFailed as e:
                    worker.failures += 1
                    failed.append(worker.worker_id)
                    self._move_or_raise(p, e, output, failed)
                except _AbortRequested:
                    break
            yield output.final(FinishReason.ABORT, "")
        finally:
            del self._active[p.request_id]
            self._metrics.in_flight.dec()
            self._metrics.worker_messages.labels(p.entry.spec.name).inc(output.messages)

    def abort(self, request_id: str) -> bool:
        """Ends a running request with finish reason ``abort``; False if unknown."""
        active = self._active.get(request_id)
        if active is None:
            return False
        active.abort()
        return True

    # --- internals ----------------------------------------------------------------

    async def _validated(self, request: GenerateRequest) -> tuple[ModelEntry, list[int]]:
        """The model entry and prompt ids of ``request`` after every client check
        (shared by ``prepare`` and ``dry_run``)."""
        entry = self._registry.resolve(request.model)
        spec = entry.spec
        validation.validate_prompt(request.prompt, vocab_size=spec.vocab_size)
        validation.validate_sampling(request.sampling, vocab_size=spec.vocab_size)
        prompt_ids = await entry.tokenizer.encode_prompt(request.prompt)
        if not prompt_ids:
            raise InvalidArgument("prompt", "tokenizes to no tokens")
        validation.check_context_window(len(prompt_ids), request.sampling.max_tokens, spec.max_model_len)
        if not entry.candidates():
            raise NoHealthyWorker(f"no healthy worker serves model {spec.name!r}")
        return entry, prompt_ids

    def _move_or_raise(self, p: PreparedRequest, e: WorkerFailed, output: _Output, failed: list[str]) -> None:
        """Returns when ``p`` may move on from its ``len(failed)``-th failed worker; else raises ``e``."""
        limit = self._limits.max_migrations
        if not e.retriable:
            raise e
        if len(failed) > limit:
            raise _annotated(e, f"gave up after {limit} migrations: max_migrations={limit}")
        if not any(w.worker_id not in failed for w in p.entry.candidates()):
            raise _annotated(e, "no other worker to take the request over")
        model = p.entry.spec.name
        if output.started:
            logger.warning("request %s: %s; migrating with %d tokens streamed (move %d of at most %d)",
                           p.request_id, e.message, output.completion_tokens, len(failed), limit)
            self._metrics.migrations.labels(model).inc()
        else:
            logger.warning("request %s: %s; retrying on another worker", p.request_id, e.message)
            self._metrics.retries.labels(model).inc()

    def _place(self, p: PreparedRequest, exclude: list[str]) -> WorkerHandle:
        candidates = [w for w in p.entry.candidates() if w.worker_id not in exclude]
        if not candidates:
            raise NoHealthyWorker(f"no healthy worker serves model {p.entry.spec.name!r}")
        view = RequestView(p.request_id, p.entry.spec.name, p.prompt_ids, p.cache_salt, p.entry.spec.block_size)
        started = time.perf_counter()
        worker = self._policy.choose(view, candidates)
        self._placement_seconds.observe(time.perf_counter() - started)
        worker.placements += 1
        return worker

    async def _submit(self, request: worker_pb2.SubmitRequest, worker: WorkerHandle,
                      active: _Active) -> AsyncIterator[list[worker_pb2.SubmitResponse]]:
        """The worker's messages for ``request``, in batches of those that arrived
        while the previous batch was being relayed, up to and including the one
        with a finish reason; raises ``WorkerFailed``/``WorkerRejected``/
        ``_AbortRequested`` after the messages before the failure. Once the
        attempt failed (``Router.abort``, the watchdog, the registry), the next
        batch is not yielded: the failure is raised instead.

        The request goes over the worker's session (``session.py``: one stream
        per worker for all of this router's requests) or, for a worker without
        the Session RPC, its own Submit call (read ahead by ``read_ahead.py``);
        either way a failure is mapped from the gRPC status as for Submit."""
        timeout = self._limits.worker_timeout_s
        worker.in_flight += 1           # counted from placement on, as the placement policies expect
        try:
            try:
                session = await worker.session(timeout)
                if active.aborted:
                    raise _AbortRequested("aborted")
                source, attempt, close = self._start(request, worker, session)
            except SessionError as e:  # unreachable, or the session ended between its opening and this submit
                raise self._worker_error(worker, e.code, e.details) from None
            active.attempt = attempt
            worker.streams.add(attempt)
            watchdog = _Watchdog(timeout, lambda: attempt.fail(
                WorkerTimeout(f"worker {worker.worker_id} sent nothing for {timeout:g}s")))
            try:
                while True:
                    watchdog.arm()
                    try:
                        batch = await source.take()
                    except SessionError as e:
                        raise attempt.failure or self._worker_error(worker, e.code, e.details) from None
                    watchdog.disarm()
                    if attempt.failure is not None:     # aborted or timed out: what was read ahead goes unsent
                        raise attempt.failure
                    if not batch:
                        return
                    if batch[-1].finish_reason == _FINISH_ERROR:
                        if len(batch) > 1:
                            yield batch[:-1]
                        raise WorkerFailed(f"worker {worker.worker_id} failed the request (engine error)")
                    yield batch
            finally:
                close()
                watchdog.cancel()
                worker.streams.discard(attempt)
                active.attempt = None
        finally:
            worker.in_flight -= 1

    def _start(self, request: worker_pb2.SubmitRequest, worker: WorkerHandle, session: RouterSession | None
               ) -> tuple[SessionStream | ReadAhead[worker_pb2.SubmitResponse], _Attempt, Callable[[], object]]:
        """(source, attempt, close): the request sent on ``session``, or as a Submit
        call when None; ``source.take()`` gives its messages, ``close()`` ends it."""
        if session is not None:
            stream = session.submit(request)
            return stream, _Attempt(stream.abort), stream.close
        call = worker.stub.Submit(request)
        attempt = _Attempt(call.cancel)
        ahead = ReadAhead(functools.partial(self._read_call, call, worker, attempt), _has_finish)
        return ahead, attempt, lambda: (ahead.close(), call.cancel())

    async def _read_call(self, call: grpc.aio.UnaryStreamCall, worker: WorkerHandle,
                         attempt: _Attempt) -> worker_pb2.SubmitResponse:
        """One message of a Submit call; raises the mapped failure (ReadAhead's ``read``)."""
        try:
            resp = await call.read()
        except asyncio.CancelledError:
            if attempt.failure is None or task_cancelled():
                raise
            raise attempt.failure from None
        except grpc.aio.AioRpcError as e:
            raise attempt.failure or self._worker_error(worker, e.code(), e.details()) from None
        if resp is grpc.aio.EOF:
            raise self._worker_error(worker, None, "")
        return resp

    def _worker_error(self, worker: WorkerHandle, code: grpc.StatusCode | None, details: str) -> RouterError:
        """The failure of a request whose Submit call (or session stream) ended with ``code``
        (None: ended without a finish reason and without an error)."""
        if code is None:
            return WorkerFailed(f"worker {worker.worker_id} ended the stream without a finish reason")
        message = f"worker {worker.worker_id} failed: {code.name}: {details}"
        if code == grpc.StatusCode.UNAVAILABLE:
            self._registry.mark_unreachable(worker)
        if code in _REJECTION_CODES:
            return WorkerRejected(f"worker {worker.worker_id} rejected the request: {details}",
                                  grpc.StatusCode.INVALID_ARGUMENT, 400)
        return WorkerFailed(message, retriable=code in _RETRIABLE_CODES)


def _continuation(p: PreparedRequest, generated: list[int]) -> worker_pb2.SubmitRequest | None:
    """The Submit that continues ``p`` after ``generated`` (its first Submit when
    empty): prompt plus generated tokens, ``max_tokens`` lowered by their
    number. None when nothing is left to generate."""
    sampling = p.sampling
    if generated:
        if len(p.prompt_ids) + len(generated) >= p.entry.spec.max_model_len:
            return None
        if sampling.max_tokens is not None:
            if sampling.max_tokens <= len(generated):
                return None
            sampling = replace(sampling, max_tokens=sampling.max_tokens - len(generated))
    return worker_pb2.SubmitRequest(
        request_id=p.request_id, prompt_token_ids=p.prompt_ids + generated if generated else p.prompt_ids,
        sampling=sampling.to_pb(with_stop=False), cache_salt=p.cache_salt)


def _annotated(e: WorkerFailed, note: str) -> WorkerFailed:
    """``e`` (its class decides the status code) with ``note`` appended to the client's message."""
    e.message = f"{e.message} ({note})"
    e.args = (e.message,)
    return e


def task_cancelled() -> bool:
    """Whether the current task itself is being cancelled (not just a call it awaits): for
    loops that must stop even when a client library swallowed the ``CancelledError``."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
