"""The batched sampler: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Statistical tests use fixed seeds (so they are deterministic) and bounds of
``Z`` standard errors per token; with ``Z = 4.5`` and a handful of tokens a
correct sampler fails for fewer than 1 in 10^4 seeds.
"""

from __future__ import annotations

import math

import pytest
import torch

from worker.engine.sampler import _apply_top_k_top_p, sample
from worker.engine.types import SamplingOptions

Z = 4.5
GREEDY = SamplingOptions(temperature=0.0)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=gen(seed)) * scale


def draw_many(logits_row: torch.Tensor, opts: SamplingOptions, n: int, seed: int) -> torch.Tensor:
    """``n`` draws from one distribution: ``n`` rows sharing one generator."""
    g = gen(seed)
    res = sample(logits_row.expand(n, -1).contiguous(), [opts] * n, [g] * n)
    return torch.tensor(res.token_ids)


def assert_frequencies(draws: torch.Tensor, probs: torch.Tensor) -> None:
    n = draws.numel()
    freq = torch.bincount(draws, minlength=probs.numel()).double() / n
    for t, (f, p) in enumerate(zip(freq.tolist(), probs.double().tolist())):
        bound = Z * math.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-9
        assert abs(f - p) <= bound, f"token {t}: frequency {f:.4f}, expected {p:.4f} +- {bound:.4f}"


def test_greedy_is_argmax():
    logits = random_logits(16, 100)
    res = sample(logits, [GREEDY] * 16, [None] * 16)
    assert res.token_ids == logits.argmax(-1).tolist()
    assert res.logprobs == [None] * 16


def test_greedy_rows_in_a_mixed_batch_are_argmax():
    logits = random_logits(6, 50, seed=1)
    opts = [GREEDY, SamplingOptions(temperature=1.5), GREEDY, SamplingOptions(top_k=5), GREEDY, SamplingOptions(top_p=0.3)]
    gens = [None, gen(1), None, gen(2), None, gen(3)]
    res = sample(logits, opts, gens)
    for i in (0, 2, 4):
        assert res.token_ids[i] == logits[i].argmax().item()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_top_k_one_is_greedy(temperature):
    logits = random_logits(32, 64, seed=2)
    opts = [SamplingOptions(temperature=temperature, top_k=1)] * 32
    res = sample(logits, opts, [gen(i) for i in range(32)])
    assert res.token_ids == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
def test_tiny_top_p_is_greedy(temperature):
    logits = random_logits(32, 64, seed=3)
    opts = [SamplingOptions(temperature=temperature, top_p=1e-6)] * 32
    res = sample(logits, opts, [gen(100 + i) for i in range(32)])
    assert res.token_ids == logits.argmax(-1).tolist()


def test_seeded_row_is_independent_of_its_batch_mates():
    vocab = 40
    target = random_logits(1, vocab, seed=4, scale=1.0)[0]  # flat enough that draws vary
    opts = SamplingOptions(temperature=0.9, seed=1234)

    def stream(batch_of: int, position: int, mates: list[SamplingOptions]) -> list[int]:
        g = gen(1234)
        out = []
        for step in range(40):
            rows = random_logits(batch_of, vocab, seed=1000 + step)
            rows[position] = target
            row_opts = list(mates)
            row_opts.insert(position, opts)
            gens = [gen(step * 10 + j) if not o.greedy else None for j, o in enumerate(row_opts)]
            gens[position] = g
            out.append(sample(rows, row_opts, gens).token_ids[position])
        return out

    alone = stream(1, 0, [])
    assert len(set(alone)) > 5, "the distribution is too peaked to show anything"
    mates = [GREEDY, SamplingOptions(top_k=3), SamplingOptions(top_p=0.5, temperature=2.0)]
    assert stream(4, 0, mates) == alone
    assert stream(4, 2, mates) == alone
    assert stream(4, 3, mates) == alone


def test_unseeded_rows_differ_across_generators():
    logits = random_logits(1, 30, seed=5, scale=0.5)[0]
    streams = [draw_many(logits, SamplingOptions(), 64, seed=s).tolist() for s in (1, 2, 3)]
    assert streams[0] != streams[1] and streams[1] != streams[2] and streams[0] != streams[2]
    # and the same generator seed repeats itself
    assert draw_many(logits, SamplingOptions(), 64, seed=2).tolist() == streams[1]


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_frequencies_match_softmax(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.5])
    draws = draw_many(logits, SamplingOptions(temperature=temperature), 4000, seed=7)
    assert_frequencies(draws, torch.softmax(logits / temperature, -1))


def test_frequencies_with_top_k_match_renormalized_softmax():
    logits = torch.tensor([0.3, 2.0, -1.0, 1.0, 0.5, 1.5])
    draws = draw_many(logits, SamplingOptions(temperature=0.8, top_k=3), 4000, seed=8)
    keep = torch.tensor([False, True, False, True, False, True])
    expected = torch.softmax((logits / 0.8).masked_fill(~keep, float("-inf")), -1)
    assert_frequencies(draws, expected)


def test_frequencies_with_top_p_match_renormalized_softmax():
    logits = torch.log(torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04]))
    # cumulative: 0.40, 0.65, 0.80, 0.90 -> top_p = 0.7 keeps the first three
    draws = draw_many(logits, SamplingOptions(top_p=0.7), 4000, seed=9)
    expected = torch.tensor([0.40, 0.25, 0.15, 0, 0, 0]) / 0.80
    assert_frequencies(draws, expected)


@pytest.mark.parametrize("k", [1, 2, 5, 17])
def test_top_k_stays_in_the_top_k(k):
    logits = random_logits(64, 50, seed=10 + k, scale=1.0)
    allowed = logits.topk(k, dim=-1).indices
    for rep in range(10):
        opts = [SamplingOptions(temperature=2.0, top_k=k)] * 64
        res = sample(logits, opts, [gen(rep * 64 + i) for i in range(64)])
        for row, tok in enumerate(res.token_ids):
            assert tok in allowed[row].tolist()
    # over all draws, more than one token of the top k shows up (the filter is not greedy)
    if k > 1:
        draws = draw_many(logits[0], SamplingOptions(temperature=2.0, top_k=k), 400, seed=k)
        assert set(draws.tolist()) == set(allowed[0].tolist())


def nucleus(probs: torch.Tensor, p: float) -> set[int]:
    """The smallest set of most likely tokens whose mass reaches ``p`` (brute force)."""
    order = sorted(range(probs.numel()), key=lambda i: -probs[i].item())
    out, mass = set(), 0.0
    for i in order:
        out.add(i)
        mass += probs[i].item()
        if mass >= p:
            break
    return out


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.8, 0.95, 0.999])
def test_top_p_keeps_the_smallest_set_reaching_p(p):
    logits = random_logits(8, 20, seed=20, scale=1.5)
    filtered = _apply_top_k_top_p(logits, [0] * 8, [p] * 8)
    for row in range(8):
        kept = set(torch.isfinite(filtered[row]).nonzero().flatten().tolist())
        assert kept == nucleus(torch.softmax(logits[row].double(), -1), p), f"row {row}"
        assert torch.equal(filtered[row][list(kept)], logits[row][list(kept)]), "kept logits were changed"
    # sampled tokens stay inside the nucleus
    opts = [SamplingOptions(top_p=p)] * 8
    for rep in range(20):
        res = sample(logits, opts, [gen(rep * 8 + i) for i in range(8)])
        for row, tok in enumerate(res.token_ids):
            assert tok in nucleus(torch.softmax(logits[row].double(), -1), p)


def test_top_k_and_top_p_combine():
    logits = torch.log(torch.tensor([[0.30, 0.25, 0.20, 0.15, 0.10]]))
    # top_k=3 leaves 0.30, 0.25, 0.20 (renormalized 0.40, 0.33, 0.27); top_p=0.6 then keeps two
    filtered = _apply_top_k_top_p(logits, [3], [0.6])
    assert torch.isfinite(filtered[0]).tolist() == [True, True, False, False, False]


def test_unfiltered_rows_keep_every_token_beside_filtered_rows():
    """A row asking for no filtering keeps its whole vocabulary even when a batch
    mate turns top-k/top-p on, including tokens of negligible probability (whose
    preceding float32 mass rounds to 1.0)."""
    logits = random_logits(4, 256, seed=30, scale=6.0)
    filtered = _apply_top_k_top_p(logits, [0, 5, 0, 0], [1.0, 1.0, 0.5, 1.0])
    assert torch.isfinite(filtered[0]).all() and torch.isfinite(filtered[3]).all()
    assert torch.equal(filtered[0], logits[0])
    assert torch.isfinite(filtered[1]).sum() == 5


@pytest.mark.parametrize("temperature", [0.0, 0.5, 1.0])
def test_logprobs_are_those_of_the_raw_logits(temperature):
    logits = random_logits(5, 40, seed=40)
    opts = [
        SamplingOptions(temperature=temperature, logprobs=True, top_logprobs=5, top_k=10),
        SamplingOptions(temperature=temperature),                       # asks for nothing
        SamplingOptions(temperature=temperature, top_logprobs=3),       # top only implies logprobs
        SamplingOptions(temperature=temperature, logprobs=True),
        SamplingOptions(temperature=temperature, logprobs=True, top_logprobs=20, top_p=0.5),
    ]
    res = sample(logits, opts, [gen(i) if temperature else None for i in range(5)])
    ref = torch.log_softmax(logits.double(), -1)
    assert res.logprobs[1] is None
    for row in (0, 2, 3, 4):
        lp = res.logprobs[row]
        tok = res.token_ids[row]
        assert lp is not None and lp.token_id == tok
        assert lp.logprob == pytest.approx(ref[row, tok].item(), abs=1e-5)
        n = opts[row].top_logprobs
        assert len(lp.top) == n
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        expected = ref[row].topk(n) if n else None
        if n:
            assert [t for t, _ in lp.top] == expected.indices.tolist()
            assert values == pytest.approx(expected.values.tolist(), abs=1e-5)
            assert lp.top[0][0] == logits[row].argmax().item()


def test_bf16_logits_greedy_sampled_and_logprobs():
    """The model hands the sampler its logits in bf16 (GPU): greedy rows are the argmax of
    those values, sampled rows and logprobs are computed from their float32 widening."""
    logits = random_logits(4, 64, seed=7).to(torch.bfloat16)
    wide = logits.float()
    greedy = sample(logits, [GREEDY] * 4, [None] * 4)
    assert greedy.token_ids == wide.argmax(-1).tolist()
    opts = [GREEDY, SamplingOptions(temperature=0.8, logprobs=True, top_logprobs=2), SamplingOptions(top_k=3), GREEDY]
    got = sample(logits, opts, [None, gen(1), gen(2), None])
    same = sample(wide, opts, [None, gen(1), gen(2), None])
    assert got.token_ids == same.token_ids
    assert got.logprobs[1].logprob == pytest.approx(same.logprobs[1].logprob, abs=1e-6)
    assert got.logprobs[1].top == same.logprobs[1].top
    assert (got.token_ids[0], got.token_ids[3]) == (wide[0].argmax().item(), wide[3].argmax().item())


def test_options_are_validated():
    with pytest.raises(ValueError, match="temperature"):
        SamplingOptions(temperature=-0.1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingOptions(top_p=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingOptions(top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        SamplingOptions(top_k=-1)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingOptions(max_tokens=0)
    with pytest.raises(ValueError, match="top_logprobs"):
        SamplingOptions(top_logprobs=21)
