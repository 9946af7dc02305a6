"""The router's gRPC client API (``kvmesh.v1.Generation.Generate``) as a benchmark target.

Prompts go out as token ids (``GenerateRequest.token_ids``) unless the
request carries text. Each streamed message's ``token_ids`` says how many
tokens it brought; the last message's ``usage`` gives the prompt and cached
token counts. One channel (one HTTP/2 connection) carries every stream.
"""

from __future__ import annotations

import time
from typing import Callable

import grpc

from kvmesh.v1 import common_pb2, generate_pb2, generate_pb2_grpc
from orchestrator.bench.backends import BackendUnavailable, pick_model
from orchestrator.bench.records import OutgoingRequest, StreamResult

CONNECT_TIMEOUT_S = 10.0
_FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
    common_pb2.FINISH_REASON_ERROR: "error",
}


class GrpcBackend:
    name = "grpc"

    def __init__(self, target: str, *, model: str = "", timeout_s: float = 300.0,
                 tokenize: Callable[[str], list[int]] | None = None) -> None:
        self.target = target
        self.model = model
        self._timeout_s = timeout_s
        self._channel: grpc.aio.Channel | None = None
        self._stub: generate_pb2_grpc.GenerationStub | None = None

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.target, options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ])
        self._stub = generate_pb2_grpc.GenerationStub(self._channel)
        try:
            listed = await self._stub.ListModels(generate_pb2.ListModelsRequest(), timeout=CONNECT_TIMEOUT_S,
                                                 wait_for_ready=True)
        except grpc.aio.AioRpcError as e:
            raise BackendUnavailable(f"router at {self.target} did not answer ListModels ({e.code().name}: "
                                     f"{e.details()}); is a kvmesh router listening there?") from None
        self.model = pick_model([m.id for m in listed.models if m.num_workers > 0], self.model, self.target)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def _request(self, req: OutgoingRequest) -> generate_pb2.GenerateRequest:
        sampling = common_pb2.SamplingParams(max_tokens=req.max_tokens, ignore_eos=req.ignore_eos,
                                             temperature=req.temperature)
        pb = generate_pb2.GenerateRequest(request_id=req.request_id, model=self.model, sampling=sampling,
                                          cache_salt=req.cache_salt)
        if req.prompt_text is not None:
            pb.text = req.prompt_text
        else:
            pb.token_ids.ids.extend(req.prompt_ids)
        return pb

    async def send(self, req: OutgoingRequest) -> StreamResult:
        assert self._stub is not None, "start() first"
        pb = self._request(req)
        times: list[float] = []
        counts: list[int] = []
        output: list[int] = []
        last: generate_pb2.GenerateResponse | None = None
        perf = time.perf_counter
        sent = perf()
        call = self._stub.Generate(pb, timeout=self._timeout_s)
        try:
            async for msg in call:
                now = perf()
                n = len(msg.token_ids)
                if n:
                    times.append(now)
                    counts.append(n)
                    if req.keep_output:
                        output.extend(msg.token_ids)
                if msg.finish_reason:
                    last = msg
        except grpc.aio.AioRpcError as e:
            code = e.code()
            kind = "timeout" if code == grpc.StatusCode.DEADLINE_EXCEEDED else f"grpc:{code.name}"
            return StreamResult(sent, perf(), tuple(times), tuple(counts), sum(counts),
                                error_kind=kind, error=e.details() or "")
        finally:
            call.cancel()
        end = perf()
        total = sum(counts)
        if last is None:
            return StreamResult(sent, end, tuple(times), tuple(counts), total, error_kind="incomplete",
                                error="the stream ended without a finish reason")
        finish = _FINISH.get(last.finish_reason, str(last.finish_reason))
        error_kind = f"finish:{finish}" if finish in ("abort", "error") else ("no_output" if not times else None)
        usage = last.usage
        return StreamResult(sent, end, tuple(times), tuple(counts), total,
                            prompt_tokens=usage.prompt_tokens, cached_tokens=usage.cached_tokens,
                            finish_reason=finish, error_kind=error_kind, worker_id=last.worker_id,
                            output_ids=tuple(output))
