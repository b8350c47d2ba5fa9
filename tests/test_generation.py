"""Samplers, logits processors, stopping, streaming, the functional form, errors and the CLI.

Oracles: brute-force references (masks, n-gram bans, contrastive search without a cache), sampled
frequencies against the filtered softmax, and a "scripted" GPT whose weights make it emit a chosen
token sequence, so text-level behaviour (UTF-8 splits, stop strings, EOS) is checked exactly.
"""

from __future__ import annotations

import json
import random

import pytest

import gptgen.native
import torch
import torch.nn.functional as F

from gptgen import GPT, GenerationError, GPTConfig, LanguageModel, Tokenizer
from gptgen.cli import main
from gptgen.generation import (BeamSampler, ContrastiveSampler, GreedySampler, RandomSampler, TopKSampler,
                               TopPSampler, generate, generate_ids, get_sampler, resolve_sampler, stream)
from gptgen.generation.processors import NoRepeatNGram, RepetitionPenalty
from gptgen.generation.stopping import StreamEmitter, TextTracker

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a journey of a thousand miles begins with a single step",
    "all that glitters is not gold, and not all who wander are lost",
    "to be or not to be, that is the question",
    "alpha beta gamma delta epsilon STOP zeta eta theta",
] * 20


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train("byte-bpe", TEXTS, vocab_size=320)


@pytest.fixture(scope="module")
def lm(tok):
    torch.manual_seed(7)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2, init_std=0.2,
                    eos_token_id=tok.eos_token_id)
    return LanguageModel(GPT(cfg).eval(), tok)


def scripted_lm(tok, prompt: str, script: list[int], filler: int | None = None, ctx: int = 48) -> LanguageModel:
    """A GPT whose greedy continuation of `prompt` is `script`: every block is the identity, the
    position embedding is one-hot and the LM head maps each position to its scripted next token."""
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_positions=ctx, n_embd=ctx, n_layer=1, n_head=2,
                    tie_word_embeddings=False, eos_token_id=tok.eos_token_id)
    model = GPT(cfg).eval()
    P = len(tok.encode(prompt))
    filler = tok.encode("x")[0] if filler is None else filler
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0 if name.endswith("weight") and ".ln_" in f".{name}" else 0.0)
        model.embed.wpe.weight.copy_(torch.eye(ctx))
        for pos in range(ctx):
            step = pos - P + 1
            target = script[step] if 0 <= step < len(script) else filler
            model.lm_head.weight[target, pos] += 10.0
    return LanguageModel(model, tok)


# Samplers: masks and frequencies -------------------------------------------------------------
LOGITS = torch.tensor([2.0, 1.5, 1.4, 0.3, 0.2, -0.5, -1.0, 1.45, -3.0, 0.9, 0.0, -0.2])
N = 40000


def _frequencies(sampler, logits=LOGITS, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    picks = sampler.choose(logits.expand(n, -1).clone(), g)
    return torch.bincount(picks, minlength=len(logits)).double() / n


def _assert_matches(freq, expected):
    expected = expected.double()
    assert torch.all(freq[expected == 0] == 0), "a filtered-out token was sampled"
    sigma = torch.sqrt(expected * (1 - expected) / N)
    assert torch.all((freq - expected).abs() <= 5 * sigma + 2e-3), (freq, expected)


def _nucleus(probs, p):
    """Brute force: the smallest set of most likely tokens whose probability reaches p."""
    order = sorted(range(len(probs)), key=lambda i: -float(probs[i]))
    kept, total = [], 0.0
    for i in order:
        kept.append(i)
        total += float(probs[i])
        if total >= p:
            break
    return kept


def test_greedy_and_zero_temperature_take_the_argmax():
    best = int(LOGITS.argmax())
    assert GreedySampler().choose(LOGITS[None], None).item() == best
    for s in (RandomSampler(temperature=0), TopKSampler(k=3, temperature=0), TopPSampler(p=0.5, temperature=0)):
        assert s.choose(LOGITS[None].clone(), None).item() == best


def test_random_sampler_frequencies_follow_tempered_softmax():
    _assert_matches(_frequencies(RandomSampler(temperature=1.5)), torch.softmax(LOGITS / 1.5, -1))


@pytest.mark.parametrize("k,temperature", [(1, 1.0), (4, 0.7), (7, 2.0)])
def test_top_k_mask_and_frequencies(k, temperature):
    top = torch.topk(LOGITS, k).indices
    expected = torch.zeros_like(LOGITS)
    expected[top] = torch.softmax(LOGITS[top] / temperature, -1)
    _assert_matches(_frequencies(TopKSampler(k=k, temperature=temperature)), expected)


@pytest.mark.parametrize("p,k,temperature", [(0.6, None, 1.0), (0.9, None, 0.8), (0.3, 5, 1.0), (1.0, 4, 1.3),
                                             (1e-6, None, 1.0)])
def test_top_p_mask_and_frequencies(p, k, temperature):
    logits = LOGITS / temperature
    if k is not None:
        kth = torch.topk(logits, k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    kept = _nucleus(probs, p)
    expected = torch.zeros_like(probs)
    expected[kept] = probs[kept] / probs[kept].sum()
    _assert_matches(_frequencies(TopPSampler(p=p, k=k, temperature=temperature)), expected)


# Processors: brute force ------------------------------------------------------------------------
def _banned_brute(seq, n):
    grams = {tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)}
    if len(seq) < n - 1:
        return set()
    prefix = tuple(seq[len(seq) - (n - 1):]) if n > 1 else ()
    return {g[-1] for g in grams if g[:-1] == prefix}


def test_no_repeat_ngram_bans_match_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 4)
        seq = [rng.randint(0, 4) for _ in range(rng.randint(0, 15))]
        assert NoRepeatNGram(n).banned(seq) == _banned_brute(seq, n), (seq, n)


def test_repetition_penalty_matches_formula():
    class State:
        def presence(self, vocab):
            out = torch.zeros(2, vocab, dtype=torch.bool)
            out[0, [1, 3]] = True
            out[1, [0]] = True
            return out

    scores = torch.tensor([[1.0, -2.0, 3.0, 4.0], [-1.0, 2.0, 0.5, -0.5]])
    got = RepetitionPenalty(2.0)(scores, State())
    expected = torch.tensor([[1.0, -4.0, 3.0, 2.0], [-2.0, 2.0, 0.5, -0.5]])
    torch.testing.assert_close(got, expected)


def test_generated_text_never_repeats_an_ngram(lm):
    prompt = [5, 9, 11, 13]
    outs = generate_ids(lm.model, [prompt] * 3, max_new_tokens=30, do_sample=True, top_k=0, seed=3,
                        no_repeat_ngram_size=2, eos_token_id=[])
    for out in outs:
        seq = prompt + out
        assert len(out) == 30
        grams = [tuple(seq[i:i + 2]) for i in range(len(seq) - 1)]
        assert len(grams) == len(set(grams))
    greedy = generate_ids(lm.model, [prompt], max_new_tokens=30, eos_token_id=[])[0]
    plain = [tuple((prompt + greedy)[i:i + 2]) for i in range(len(prompt) + 29)]
    assert len(plain) != len(set(plain)), "the greedy control should repeat itself"


def test_banned_words_never_emitted(lm):
    free = generate_ids(lm.model, [[3, 4, 5]] * 8, max_new_tokens=30, do_sample=True, top_k=0, seed=1,
                        eos_token_id=[])
    flat = [t for out in free for t in out]
    single = max(set(flat), key=flat.count)
    pairs = [(a, b) for out in free for a, b in zip(out, out[1:]) if single not in (a, b)]
    a, b = max(set(pairs), key=pairs.count)
    outs = generate_ids(lm.model, [[3, 4, 5]] * 8, max_new_tokens=30, do_sample=True, top_k=0, seed=1,
                        eos_token_id=[], bad_words_ids=[[single], [a, b]])
    for out in outs:
        assert single not in out
        seq = [3, 4, 5] + out
        assert all((x, y) != (a, b) for x, y in zip(seq, seq[1:]))


def test_min_new_tokens_and_eos(tok):
    eos = tok.eos_token_id
    words = tok.encode(" alpha beta gamma delta")
    lm = scripted_lm(tok, "go", words[:2] + [eos] + words[2:])
    assert generate_ids(lm.model, [tok.encode("go")], max_new_tokens=10) == [words[:2] + [eos]]
    out = generate_ids(lm.model, [tok.encode("go")], max_new_tokens=10, min_new_tokens=5)[0]
    assert eos not in out[:5] and len(out) == 10
    # Several EOS ids: the first one produced ends the sequence.
    assert generate_ids(lm.model, [tok.encode("go")], max_new_tokens=10, eos_token_id=[words[1], eos]) == [words[:2]]


def test_rows_stop_independently_and_batch_equals_single(lm):
    prompts = [[3, 4, 5], [7], [10, 11, 12, 13, 14]]
    free = [generate_ids(lm.model, [p], max_new_tokens=25, eos_token_id=[])[0] for p in prompts]
    eos = free[0][3]
    expected = [f[:f.index(eos) + 1] if eos in f else f for f in free]
    assert len({len(e) for e in expected}) > 1, "the rows should stop at different steps"
    assert [generate_ids(lm.model, [p], max_new_tokens=25, eos_token_id=eos)[0] for p in prompts] == expected
    assert generate_ids(lm.model, prompts, max_new_tokens=25, eos_token_id=eos) == expected


def test_seed_reproducible(lm):
    kw = dict(max_new_tokens=20, do_sample=True, top_k=50, top_p=0.95, num_return_sequences=3)
    a = lm.generate(["one", "two"], seed=5, **kw)
    assert a == lm.generate(["one", "two"], seed=5, **kw)
    assert a != lm.generate(["one", "two"], seed=6, **kw)
    assert len(set(a[0])) > 1  # the three samples differ


# Contrastive search against a brute-force reference ---------------------------------------
def _contrastive_reference(model, prompt, k, alpha, steps):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits, hidden = model(torch.tensor([seq]), return_hidden=True)
            probs = torch.softmax(logits[0, -1], -1)
            context = F.normalize(hidden[0], dim=-1)
            best, best_score = None, None
            for p, cand in zip(*torch.topk(probs, k)):
                _, h = model(torch.tensor([seq + [int(cand)]]), return_hidden=True)
                sim = (context @ F.normalize(h[0, -1], dim=-1)).max()
                score = (1 - alpha) * p - alpha * sim
                if best_score is None or score > best_score:
                    best, best_score = int(cand), score
            seq.append(best)
    return seq[len(prompt):]


@pytest.mark.parametrize("k,alpha", [(4, 0.6), (3, 0.0), (5, 1.0)])
def test_contrastive_matches_brute_force(lm, k, alpha):
    prompts = [[3, 4, 5, 6], [9, 10]]
    expected = [_contrastive_reference(lm.model, p, k, alpha, 12) for p in prompts]
    got = generate_ids(lm.model, prompts, max_new_tokens=12, sampler=ContrastiveSampler(k=k, alpha=alpha),
                       eos_token_id=[])
    assert got == expected
    if alpha == 0.0:  # no penalty: contrastive search is greedy
        assert got == generate_ids(lm.model, prompts, max_new_tokens=12, eos_token_id=[])


# Text, stop strings, streaming, UTF-8 -------------------------------------------------------------
def test_stream_and_final_text_never_split_a_character(tok):
    target = " 昨夜雨疏风骤 ok"
    script = tok.encode(target)
    assert any("\ufffd" in tok.decode([t]) for t in script), "the test needs a character split over tokens"
    lm = scripted_lm(tok, "poem:", script)
    pieces = list(stream(lm, "poem:", max_new_tokens=len(script)))
    assert "".join(pieces) == target
    assert all("\ufffd" not in p for p in pieces) and len(pieces) > 3
    assert lm.generate("poem:", max_new_tokens=len(script)) == "poem:" + target
    # Cut in the middle of a character: the partial character is dropped, not shown broken.
    for n in range(1, len(script)):
        if tok.decode(script[:n]).endswith("\ufffd"):
            text = lm.generate("poem:", max_new_tokens=n, include_prompt=False)
            assert "\ufffd" not in text and target.startswith(text)
            assert "".join(stream(lm, "poem:", max_new_tokens=n)) == text


def test_text_tracker_on_every_prefix(tok):
    text = " 한국어 文字 and ascii"
    ids = tok.encode(text)
    tracker, emitter = TextTracker(tok, tok.encode("x"), stop=["ascii"]), StreamEmitter()
    out = ""
    for n in range(1, len(ids) + 1):
        out += emitter.piece(tracker.safe(ids[:n], done=n == len(ids)))
        assert "\ufffd" not in out and text.startswith(out)
    assert out == " 한국어 文字 and "


def test_stop_strings_end_sequences(tok, monkeypatch):
    script = tok.encode(" alpha beta STOP gamma delta")
    lm = scripted_lm(tok, "go", script)
    assert lm.generate("go", max_new_tokens=len(script), stop=["STOP"]) == "go alpha beta "
    assert lm.generate("go", max_new_tokens=len(script), stop=["gam", "STOP"], include_prompt=False) == " alpha beta "
    assert "".join(stream(lm, "go", max_new_tokens=len(script), stop="STOP")) == " alpha beta "
    got = []
    lm.generate(["go"], max_new_tokens=len(script), stop=["STOP"], callback=lambda i, p: got.append((i, p)))
    assert "".join(p for _, p in got) == " alpha beta " and {i for i, _ in got} == {0}
    # The sequence stops at the stop string: the model runs no step past it.
    calls = []
    hook = lm.model.embed.register_forward_hook(lambda *a: calls.append(1))
    try:
        # the model's forward (the hooked embedding) runs every step, not the native one-token step
        monkeypatch.setattr(gptgen.native, "decoder", lambda model: None)
        lm.generate("go", max_new_tokens=len(script), stop=["STOP"])
        with_stop, calls[:] = len(calls), []
        lm.generate("go", max_new_tokens=len(script))
        without = len(calls)
    finally:
        hook.remove()
    n_stop = next(n for n in range(1, len(script) + 1) if "STOP" in tok.decode(script[:n]))
    assert (with_stop, without) == (n_stop, len(script))


def test_bad_words_strings_and_add_bos(tok):
    script = tok.encode(" alpha beta gamma")
    lm = scripted_lm(tok, "go", script)
    out = lm.generate("go", max_new_tokens=len(script), bad_words=[" beta"], include_prompt=False)
    assert out.startswith(" alpha") and " beta" not in out
    # config.extra["add_bos"]: the prompt gets the BOS token, as generate_ids with it prepended.
    bos = tok.bos_token_id
    lm.model.config.extra["add_bos"] = True
    try:
        ids = generate_ids(lm.model, [[bos] + tok.encode("go")], max_new_tokens=4)[0]
        assert lm.generate("go", max_new_tokens=4, include_prompt=False) == tok.decode(ids, skip_special_tokens=True)
    finally:
        lm.model.config.extra.pop("add_bos")


def test_return_shapes_and_lengths(lm):
    assert isinstance(lm.generate("hi", max_new_tokens=3), str)
    three = lm.generate("hi", max_new_tokens=3, do_sample=True, num_return_sequences=3, seed=0)
    assert isinstance(three, list) and len(three) == 3 and all(t.startswith("hi") for t in three)
    two = lm.generate(["a", "b c"], max_new_tokens=3)
    assert isinstance(two, list) and len(two) == 2 and all(isinstance(t, str) for t in two)
    nested = lm.generate(["a", "b c"], max_new_tokens=3, num_beams=3, num_return_sequences=2)
    assert [len(x) for x in nested] == [2, 2]
    p = lm.tokenizer.encode("b c")
    assert len(generate_ids(lm.model, [p], max_length=len(p) + 5, eos_token_id=[])[0]) == 5
    assert len(generate_ids(lm.model, [p], max_length=10_000, eos_token_id=[])[0]) == 64 - len(p)
    assert len(generate_ids(lm.model, [p], eos_token_id=[])[0]) == 50


def test_sampler_names_and_hf_vocabulary():
    assert isinstance(resolve_sampler(), GreedySampler)
    assert isinstance(resolve_sampler(do_sample=True, top_k=0), RandomSampler)
    s = resolve_sampler(do_sample=True)
    assert isinstance(s, TopKSampler) and s.k == 50
    s = resolve_sampler(do_sample=True, top_k=50, top_p=0.95, temperature=0.7)
    assert isinstance(s, TopPSampler) and (s.k, s.p, s.temperature) == (50, 0.95, 0.7)
    assert isinstance(resolve_sampler(num_beams=5, early_stopping=True), BeamSampler)
    assert isinstance(resolve_sampler(top_k=4, penalty_alpha=0.6), ContrastiveSampler)
    assert isinstance(resolve_sampler(do_sample=True, temperature=0), GreedySampler)
    assert isinstance(resolve_sampler("top_k"), TopKSampler)
    s = resolve_sampler("top_p", top_p=0.5, top_k=10)
    assert (s.p, s.k) == (0.5, 10)
    mine = TopKSampler(k=10)
    assert resolve_sampler(mine) is mine and get_sampler(mine) is mine
    assert isinstance(get_sampler("beam", num_beams=2), BeamSampler)


# KerasHub functional form --------------------------------------------------------------------------
def test_functional_form_uses_the_same_engine(lm):
    model = lm.model
    bos, length = 2, 14

    def next_fn(prompt, cache, index):
        logits, hidden = model(prompt, return_hidden=True)
        return logits[:, index - 1], hidden[:, index - 1], cache

    prompt = torch.zeros(2, length, dtype=torch.long)
    prompt[:, 0] = bos
    with torch.no_grad():
        out = GreedySampler()(next=next_fn, prompt=prompt, index=1)
        assert out[:, 1:].tolist() == generate_ids(model, [[bos], [bos]], max_new_tokens=length - 1, eos_token_id=[])
        beam = BeamSampler(num_beams=3)(next=next_fn, prompt=prompt[:1], index=1)
        ref = generate_ids(model, [[bos]], max_new_tokens=length - 1, num_beams=3, eos_token_id=[])[0]
        assert beam[0, 1:].tolist() == ref
        a = TopKSampler(k=10)(next=next_fn, prompt=prompt, index=1, seed=4)
        assert a[:, 1:].tolist() == generate_ids(model, [[bos], [bos]], max_new_tokens=length - 1, sampler="top_k",
                                                  top_k=10, seed=4, eos_token_id=[])
        hidden = model(prompt, return_hidden=True)[1]
        c = ContrastiveSampler(k=3, alpha=0.5)(next=next_fn, prompt=prompt[:1], index=1, hidden_states=hidden[:1])
        assert c[0, 1:].tolist() == _contrastive_reference(model, [bos], 3, 0.5, length - 1)
        stop = int(out[0, 3])
        s = GreedySampler()(next=next_fn, prompt=prompt, index=1, stop_token_ids=[stop])
        first = s[0].tolist().index(stop, 1)
        assert s[0, first + 1:].eq(0).all() and s[0, :first + 1].tolist() == out[0, :first + 1].tolist()


# Bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,words", [
    (dict(prompts=[]), "prompt list is empty"),
    (dict(prompts="word " * 80), "context"),
    (dict(sampler="top_k", top_k=0), "positive integer"),
    (dict(sampler=TopKSampler, k=-1), "positive integer"),
    (dict(do_sample=True, top_p=0.0), "(0, 1]"),
    (dict(do_sample=True, top_p=1.5), "(0, 1]"),
    (dict(sampler="top_p", top_p=2), "(0, 1]"),
    (dict(temperature=-0.5), "temperature"),
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences=3"),
    (dict(sampler="nucleus"), "sampler must be one of"),
    (dict(sampler="greedy", num_return_sequences=2), "one sequence"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
])
def test_bad_input_raises_one_sentence(lm, kwargs, words):
    kwargs = dict(kwargs)
    prompts = kwargs.pop("prompts", "hello")
    if kwargs.get("sampler") is TopKSampler:
        with pytest.raises(GenerationError, match="positive integer"):
            TopKSampler(k=kwargs["k"])
        return
    with pytest.raises(GenerationError) as info:
        generate(lm, prompts, max_new_tokens=3, **kwargs)
    message = str(info.value)
    assert words in message and message.endswith(".") and "\n" not in message


def test_long_prompt_left_truncated_when_asked(lm):
    text = "word " * 80
    out = lm.generate(text, max_new_tokens=5, truncate_prompt=True, include_prompt=False)
    ids = lm.tokenizer.encode(text)[-(64 - 5):]
    gen = generate_ids(lm.model, [ids], max_new_tokens=5)[0]
    assert out == lm.tokenizer.decode(gen, skip_special_tokens=True).rstrip("\ufffd")
    assert generate_ids(lm.model, [ids], max_new_tokens=5) == generate_ids(
        lm.model, [lm.tokenizer.encode(text)], max_new_tokens=5, truncate_prompt=True)


def test_truncation_keeps_half_the_context_for_the_prompt(lm):
    ids = lm.tokenizer.encode("word " * 80)
    ctx = lm.config.n_positions
    out = generate_ids(lm.model, [ids], max_new_tokens=10 * ctx, truncate_prompt=True, eos_token_id=[])
    assert len(out[0]) == ctx - ctx // 2  # the prompt kept its last ctx // 2 tokens; the rest was generated
    assert out == generate_ids(lm.model, [ids[-(ctx // 2):]], max_new_tokens=ctx, eos_token_id=[])


# CLI ------------------------------------------------------------------------------------------------
def test_cli_generate(lm, tmp_path, capsys):
    lm.save(tmp_path / "m")
    code = main(["generate", "--model", str(tmp_path / "m"), "hello", "one two", "--max-new-tokens", "6",
                 "--do-sample", "--top-k", "20", "--seed", "3", "--num-return-sequences", "2", "--json"])
    assert code == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    expected = lm.generate(["hello", "one two"], max_new_tokens=6, do_sample=True, top_k=20, seed=3,
                           num_return_sequences=2, include_prompt=False)
    assert [x["prompt"] for x in lines] == ["hello", "one two"]
    assert [x["generations"] for x in lines] == expected
    assert main(["generate", "--model", str(tmp_path / "m"), "hello", "--max-new-tokens", "6", "--stream"]) == 0
    assert capsys.readouterr().out == lm.generate("hello", max_new_tokens=6) + "\n"
    assert main(["generate", "--model", str(tmp_path / "m"), "hello", "--sampler", "nucleus"]) == 2
    assert "sampler must be one of" in capsys.readouterr().err


def test_keras_mini_shape_cache_and_functional_form():
    """The KerasHub mini-GPT shape (post-norm, ReLU, 3 heads of 85 dims, head with bias), as seed B uses it."""
    from gptgen import preset

    torch.manual_seed(3)
    model = GPT(preset("mini", vocab_size=300, n_positions=40)).eval()
    prompts = [[2], [2, 17, 40]]
    out = generate_ids(model, prompts, max_new_tokens=12, eos_token_id=[])
    with torch.no_grad():
        for p, o in zip(prompts, out):
            full = model(torch.tensor([p + o]))[0]
            assert full[len(p) - 1:-1].argmax(-1).tolist() == o  # every greedy step agrees with a full pass

        def next_fn(prompt, cache, index):
            return model(prompt)[:, index - 1], None, cache

        buf = torch.zeros(1, 13, dtype=torch.long)
        buf[0, 0] = 2
        beam = BeamSampler(num_beams=10)(next=next_fn, prompt=buf, index=1)
    assert beam[0, 1:].tolist() == generate_ids(model, [[2]], max_new_tokens=12, num_beams=10, eos_token_id=[])[0]


def test_beam_streams_its_final_text_and_zero_tokens(lm):
    kw = dict(max_new_tokens=8, num_beams=3)
    text = lm.generate("hello", include_prompt=False, **kw)
    assert "".join(stream(lm, "hello", **kw)) == text
    got = []
    assert lm.generate(["hello"], callback=lambda i, p: got.append(p), **kw) == ["hello" + text]
    assert "".join(got) == text
    for call in (lambda: lm.generate("hello", max_new_tokens=0), lambda: generate_ids(lm.model, [[3, 4]], max_new_tokens=0)):
        with pytest.raises(GenerationError, match="max_new_tokens must be an integer of at least 1"):
            call()  # as transformers: at least one new token
