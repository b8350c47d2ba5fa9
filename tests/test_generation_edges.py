"""Decoding edges held against KerasHub's functional sampler form and transformers' processors.

Oracles: exhaustive enumeration (beam search over a tiny vocabulary), hand-made bigram models whose
greedy chain is known, transformers' own LogitsProcessor/warper classes on the same score tensors.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from gptgen import GenerationError, GPT, GPTConfig, LanguageModel, Tokenizer, TokenizerError
from gptgen.generation import (BeamSampler, ContrastiveSampler, GreedySampler, RandomSampler, TopKSampler,
                               TopPSampler, generate, generate_ids, resolve_sampler, stream)
from gptgen.generation.processors import build_processors

pytestmark = pytest.mark.usefixtures("one_thread")

V = 5
torch.manual_seed(0)
BIGRAM = torch.randn(V + 1, V, generator=torch.Generator().manual_seed(3)) * 2  # row V: the start row
POSITIONAL = torch.randn(8, V, generator=torch.Generator().manual_seed(4)) * 1.5


def bigram_next(prompt, cache, index):
    """KerasHub's next(): the distribution of the token at `index` given the token before it."""
    prev = prompt[:, index - 1] if index > 0 else torch.full((prompt.shape[0],), V)
    return BIGRAM[prev], None, cache


def positional_next_one_row(prompt, cache, index):
    """A next() that returns one row per prompt whatever the number of beams (KerasHub broadcasts it)."""
    B = 1 if prompt.shape[0] % 2 else 2
    return POSITIONAL[index].expand(B, V), None, cache


def _greedy_chain(first_prev, steps):
    out, prev = [], first_prev
    for _ in range(steps):
        prev = int(BIGRAM[prev].argmax())
        out.append(prev)
    return out


# KerasHub functional form -------------------------------------------------------------------------
def test_index_zero_fills_the_whole_prompt():
    prompt = torch.zeros(2, 6, dtype=torch.long)
    out = GreedySampler()(next=bigram_next, prompt=prompt, index=0)
    assert out.tolist() == [_greedy_chain(V, 6)] * 2
    assert GreedySampler(temperature=0.3)(bigram_next, prompt).tolist() == out.tolist()  # index defaults to 0
    assert TopKSampler(k=1, temperature=2.0)(bigram_next, prompt, seed=1).tolist() == out.tolist()
    with pytest.raises(GenerationError, match="index"):
        GreedySampler()(bigram_next, prompt, index=7)


def _sequence_log_prob(seq, temperature, start=V):
    total, prev = 0.0, start
    for t in seq:
        total += float(F.log_softmax(BIGRAM[prev].double() / temperature, -1)[t])
        prev = t
    return total


@pytest.mark.parametrize("temperature", [1.0, 0.4, 3.0])
def test_all_beams_and_log_probs_equal_exhaustive_search(temperature):
    """With num_beams = V ** (L - 1) beam search is exact: its beams are the best sequences of all V ** L."""
    L = 3
    nb = V ** (L - 1)
    prompt = torch.zeros(1, L, dtype=torch.long)
    beams, log_probs = BeamSampler(num_beams=nb, return_all_beams=True, temperature=temperature)(
        bigram_next, prompt, index=0)
    assert beams.shape == (1, nb, L) and log_probs.shape == (1, nb)
    scored = sorted(((_sequence_log_prob(s, temperature), list(s)) for s in itertools.product(range(V), repeat=L)),
                    reverse=True)
    assert [b.tolist() for b in beams[0]] == [s for _, s in scored[:nb]]
    torch.testing.assert_close(log_probs[0].double(), torch.tensor([lp for lp, _ in scored[:nb]], dtype=torch.float64),
                               rtol=0, atol=1e-4)
    best = BeamSampler(num_beams=nb, temperature=temperature)(bigram_next, prompt, index=0)
    assert best[0].tolist() == scored[0][1]
    # a 1-D prompt gives 2-D beams and 1-D log-probabilities
    b1, lp1 = BeamSampler(num_beams=3, return_all_beams=True)(bigram_next, torch.zeros(L, dtype=torch.long))
    assert b1.shape == (3, L) and lp1.shape == (3,)


def test_one_logits_row_is_broadcast_over_the_beams():
    L, nb = 3, 4
    for B in (1, 2):
        prompt = torch.zeros(B, L, dtype=torch.long)
        prompt[:, 0] = 2
        beams, lp = BeamSampler(num_beams=nb, return_all_beams=True)(positional_next_one_row, prompt, index=1)
        logp = F.log_softmax(POSITIONAL.double(), -1)
        scored = sorted(((float(logp[1, a] + logp[2, b]), [2, a, b]) for a in range(V) for b in range(V)), reverse=True)
        for row in range(B):
            assert [s.tolist() for s in beams[row]] == [s for _, s in scored[:nb]]
            torch.testing.assert_close(lp[row].double(), torch.tensor([v for v, _ in scored[:nb]], dtype=torch.float64),
                                       rtol=0, atol=1e-4)


def test_mask_keeps_prompt_tokens_past_index_and_their_stop_tokens_do_not_stop():
    prompt = torch.tensor([[1, 0, 0, 0, 0, 0, 0], [1, 3, 4, 4, 0, 0, 0]])
    mask = prompt.ne(0)
    mask[:, 0] = True
    out = GreedySampler()(bigram_next, prompt, index=1, mask=mask)
    assert out[0].tolist() == [1] + _greedy_chain(1, 6)
    assert out[1].tolist() == [1, 3, 4, 4] + _greedy_chain(4, 3)
    stop = 4  # in row 1's prompt part: it must not end that row
    got = GreedySampler()(bigram_next, prompt, index=1, mask=mask, stop_token_ids=[stop])
    chain = _greedy_chain(4, 3)
    expected = [1, 3, 4, 4] + (chain[:chain.index(stop) + 1] if stop in chain else chain)
    assert got[1, :len(expected)].tolist() == expected


def test_contrastive_takes_temperature_and_index_zero(tok_lm):
    model = tok_lm.model

    def next_fn(prompt, cache, index):
        logits, hidden = model(prompt, return_hidden=True)
        return logits[:, index - 1], hidden[:, index - 1], cache

    prompt = torch.full((1, 10), 2, dtype=torch.long)
    with torch.no_grad():
        hidden = model(prompt, return_hidden=True)[1]
        for t in (1.0, 0.5):
            got = ContrastiveSampler(k=3, alpha=0.4, temperature=t)(next_fn, prompt, index=2, hidden_states=hidden)
            assert got[0, 2:].tolist() == _contrastive_reference(model, [2, 2], 3, 0.4, 8, t)
    with pytest.raises(GenerationError, match="temperature above 0"):
        ContrastiveSampler(temperature=0)
    with pytest.raises(GenerationError, match="temperature above 0"):
        BeamSampler(temperature=0)


def _contrastive_reference(model, prompt, k, alpha, steps, temperature):
    seq = list(prompt)
    for _ in range(steps):
        logits, hidden = model(torch.tensor([seq]), return_hidden=True)
        probs = torch.softmax(logits[0, -1] / temperature, -1)
        context = F.normalize(hidden[0], dim=-1)
        best, best_score = None, None
        for p, cand in zip(*torch.topk(probs, k)):
            _, h = model(torch.tensor([seq + [int(cand)]]), return_hidden=True)
            score = (1 - alpha) * p - alpha * (context @ F.normalize(h[0, -1], dim=-1)).max()
            if best_score is None or score > best_score:
                best, best_score = int(cand), score
        seq.append(best)
    return seq[len(prompt):]


# top-p rounding, min_tokens_to_keep, warpers through the samplers ------------------------------------
def test_top_p_sampler_on_point_three_one_one_five_draws_two_tokens():
    logits = torch.tensor([0.3, 0.1, 0.1, 0.5]).log()
    n = 20000
    picks = TopPSampler(p=0.8).choose(logits.expand(n, -1).contiguous(), torch.Generator().manual_seed(0))
    freq = torch.bincount(picks, minlength=4).double() / n
    assert freq[1] == 0 and freq[2] == 0
    assert abs(float(freq[3]) - 0.625) < 5 * math.sqrt(0.625 * 0.375 / n)


def _hf_lp():
    return pytest.importorskip("transformers.generation.logits_process")


def test_min_tokens_to_keep_in_top_k_and_top_p_as_transformers():
    lp = _hf_lp()
    scores = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)) * 3
    for keep in (1, 4, 9):
        ours = TopKSampler(k=2, min_tokens_to_keep=keep).filter(scores)
        assert torch.equal(ours, lp.TopKLogitsWarper(2, min_tokens_to_keep=keep)(None, scores.clone()))
        ours = TopPSampler(p=0.05, min_tokens_to_keep=keep).filter(scores)
        assert torch.equal(ours, lp.TopPLogitsWarper(0.05, min_tokens_to_keep=keep)(None, scores.clone()))
    s = resolve_sampler(do_sample=True, top_p=0.5, min_tokens_to_keep=3)
    assert isinstance(s, TopPSampler) and s.min_tokens_to_keep == 3


def test_warper_options_reach_the_sampler():
    s = resolve_sampler(min_p=0.1)
    assert isinstance(s, TopKSampler) and (s.k, s.min_p) == (50, 0.1)  # HF: sampling with top_k 50
    s = resolve_sampler(do_sample=True, top_k=0, typical_p=0.9, epsilon_cutoff=3e-4, eta_cutoff=1e-3)
    assert isinstance(s, RandomSampler) and (s.typical_p, s.epsilon_cutoff, s.eta_cutoff) == (0.9, 3e-4, 1e-3)
    s = resolve_sampler("top_p", top_p=0.9, min_p=0.2)
    assert isinstance(s, TopPSampler) and s.min_p == 0.2
    assert isinstance(resolve_sampler(min_p=0.1, do_sample=False), GreedySampler)


# bad_words_ids with EOS ---------------------------------------------------------------------------
def test_bad_words_listing_eos_keep_eos_as_transformers():
    lp = _hf_lp()
    eos = 7
    bad = [[eos], [3], [5, 6], [2, eos]]
    scores = torch.randn(2, 12, generator=torch.Generator().manual_seed(2))
    input_ids = torch.tensor([[1, 2, 5], [4, 4, 2]])

    class State:
        def row_lists(self):
            return input_ids.tolist()

    procs = build_processors(bad_words_ids=bad, eos_ids=[eos], vocab_size=12)
    ours = scores
    for proc in procs:
        ours = proc(ours, State())
    theirs = lp.NoBadWordsLogitsProcessor(bad, eos_token_id=eos)(input_ids, scores.clone())
    assert torch.equal(ours, theirs)
    assert torch.isfinite(ours[0, eos]) and not torch.isfinite(ours[1, eos])  # [2, eos] still bans after 2


def test_generation_still_ends_at_eos_listed_in_bad_words(tok_lm):
    model = tok_lm.model
    free = generate_ids(model, [[3, 4]], max_new_tokens=12, eos_token_id=[])[0]
    eos = free[4]
    expected = free[:free.index(eos) + 1]
    assert generate_ids(model, [[3, 4]], max_new_tokens=12, eos_token_id=eos, bad_words_ids=[[eos]]) == [expected]


# min_length -------------------------------------------------------------------------------------------
def test_min_length_counts_each_rows_prompt(tok_lm):
    model = tok_lm.model
    prompts = [[3, 4], [5, 6, 7, 8, 9]]
    free = [generate_ids(model, [p], max_new_tokens=14, eos_token_id=[])[0] for p in prompts]
    eos = free[0][1]
    min_length = 7
    got = generate_ids(model, prompts, max_new_tokens=14, eos_token_id=eos, min_length=min_length)
    alone = [generate_ids(model, [p], max_new_tokens=14, eos_token_id=eos, min_length=min_length)[0] for p in prompts]
    assert got == alone
    for p, g in zip(prompts, got):
        if eos in g:
            assert len(p) + g.index(eos) + 1 > min_length  # no EOS before the row reaches min_length
    # min_length below every prompt's length changes nothing; min_new_tokens still applies with it
    assert generate_ids(model, prompts, max_new_tokens=14, eos_token_id=eos, min_length=2) == \
        generate_ids(model, prompts, max_new_tokens=14, eos_token_id=eos)
    assert generate_ids(model, prompts, max_new_tokens=14, eos_token_id=eos, min_length=2, min_new_tokens=6) == \
        generate_ids(model, prompts, max_new_tokens=14, eos_token_id=eos, min_new_tokens=6)


# Bad input: one sentence each ----------------------------------------------------------------------
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("kwargs,words", [
    (dict(temperature=NAN), "temperature"), (dict(temperature=INF), "temperature"),
    (dict(top_p=NAN), "top_p"), (dict(top_p=INF), "top_p"), (dict(top_k=NAN), "top_k"),
    (dict(repetition_penalty=NAN), "repetition_penalty"), (dict(repetition_penalty=INF), "repetition_penalty"),
    (dict(num_beams=2, length_penalty=NAN), "length_penalty"), (dict(length_penalty=INF), "length_penalty"),
    (dict(penalty_alpha=NAN, top_k=4), "penalty_alpha"), (dict(penalty_alpha=-1, top_k=4), "penalty_alpha"),
    (dict(penalty_alpha=1.5, top_k=4), "penalty_alpha"),
    (dict(min_p=NAN), "min_p"), (dict(min_p=1.5), "min_p"), (dict(typical_p=INF), "typical_p"),
    (dict(typical_p=0), "typical_p"), (dict(epsilon_cutoff=NAN), "epsilon_cutoff"),
    (dict(epsilon_cutoff=1.0), "epsilon_cutoff"), (dict(eta_cutoff=-0.1), "eta_cutoff"),
    (dict(eta_cutoff=INF), "eta_cutoff"), (dict(min_tokens_to_keep=0), "min_tokens_to_keep"),
    (dict(no_repeat_ngram_size=NAN), "no_repeat_ngram_size"), (dict(min_length=-1), "min_length"),
    (dict(eos_token_id=10_000), "eos_token_id"), (dict(eos_token_id=[-1]), "eos_token_id"),
    (dict(sampler="beam", temperature=0), "temperature"),
    (dict(seed=2**64), "seed"), (dict(seed=NAN), "seed"), (dict(pad_token_id=-5), "pad_token_id"),
])
def test_bad_options_one_sentence(tok_lm, kwargs, words):
    with pytest.raises(GenerationError, match=words) as info:
        tok_lm.generate("the", max_new_tokens=2, **kwargs)
    message = str(info.value)
    assert message.endswith(".") and message.count(". ") == 0 and "\n" not in message


def test_none_prompts_and_bad_decode_ids(tok_lm):
    with pytest.raises(GenerationError, match="Prompts"):
        tok_lm.generate(None)
    with pytest.raises(GenerationError, match="Prompts"):
        generate(tok_lm, 5)
    with pytest.raises(GenerationError, match="no option 'top_q'"):
        tok_lm.generate("the", top_q=0.5)
    with pytest.raises(GenerationError, match="prompt"):
        list(tok_lm.stream(None))
    with pytest.raises(GenerationError, match="prompt"):
        list(stream(tok_lm, None))
    tok = tok_lm.tokenizer
    for ids in ([-1], [tok.vocab_size], [1, 2, tok.vocab_size + 100]):
        with pytest.raises(TokenizerError, match="outside the tokenizer's vocabulary"):
            tok.decode(ids)
        with pytest.raises(TokenizerError, match="outside the tokenizer's vocabulary"):
            tok.decode_batch([[1], ids])
    assert tok.decode(tok.encode("the dog")) == "the dog"


@pytest.fixture(scope="module")
def tok_lm():
    tok = Tokenizer.train("byte-bpe", ["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=290)
    torch.manual_seed(11)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_positions=48, n_embd=32, n_layer=2, n_head=2, init_std=0.2,
                    eos_token_id=tok.eos_token_id)
    return LanguageModel(GPT(cfg).eval(), tok)


def test_generation_modules_import_no_circle():
    """loop.py imports neither the engine nor the samplers; samplers and processors never import the engine."""
    import ast
    from pathlib import Path

    import gptgen.generation as pkg

    root = Path(pkg.__file__).parent

    def imported(name):
        tree = ast.parse((root / f"{name}.py").read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}

    assert not imported("loop") & {"engine", "samplers", "processors"}
    assert "engine" not in imported("samplers") and "engine" not in imported("processors")
    assert "loop" in imported("samplers") and {"loop", "samplers"} <= imported("engine")


def test_model_ids_beyond_the_tokenizer_decode_to_nothing(tok_lm):
    """A model with more ids than its tokenizer (a padded vocabulary) still generates text: the ids the
    tokenizer lacks decode to nothing, while Tokenizer.decode itself refuses them."""
    tok = tok_lm.tokenizer
    torch.manual_seed(5)
    cfg = GPTConfig(vocab_size=2 * tok.vocab_size, n_positions=48, n_embd=32, n_layer=1, n_head=2, init_std=0.5)
    lm = LanguageModel(GPT(cfg).eval(), tok)
    kw = dict(max_new_tokens=30, do_sample=True, top_k=0, temperature=2.0, seed=3, eos_token_id=[])
    ids = generate_ids(lm.model, [tok.encode("the")], **kw)[0]
    assert any(t >= tok.vocab_size for t in ids) and any(t < tok.vocab_size for t in ids)
    text = lm.generate("the", include_prompt=False, **kw)
    assert text == tok.decode([t for t in ids if t < tok.vocab_size], skip_special_tokens=True)
