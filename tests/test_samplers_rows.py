"""Per-row sampling functions and logits processors.

Oracles: each per-row call equals the scalar call on that row alone; the scalar calls equal brute-force
references written from the definitions, and transformers' own warpers on the same score tensors.
"""

from __future__ import annotations

import random

import pytest
import torch

from gptgen import GenerationError
from gptgen.generation import (MinNewTokens, NoRepeatNGram, PresenceFrequencyPenalty, RepetitionPenalty,
                               apply_temperature, draw, epsilon_filter, eta_filter, min_p_filter, sample,
                               top_k_filter, top_p_filter, typical_filter, warp)
from gptgen.generation.engine import DecodeState

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS, VOCAB = 6, 40


def _scores(seed=0, rows=ROWS, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, vocab, generator=g) * 2
    s[0, 5:9] = s[0, 4]  # ties with the row's 5th value
    s[1, :] = s[1, 0].round()  # a flat row
    s[2, 3] = float("-inf")  # an already banned token
    return s


# filter, per-row values including each filter's "off" value
FILTERS = [
    (top_k_filter, [0, 1, 3, 5, 7, VOCAB + 3]),
    (top_p_filter, [1.0, 0.05, 0.3, 0.8, 0.95, 1.0]),
    (min_p_filter, [0.0, 0.01, 0.1, 0.5, 0.9, 0.0]),
    (typical_filter, [1.0, 0.2, 0.5, 0.9, 0.99, 1.0]),
    (epsilon_filter, [0.0, 1e-3, 0.01, 0.05, 0.2, 0.0]),
    (eta_filter, [0.0, 1e-3, 0.01, 0.05, 0.2, 0.0]),
]


@pytest.mark.parametrize("fn,values", FILTERS, ids=[f.__name__ for f, _ in FILTERS])
@pytest.mark.parametrize("keep", [1, 3])
def test_per_row_values_equal_the_scalar_result_row_by_row(fn, values, keep):
    scores = _scores()
    for form in (values, torch.tensor(values, dtype=torch.float64)):
        got = fn(scores, form, min_tokens_to_keep=keep)
        for r, v in enumerate(values):
            alone = fn(scores[r:r + 1], v, min_tokens_to_keep=keep)
            assert torch.equal(got[r:r + 1], alone), (fn.__name__, r, v)
    assert torch.equal(fn(scores, values[0]), scores), "the off value must leave scores untouched"


def test_temperature_per_row_and_zero_rows_unchanged():
    scores = _scores()
    temps = [0.0, 0.5, 1.0, 1.7, 0.0, 3.0]
    got = apply_temperature(scores, torch.tensor(temps, dtype=torch.float64))
    for r, t in enumerate(temps):
        expected = scores[r] if t == 0 else scores[r] / t
        assert torch.equal(got[r], expected)
        assert torch.equal(got[r:r + 1], apply_temperature(scores[r:r + 1], t))


# Brute force ----------------------------------------------------------------------------------------
def test_top_k_keeps_ties_with_the_kth_like_brute_force():
    scores = _scores()
    for k in (1, 3, 5, 8, VOCAB):
        got = top_k_filter(scores, k)
        for r in range(ROWS):
            row = scores[r].tolist()
            kth = sorted(row, reverse=True)[k - 1]
            kept = {i for i, v in enumerate(row) if v >= kth and v != float("-inf")}
            assert {i for i, v in enumerate(got[r].tolist()) if v != float("-inf")} == kept
    tied = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0]])
    assert torch.isfinite(top_k_filter(tied, 2))[0].tolist() == [True, True, True, True, False]


def _nucleus(probs, p):
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, total = [], 0.0
    for i in order:
        kept.append(i)
        total += probs[i]
        if total >= p - 1e-9:  # exact arithmetic: the set reaches p
            break
    return set(kept)


def test_top_p_smallest_set_reaching_p_brute_force():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        probs = torch.rand(12, generator=g, dtype=torch.float64) ** 3
        probs /= probs.sum()
        for p in (0.1, 0.5, 0.77, 0.9):
            got = top_p_filter(probs.log().float()[None], p)[0]
            assert {i for i in range(12) if torch.isfinite(got[i])} == _nucleus(probs.tolist(), p)


def test_top_p_rounding_keeps_two_of_point_three_one_one_five():
    scores = torch.tensor([[0.3, 0.1, 0.1, 0.5]]).log()
    kept = torch.isfinite(top_p_filter(scores, 0.8))[0].tolist()
    assert kept == [True, False, False, True]


def test_min_p_brute_force():
    scores = _scores()
    probs = torch.softmax(scores.double(), -1)
    got = min_p_filter(scores, 0.2)
    for r in range(ROWS):
        top = float(probs[r].max())
        kept = {i for i in range(VOCAB) if probs[r, i] >= 0.2 * top - 1e-7}
        assert {i for i in range(VOCAB) if torch.isfinite(got[r, i])} == kept


# transformers' warpers on the same tensors --------------------------------------------------------------
def _hf(name, *args, **kw):
    lp = pytest.importorskip("transformers.generation.logits_process")
    return getattr(lp, name)(*args, **kw)


@pytest.mark.parametrize("keep", [1, 2, 7])
def test_filters_equal_transformers_warpers(keep):
    for seed in range(4):
        scores = _scores(seed, rows=8, vocab=64)
        cases = [
            (top_k_filter, 5, _hf("TopKLogitsWarper", 5, min_tokens_to_keep=keep)),
            (top_p_filter, 0.8, _hf("TopPLogitsWarper", 0.8, min_tokens_to_keep=keep)),
            (top_p_filter, 0.3, _hf("TopPLogitsWarper", 0.3, min_tokens_to_keep=keep)),
            (min_p_filter, 0.15, _hf("MinPLogitsWarper", 0.15, min_tokens_to_keep=keep)),
            (typical_filter, 0.6, _hf("TypicalLogitsWarper", 0.6, min_tokens_to_keep=keep)),
            (epsilon_filter, 0.02, _hf("EpsilonLogitsWarper", 0.02, min_tokens_to_keep=keep)),
            (eta_filter, 0.02, _hf("EtaLogitsWarper", 0.02, min_tokens_to_keep=keep)),
        ]
        for fn, value, warper in cases:
            ours = fn(scores.clone(), value, min_tokens_to_keep=keep)
            theirs = warper(None, scores.clone())
            assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs)), (fn.__name__, seed, keep)
            assert torch.equal(ours[torch.isfinite(ours)], theirs[torch.isfinite(theirs)])


def test_warp_chain_equals_transformers_chain():
    lp = pytest.importorskip("transformers.generation.logits_process")
    scores = _scores(5, rows=8, vocab=64)
    chain = lp.LogitsProcessorList([lp.TemperatureLogitsWarper(0.7), lp.TopKLogitsWarper(20),
                                    lp.TopPLogitsWarper(0.9), lp.MinPLogitsWarper(0.05),
                                    lp.TypicalLogitsWarper(0.95), lp.EpsilonLogitsWarper(1e-3),
                                    lp.EtaLogitsWarper(1e-3)])
    ours = warp(scores.clone(), temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, typical_p=0.95,
                epsilon_cutoff=1e-3, eta_cutoff=1e-3)
    theirs = chain(None, scores.clone())
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    # the same distribution: below temperature 1 gptgen takes the row maximum off before dividing (so no
    # temperature overflows), a shift softmax does not see
    torch.testing.assert_close(torch.log_softmax(ours, -1), torch.log_softmax(theirs, -1), rtol=0, atol=2e-6)


# draw ------------------------------------------------------------------------------------------------
def test_seeded_row_draws_the_same_token_whatever_else_is_in_the_batch():
    probs = torch.softmax(_scores(1, rows=5, vocab=300), -1)
    target = probs[2]

    def picks(batch, seeds):
        gens = [None if s is None else torch.Generator().manual_seed(s) for s in seeds]
        return [draw(batch, gens).tolist() for _ in range(12)]

    base = picks(probs, [None, 5, 11, None, 7])
    others = picks(probs.flip(0).roll(1, 0).index_copy(0, torch.tensor([2]), target[None]), [3, None, 11, 9, None])
    seq_alone = picks(target[None], [11])
    for step in range(12):
        assert base[step][2] == others[step][2] == seq_alone[step][0]
    assert len({tuple(b) for b in base}) > 1, "draws must vary between steps"


def test_draw_frequencies_follow_probs_for_each_generator_form():
    probs = torch.softmax(torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0]), -1)
    n = 20000
    for gen in (None, torch.Generator().manual_seed(0), [torch.Generator().manual_seed(i) if i % 2 else None
                                                           for i in range(n)]):
        picks = draw(probs.expand(n, -1).contiguous(), gen)
        freq = torch.bincount(picks, minlength=5).double() / n
        sigma = torch.sqrt(probs.double() * (1 - probs.double()) / n)
        assert torch.all((freq - probs).abs() <= 5 * sigma + 1e-3), freq
    with pytest.raises(GenerationError, match="one generator"):
        draw(probs.expand(3, -1), [None])


def test_sample_per_row_temperature_zero_is_argmax():
    scores = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.0, 1.0, 0.0, 0.5], dtype=torch.float64)
    got = sample(scores, torch.Generator().manual_seed(0), temperature=t, top_k=torch.tensor([0, 3, 2, 1]))
    assert got[0] == scores[0].argmax() and got[2] == scores[2].argmax() and got[3] == scores[3].argmax()
    assert int(got[1]) in torch.topk(scores[1], 3).indices.tolist()


# Processors -------------------------------------------------------------------------------------------
class FakeState:
    def __init__(self, prompts, generated):
        self.lists = [p + g for p, g in zip(prompts, generated)]
        self.generated = generated

    def row_lists(self):
        return self.lists

    def presence(self, vocab):
        out = torch.zeros(len(self.lists), vocab, dtype=torch.bool)
        for r, seq in enumerate(self.lists):
            out[r, seq] = True
        return out

    def generated_counts(self, vocab):
        out = torch.zeros(len(self.lists), vocab, dtype=torch.long)
        for r, seq in enumerate(self.generated):
            for t in seq:
                out[r, t] += 1
        return out


def _state(seed=0, rows=ROWS, vocab=VOCAB):
    rng = random.Random(seed)
    prompts = [[rng.randrange(8) for _ in range(rng.randint(1, 6))] for _ in range(rows)]
    gens = [[rng.randrange(8) for _ in range(rng.randint(0, 8))] for _ in range(rows)]
    return FakeState(prompts, gens)


def _rowwise(proc_factory, values, scores, state):
    """The per-row processor's output, and the scalar one applied to each row alone."""
    got = proc_factory(values)(scores, state)
    for r, v in enumerate(values):
        sub = FakeState([state.lists[r][:len(state.lists[r]) - len(state.generated[r])]], [state.generated[r]])
        assert torch.equal(got[r:r + 1], proc_factory(v)(scores[r:r + 1], sub)), (r, v)
    return got


def test_repetition_penalty_per_row_equals_scalar_and_formula():
    scores, state = _scores(), _state()
    values = [1.0, 1.3, 2.0, 0.5, 1.0, 5.0]
    got = _rowwise(RepetitionPenalty, values, scores, state)
    for r, pen in enumerate(values):
        for t in range(VOCAB):
            s = float(scores[r, t])
            want = (s * pen if s < 0 else s / pen) if t in state.lists[r] else s
            assert float(got[r, t]) == pytest.approx(want, rel=1e-6, abs=0)


def test_no_repeat_ngram_per_row_equals_scalar():
    scores, state = _scores(), _state(1)
    got = _rowwise(NoRepeatNGram, [0, 1, 2, 3, 2, 0], scores, state)
    assert torch.equal(got[0], scores[0]) and torch.equal(got[5], scores[5])


def test_min_new_tokens_per_row():
    scores, state = _scores(), _state(2)
    eos = [7, 9]
    values = [0, 3, 100, 1, 5, 2]
    got = MinNewTokens(values, eos)(scores, state)
    for r, m in enumerate(values):
        banned = len(state.generated[r]) < m
        for e in eos:
            assert (float(got[r, e]) == float("-inf")) == (banned or float(scores[r, e]) == float("-inf"))
        other = [t for t in range(VOCAB) if t not in eos]
        assert torch.equal(got[r, other], scores[r, other])


def test_presence_frequency_penalty_openai_definition():
    scores, state = _scores(), _state(3)
    presence = [0.0, 0.5, -1.0, 2.0, 0.0, 1.0]
    frequency = [0.0, 0.0, 0.3, 1.5, -0.5, 1.0]
    got = PresenceFrequencyPenalty(presence, frequency)(scores, state)
    for r in range(ROWS):
        for t in range(VOCAB):
            c = state.generated[r].count(t)
            want = float(scores[r, t]) - presence[r] * (c > 0) - frequency[r] * c
            assert float(got[r, t]) == pytest.approx(want, rel=1e-6, abs=1e-6)
    prompt_only = FakeState([[1, 2, 3]], [[]])
    assert torch.equal(PresenceFrequencyPenalty(1.0, 1.0)(scores[:1], prompt_only), scores[:1])
    for r in range(ROWS):
        sub = FakeState([[]], [state.generated[r]])
        assert torch.allclose(got[r:r + 1], PresenceFrequencyPenalty(presence[r], frequency[r])(scores[r:r + 1], sub))


@pytest.mark.parametrize("options", [dict(repetition_penalty=float("nan")), dict(repetition_penalty=0.0),
                                     dict(presence_penalty=float("inf")), dict(no_repeat_ngram_size=-1),
                                     dict(min_new_tokens=-2)])
def test_bad_processor_values_one_sentence(options):
    # the processors take values GenerationConfig has checked: a bad one is refused there, naming the option
    from gptgen import GenerationConfig

    with pytest.raises(GenerationError, match=f"^{next(iter(options))} must be .*\\.$"):
        GenerationConfig(**options)


def test_decode_state_generated_counts_brute_force():
    prompts = [[1, 2, 3], [4], [5, 5]]
    state = DecodeState(prompts=prompts, rows_per_prompt=2, num_return_sequences=2, max_new_tokens=6,
                        eos_ids=[9], pad_id=0, device="cpu", generator=None, processors=[])
    steps = [[3, 9, 1, 4, 4, 2], [3, 3, 3, 3, 9, 1], [1, 1, 2, 2, 3, 3], [9, 5, 5, 5, 5, 5],
             [4, 4, 4, 4, 4, 4], [2, 9, 2, 2, 2, 2]]
    for i in range(6):
        state.append(torch.tensor([row[i] for row in steps]))
        counts = state.generated_counts(12)
        for r, row in enumerate(steps):
            upto = row[:i + 1]
            if 9 in upto:  # a row stops counting after its EOS
                upto = upto[:upto.index(9) + 1]
            assert counts[r].tolist() == [upto.count(t) for t in range(12)], (i, r)
            assert int(state.generated_lengths()[r]) == len(upto)


def test_candidate_shortcut_draws_what_the_whole_row_draws():
    """sample() with top-k on works on the candidates only; a batch mate with top-k off forces the
    whole-row path, and the seeded row still draws the same tokens."""
    scores = torch.randn(2, 1500, generator=torch.Generator().manual_seed(4)) * 3
    scores[0, 10:14] = scores[0].max() - 0.5  # ties around the k-th
    for k, p in ((5, 1.0), (12, 0.7), (40, 0.95)):
        for seed in range(25):
            alone = sample(scores[:1], [torch.Generator().manual_seed(seed)], temperature=0.9, top_k=k, top_p=p)
            mixed = sample(scores, [torch.Generator().manual_seed(seed), None], temperature=0.9,
                           top_k=torch.tensor([k, 0]), top_p=p)
            whole = draw(torch.softmax(warp(scores[:1], temperature=0.9, top_k=k, top_p=p), -1),
                         torch.Generator().manual_seed(seed))
            assert int(alone[0]) == int(mixed[0]) == int(whole[0]), (k, p, seed)


# Large vocabularies: the candidate search and the float32 draw ------------------------------------------
def test_top_values_equal_torch_topk_values():
    from gptgen.generation.samplers import top_values

    V = 4500  # not a whole number of blocks: the last 20 tokens sit past the last block
    scores = torch.randn(6, V, generator=torch.Generator().manual_seed(6)) * 3
    scores[1] = scores[1].round()  # many ties
    scores[2, 100:4000] = float("-inf")
    scores[3, -7:] = scores[3].max() + 1  # the best tokens past the last whole block
    scores[4, 64:96] = 50 + torch.arange(32.0)  # one block holds the 32 best
    scores[5, ::32] = 30.0  # every block has the same maximum
    for n in (1, 5, 33, 35):
        values, ids = top_values(scores, n)
        assert torch.equal(values, torch.topk(scores, n).values), n
        assert torch.equal(scores.gather(1, ids), values), n
        assert all(len(set(row)) == n for row in ids.tolist()), n


def test_candidates_draw_what_the_whole_row_draws_at_a_large_vocabulary():
    """Rows alone take the candidate path; beside a row with top-k off the whole batch takes the
    whole-row path. A seeded row's token is the same either way, step after step."""
    V = 4500
    g = torch.Generator().manual_seed(8)
    for step in range(40):
        scores = torch.randn(2, V, generator=g) * 3
        if step % 4 == 0:
            scores[0, 200:210] = torch.topk(scores[0], 12).values[-1]  # ties with the k-th
        for k, p, min_p, t in ((12, 1.0, 0.0, 0.9), (20, 0.8, 0.0, 1.3), (30, 0.95, 0.05, 0.7)):
            alone = sample(scores[:1], [torch.Generator().manual_seed(step)], temperature=t, top_k=k, top_p=p,
                           min_p=min_p)
            mixed = sample(scores, [torch.Generator().manual_seed(step), None], temperature=t,
                           top_k=torch.tensor([k, 0]), top_p=p, min_p=min_p)
            assert int(alone[0]) == int(mixed[0]), (step, k, p)


def test_top_k_top_p_frequencies_follow_the_filtered_softmax_at_a_large_vocabulary():
    V, rows, calls = 4500, 4000, 5
    logits = torch.randn(V, generator=torch.Generator().manual_seed(9)) * 2
    want = torch.softmax(warp(logits[None].double(), temperature=0.8, top_k=20, top_p=0.9)[0], -1)
    batch = logits.expand(rows, -1).contiguous()
    g = torch.Generator().manual_seed(1)
    picks = torch.cat([sample(batch, g, temperature=0.8, top_k=20, top_p=0.9) for _ in range(calls)])
    freq = torch.bincount(picks, minlength=V).double() / (rows * calls)
    assert (freq[want == 0] == 0).all()
    assert 0.5 * (freq - want).abs().sum() < 0.03


def test_draw_never_gives_a_zero_probability_token_when_the_point_rounds_to_the_total(monkeypatch):
    from gptgen.generation import samplers

    probs = torch.tensor([[0.2, 0.0, 0.8, 0.0, 0.0], [0.0, 0.3, 0.0, 0.7, 0.0]])
    for u, want in ((1 - 1e-12, [2, 3]), (0.0, [0, 1])):
        monkeypatch.setattr(samplers, "_uniforms",
                            lambda rows, gen, dev, u=u: torch.full((rows, 1), u, dtype=torch.float64))
        assert draw(probs).tolist() == want
        assert draw(probs.double()).tolist() == want
