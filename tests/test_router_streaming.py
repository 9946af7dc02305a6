"""Relaying many tokens cheaply: ``ReadAhead`` (worker messages read ahead of a busy
consumer), chunks merged from several worker messages (``_Output.on_batch``), and the
byte-table detokenizer, each checked against the one-message-at-a-time behaviour."""

from __future__ import annotations

import asyncio
import random
import time
from contextlib import aclosing
from types import SimpleNamespace

import pytest
from router_fixtures import Behaviour, byte_model_files, model_files, start_fake_worker, start_router
from tokenizers import Tokenizer, models, pre_tokenizers

from kvmesh.v1 import common_pb2, worker_pb2
from orchestrator.detokenize import ByteDetokenizer, IncrementalDetokenizer
from orchestrator.metrics import RouterMetrics
from orchestrator.read_ahead import ReadAhead
from orchestrator.router import PreparedRequest, _Output
from orchestrator.tokenize import TokenizerBundle
from orchestrator.types import FinishReason, GenerateRequest, Sampling, TokenPrompt

TEXT = "Héllo wörld 🙂, the fake worker says STOP and then more text 日本語."


# --- ReadAhead ---------------------------------------------------------------------------

class Source:
    """Messages 0..n-1 (n-1 is the last), or an error after ``fail_after`` of them."""

    def __init__(self, n: int, fail_after: int | None = None) -> None:
        self.n, self.fail_after, self.sent = n, fail_after, 0
        self.more = asyncio.Event()
        self.more.set()

    async def read(self) -> int:
        await self.more.wait()
        await asyncio.sleep(0)
        if self.fail_after is not None and self.sent == self.fail_after:
            raise ConnectionError("worker gone")
        self.sent += 1
        return self.sent - 1


async def test_read_ahead_gives_every_message_once_in_order_merging_what_queued_up():
    source = Source(40)
    ahead = ReadAhead(source.read, lambda m: m == 39)
    batches = []
    while batch := await ahead.take():
        batches.append(batch)
        await asyncio.sleep(0.002)            # a busy consumer: the pump reads on meanwhile
    assert [m for b in batches for m in b] == list(range(40))
    assert len(batches) < 40                  # some were merged
    assert await ahead.take() == []           # after the last one


async def test_read_ahead_keeping_up_takes_one_message_at_a_time():
    source = Source(5)
    ahead = ReadAhead(source.read, lambda m: m == 4)
    batches = []
    while batch := await ahead.take():
        batches.append(batch)
    assert batches == [[0], [1], [2], [3], [4]]


async def test_read_ahead_raises_the_error_after_the_messages_before_it():
    source = Source(100, fail_after=3)
    ahead = ReadAhead(source.read, lambda m: False)
    await asyncio.sleep(0.05)                 # everything before the failure is read by now
    assert await ahead.take() == [0, 1, 2]
    with pytest.raises(ConnectionError):
        await ahead.take()


async def test_read_ahead_stops_reading_at_its_limit_until_the_consumer_takes():
    source = Source(100)
    ahead = ReadAhead(source.read, lambda m: m == 99, limit=8)
    await asyncio.sleep(0.05)
    assert source.sent == 8
    assert await ahead.take() == list(range(8))
    await asyncio.sleep(0.05)
    assert source.sent == 16
    ahead.close()


async def test_read_ahead_close_cancels_the_pending_read():
    source = Source(10)
    source.more.clear()                       # the read blocks
    ahead = ReadAhead(source.read, lambda m: False)
    await asyncio.sleep(0.01)
    ahead.close()
    await asyncio.sleep(0.01)
    assert ahead._task.cancelled()


# --- merged chunks ----------------------------------------------------------------------

def bundle_for(files) -> TokenizerBundle:
    return TokenizerBundle.build(files.tokenizer_json, files.chat_template,
                                 bos_token=files.bos_token, eos_token=files.eos_token)


@pytest.fixture(scope="module", params=["byte_level", "model"])
def bundle(request) -> TokenizerBundle:
    return bundle_for(byte_model_files() if request.param == "byte_level" else model_files())


def prepared(bundle: TokenizerBundle, **sampling) -> PreparedRequest:
    entry = SimpleNamespace(spec=SimpleNamespace(name="m", max_model_len=4096), tokenizer=bundle)
    return PreparedRequest("r1", entry, [5, 6, 7], Sampling(**sampling), "", time.monotonic())


def messages(ids: list[int], sizes: list[int], finish: int, logprobs: bool = False):
    """Worker messages carrying ``ids`` in pieces of ``sizes``; the last one has ``finish``."""
    out, i = [], 0
    for k, size in enumerate(sizes):
        part = ids[i:i + size]
        i += size
        m = worker_pb2.SubmitResponse(token_ids=part, finish_reason=finish if k == len(sizes) - 1 else 0)
        if logprobs:
            m.logprobs.extend(common_pb2.Logprob(token_id=t, logprob=-0.5) for t in part)
        if k == 0:
            m.cached_tokens = 2
        out.append(m)
    assert i == len(ids)
    return out


def relay(bundle, msgs, batches: list[int], **sampling):
    """The chunks ``_Output`` makes when the messages arrive in groups of ``batches``."""
    output = _Output(prepared(bundle, **sampling), bundle, RouterMetrics())
    chunks, i = [], 0
    for n in batches:
        chunks.append(output.on_batch(msgs[i:i + n], "w0"))
        i += n
        if chunks[-1].finish_reason is not None:
            break
    return chunks


def joined(chunks):
    return ("".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids],
            [lp.token_id for c in chunks for lp in c.logprobs], chunks[-1].finish_reason, chunks[-1].usage)


def test_a_merged_chunk_is_the_concatenation_of_the_single_ones(bundle):
    ids = bundle.encode(TEXT, add_special_tokens=False)
    msgs = messages(ids, [1] * len(ids), common_pb2.FINISH_REASON_LENGTH, logprobs=True)
    one_by_one = relay(bundle, msgs, [1] * len(msgs), logprobs=True)
    merged = relay(bundle, msgs, [7, 1, len(msgs) - 8], logprobs=True)
    assert len(merged) == 3
    assert joined(merged) == joined(one_by_one)
    text, got_ids, lp_ids, finish, usage = joined(merged)
    assert text == TEXT and got_ids == ids and lp_ids == ids
    assert finish is FinishReason.LENGTH
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) == (3, len(ids), 2)


def split(n: int, pattern: list[int]) -> list[int]:
    """Message sizes cycling through ``pattern``, summing to ``n``."""
    sizes = []
    while sum(sizes) < n:
        sizes.append(min(pattern[len(sizes) % len(pattern)], n - sum(sizes)))
    return sizes


@pytest.mark.parametrize("pattern", [[1], [3], [2, 5, 1, 9, 13]])
def test_a_stop_string_inside_a_merged_chunk_cuts_there_and_drops_the_rest(bundle, pattern):
    ids = bundle.encode(TEXT, add_special_tokens=False)
    msgs = messages(ids, split(len(ids), pattern), common_pb2.FINISH_REASON_LENGTH)
    one_by_one = relay(bundle, msgs, [1] * len(msgs), stop=("says",))
    merged = relay(bundle, msgs, [len(msgs)], stop=("says",))
    assert len(merged) == 1
    assert joined(merged) == joined(one_by_one)
    text, got_ids, _, finish, usage = joined(merged)
    assert text == "Héllo wörld 🙂, the fake worker "
    assert finish is FinishReason.STOP
    assert usage.completion_tokens == len(got_ids) < len(ids)     # tokens after the stop's message: not counted


def test_a_stop_string_held_back_over_a_batch_boundary(bundle):
    ids = bundle.encode(TEXT, add_special_tokens=False)
    msgs = messages(ids, [1] * len(ids), common_pb2.FINISH_REASON_LENGTH)
    one_by_one = relay(bundle, msgs, [1] * len(msgs), stop=("STOP and", "日本"))
    merged = relay(bundle, msgs, split(len(msgs), [4, 1, 6, 2]), stop=("STOP and", "日本"))
    assert joined(merged) == joined(one_by_one)
    assert joined(merged)[0] == "Héllo wörld 🙂, the fake worker says "


# --- detokenizers -------------------------------------------------------------------------

def test_byte_detokenizer_matches_decode_for_any_split(bundle):
    assert isinstance(bundle.detokenizer([]), ByteDetokenizer)
    rng = random.Random(0)
    vocab = bundle.vocab_size
    for _ in range(300):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        detok, i, text = bundle.detokenizer([1, 2]), 0, ""
        while i < len(ids):
            n = rng.randint(1, 5)
            text += detok.add(ids[i:i + n])
            i += n
        assert text + detok.flush() == bundle.decode(ids)


def test_other_tokenizers_keep_the_decode_window():
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "again": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bundle = TokenizerBundle.build(tok.to_str())
    detok = bundle.detokenizer([1])
    assert isinstance(detok, IncrementalDetokenizer)
    assert detok.add([2]) + detok.add([3, 1]) + detok.flush() == " world again hello"


# --- through a router -------------------------------------------------------------------

async def test_a_slow_consumer_gets_merged_chunks_with_every_token_once():
    reply = "one two three four five six seven eight nine ten " * 8
    worker = await start_fake_worker("w0", behaviour=Behaviour(reply=reply, cached_tokens=4))
    router = await start_router([worker])
    try:
        bundle = router.router._registry.resolve("").tokenizer
        want = bundle.encode(reply, add_special_tokens=False)
        prompt = TokenPrompt(tuple(bundle.encode("count:", add_special_tokens=False)))
        request = GenerateRequest(prompt, sampling=Sampling(max_tokens=len(want), ignore_eos=True))
        chunks = []
        async with aclosing(router.router.generate(request)) as stream:
            async for chunk in stream:
                chunks.append(chunk)
                await asyncio.sleep(0.01)     # the client side is behind: worker messages queue up
        ids = [t for c in chunks for t in c.token_ids]
        assert ids == want
        assert "".join(c.text for c in chunks) == reply
        assert len(chunks) < len(want) / 2
        last = chunks[-1]
        assert last.finish_reason is FinishReason.LENGTH
        assert (last.usage.completion_tokens, last.usage.cached_tokens) == (len(want), 4)
        sample = router.metrics.registry.get_sample_value
        assert sample("kvmesh_router_worker_messages_total", {"model": "smollm2-test"}) == len(want)
        assert sample("kvmesh_router_inter_token_latency_seconds_count", {"model": "smollm2-test"}) \
            == len(chunks) - 1
    finally:
        await router.stop(grace=0)
        await worker.stop()
