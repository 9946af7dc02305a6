"""Proto <-> engine types for the Worker service; the servicer never builds a message by hand.

Unset optional ``SamplingParams`` fields take the defaults documented in
common.proto (temperature 1.0, top_p 1.0, top_k off, fresh seed, max_tokens
up to the context window). Stop strings are ignored here: the router owns
text and applies them.
"""

from __future__ import annotations

from kvmesh.v1 import common_pb2, worker_pb2
from kvstore.hashing import HASH_SCHEME
from worker.engine.types import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineRequest,
    FinishReason,
    LoadSnapshot,
    RequestOutput,
    SamplingOptions,
)
from worker.engine_loop import KvCacheSnapshot, ServedModel
from worker.kv_events import NumberedEvent

_FINISH_TO_PB = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
}


def sampling_from_pb(pb: common_pb2.SamplingParams) -> SamplingOptions:
    """Raises ValueError naming the field when a value is out of bounds."""
    return SamplingOptions(
        temperature=pb.temperature if pb.HasField("temperature") else 1.0,
        top_p=pb.top_p if pb.HasField("top_p") else 1.0,
        top_k=pb.top_k if pb.HasField("top_k") else 0,
        seed=pb.seed if pb.HasField("seed") else None,
        max_tokens=pb.max_tokens if pb.HasField("max_tokens") else None,
        stop_token_ids=tuple(pb.stop_token_ids),
        ignore_eos=pb.ignore_eos,
        logprobs=pb.logprobs,
        top_logprobs=pb.top_logprobs,
    )


def request_from_pb(pb: worker_pb2.SubmitRequest) -> EngineRequest:
    """Raises ValueError naming the field. The prompt itself (empty, too long,
    ids outside the vocabulary) is checked by the engine's ``add_request``."""
    if not pb.request_id:
        raise ValueError("request_id must not be empty")
    return EngineRequest(
        request_id=pb.request_id,
        prompt_token_ids=tuple(pb.prompt_token_ids),
        sampling=sampling_from_pb(pb.sampling),
        cache_salt=pb.cache_salt,
    )


def output_to_pb(out: RequestOutput, first: bool) -> worker_pb2.SubmitResponse:
    """One streamed delta; prompt accounting goes on the ``first`` message only."""
    pb = worker_pb2.SubmitResponse(
        token_ids=out.new_token_ids,
        finish_reason=_FINISH_TO_PB[out.finish_reason],
    )
    for lp in out.logprobs:
        pb.logprobs.append(
            common_pb2.Logprob(
                token_id=lp.token_id,
                logprob=lp.logprob,
                top=[common_pb2.TokenLogprob(token_id=t, logprob=p) for t, p in lp.top],
            )
        )
    if first:
        pb.prompt_tokens = out.num_prompt_tokens
        pb.cached_tokens = out.num_cached_tokens
    return pb


def load_to_pb(load: LoadSnapshot, worker_id: str, draining: bool) -> worker_pb2.LoadReport:
    return worker_pb2.LoadReport(
        worker_id=worker_id,
        num_running=load.num_running,
        num_waiting=load.num_waiting,
        waiting_prefill_tokens=load.waiting_prefill_tokens,
        kv_blocks_total=load.kv_blocks_total,
        kv_blocks_used=load.kv_blocks_used,
        kv_blocks_cached=load.kv_blocks_cached,
        kv_usage=load.kv_usage,
        draining=draining,
    )


def model_info_to_pb(model: ServedModel, worker_id: str) -> worker_pb2.ModelInfo:
    s = model.summary
    return worker_pb2.ModelInfo(
        worker_id=worker_id,
        model=s.name,
        max_model_len=s.max_model_len,
        block_size=s.block_size,
        eos_token_ids=s.eos_token_ids,
        tokenizer_json=model.tokenizer_json,
        chat_template=model.chat_template or "",
        bos_token=model.bos_token or "",
        eos_token=model.eos_token or "",
        vocab_size=s.vocab_size,
        hash_scheme=HASH_SCHEME,
    )


def kv_event_to_pb(numbered: NumberedEvent) -> worker_pb2.KvEvent:
    ev = numbered.event
    pb = worker_pb2.KvEvent(event_id=numbered.event_id)
    if isinstance(ev, BlockStored):
        pb.stored.block_hashes.extend(ev.block_hashes)
        if ev.parent_block_hash is not None:
            pb.stored.parent_block_hash = ev.parent_block_hash
        pb.stored.token_ids.extend(ev.token_ids)
        pb.stored.block_size = ev.block_size
    elif isinstance(ev, BlockRemoved):
        pb.removed.block_hashes.extend(ev.block_hashes)
    elif isinstance(ev, AllBlocksCleared):
        pb.cleared.SetInParent()
    else:
        raise TypeError(f"unknown KV cache event type {type(ev).__name__}")
    return pb


def kv_batch_to_pb(batch: list[NumberedEvent]) -> worker_pb2.KvEventBatch:
    return worker_pb2.KvEventBatch(events=[kv_event_to_pb(e) for e in batch])


def kv_snapshot_to_pb(snapshot: KvCacheSnapshot, epoch: str) -> worker_pb2.KvSnapshot:
    return worker_pb2.KvSnapshot(last_event_id=snapshot.last_event_id, block_hashes=snapshot.block_hashes,
                                 kv_blocks_total=snapshot.kv_blocks_total, epoch=epoch)
