"""The set of workers and the models they serve.

Workers join in two ways:

* registered: the worker calls ``Registry.Register`` (grpc_server.py), then
  ``Heartbeat`` every ``heartbeat_interval_s`` with its load. A worker silent
  for ``missed_heartbeats`` intervals is dropped and its running streams fail
  with ``WorkerFailed`` (no client waits on a dead worker).
* static: given by address at start-up (``--worker host:port``). The router
  polls ``GetLoad`` every interval; a failed poll marks the worker unhealthy
  (no new requests), ``missed_heartbeats`` failed intervals in a row fail its
  streams, and a later successful poll brings it back. Static workers are
  never removed; one that is down at start-up is connected when it comes up.

* discovered: another component (redis_discovery.py) registers the worker
  with ``expires=False`` and reports its heartbeats and departure itself
  (``heartbeat``, ``deregister``, ``expire``).

Joining fetches ``GetModelInfo``. A worker whose block hash scheme differs
from this router's (``kvstore.hashing.HASH_SCHEME``) is refused: the router
could never match its blocks. The first worker of a model defines its
``ModelEntry`` (spec + tokenizer); later workers of that model must agree on
context window, block size, hash scheme and tokenizer fingerprint, or are
refused. A model disappears with its last registered worker.

Listeners (``add_listener``) hear every join and leave, with the handle: the
KV indexer follows a worker's events from its join to its leave.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

import grpc

from kvmesh.v1 import worker_pb2
from kvstore.hashing import HASH_SCHEME
from orchestrator.errors import (InvalidArgument, ModelNotFound, NoHealthyWorker, WorkerFailed,
                                 WorkerIncompatible, WorkerUnreachable)
from orchestrator.tokenize import TokenizerBundle, fingerprint_of
from orchestrator.types import ModelCard, ModelSpec
from orchestrator.workers import WorkerHandle, WorkerLoad

logger = logging.getLogger(__name__)

DEREGISTER_GRACE_S = 30.0
"""How long a deregistered worker's channel stays open for streams still running."""


class WorkerListener(Protocol):
    def worker_joined(self, handle: WorkerHandle) -> None: ...
    def worker_left(self, handle: WorkerHandle) -> None: ...


@dataclass(eq=False)
class ModelEntry:
    spec: ModelSpec
    tokenizer: TokenizerBundle
    workers: dict[str, WorkerHandle] = field(default_factory=dict)

    def candidates(self) -> list[WorkerHandle]:
        """Workers that take new requests now."""
        return [w for w in self.workers.values() if w.available]


class WorkerRegistry:
    def __init__(self, *, heartbeat_interval_s: float = 2.0, missed_heartbeats: int = 3,
                 info_timeout_s: float = 10.0, on_change: Callable[[], None] | None = None) -> None:
        self.heartbeat_interval_s = heartbeat_interval_s
        self._missed = missed_heartbeats
        self._info_timeout_s = info_timeout_s
        self._on_change = on_change or (lambda: None)
        self._workers: dict[str, WorkerHandle] = {}
        self._models: dict[str, ModelEntry] = {}
        self._bundles: dict[str, TokenizerBundle] = {}     # by tokenizer fingerprint
        self._static_pending: set[str] = set()             # static addresses not yet connected
        self._monitor: asyncio.Task | None = None
        self._closing: set[asyncio.Task] = set()
        self._listeners: list[WorkerListener] = []
        self._no_expiry: set[str] = set()                  # liveness reported by a discovery backend

    def add_listener(self, listener: WorkerListener) -> None:
        """``listener`` hears every join (after it is routable) and leave (before its channel closes)."""
        self._listeners.append(listener)

    # --- life cycle --------------------------------------------------------

    async def start(self, static_addresses: Iterable[str] = ()) -> None:
        """Connects the static workers that are up, then watches all workers."""
        self._static_pending.update(static_addresses)
        await self._connect_static()
        self._monitor = asyncio.create_task(self._watch(), name="worker-registry-monitor")

    async def stop(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
        for handle in list(self._workers.values()):
            await handle.close()
        self._workers.clear()
        self._models.clear()
        await asyncio.gather(*self._closing, return_exceptions=True)

    # --- joining and leaving ----------------------------------------------

    async def register(self, worker_id: str, address: str, model: str = "", *,
                       static: bool = False, expires: bool = True) -> WorkerHandle:
        """Adds (or replaces) a worker after fetching its ModelInfo.

        ``expires=False``: never dropped for missed heartbeats here; the
        caller (a discovery backend) calls ``expire`` or ``deregister``.

        Raises ``WorkerUnreachable`` when GetModelInfo fails,
        ``InvalidArgument`` when ``model`` differs from what the worker serves,
        ``WorkerIncompatible`` when it disagrees with its model's other workers.
        """
        if not address:
            raise InvalidArgument("address", "is required (host:port of the worker's gRPC server)")
        handle = WorkerHandle.connect(worker_id, address, model, static=static)
        try:
            info = await handle.stub.GetModelInfo(worker_pb2.GetModelInfoRequest(), timeout=self._info_timeout_s)
            if model and info.model != model:
                raise InvalidArgument("model", f"worker at {address} serves {info.model!r}, not {model!r}")
            handle.worker_id = worker_id or self._static_id(info.worker_id, address)
            handle.model = info.model
            entry = await self._entry_for(info, handle.worker_id)
        except grpc.aio.AioRpcError as e:
            await handle.close()
            raise WorkerUnreachable(
                f"cannot fetch ModelInfo from worker {worker_id or address} at {address}: "
                f"{e.code().name}: {e.details()}") from e
        except BaseException:
            await handle.close()
            raise
        old = self._workers.get(handle.worker_id)
        if old is not None:
            self._remove(old, grace=DEREGISTER_GRACE_S, error=None)
            entry = self._models.setdefault(info.model, entry)   # it may have left with `old`
        self._workers[handle.worker_id] = handle
        entry.workers[handle.worker_id] = handle
        if expires:
            self._no_expiry.discard(handle.worker_id)
        else:
            self._no_expiry.add(handle.worker_id)
        logger.info("worker %s joined at %s serving %s (static=%s)", handle.worker_id, address, info.model, static)
        for listener in self._listeners:
            listener.worker_joined(handle)
        self._on_change()
        return handle

    def heartbeat(self, worker_id: str, load: WorkerLoad) -> bool:
        """Records liveness and load; False for an unknown worker (it should register again)."""
        handle = self._workers.get(worker_id)
        if handle is None:
            return False
        self._seen(handle, load)
        return True

    def deregister(self, worker_id: str) -> bool:
        handle = self._workers.get(worker_id)
        if handle is None:
            return False
        logger.info("worker %s deregistered", worker_id)
        self._remove(handle, grace=DEREGISTER_GRACE_S, error=None)
        return True

    def expire(self, worker_id: str, reason: str) -> bool:
        """Drops a worker that died (``reason`` says how it was noticed); its streams fail now."""
        handle = self._workers.get(worker_id)
        if handle is None:
            return False
        logger.warning("worker %s %s; dropping it", worker_id, reason)
        self._remove(handle, grace=None, error=WorkerFailed(f"worker {worker_id} {reason} and was dropped"))
        return True

    def mark_unreachable(self, handle: WorkerHandle) -> None:
        """The router failed to reach the worker: place nothing there until it
        heartbeats (registered) or answers a poll (static) again."""
        if handle.healthy:
            logger.warning("worker %s marked unhealthy after a connection failure", handle.worker_id)
            handle.healthy = False
            self._on_change()

    # --- queries -------------------------------------------------------------

    def workers(self) -> list[WorkerHandle]:
        return list(self._workers.values())

    def get(self, worker_id: str) -> WorkerHandle | None:
        return self._workers.get(worker_id)

    def resolve(self, model: str) -> ModelEntry:
        """The entry of ``model``; an empty name means the only model served."""
        if not model:
            if len(self._models) == 1:
                return next(iter(self._models.values()))
            if not self._models:
                raise NoHealthyWorker("no workers are registered")
            raise InvalidArgument("model", f"several models are served ({', '.join(sorted(self._models))}); name one")
        entry = self._models.get(model)
        if entry is None:
            served = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFound(f"model {model!r} is not served; available: {served}")
        return entry

    def model_cards(self) -> list[ModelCard]:
        return [ModelCard(name, e.spec.max_model_len, len(e.candidates())) for name, e in sorted(self._models.items())]

    def healthy_count(self) -> int:
        return sum(1 for w in self._workers.values() if w.available)

    # --- internals -----------------------------------------------------------

    def _static_id(self, reported_id: str, address: str) -> str:
        taken = self._workers.get(reported_id)
        if reported_id and (taken is None or taken.address == address):
            return reported_id
        return address

    async def _entry_for(self, info: worker_pb2.ModelInfo, worker_id: str) -> ModelEntry:
        if info.hash_scheme != HASH_SCHEME:
            raise WorkerIncompatible(
                f"worker {worker_id} hashes KV blocks with scheme {info.hash_scheme!r} but this router uses "
                f"{HASH_SCHEME!r}: its prefix cache could never be matched; run the same kvmesh version on both")
        if info.block_size < 1:
            raise WorkerIncompatible(f"worker {worker_id} reports block_size {info.block_size}; it must be >= 1")
        fingerprint = fingerprint_of(info.tokenizer_json, info.chat_template, info.bos_token, info.eos_token)
        entry = self._models.get(info.model)
        if entry is not None:
            spec = entry.spec
            mismatch = [
                f"{name} {mine} != {theirs}" for name, mine, theirs in (
                    ("max_model_len", spec.max_model_len, info.max_model_len),
                    ("block_size", spec.block_size, info.block_size),
                    ("tokenizer fingerprint", entry.tokenizer.fingerprint, fingerprint),
                    ("hash_scheme", spec.hash_scheme, info.hash_scheme),
                ) if mine != theirs]
            if mismatch:
                raise WorkerIncompatible(
                    f"worker {worker_id} disagrees with the other workers of {info.model}: {'; '.join(mismatch)}")
            return entry
        bundle = self._bundles.get(fingerprint)
        if bundle is None:
            try:
                bundle = await asyncio.to_thread(TokenizerBundle.from_model_info, info)
            except ValueError as e:
                raise WorkerIncompatible(f"worker {worker_id} sent an unusable tokenizer: {e}") from e
            self._bundles[fingerprint] = bundle
        if info.model in self._models:          # another registration won the race
            return await self._entry_for(info, worker_id)
        spec = ModelSpec(
            name=info.model,
            max_model_len=info.max_model_len,
            block_size=info.block_size,
            vocab_size=info.vocab_size or bundle.vocab_size,
            eos_token_ids=tuple(info.eos_token_ids),
            hash_scheme=info.hash_scheme,
        )
        entry = ModelEntry(spec, bundle)
        self._models[info.model] = entry
        return entry

    def _seen(self, handle: WorkerHandle, load: WorkerLoad | None) -> None:
        handle.last_seen = time.monotonic()
        if load is not None:
            handle.load = load
        if not handle.healthy:
            handle.healthy = True
            logger.info("worker %s is healthy again", handle.worker_id)
            self._on_change()

    def _remove(self, handle: WorkerHandle, *, grace: float | None, error: WorkerFailed | None) -> None:
        if self._workers.get(handle.worker_id) is handle:
            del self._workers[handle.worker_id]
            self._no_expiry.discard(handle.worker_id)
        for listener in self._listeners:
            listener.worker_left(handle)
        entry = self._models.get(handle.model)
        if entry is not None and entry.workers.get(handle.worker_id) is handle:
            del entry.workers[handle.worker_id]
            if not entry.workers:
                del self._models[handle.model]
        if error is not None:
            handle.fail_streams(error)
        task = asyncio.create_task(handle.close(grace))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        self._on_change()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            try:
                self._expire_silent()
                await asyncio.gather(self._poll_static(), self._connect_static())
            except Exception:   # a bug here must not stop expiry for good
                logger.exception("worker monitor round failed")

    def _expire_silent(self) -> None:
        deadline = time.monotonic() - self._missed * self.heartbeat_interval_s
        for handle in list(self._workers.values()):
            if handle.static or handle.worker_id in self._no_expiry or handle.last_seen >= deadline:
                continue
            logger.warning("worker %s missed %d heartbeats; dropping it", handle.worker_id, self._missed)
            self._remove(handle, grace=None, error=WorkerFailed(
                f"worker {handle.worker_id} stopped sending heartbeats and was dropped"))

    async def _poll_static(self) -> None:
        static = [w for w in self._workers.values() if w.static]
        await asyncio.gather(*(self._poll(w) for w in static))

    async def _poll(self, handle: WorkerHandle) -> None:
        try:
            report = await handle.stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=self.heartbeat_interval_s)
        except grpc.aio.AioRpcError as e:
            self.mark_unreachable(handle)
            silent_s = time.monotonic() - handle.last_seen
            if silent_s > self._missed * self.heartbeat_interval_s and handle.streams:
                logger.warning("static worker %s unreachable for %.1fs (%s); failing its streams",
                               handle.worker_id, silent_s, e.code().name)
                handle.fail_streams(WorkerFailed(f"worker {handle.worker_id} is unreachable"))
            return
        self._seen(handle, WorkerLoad.from_pb(report))

    async def _connect_static(self) -> None:
        async def connect(address: str) -> None:
            try:
                await self.register("", address, static=True)
            except WorkerUnreachable as e:
                logger.info("static worker %s not reachable yet: %s", address, e.message)
                return
            except (WorkerIncompatible, InvalidArgument) as e:
                logger.error("static worker %s refused: %s", address, e.message)
            self._static_pending.discard(address)

        await asyncio.gather(*(connect(a) for a in list(self._static_pending)))
