"""Thin gRPC servicers: ``kvmesh.v1.Generation`` (clients),
``kvmesh.v1.Registry`` (workers joining) and ``kvmesh.v1.Admin`` (introspection).

Each RPC converts its proto with ``from_pb``/``to_pb`` and delegates to the
router or the worker registry. ``error_boundary`` is the one place errors
become status codes (the mapping itself is declared in errors.py) and the
one place requests are counted.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from contextlib import aclosing
from typing import Any, Callable

import grpc

from kvmesh.v1 import admin_pb2, admin_pb2_grpc, generate_pb2, generate_pb2_grpc, registry_pb2, registry_pb2_grpc
from orchestrator.errors import InvalidArgument, RouterError, grpc_status
from orchestrator.metrics import RouterMetrics
from orchestrator.registry import WorkerRegistry
from orchestrator.router import Router
from orchestrator.types import GenerateRequest
from orchestrator.workers import WorkerLoad

logger = logging.getLogger(__name__)


def error_boundary(method: Callable[..., Any]) -> Callable[..., Any]:
    """Maps ``RouterError`` to its status, anything unexpected to INTERNAL
    (logged with its traceback), and counts the call by final status.
    Works for unary methods and for response-streaming async generators."""
    endpoint = f"grpc.{method.__name__}"

    async def fail(self: Any, context: grpc.aio.ServicerContext, e: Exception) -> None:
        if isinstance(e, RouterError):
            code, message = grpc_status(e)
        else:
            logger.exception("%s failed", endpoint)
            code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}"
        self.metrics.requests.labels(endpoint, code.name).inc()
        await context.abort(code, message)

    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def streaming(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async with aclosing(method(self, request, context)) as responses:
                    async for response in responses:
                        yield response
            except asyncio.CancelledError:
                self.metrics.requests.labels(endpoint, "CANCELLED").inc()
                raise
            except Exception as e:
                await fail(self, context, e)
            else:
                self.metrics.requests.labels(endpoint, "OK").inc()
        return streaming

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            response = await method(self, request, context)
        except Exception as e:
            await fail(self, context, e)
        self.metrics.requests.labels(endpoint, "OK").inc()
        return response
    return unary


class GenerationServicer(generate_pb2_grpc.GenerationServicer):
    def __init__(self, router: Router, metrics: RouterMetrics) -> None:
        self.router = router
        self.metrics = metrics

    @error_boundary
    async def Generate(self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        async with aclosing(self.router.generate(GenerateRequest.from_pb(request))) as chunks:
            async for chunk in chunks:
                yield chunk.to_pb()

    @error_boundary
    async def Abort(self, request: generate_pb2.AbortRequest, context: grpc.aio.ServicerContext):
        return generate_pb2.AbortResponse(found=self.router.abort(request.request_id))

    @error_boundary
    async def ListModels(self, request: generate_pb2.ListModelsRequest, context: grpc.aio.ServicerContext):
        return generate_pb2.ListModelsResponse(models=[card.to_pb() for card in self.router.model_cards()])


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, router: Router, metrics: RouterMetrics) -> None:
        self.router = router
        self.metrics = metrics

    @error_boundary
    async def DryRunRoute(self, request: admin_pb2.DryRunRouteRequest, context: grpc.aio.ServicerContext):
        model, decision = await self.router.dry_run(GenerateRequest.from_pb(request.request))
        return decision.to_pb(model)


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
    def __init__(self, registry: WorkerRegistry, metrics: RouterMetrics) -> None:
        self.registry = registry
        self.metrics = metrics

    @error_boundary
    async def Register(self, request: registry_pb2.RegisterRequest, context: grpc.aio.ServicerContext):
        if not request.worker_id:
            raise InvalidArgument("worker_id", "is required")
        await self.registry.register(request.worker_id, request.address, request.model)
        return registry_pb2.RegisterResponse(heartbeat_interval_s=self.registry.heartbeat_interval_s)

    @error_boundary
    async def Heartbeat(self, request: registry_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext):
        known = self.registry.heartbeat(request.worker_id, WorkerLoad.from_pb(request.load))
        return registry_pb2.HeartbeatResponse(known=known)

    @error_boundary
    async def Deregister(self, request: registry_pb2.DeregisterRequest, context: grpc.aio.ServicerContext):
        self.registry.deregister(request.worker_id)
        return registry_pb2.DeregisterResponse()
