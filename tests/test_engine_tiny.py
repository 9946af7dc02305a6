"""The whole engine on the tiny random Llama (fast): parity with transformers,
stopping rules, seeded sampling, aborts, request validation, logprobs, prefix-cache
accounting and the KV event stream.

The tiny model is random, so its greedy continuations are arbitrary but fixed;
tests that need a particular token (a stop token, an EOS) take it from the
model's own reference continuation instead of hard-coding it.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from engine_helpers import greedy, run_to_completion, submit_all, tokens
from kvstore.hashing import HashNamespace, block_hashes, max_cacheable_prompt_blocks
from worker.engine.config import EngineConfig
from worker.engine.engine import LLMEngine
from worker.engine.types import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineRequest,
    FinishReason,
    SamplingOptions,
)

BS = 4
EOS = 255
PROMPT_LENGTHS = [1, 3, 4, 8, 13, 30]   # includes exact multiples of the block size
MAX_NEW = 10


def make_prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, EOS) for _ in range(length)]


PROMPTS = [make_prompt(i, n) for i, n in enumerate(PROMPT_LENGTHS)]


def engine(model_dir: Path, **kw) -> LLMEngine:
    kw.setdefault("block_size", BS)
    kw.setdefault("num_kv_blocks", 64)
    kw.setdefault("max_num_batched_tokens", 8)
    return LLMEngine(EngineConfig(model=str(model_dir), device="cpu", **kw))


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' argmax continuation, recomputing the whole sequence each step (no KV cache, no EOS)."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


@pytest.fixture(scope="module")
def reference(tiny_reference) -> list[list[int]]:
    return [hf_greedy(tiny_reference, p, MAX_NEW) for p in PROMPTS]


def first_new_token_index(stream: list[int]) -> int:
    """An index ``k`` (preferably 2, so the stop is mid-stream) whose token does not occur before it."""
    for start in (2, 1, 0):
        for i in range(start, len(stream)):
            if stream[i] not in stream[:i]:
                return i
    raise AssertionError("unreachable: index 0 is always fresh")


# ---- parity ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        pytest.param({}, id="chunked"),                                    # budget 8 < most prompts
        pytest.param({"num_kv_blocks": 14, "max_num_batched_tokens": 16}, id="preempting"),
        pytest.param({"max_num_seqs": 2, "enable_prefix_caching": False}, id="two-seqs-no-cache"),
    ],
)
def test_greedy_parity_with_transformers(tiny_model_dir, reference, kw):
    eng = engine(tiny_model_dir, **kw)
    for round_ in ("cold", "warm"):
        ids = submit_all(eng, PROMPTS, greedy(MAX_NEW, ignore_eos=True), prefix=round_)
        outs = run_to_completion(eng, max_steps=2000)
        for rid, p, ref in zip(ids, PROMPTS, reference):
            got = tokens(outs[rid])
            assert got == ref, f"{round_} {rid} (prompt of {len(p)}): engine {got} != transformers {ref}"
            assert outs[rid][-1].finish_reason is FinishReason.LENGTH
        assert eng.load().kv_blocks_used == 0
    if kw.get("num_kv_blocks") == 14:
        assert eng.num_preemptions > 0, "the small pool never forced a preemption"


def test_warm_run_reports_cache_hits(tiny_model_dir, reference):
    eng = engine(tiny_model_dir)
    submit_all(eng, PROMPTS, greedy(MAX_NEW, ignore_eos=True), prefix="cold")
    run_to_completion(eng)
    ids = submit_all(eng, PROMPTS, greedy(MAX_NEW, ignore_eos=True), prefix="warm")
    outs = run_to_completion(eng)
    for rid, p, ref in zip(ids, PROMPTS, reference):
        assert tokens(outs[rid]) == ref
        assert outs[rid][0].num_cached_tokens == max_cacheable_prompt_blocks(len(p), BS) * BS


# ---- stopping ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7])
def test_max_tokens_exact(tiny_model_dir, n):
    eng = engine(tiny_model_dir)
    ids = submit_all(eng, PROMPTS, greedy(n, ignore_eos=True))
    outs = run_to_completion(eng)
    for rid in ids:
        assert len(outs[rid]) == n and all(len(o.new_token_ids) == 1 for o in outs[rid])
        assert [o.finish_reason for o in outs[rid]] == [None] * (n - 1) + [FinishReason.LENGTH]


def test_context_window_caps_output(tiny_model_dir):
    eng = engine(tiny_model_dir, num_kv_blocks=8)   # 32 tokens: the window is the pool
    assert eng.max_model_len == 32
    eng.add_request(EngineRequest("r", tuple(make_prompt(1, 28)), SamplingOptions(temperature=0.0, ignore_eos=True)))
    outs = run_to_completion(eng)["r"]
    assert len(outs) == 4 and outs[-1].finish_reason is FinishReason.LENGTH


def test_stop_token_ids(tiny_model_dir, reference):
    eng = engine(tiny_model_dir)
    for i, (p, ref) in enumerate(zip(PROMPTS, reference)):
        k = first_new_token_index(ref)
        stop = ref[k]
        eng.add_request(EngineRequest(f"s{i}", tuple(p), greedy(MAX_NEW, ignore_eos=True, stop_token_ids=(stop, 9999))))
    outs = run_to_completion(eng)
    for i, ref in enumerate(reference):
        k = first_new_token_index(ref)
        got = outs[f"s{i}"]
        assert tokens(got) == ref[: k + 1], "must stop at the stop token and include it"
        assert got[-1].finish_reason is FinishReason.STOP
        assert all(o.finish_reason is None for o in got[:-1])


@pytest.fixture(scope="module")
def eos_model(tmp_path_factory, tiny_model_dir, reference) -> tuple[Path, int, int]:
    """The tiny model with its EOS id moved to a token that prompt 4's greedy
    continuation produces (at index ``k``): (dir, eos id, k)."""
    ref = reference[4]
    k = first_new_token_index(ref)
    path = tmp_path_factory.mktemp("tiny-llama-eos")
    for f in Path(tiny_model_dir).iterdir():
        if f.is_file():
            shutil.copy(f, path / f.name)
    for name in ("config.json", "generation_config.json"):
        cfg_path = path / name
        if cfg_path.exists():
            cfg = json.loads(cfg_path.read_text())
            cfg["eos_token_id"] = ref[k]
            cfg_path.write_text(json.dumps(cfg))
    return path, ref[k], k


def test_eos_stops_unless_ignored(eos_model, reference):
    path, eos, k = eos_model
    eng = engine(path)
    assert eng.model_summary.eos_token_ids == (eos,)
    prompt = tuple(PROMPTS[4])
    eng.add_request(EngineRequest("stop", prompt, greedy(MAX_NEW)))
    eng.add_request(EngineRequest("ignore", prompt, greedy(MAX_NEW, ignore_eos=True)))
    outs = run_to_completion(eng)
    assert tokens(outs["stop"]) == reference[4][: k + 1]
    assert outs["stop"][-1].finish_reason is FinishReason.STOP
    assert tokens(outs["ignore"]) == reference[4]
    assert outs["ignore"][-1].finish_reason is FinishReason.LENGTH


# ---- seeded sampling -------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_across_runs_and_batches(tiny_model_dir):
    opts = SamplingOptions(temperature=1.0, top_k=100, top_p=0.95, seed=42, max_tokens=12, ignore_eos=True)
    prompt = tuple(PROMPTS[3])

    eng1 = engine(tiny_model_dir)
    eng1.add_request(EngineRequest("alone", prompt, opts))
    alone = tokens(run_to_completion(eng1)["alone"])
    assert len(alone) == 12

    # a fresh engine, other budget, the request arriving behind busy batch mates
    eng2 = engine(tiny_model_dir, max_num_batched_tokens=5)
    mates = [
        ("g", PROMPTS[5], SamplingOptions(temperature=0.0, max_tokens=6, ignore_eos=True)),
        ("s7", PROMPTS[4], SamplingOptions(temperature=0.7, seed=7, max_tokens=15, ignore_eos=True)),
        ("u", PROMPTS[1], SamplingOptions(temperature=1.3, top_p=0.5, max_tokens=9, ignore_eos=True)),
    ]
    for rid, p, o in mates[:2]:
        eng2.add_request(EngineRequest(rid, tuple(p), o))
    eng2.step()
    eng2.add_request(EngineRequest("batched", prompt, opts))
    eng2.add_request(EngineRequest(mates[2][0], tuple(mates[2][1]), mates[2][2]))
    outs = run_to_completion(eng2)
    assert tokens(outs["batched"]) == alone
    # a different seed gives a different stream (the model's distribution is broad)
    eng1.add_request(EngineRequest("other", prompt, SamplingOptions(temperature=1.0, seed=43, max_tokens=12, ignore_eos=True)))
    assert tokens(run_to_completion(eng1)["other"]) != alone


# ---- abort -----------------------------------------------------------------------------


def test_abort_frees_blocks_and_silences_the_request(tiny_model_dir):
    eng = engine(tiny_model_dir, max_num_seqs=2)
    for i in range(3):
        eng.add_request(EngineRequest(f"r{i}", tuple(PROMPTS[5]), greedy(20, ignore_eos=True)))
    for _ in range(6):
        eng.step()
    load = eng.load()
    assert load.num_running == 2 and load.num_waiting == 1 and load.kv_blocks_used > 0
    assert eng.abort_request("r2")                    # waiting
    assert eng.abort_request("r0")                    # running
    assert not eng.abort_request("r0") and not eng.abort_request("unknown")
    seen = set()
    for _ in range(3):
        seen |= {o.request_id for o in eng.step()}
    assert seen == {"r1"}
    used = eng.load().kv_blocks_used
    assert 0 < used <= -(-(len(PROMPTS[5]) + 20) // BS)  # only r1's blocks are left
    assert eng.abort_request("r1")
    load = eng.load()
    assert load.kv_blocks_used == 0 and load.num_running == 0 and load.num_waiting == 0
    assert not eng.has_unfinished()
    assert eng.step() == []
    # the ids are free again
    eng.add_request(EngineRequest("r0", tuple(PROMPTS[0]), greedy(2)))
    assert [o.request_id for o in run_to_completion(eng)["r0"]] == ["r0", "r0"]


# ---- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "field"),
    [
        ((), "prompt_token_ids"),
        ((1,) * 64, "prompt_token_ids"),              # max_model_len = 64 (16 blocks of 4)
        ((1,) * 100, "prompt_token_ids"),
        ((1, 2, 256), "prompt_token_ids"),            # vocab_size = 256
        ((1, -1, 2), "prompt_token_ids"),
    ],
    ids=["empty", "at-window", "over-window", "above-vocab", "negative"],
)
def test_add_request_rejects_bad_prompts(tiny_model_dir, prompt, field):
    eng = engine(tiny_model_dir, num_kv_blocks=16)
    assert eng.max_model_len == 64
    with pytest.raises(ValueError, match=f"^{field}"):
        eng.add_request(EngineRequest("r", prompt, greedy(1)))
    assert not eng.has_unfinished()
    eng.add_request(EngineRequest("r", (1,) * 63, greedy(1)))    # the longest prompt that fits
    assert run_to_completion(eng)["r"][-1].finish_reason is not None


def test_add_request_rejects_duplicate_ids(tiny_model_dir):
    eng = engine(tiny_model_dir)
    eng.add_request(EngineRequest("dup", (1, 2, 3), greedy(3)))
    with pytest.raises(ValueError, match="^request_id.*dup"):
        eng.add_request(EngineRequest("dup", (4, 5), greedy(3)))
    eng.step()                                         # now running, still a duplicate
    with pytest.raises(ValueError, match="^request_id"):
        eng.add_request(EngineRequest("dup", (4, 5), greedy(3)))
    outs = run_to_completion(eng)
    assert list(outs) == ["dup"] and tokens(outs["dup"])


# ---- logprobs ----------------------------------------------------------------------------


def test_logprobs_match_transformers(tiny_model_dir, tiny_reference, reference):
    eng = engine(tiny_model_dir)
    ask = greedy(MAX_NEW, ignore_eos=True, logprobs=True, top_logprobs=4)
    eng.add_request(EngineRequest("lp", tuple(PROMPTS[4]), ask))
    eng.add_request(EngineRequest("plain", tuple(PROMPTS[4]), greedy(MAX_NEW, ignore_eos=True)))
    outs = run_to_completion(eng)
    assert all(o.logprobs == () for o in outs["plain"])
    got = outs["lp"]
    assert tokens(got) == reference[4]
    full = PROMPTS[4] + reference[4]
    with torch.inference_mode():
        ref_lp = torch.log_softmax(tiny_reference(torch.tensor([full])).logits[0].double(), -1)
    for j, o in enumerate(got):
        assert len(o.logprobs) == 1
        lp = o.logprobs[0]
        pos = len(PROMPTS[4]) - 1 + j
        assert lp.token_id == o.new_token_ids[0]
        assert lp.logprob == pytest.approx(ref_lp[pos, lp.token_id].item(), abs=1e-4)
        assert len(lp.top) == 4
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        assert lp.top[0][0] == lp.token_id           # greedy: the chosen token is the most likely
        top = ref_lp[pos].topk(4)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert values == pytest.approx(top.values.tolist(), abs=1e-4)


# ---- prefix-cache accounting --------------------------------------------------------------


def test_num_cached_tokens_on_first_output_only(tiny_model_dir):
    eng = engine(tiny_model_dir)
    p13 = tuple(PROMPTS[4])                           # 13 tokens: 3 cacheable blocks
    eng.add_request(EngineRequest("cold", p13, greedy(4, ignore_eos=True)))
    cold = run_to_completion(eng)["cold"]
    assert [(o.num_prompt_tokens, o.num_cached_tokens) for o in cold] == [(13, 0), (0, 0), (0, 0), (0, 0)]
    eng.add_request(EngineRequest("warm", p13, greedy(4, ignore_eos=True)))
    eng.add_request(EngineRequest("head", p13[:12], greedy(2, ignore_eos=True)))   # exactly 3 full blocks
    eng.add_request(EngineRequest("salted", p13, greedy(2, ignore_eos=True), cache_salt="tenant"))
    outs = run_to_completion(eng)
    assert [(o.num_prompt_tokens, o.num_cached_tokens) for o in outs["warm"]] == [(13, 12), (0, 0), (0, 0), (0, 0)]
    assert tokens(outs["warm"]) == tokens(cold)
    assert outs["head"][0].num_cached_tokens == 8     # the last block is recomputed
    assert outs["salted"][0].num_cached_tokens == 0   # another namespace shares nothing
    assert all(o.num_cached_tokens == 0 and o.num_prompt_tokens == 0 for o in outs["head"][1:])


# ---- KV events ----------------------------------------------------------------------------


def test_kv_events_describe_the_cached_set(tiny_model_dir):
    eng = engine(tiny_model_dir, num_kv_blocks=20, max_num_batched_tokens=12)
    name = eng.model_summary.name
    assert name == Path(tiny_model_dir).name
    roots = {s: HashNamespace(model=name, cache_salt=s).root_hash() for s in ("", "t1")}
    replay: set[int] = set()
    counts = {"stored": 0, "removed": 0}

    def drain_and_check() -> None:
        for ev in eng.drain_kv_events():
            if isinstance(ev, BlockStored):
                assert ev.block_size == BS and len(ev.token_ids) == BS * len(ev.block_hashes)
                parents = list(roots.values()) if ev.parent_block_hash is None else [ev.parent_block_hash]
                assert any(block_hashes(ev.token_ids, BS, parent_hash=r) == list(ev.block_hashes) for r in parents)
                for h in ev.block_hashes:
                    assert h not in replay
                    replay.add(h)
                counts["stored"] += len(ev.block_hashes)
            elif isinstance(ev, BlockRemoved):
                for h in ev.block_hashes:
                    assert h in replay
                    replay.remove(h)
                counts["removed"] += len(ev.block_hashes)
            else:
                assert isinstance(ev, AllBlocksCleared)
                replay.clear()
        assert replay == set(eng.block_manager.cached_block_hashes())
        assert len(replay) == eng.load().kv_blocks_cached

    rng = random.Random(5)
    shared = make_prompt(99, 24)
    for i in range(14):
        prompt = shared[: rng.randint(0, 24)] + make_prompt(100 + i, rng.randint(1, 16))
        salt = "t1" if i % 4 == 3 else ""
        eng.add_request(EngineRequest(f"k{i}", tuple(prompt), greedy(rng.randint(1, 8), ignore_eos=True), cache_salt=salt))
        if i % 3 == 2:
            for _ in range(4):
                eng.step()
                drain_and_check()
    for _ in range(2000):
        if not eng.has_unfinished():
            break
        eng.step()
        drain_and_check()
    assert not eng.has_unfinished()
    assert counts["stored"] > 0 and counts["removed"] > 0, counts   # the pool was small enough to evict
    assert eng.block_manager.reset_prefix_cache()
    drain_and_check()
    assert replay == set() and eng.load().kv_blocks_cached == 0
