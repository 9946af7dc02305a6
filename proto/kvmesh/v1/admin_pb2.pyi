from kvmesh.v1 import generate_pb2 as _generate_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DryRunRouteRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: _generate_pb2.GenerateRequest
    def __init__(self, request: _Optional[_Union[_generate_pb2.GenerateRequest, _Mapping]] = ...) -> None: ...

class DryRunRouteResponse(_message.Message):
    __slots__ = ("model", "policy", "chosen_worker_id", "prompt_tokens", "prompt_blocks", "block_size", "workers", "formula")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    FORMULA_FIELD_NUMBER: _ClassVar[int]
    model: str
    policy: str
    chosen_worker_id: str
    prompt_tokens: int
    prompt_blocks: int
    block_size: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerRouteScore]
    formula: str
    def __init__(self, model: _Optional[str] = ..., policy: _Optional[str] = ..., chosen_worker_id: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., prompt_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerRouteScore, _Mapping]]] = ..., formula: _Optional[str] = ...) -> None: ...

class WorkerRouteScore(_message.Message):
    __slots__ = ("worker_id", "overlap_blocks", "cached_blocks", "predicted_blocks", "cost", "prefill_blocks", "decode_blocks", "probability")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    PREFILL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DECODE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    overlap_blocks: int
    cached_blocks: int
    predicted_blocks: int
    cost: float
    prefill_blocks: float
    decode_blocks: float
    probability: float
    def __init__(self, worker_id: _Optional[str] = ..., overlap_blocks: _Optional[int] = ..., cached_blocks: _Optional[int] = ..., predicted_blocks: _Optional[int] = ..., cost: _Optional[float] = ..., prefill_blocks: _Optional[float] = ..., decode_blocks: _Optional[float] = ..., probability: _Optional[float] = ...) -> None: ...
