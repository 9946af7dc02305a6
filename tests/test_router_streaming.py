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
from orchestrator.errors import WorkerFailed
from orchestrator.metrics import RouterMetrics
from orchestrator.read_ahead import ReadAhead
from orchestrator import router as router_module
from orchestrator.router import PreparedRequest, _Output
from orchestrator.tokenize import TokenizerBundle
from orchestrator.types import FinishReason, GenerateRequest, Sampling, TokenPrompt

TEXT = "Héllo wörld 🙂, the fake worker says STOP and then more text 日本語."
PROMPT = [5, 6, 7]
LENGTH = common_pb2.FINISH_REASON_LENGTH


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


async def take_all(ahead: ReadAhead, pause: float = 0.0) -> list[list[int]]:
    """Every batch ``ahead`` gives until the last one, sleeping ``pause`` after each (a busy consumer)."""
    batches = []
    while batch := await ahead.take():
        batches.append(batch)
        if pause:
            await asyncio.sleep(pause)
    return batches


async def test_read_ahead_gives_every_message_once_in_order_merging_what_queued_up():
    source = Source(40)
    ahead = ReadAhead(source.read, lambda m: m == 39)
    batches = await take_all(ahead, pause=0.002)  # the pump reads on meanwhile
    assert [m for b in batches for m in b] == list(range(40))
    assert len(batches) < 40                  # some were merged
    assert await ahead.take() == []           # after the last one


async def test_read_ahead_keeping_up_takes_one_message_at_a_time():
    source = Source(5)
    ahead = ReadAhead(source.read, lambda m: m == 4)
    assert await take_all(ahead) == [[0], [1], [2], [3], [4]]


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


def word_level_bundle() -> TokenizerBundle:
    """A WordLevel tokenizer that knows TEXT's words: no byte-level decoder, so
    the decode-window ``IncrementalDetokenizer`` (decode joins words with spaces)."""
    words = ["[UNK]", "a", "b", "c", "d", "e", "f", "g"] + list(dict.fromkeys(TEXT.split()))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return TokenizerBundle.build(tok.to_str())


BUNDLES = {"byte_level": lambda: bundle_for(byte_model_files()), "model": lambda: bundle_for(model_files()),
           "word_level": word_level_bundle}


@pytest.fixture(scope="module", params=list(BUNDLES))
def bundle(request) -> TokenizerBundle:
    return BUNDLES[request.param]()


@pytest.fixture(scope="module", params=["byte_level", "model"])
def byte_bundle(request) -> TokenizerBundle:
    return BUNDLES[request.param]()


def streamed_text(bundle: TokenizerBundle, ids: list[int]) -> str:
    """The text of ``ids`` generated after PROMPT (what the stream must add up to)."""
    return bundle.decode(PROMPT + ids)[len(bundle.decode(PROMPT)):]


def prepared(bundle: TokenizerBundle, **sampling) -> PreparedRequest:
    entry = SimpleNamespace(spec=SimpleNamespace(name="m", max_model_len=4096), tokenizer=bundle)
    return PreparedRequest("r1", entry, PROMPT, Sampling(**sampling), "", time.monotonic())


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


def relayed(bundle, msgs, batches: list[int], metrics: RouterMetrics | None = None, **sampling):
    """(output, chunks): the chunks ``_Output`` makes when the messages arrive in groups of ``batches``."""
    output = _Output(prepared(bundle, **sampling), bundle, metrics or RouterMetrics())
    chunks, i = [], 0
    for n in batches:
        chunks.append(output.on_batch(msgs[i:i + n], "w0"))
        i += n
        if chunks[-1].finish_reason is not None:
            break
    return output, chunks


def relay(bundle, msgs, batches: list[int], **sampling):
    return relayed(bundle, msgs, batches, **sampling)[1]


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
    assert text == streamed_text(bundle, ids) and got_ids == ids and lp_ids == ids
    assert finish is FinishReason.LENGTH
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) == (3, len(ids), 2)


def split(n: int, pattern: list[int]) -> list[int]:
    """Message sizes cycling through ``pattern``, summing to ``n``."""
    sizes = []
    while sum(sizes) < n:
        sizes.append(min(pattern[len(sizes) % len(pattern)], n - sum(sizes)))
    return sizes


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("pattern", [[1], [3], [2, 5, 1, 9, 13], [10_000]])
def test_a_stop_string_inside_a_message_or_a_merged_chunk_cuts_at_its_token(bundle, pattern, merge):
    """Worker messages of several tokens each (``pattern``; [10_000]: one message with
    every token), relayed one per chunk or merged into one: everything ends at the token
    that completes the stop string, as in a stream of one token per message."""
    ids = bundle.encode(TEXT, add_special_tokens=False)
    k = next(n for n in range(1, len(ids) + 1) if "says" in streamed_text(bundle, ids[:n]))
    assert k < len(ids)
    one_per_token = relay(bundle, messages(ids, [1] * len(ids), LENGTH, logprobs=True), [1] * len(ids),
                          stop=("says",), logprobs=True)
    msgs = messages(ids, split(len(ids), pattern), LENGTH, logprobs=True)
    output, chunks = relayed(bundle, msgs, [len(msgs)] if merge else [1] * len(msgs), stop=("says",),
                             logprobs=True)
    assert joined(chunks) == joined(one_per_token)
    text, got_ids, lp_ids, finish, usage = joined(chunks)
    full = streamed_text(bundle, ids)
    assert text == full[:full.index("says")]
    assert got_ids == lp_ids == output.generated == ids[:k]      # what a migration would resubmit
    assert finish is FinishReason.STOP
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) == (3, k, 2)


def test_a_stop_string_held_back_over_a_batch_boundary(bundle):
    ids = bundle.encode(TEXT, add_special_tokens=False)
    msgs = messages(ids, [1] * len(ids), common_pb2.FINISH_REASON_LENGTH)
    one_by_one = relay(bundle, msgs, [1] * len(msgs), stop=("STOP and", "日本"))
    merged = relay(bundle, msgs, split(len(msgs), [4, 1, 6, 2]), stop=("STOP and", "日本"))
    assert joined(merged) == joined(one_by_one)
    full = streamed_text(bundle, ids)
    assert joined(merged)[0] == full[:full.index("STOP and")]


def test_itl_is_observed_per_token_and_tokens_per_chunk_once_per_chunk(bundle, monkeypatch):
    """A gap g before a chunk of n tokens is n ITL observations of g/n; the first
    chunk's tokens have TTFT only."""
    now = [time.monotonic()]
    monkeypatch.setattr(router_module, "time", SimpleNamespace(monotonic=lambda: now[0]))
    ids = bundle.encode(TEXT, add_special_tokens=False)[:7]
    msgs = messages(ids, [1, 3, 2, 1], LENGTH)
    metrics = RouterMetrics()
    output = _Output(prepared(bundle), bundle, metrics)
    for msg, gap in zip(msgs, [0.5, 0.024, 0.004, 0.018]):
        now[0] += gap
        output.on_batch([msg], "w0")
    sample = metrics.registry.get_sample_value
    itl = "kvmesh_router_inter_token_latency_seconds"
    assert sample(f"{itl}_count", {"model": "m"}) == 6
    assert sample(f"{itl}_sum", {"model": "m"}) == pytest.approx(0.046)
    assert [sample(f"{itl}_bucket", {"model": "m", "le": le}) for le in ("0.0025", "0.01", "0.02")] == [2, 5, 6]
    tokens = "kvmesh_router_chunk_tokens"
    assert (sample(f"{tokens}_count", {"model": "m"}), sample(f"{tokens}_sum", {"model": "m"})) == (4, 7)
    assert [sample(f"{tokens}_bucket", {"model": "m", "le": le}) for le in ("1.0", "2.0", "3.0")] == [2, 3, 4]
    assert sample("kvmesh_router_time_to_first_token_seconds_count", {"model": "m"}) == 1


# --- detokenizers -------------------------------------------------------------------------

def test_byte_detokenizer_matches_decode_for_any_split(byte_bundle):
    bundle = byte_bundle
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
    assert isinstance(word_level_bundle().detokenizer(PROMPT), IncrementalDetokenizer)   # the bundle case


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
        assert sample("kvmesh_router_chunk_tokens_count", {"model": "smollm2-test"}) == len(chunks)
        assert sample("kvmesh_router_inter_token_latency_seconds_count", {"model": "smollm2-test"}) \
            == len(want) - len(chunks[0].token_ids)
    finally:
        await router.stop(grace=0)
        await worker.stop()


async def test_an_abort_takes_effect_at_the_next_chunk_not_after_what_was_read_ahead():
    reply = "one two three four five six seven eight nine ten " * 8
    worker = await start_fake_worker("w0", behaviour=Behaviour(reply=reply))
    router = await start_router([worker])
    try:
        request = GenerateRequest(count_prompt(router), sampling=Sampling(max_tokens=1500, ignore_eos=True),
                                  request_id="r-abort")
        async with aclosing(router.router.generate(request)) as stream:
            first = await anext(stream)
            await asyncio.sleep(0.2)          # the worker's messages queue up in the read-ahead
            assert router.router.abort("r-abort")
            rest = [chunk async for chunk in stream]
        assert first.token_ids and first.finish_reason is None
        assert len(rest) == 1 and rest[0].token_ids == () and rest[0].finish_reason is FinishReason.ABORT
        assert rest[0].usage.completion_tokens == len(first.token_ids)
    finally:
        await router.stop(grace=0)
        await worker.stop()


def count_prompt(router) -> TokenPrompt:
    bundle = router.router._registry.resolve("").tokenizer
    return TokenPrompt(tuple(bundle.encode("count:", add_special_tokens=False)))


async def test_worker_messages_are_counted_for_a_failed_request():
    worker = await start_fake_worker("w0", behaviour=Behaviour(reply="word " * 200, die_after_tokens=5))
    router = await start_router([worker], max_migrations=0)
    try:
        tokens = 0
        request = GenerateRequest(count_prompt(router), sampling=Sampling(max_tokens=100))
        with pytest.raises(WorkerFailed):
            async for chunk in router.router.generate(request):
                tokens += len(chunk.token_ids)
        assert tokens == 5
        sample = router.metrics.registry.get_sample_value
        assert sample("kvmesh_router_worker_messages_total", {"model": "smollm2-test"}) == 5
    finally:
        await router.stop(grace=0)           # the worker stopped its own server


async def test_worker_messages_are_counted_for_a_request_its_client_left():
    worker = await start_fake_worker("w0", behaviour=Behaviour(reply="word " * 200, token_delay_s=0.005))
    router = await start_router([worker])
    try:
        chunks = []
        request = GenerateRequest(count_prompt(router), sampling=Sampling(max_tokens=100))
        async with aclosing(router.router.generate(request)) as stream:
            async for chunk in stream:
                chunks.append(chunk)
                if len(chunks) == 3:
                    break
        sample = router.metrics.registry.get_sample_value
        assert sample("kvmesh_router_worker_messages_total", {"model": "smollm2-test"}) \
            == sum(len(c.token_ids) for c in chunks) >= 3
    finally:
        await router.stop(grace=0)
        await worker.stop()
