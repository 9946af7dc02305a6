"""kvmesh bench request shapes on the real SmolLM2 tokenizer: exact lengths,
length distributions, shared prefixes, multi-turn chains, datasets, traces."""

from __future__ import annotations

import json
import random
import statistics

import pytest

from orchestrator.bench import workloads
from orchestrator.bench.arrivals import TraceEntry
from orchestrator.bench.tokens import TokenSource
from orchestrator.bench.workloads import LengthDist, WorkloadConfig


@pytest.fixture(scope="module")
def source(smollm2_dir) -> TokenSource:
    return TokenSource.load(str(smollm2_dir))


def config(**kw) -> WorkloadConfig:
    kw.setdefault("input_len", LengthDist.parse("32"))
    kw.setdefault("output_len", LengthDist.parse("8"))
    return WorkloadConfig(**kw)


# --- lengths ---------------------------------------------------------------------------

def test_length_forms():
    assert LengthDist.parse("128").sample(random.Random(0)) == 128
    rng = random.Random(0)
    u = [LengthDist.parse("uniform:10,20").sample(rng) for _ in range(4000)]
    assert min(u) == 10 and max(u) == 20 and statistics.fmean(u) == pytest.approx(15, abs=0.3)
    n = LengthDist.parse("normal:100,10")
    assert (n.lo, n.hi) == (70, 130)                       # mean +- 3 sd
    values = [n.sample(rng) for _ in range(4000)]
    assert statistics.fmean(values) == pytest.approx(100, abs=1) and statistics.stdev(values) == pytest.approx(10, rel=0.1)
    clipped = LengthDist.parse("normal:100,50,90,110")
    assert all(90 <= clipped.sample(rng) <= 110 for _ in range(1000))


@pytest.mark.parametrize("bad", ["0", "abc", "uniform:5", "uniform:9,3", "normal:1,2,3", "poisson:4"])
def test_bad_lengths_name_the_accepted_forms(bad):
    with pytest.raises(ValueError, match="uniform:LO,HI"):
        LengthDist.parse(bad)


# --- prompts from the vocabulary -----------------------------------------------------------

def test_random_prompts_have_exact_lengths_from_real_words(source):
    specs = workloads.build(config(num_requests=20, input_len=LengthDist.parse("uniform:5,300")), source, seed=0)
    assert len(specs) == 20
    for s in specs:
        assert 5 <= len(s.prompt_ids) <= 300 and s.output_len == 8 and s.parent is None
        # whole words: the text re-tokenizes to exactly the same ids
        assert source.encode(source.decode(s.prompt_ids)) == list(s.prompt_ids)
    assert workloads.build(config(num_requests=20), source, seed=0) == workloads.build(config(num_requests=20), source, seed=0)
    assert workloads.build(config(num_requests=3), source, seed=0) != workloads.build(config(num_requests=3), source, seed=1)


def test_fit_repairs_ids_that_do_not_survive_a_round_trip(source):
    rng = random.Random(0)
    # " garden" + "ing" decodes to " gardening", one token: the round trip loses a token
    ids = source.sample(5, rng) + source.encode(" garden") + source.encode("ing") + source.sample(5, rng)
    assert len(source.encode(source.decode(ids))) == len(ids) - 1
    fitted = source.fit(ids, rng)
    assert len(fitted) == len(ids)
    assert source.encode(source.decode(fitted)) == fitted
    assert fitted[:5] == ids[:5]


def test_shared_prefix_interleaves_groups(source):
    c = config(kind="shared-prefix", num_requests=12, num_prefixes=3, prefix_len=64, input_len=LengthDist.parse("16"))
    specs = workloads.build(c, source, seed=0)
    prefixes = [s.prompt_ids[:64] for s in specs]
    assert len(set(prefixes)) == 3
    # request i uses prefix i mod 3, so neighbours never share one
    assert all(prefixes[i] == prefixes[i % 3] for i in range(12))
    assert all(prefixes[i] != prefixes[i + 1] for i in range(11))
    questions = [s.prompt_ids[64:] for s in specs]
    assert len(set(questions)) == 12 and all(len(q) == 16 for q in questions)


def test_multi_turn_chains_turns_across_interleaved_conversations(source):
    specs = workloads.build(config(kind="multi-turn", num_requests=10, num_turns=3), source, seed=0)
    # ceil(10 / 3) = 4 conversations; request i is conversation i % 4, turn i // 4
    assert [s.parent for s in specs] == [None] * 4 + [0, 1, 2, 3, 4, 5]
    assert all(len(s.prompt_ids) == 32 for s in specs)       # each holds only its new user message


def test_dataset_prompts_and_output_lengths(source, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Tell me about gardens.", "output_len": 5},
        {"prompt_token_ids": [100, 200, 300]},
    ]) + "\n")
    specs = workloads.build(config(kind="dataset", dataset=str(path), num_requests=5), source, seed=0)
    assert len(specs) == 5
    shapes = {(s.prompt_ids, s.output_len) for s in specs}
    assert shapes == {(tuple(source.encode("Tell me about gardens.")), 5), ((100, 200, 300), 8)}
    path.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match="data.jsonl:1"):
        workloads.build(config(kind="dataset", dataset=str(path)), source, seed=0)


def test_trace_hash_ids_become_shared_blocks(source):
    trace = (TraceEntry(0.0, 20, 3, (7, 8)), TraceEntry(0.1, 12, 4, (7,)), TraceEntry(0.2, 6, 2, ()))
    specs = workloads.build(config(kind="trace", trace=trace, num_requests=10, trace_block_size=10), source, seed=0)
    assert [(len(s.prompt_ids), s.output_len) for s in specs] == [(20, 3), (12, 4), (6, 2)]
    assert specs[0].prompt_ids[:10] == specs[1].prompt_ids[:10]      # same hash id 7, same tokens
    assert specs[0].prompt_ids[10:20] != specs[1].prompt_ids[10:12] + specs[0].prompt_ids[12:20]


def test_warmup_prompts_share_nothing_with_the_workload(source):
    specs = workloads.build(config(kind="shared-prefix", num_requests=6, num_prefixes=2, prefix_len=32), source, seed=0)
    warm = workloads.warmup_specs(specs, 3, source, seed=0)
    assert [len(w.prompt_ids) for w in warm] == [len(s.prompt_ids) for s in specs[:3]]
    assert all(w.prompt_ids[:32] not in {s.prompt_ids[:32] for s in specs} for w in warm)


def test_workload_config_validation():
    with pytest.raises(ValueError, match="valid: random"):
        WorkloadConfig(kind="zipf")
    with pytest.raises(ValueError, match="--dataset"):
        WorkloadConfig(kind="dataset")
