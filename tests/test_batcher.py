"""The continuous-batching engine (gptgen.generation.batcher).

Oracles: the per-call engine (`generate_ids` / `lm.generate`) for greedy tokens, with and without
other requests in flight; the same seeded request run alone; log_softmax of the model's logits
computed over the whole sequence without a cache; a "scripted" GPT whose greedy continuation is a
chosen token list, for UTF-8 splits, stop strings and EOS.
"""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import torch

from gptgen import GPT, GenerationError, GPTConfig, LanguageModel, Tokenizer
from gptgen.generation import generate_ids
from gptgen.generation.batcher import BatchEngine, PromptTooLong, QueueFull, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a journey of a thousand miles begins with a single step",
    "all that glitters is not gold, and not all who wander are lost",
    "to be or not to be, that is the question",
] * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train("byte-bpe", TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def lm(tok):
    torch.manual_seed(11)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=2, init_std=0.2,
                    eos_token_id=tok.eos_token_id)
    return LanguageModel(GPT(cfg).eval(), tok)


@pytest.fixture(scope="module")
def engine(lm):
    with BatchEngine(lm, max_batch=12, prefill_chunk=16) as eng:
        yield eng


def _prompt(tok, text):
    return tok.encode(text)


def _wait_until(cond, timeout=20.0):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.002)


class Collector:
    """on_event sink: events per choice, and a flag once the first token arrived."""

    def __init__(self):
        self.events = {}
        self.first = threading.Event()

    def __call__(self, ev):
        self.events.setdefault(ev.index, []).append(ev)
        if ev.token_id is not None:
            self.first.set()

    def tokens(self, i=0):
        return [e.token_id for e in self.events.get(i, []) if e.token_id is not None]

    def text(self, i=0):
        return "".join(e.text for e in self.events.get(i, []))


OTHERS = [
    SamplingParams(max_tokens=30, temperature=0.8, top_k=20, seed=1),
    SamplingParams(max_tokens=25, temperature=1.2, top_p=0.9),
    SamplingParams(max_tokens=40, temperature=0.7, min_p=0.05, seed=3, repetition_penalty=1.3),
    SamplingParams(max_tokens=20, temperature=1.0, presence_penalty=0.5, frequency_penalty=0.5),
    SamplingParams(max_tokens=35, temperature=0.0, no_repeat_ngram_size=2),
    SamplingParams(max_tokens=30, temperature=0.9, top_k=5, top_p=0.8, seed=6, n=2),
    SamplingParams(max_tokens=28, temperature=1.0, stop=["e"], seed=7),
    SamplingParams(max_tokens=33, temperature=1.5, min_tokens=10, logprobs=3),
]
OTHER_PROMPTS = ["the quick", "a journey of a", "all", "to be or not to be, that", "alpha beta", "x y z", "lazy dog",
                 "wander"]


def _run_with_others(engine, tok, prompt_ids, params):
    """Run `params` on `prompt_ids` while 8 other requests join before and after it; return its tokens."""
    sinks, reqs = [], []
    for i in range(4):
        sink = Collector()
        reqs.append(engine.submit(_prompt(tok, OTHER_PROMPTS[i]), OTHERS[i], sink))
        sinks.append(sink)
        sink.first.wait(10)  # each joins at a later step than the one before
    target = Collector()
    treq = engine.submit(prompt_ids, params, target)
    for i in range(4, 8):
        target.first.wait(10)
        time.sleep(0.005 * i)
        sink = Collector()
        reqs.append(engine.submit(_prompt(tok, OTHER_PROMPTS[i]), OTHERS[i], sink))
    assert treq.done.wait(30)
    for r in reqs:
        assert r.done.wait(30)
    return target


# Greedy and seeded sampling: the same alone and in a busy batch --------------------------------------
@pytest.mark.parametrize("extra", [{}, dict(repetition_penalty=1.4, no_repeat_ngram_size=2)])
def test_greedy_matches_lm_generate_alone_and_with_8_others(engine, lm, tok, extra):
    prompt = _prompt(tok, "the quick brown fox")
    ref = generate_ids(lm.model, [prompt], max_new_tokens=40, eos_token_id=tok.eos_token_id, **extra)[0]
    params = SamplingParams(max_tokens=40, temperature=0.0, **extra)
    alone = engine.generate(prompt, params)[0]
    assert alone.token_ids == ref
    busy = _run_with_others(engine, tok, prompt, params)
    assert busy.tokens() == ref
    assert busy.text() == alone.text == lm.tokenizer.decode(ref, skip_special_tokens=True)
    assert engine.stats()["active_slots"] == 0


def test_seeded_sampling_is_the_same_alone_and_with_8_others(engine, tok):
    prompt = _prompt(tok, "all that glitters")
    params = SamplingParams(max_tokens=40, temperature=1.3, top_k=40, top_p=0.95, seed=1234)
    alone = engine.generate(prompt, params)[0]
    again = engine.generate(prompt, params)[0]
    busy = _run_with_others(engine, tok, prompt, params)
    assert alone.token_ids == again.token_ids == busy.tokens()
    assert alone.text == busy.text()
    other = engine.generate(prompt, SamplingParams(max_tokens=40, temperature=1.3, top_k=40, top_p=0.95, seed=99))[0]
    assert other.token_ids != alone.token_ids  # the seed matters


def test_n_choices_use_seed_plus_index(engine, tok):
    prompt = _prompt(tok, "to be or")
    both = engine.generate(prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=50, n=3))
    assert [c.index for c in both] == [0, 1, 2]
    for i, choice in enumerate(both):
        single = engine.generate(prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=50 + i))[0]
        assert choice.token_ids == single.token_ids
        assert choice.prompt_tokens == len(prompt)
    assert len({tuple(c.token_ids) for c in both}) == 3


# Chunked prefill, cancellation, limits --------------------------------------------------------------
def test_long_prompt_is_prefilled_in_chunks_while_another_request_decodes(lm, tok):
    long_prompt = (_prompt(tok, TEXTS[0] + " " + TEXTS[1] + " " + TEXTS[2]) * 3)[:100]
    ref = generate_ids(lm.model, [long_prompt], max_new_tokens=10, eos_token_id=tok.eos_token_id)[0]
    with BatchEngine(lm, max_batch=4, prefill_chunk=8) as eng:
        seen = []
        holder = {}
        runner = Collector()

        def on_runner(ev):
            runner(ev)
            if "long" in holder:
                seen.append(holder["long"].prefilled)

        r = eng.submit(_prompt(tok, "the"), SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True),
                       on_runner)
        runner.first.wait(10)
        long_sink = Collector()
        holder["long"] = eng.submit(long_prompt, SamplingParams(max_tokens=10, temperature=0.0), long_sink)
        assert holder["long"].done.wait(30)
        eng.cancel(r)
        assert r.done.wait(10)
        stats = eng.stats()
    assert long_sink.tokens() == ref  # chunked prefill gives the tokens of a one-shot prefill
    between = sorted({p for p in seen if 0 < p < len(long_prompt)})
    assert len(between) >= 5, seen  # the running request got tokens between the chunks
    assert all(b % 8 == 0 for b in between)
    assert stats["prefill_chunks"] >= 100 // 8


def test_churn_of_joins_leaves_cancels_and_choices_keeps_every_row_intact(lm, tok):
    """Few slots, tiny prefill chunks, n > 1, cancellations: rows are moved and swapped all the time,
    and every completed greedy choice still equals the per-call engine's tokens."""
    import random

    rng = random.Random(3)
    words = " ".join(TEXTS[:4]).split()
    jobs = []
    for i in range(24):
        prompt = tok.encode(" ".join(rng.sample(words, rng.randint(1, 12))))
        jobs.append((prompt, rng.randint(1, 18), rng.choice([1, 1, 2, 3]), rng.random() < 0.2))
    refs = {}
    for prompt, new, _, _ in jobs:
        refs[(tuple(prompt), new)] = generate_ids(lm.model, [prompt], max_new_tokens=new,
                                                  eos_token_id=tok.eos_token_id)[0]
    with BatchEngine(lm, max_batch=5, prefill_chunk=4) as eng:
        submitted = []
        for prompt, new, n, cancel in jobs:
            sink = Collector()
            req = eng.submit(prompt, SamplingParams(max_tokens=new, temperature=0.0, n=n), sink)
            submitted.append((prompt, new, n, req, sink))
            if cancel:
                time.sleep(0.003)
                eng.cancel(req)
            if rng.random() < 0.5:
                time.sleep(0.002)
        for *_, req, _ in submitted:
            assert req.done.wait(30)
        stats = eng.stats()
    assert stats["active_slots"] == 0 and stats["queue_depth"] == 0
    completed = 0
    for prompt, new, n, req, sink in submitted:
        for i in range(n):
            final = sink.events[i][-1]
            assert final.finish_reason in ("stop", "length", "cancelled")
            if final.finish_reason != "cancelled":
                assert sink.tokens(i) == refs[(tuple(prompt), new)]
                completed += 1
    assert completed >= 20


def test_prompts_of_different_lengths_joining_in_one_prefill_keep_their_caches(lm, tok):
    """Rows that finish their prefill in the same step swap places as they join the decoding rows; each must
    carry its whole prompt cache along (a row moved before its own length was set lost its last positions)."""
    words = " ".join(TEXTS[:4]).split()
    prompts = [tok.encode(" ".join(words[i:i + 1 + (5 * i) % 13])) for i in range(20)]
    refs = [generate_ids(lm.model, [p], max_new_tokens=10, eos_token_id=tok.eos_token_id)[0] for p in prompts]
    eng = BatchEngine(lm, max_batch=8, prefill_chunk=128)
    sinks = [Collector() for _ in prompts]
    reqs = [eng.submit(p, SamplingParams(max_tokens=10, temperature=0), s) for p, s in zip(prompts, sinks)]
    eng.start()  # all queued before the first step: each wave of 8 joins in one prefill
    try:
        for r in reqs:
            assert r.done.wait(30)
    finally:
        eng.close()
    assert [s.tokens() for s in sinks] == refs


def test_ids_past_the_tokenizer_in_a_padded_vocabulary_have_empty_text(tok):
    """A model whose embedding is padded past the tokenizer may pick or rank those ids: their text is ""."""
    torch.manual_seed(5)
    cfg = GPTConfig(vocab_size=2 * tok.vocab_size, n_positions=64, n_embd=32, n_layer=1, n_head=2, init_std=0.2,
                    eos_token_id=tok.eos_token_id)
    padded = LanguageModel(GPT(cfg).eval(), tok)
    with BatchEngine(padded, max_batch=2) as eng:
        sink = Collector()
        req = eng.submit(tok.encode("the quick"), SamplingParams(max_tokens=12, temperature=0, logprobs=20), sink)
        assert req.done.wait(30)
    events = [e for e in sink.events[0] if e.token_id is not None]
    assert sink.events[0][-1].finish_reason in ("stop", "length")
    alternatives = [alt for e in events for alt in e.top_logprobs]
    past = [alt for alt in alternatives if alt[0] >= tok.vocab_size]
    assert past and all(text == "" for _, text, _ in past)
    assert all(text == tok.decode([i]) for i, text, _ in alternatives if i < tok.vocab_size)


def test_cancel_frees_the_slot_within_one_step(engine, tok):
    sink = Collector()
    req = engine.submit(_prompt(tok, "a journey"), SamplingParams(max_tokens=100, ignore_eos=True), sink)
    assert sink.first.wait(10)
    before = engine.stats()["steps"]
    engine.cancel(req)
    assert req.done.wait(10)
    after = engine.stats()
    assert after["active_slots"] == 0
    assert after["steps"] - before <= 1
    assert sink.events[0][-1].finish_reason == "cancelled"
    assert req.finish_reasons == ["cancelled"]


def test_a_failing_step_ends_its_requests_with_error_and_the_engine_goes_on(lm, tok, caplog):
    with BatchEngine(lm, max_batch=4) as eng:
        real = eng.runner.forward
        calls = {"n": 0}

        def flaky(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("boom")
            return real(*args, **kwargs)

        eng.runner.forward = flaky
        sink = Collector()
        req = eng.submit(_prompt(tok, "the"), SamplingParams(max_tokens=20, temperature=0.0), sink)
        assert req.done.wait(10)
        assert sink.events[0][-1].finish_reason == "error"
        again = eng.generate(_prompt(tok, "the"), SamplingParams(max_tokens=5, temperature=0.0))[0]
        assert again.finish_reason == "length" and len(again.token_ids) == 5
        assert eng.stats()["active_slots"] == 0
    assert "boom" in caplog.text


def test_max_tokens_none_runs_to_the_context_and_close_cancels_the_rest(lm, tok):
    eng = BatchEngine(lm, max_batch=2, max_context=40)
    with eng:
        prompt = _prompt(tok, "the quick brown")
        full = eng.generate(prompt, SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True))[0]
        assert full.finish_reason == "length" and len(prompt) + len(full.token_ids) == 40
        with pytest.raises(PromptTooLong):
            eng.submit(list(range(1, 41)), SamplingParams(max_tokens=None), lambda ev: None)
        sink = Collector()
        req = eng.submit(prompt, SamplingParams(max_tokens=30, ignore_eos=True), sink)
        assert sink.first.wait(10)
    assert req.done.is_set() and req.finish_reasons == ["cancelled"]
    with pytest.raises(GenerationError, match="closed"):
        eng.submit(prompt, SamplingParams(), lambda ev: None)


def test_callbacks_may_call_back_into_the_engine(lm, tok):
    """on_event runs on the engine thread without the engine's lock: it may cancel or read stats."""
    with BatchEngine(lm, max_batch=1, max_queue=4) as eng:
        seen = []
        holder = {}

        def on_event(ev):
            seen.append(eng.stats()["active_slots"])
            if ev.completion_tokens == 3 and ev.token_id is not None:
                eng.cancel(holder["req"])

        holder["req"] = eng.submit(_prompt(tok, "the"), SamplingParams(max_tokens=50, ignore_eos=True), on_event)
        waiting = eng.submit(_prompt(tok, "a"), SamplingParams(max_tokens=5), lambda ev: seen.append(eng.stats()))
        eng.cancel(waiting)
        assert holder["req"].done.wait(10) and waiting.done.wait(10)
        assert holder["req"].finish_reasons == ["cancelled"] and waiting.finish_reasons == ["cancelled"]
        assert 3 <= sum(isinstance(x, int) for x in seen) <= 5


def test_queue_limit_raises_queue_full(lm, tok):
    with BatchEngine(lm, max_batch=1, max_queue=2) as eng:
        reqs = []
        with pytest.raises(QueueFull, match="queue"):
            for _ in range(10):
                reqs.append(eng.submit(_prompt(tok, "the"), SamplingParams(max_tokens=100, ignore_eos=True),
                                       lambda ev: None))
        assert 2 <= len(reqs) <= 3  # the queue holds 2; one more may already sit in the slot
        # the engine thread may move a queued request into the free slot after the refusal
        stats = eng.stats()
        assert stats["queue_depth"] + stats["active_slots"] == len(reqs) and stats["active_slots"] <= 1
        for r in reqs:
            eng.cancel(r)
        for r in reqs:
            assert r.done.wait(10)
            assert r.finish_reasons == ["cancelled"]
        _wait_until(lambda: eng.stats()["active_slots"] == 0)


def test_errors(engine, lm, tok):
    with pytest.raises(PromptTooLong, match="context of 128"):
        engine.submit(list(range(1, 121)), SamplingParams(max_tokens=20), lambda ev: None)
    with pytest.raises(GenerationError, match="top_p"):
        engine.submit([1, 2], SamplingParams(top_p=0.0), lambda ev: None)
    with pytest.raises(GenerationError, match="temperature"):
        engine.submit([1, 2], SamplingParams(temperature=-1), lambda ev: None)
    with pytest.raises(GenerationError, match="vocabulary"):
        engine.submit([1, 99999], SamplingParams(), lambda ev: None)
    with pytest.raises(GenerationError, match="no tokens"):
        engine.submit([], SamplingParams(), lambda ev: None)
    with pytest.raises(GenerationError, match="n \\(13\\)"):
        engine.submit([1], SamplingParams(n=13), lambda ev: None)


# Finish reasons, stop strings, UTF-8, logprobs ----------------------------------------------------
def scripted_lm(tok, prompt_ids, script, ctx=48, filler=None):
    """A GPT whose greedy continuation of `prompt_ids` is `script`: the blocks are the identity, the
    position embedding is one-hot and the LM head maps each position to its scripted next token."""
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_positions=ctx, n_embd=ctx, n_layer=1, n_head=2,
                    tie_word_embeddings=False, eos_token_id=tok.eos_token_id)
    model = GPT(cfg).eval()
    P = len(prompt_ids)
    filler = script[0] if filler is None else filler
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0 if name.endswith("weight") and ".ln_" in f".{name}" else 0.0)
        model.embed.wpe.weight.copy_(torch.eye(ctx))
        for pos in range(ctx):
            step = pos - P + 1
            target = script[step] if 0 <= step < len(script) else filler
            model.lm_head.weight[target, pos] += 10.0
    return LanguageModel(model, tok)


@pytest.fixture(scope="module")
def gpt2_tok(gpt2_tokenizer_dir):
    return Tokenizer.from_pretrained(gpt2_tokenizer_dir)


def test_utf8_characters_split_over_tokens_never_appear_half(gpt2_tok):
    text = " naïve café → 世界 🙂 한국어 done"
    script = gpt2_tok.encode(text)
    singles = [gpt2_tok.decode([t]) for t in script]
    assert sum("\ufffd" in s for s in singles) >= 4  # the byte-level BPE really splits characters
    prompt = gpt2_tok.encode("Say:")
    lm = scripted_lm(gpt2_tok, prompt, script + [gpt2_tok.eos_token_id])
    with BatchEngine(lm, max_batch=2) as eng:
        sink = Collector()
        req = eng.submit(prompt, SamplingParams(max_tokens=40, temperature=0.0), sink)
        assert req.done.wait(20)
    deltas = [e.text for e in sink.events[0]]
    assert all("\ufffd" not in d for d in deltas)
    for d in deltas:
        d.encode("utf-8")  # every delta is valid UTF-8 on its own
    assert "".join(deltas) == text
    assert sink.tokens() == script + [gpt2_tok.eos_token_id]
    assert sum(d == "" for d in deltas[:-1]) >= 3  # bytes of unfinished characters were held back
    assert sink.events[0][-1].finish_reason == "stop"  # EOS


def test_stop_string_split_across_tokens_stops_and_is_cut(gpt2_tok):
    text = " the answer is forty-two. Question: what else"
    script = gpt2_tok.encode(text)
    pieces = [gpt2_tok.decode([t]) for t in script]
    # a stop string that begins inside one token and ends inside the next
    k = next(i for i, p in enumerate(pieces) if p == " forty")
    stop = pieces[k][-3:] + pieces[k + 1][:1]
    assert stop == "rty-"
    prompt = gpt2_tok.encode("Q:")
    lm = scripted_lm(gpt2_tok, prompt, script)
    with BatchEngine(lm, max_batch=2) as eng:
        done = eng.generate(prompt, SamplingParams(max_tokens=30, temperature=0.0, stop=["never", stop]))[0]
        sink = Collector()
        eng.submit(prompt, SamplingParams(max_tokens=30, temperature=0.0, stop=[stop]), sink).done.wait(20)
        longer = eng.generate(prompt, SamplingParams(max_tokens=30, temperature=0.0, stop=[" what"]))[0]
        length = eng.generate(prompt, SamplingParams(max_tokens=3, temperature=0.0))[0]
    assert done.text == " the answer is fo"
    assert done.finish_reason == "stop"
    assert done.token_ids == script[:k + 2]  # stopped at the token that completed the stop string
    assert all(stop not in "".join(e.text for e in sink.events[0][:i + 1]) for i in range(len(sink.events[0])))
    assert sink.text() == done.text
    assert longer.text == " the answer is forty-two. Question:" and longer.finish_reason == "stop"
    assert length.finish_reason == "length" and length.token_ids == script[:3]
    assert length.completion_tokens == 3 and length.text == gpt2_tok.decode(script[:3])


def test_logprobs_equal_log_softmax_of_the_model_logits(engine, lm, tok):
    prompt = _prompt(tok, "a single step")
    for params in (SamplingParams(max_tokens=12, temperature=0.0, logprobs=5),
                   SamplingParams(max_tokens=12, temperature=0.9, top_k=30, seed=4, logprobs=3)):
        out = engine.generate(prompt, params)[0]
        seq = torch.tensor([prompt + out.token_ids])
        with torch.no_grad():
            ref = torch.log_softmax(lm.model(seq)[0].float(), dim=-1)
        P = len(prompt)
        for i, tokn in enumerate(out.token_ids):
            row = ref[P - 1 + i]
            assert out.logprobs[i] == pytest.approx(row[tokn].item(), abs=1e-4)
            vals, ids = torch.topk(row, params.logprobs)
            got = out.top_logprobs[i]
            assert [g[0] for g in got] == ids.tolist()
            assert [g[2] for g in got] == pytest.approx(vals.tolist(), abs=1e-4)
            assert [g[1] for g in got] == [tok.decode([t]) for t in ids.tolist()]


def test_presence_and_frequency_penalties_follow_openai_per_row(engine, lm, tok):
    """Greedy with OpenAI's penalties, checked step by step against the model's own logits."""
    prompt = _prompt(tok, "to be or not to be")
    params = SamplingParams(max_tokens=25, temperature=0.0, presence_penalty=1.5, frequency_penalty=0.7)
    plain = SamplingParams(max_tokens=25, temperature=0.0)
    sinks = [Collector(), Collector()]
    reqs = [engine.submit(prompt, params, sinks[0]), engine.submit(prompt, plain, sinks[1])]
    for r in reqs:
        assert r.done.wait(20)
    out = sinks[0].tokens()
    assert out != sinks[1].tokens()  # the penalties change the text, and only in the row that asked
    assert sinks[1].tokens() == generate_ids(lm.model, [prompt], max_new_tokens=25, eos_token_id=tok.eos_token_id)[0]
    with torch.no_grad():
        logits = lm.model(torch.tensor([prompt + out]))[0].float()
    for i, chosen in enumerate(out):
        counts = torch.bincount(torch.tensor(out[:i], dtype=torch.long), minlength=logits.shape[-1]).float()
        scores = logits[len(prompt) - 1 + i] - 1.5 * (counts > 0) - 0.7 * counts
        assert chosen == int(torch.argmax(scores))


def test_min_tokens_holds_back_eos(tok):
    prompt = tok.encode("the quick")
    brown = tok.encode(" brown")
    script = brown + [tok.eos_token_id] + tok.encode(" fox jumps")
    lm = scripted_lm(tok, prompt, script)
    m = len(brown) + 2
    with BatchEngine(lm, max_batch=2) as eng:
        early = eng.generate(prompt, SamplingParams(max_tokens=10, temperature=0.0))[0]
        held = eng.generate(prompt, SamplingParams(max_tokens=10, temperature=0.0, min_tokens=m))[0]
    assert early.token_ids == brown + [tok.eos_token_id] and early.finish_reason == "stop"
    assert held.token_ids[:len(brown)] == brown
    assert tok.eos_token_id not in held.token_ids[:m] and len(held.token_ids) >= m
    assert held.token_ids[len(brown) + 1:m] == script[len(brown) + 1:m]  # the script goes on after the ban


def test_max_tokens_gives_length_and_eos_gives_stop(tok):
    prompt = tok.encode("the quick")
    script = tok.encode(" brown fox") + [tok.eos_token_id]
    lm = scripted_lm(tok, prompt, script)
    with BatchEngine(lm, max_batch=2) as eng:
        eos = eng.generate(prompt, SamplingParams(max_tokens=20, temperature=0.0))[0]
        short = eng.generate(prompt, SamplingParams(max_tokens=2, temperature=0.0))[0]
        ignored = eng.generate(prompt, SamplingParams(max_tokens=len(script) + 2, temperature=0.0, ignore_eos=True))[0]
        ids = eng.generate(prompt, SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=[script[1]]))[0]
    assert eos.finish_reason == "stop" and eos.token_ids == script and eos.text == " brown fox"
    assert eos.completion_tokens == len(script)
    assert short.finish_reason == "length" and short.token_ids == script[:2]
    assert ignored.finish_reason == "length" and len(ignored.token_ids) == len(script) + 2
    assert ids.finish_reason == "stop" and ids.token_ids == script[:2]


# CUDA: the decode step captured in CUDA graphs per bucketed batch size -------------------------------
def test_fixed_shape_bucketed_decode_gives_the_same_tokens(lm, tok, monkeypatch):
    """The CUDA path's step (rows padded to a bucket, attention over the whole cache) run eagerly on CPU."""
    from gptgen.generation import runner

    calls = []

    def eager(fn, **options):
        assert options["mode"] == "reduce-overhead" and options["fullgraph"]
        def run(model, idx, *args):
            calls.append(idx.shape[0])
            return fn(model, idx, *args)
        return run

    monkeypatch.setattr(runner.torch, "compile", eager)
    prompts = [_prompt(tok, p) for p in OTHER_PROMPTS[:5]]
    refs = [generate_ids(lm.model, [p], max_new_tokens=12 + 3 * i, eos_token_id=tok.eos_token_id)[0]
            for i, p in enumerate(prompts)]
    with BatchEngine(lm, max_batch=8) as eng:
        eng.runner.graphs = True
        sinks = [Collector() for _ in prompts]
        reqs = [eng.submit(p, SamplingParams(max_tokens=12 + 3 * i, temperature=0.0), s)
                for i, (p, s) in enumerate(zip(prompts, sinks))]
        for r in reqs:
            assert r.done.wait(30)
    assert [s.tokens() for s in sinks] == refs
    assert set(calls) <= {1, 2, 4, 8} and max(calls) >= 4  # padded to power-of-two buckets


@pytest.mark.gpu
def test_cuda_graph_decode_matches_cpu_greedy(lm, tok):
    cpu_ref = [generate_ids(lm.model, [_prompt(tok, p)], max_new_tokens=20, eos_token_id=tok.eos_token_id)[0]
               for p in OTHER_PROMPTS[:5]]
    gpu_model = GPT(lm.config).eval().to("cuda")
    gpu_model.load_state_dict(lm.model.state_dict())
    with BatchEngine(LanguageModel(gpu_model, tok), max_batch=8) as eng:
        assert eng.runner.graphs
        sinks = [Collector() for _ in cpu_ref]
        reqs = [eng.submit(_prompt(tok, p), SamplingParams(max_tokens=20, temperature=0.0), s)
                for p, s in zip(OTHER_PROMPTS[:5], sinks)]
        for r in reqs:
            assert r.done.wait(600)  # the first step of each bucket compiles
    assert [s.tokens() for s in sinks] == cpu_ref


# CPU: the decode step compiled by inductor ------------------------------------------------------------
HAS_COMPILER = shutil.which("g++") is not None or shutil.which("gcc") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_COMPILER, reason="inductor needs a C++ compiler")
def test_compiled_cpu_decode_gives_the_eager_tokens(lm, tok, monkeypatch):
    """compile=True on CPU: warm_up compiles every batch size up front; rows joining and leaving at
    different steps (batch sizes 1..4, different filled lengths) get the per-call engine's greedy tokens and
    the eager engine's seeded samples."""
    import gptgen.native

    monkeypatch.setattr(gptgen.native, "decoder", lambda model: None)  # inductor's step, not the native one
    prompts = [_prompt(tok, p) for p in OTHER_PROMPTS[:4]]
    lengths = [10, 18, 14, 22]
    greedy_refs = [generate_ids(lm.model, [p], max_new_tokens=n, eos_token_id=tok.eos_token_id)[0]
                   for p, n in zip(prompts, lengths)]
    sampled = [SamplingParams(max_tokens=n, temperature=1.1, top_k=30, top_p=0.9, seed=40 + i)
               for i, n in enumerate(lengths)]

    def run(eng, params):
        sinks = [Collector() for _ in prompts]
        reqs = []
        for p, prm, sink in zip(prompts, params, sinks):
            reqs.append(eng.submit(p, prm, sink))
            sink.first.wait(10)  # the next joins a step later: batch sizes and lengths differ
        for r in reqs:
            assert r.done.wait(60)
        return [s.tokens() for s in sinks]

    eng = BatchEngine(lm, max_batch=4, compile=True)
    assert eng.compile_cpu and not eng.runner.graphs
    assert eng.warm_up() > 0
    assert eng.warm_up() == 0.0  # once is enough
    with eng:
        with pytest.raises(GenerationError, match="before the engine starts"):
            eng.warm_up()
        greedy = run(eng, [SamplingParams(max_tokens=n, temperature=0.0) for n in lengths])
        samples = run(eng, sampled)
    with BatchEngine(lm, max_batch=4) as eager:
        assert not eager.compile_cpu and eager.warm_up() == 0.0
        eager_samples = run(eager, sampled)
    assert greedy == greedy_refs
    assert samples == eager_samples


def test_compile_must_be_a_bool_or_none(lm):
    with pytest.raises(GenerationError, match="compile must be True, False or None"):
        BatchEngine(lm, compile="yes")


# Per-row token choice: candidate narrowing keeps the full-vocabulary distribution -------------------
def _reference_probs(logits, t, k, p, min_p):
    """Brute force: temperature, top-k, nucleus ("the tokens before it hold less than p"), min-p."""
    probs = torch.softmax(logits.double() / t, dim=-1)
    order = sorted(range(len(probs)), key=lambda i: -probs[i].item())
    keep = set(order[:k] if k else order)
    kept = probs * torch.tensor([i in keep for i in range(len(probs))], dtype=torch.double)
    kept = kept / kept.sum()
    nucleus, before = set(), 0.0
    for i in order:
        if i in keep and before < p:
            nucleus.add(i)
            before += kept[i].item()
    kept = kept * torch.tensor([i in nucleus for i in range(len(probs))], dtype=torch.double)
    kept = kept / kept.sum()
    kept = torch.where(kept < min_p * kept.max(), torch.zeros_like(kept), kept)
    return kept / kept.sum()


@pytest.mark.parametrize("t,k,p,min_p", [
    (0.7, 5, 1.0, 0.0),      # top-k within the candidates
    (1.0, 0, 0.6, 0.0),      # a nucleus the candidates cover: p / mass over the candidates
    (1.3, 0, 0.97, 0.0),     # a nucleus wider than the candidates: the whole vocabulary
    (1.0, 4, 0.8, 0.0),      # top-k then top-p
    (1.0, 0, 1.0, 0.15),     # min-p alone
])
def test_choose_tokens_matches_the_filtered_softmax(monkeypatch, t, k, p, min_p):
    from gptgen.generation import row_sampling

    monkeypatch.setattr(row_sampling, "CANDIDATES", 8)
    torch.manual_seed(0)
    logits = torch.randn(40) * 2.0
    n = 30000
    scores = logits.expand(n, -1).clone()
    torch.manual_seed(1)
    picks = row_sampling.choose_tokens(scores, temperature=[t] * n, top_k=[k] * n, top_p=[p] * n,
                                       min_p=[min_p] * n, generators=[None] * n)
    freq = torch.bincount(picks, minlength=40).double() / n
    ref = _reference_probs(logits, t, k, p, min_p)
    assert (freq[ref == 0] == 0).all()
    assert 0.5 * (freq - ref).abs().sum() < 0.02


def test_a_seeded_row_draws_the_same_whatever_the_other_rows(monkeypatch):
    from gptgen.generation import row_sampling

    monkeypatch.setattr(row_sampling, "CANDIDATES", 8)
    torch.manual_seed(0)
    V = 40
    settings = [dict(t=1.0, k=0, p=1.0), dict(t=0.8, k=5, p=1.0), dict(t=1.0, k=0, p=0.6), dict(t=1.3, k=0, p=0.97)]
    for mine in settings:
        alone, busy = [], []
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        for step in range(30):
            logits = torch.randn(6, V) * 2.0
            def pick(rows, gen):
                cfg = [mine if r == 2 else settings[(r + step) % 4] for r in rows]
                return row_sampling.choose_tokens(
                    logits[rows], temperature=[c["t"] if r != 4 else 0.0 for c, r in zip(cfg, rows)],
                    top_k=[c["k"] for c in cfg], top_p=[c["p"] for c in cfg], min_p=[0.0] * len(rows),
                    generators=[gen if r == 2 else None for r in rows])
            alone.append(pick([2], g1)[0].item())
            busy.append(pick([0, 1, 2, 3, 4, 5], g2)[2].item())
        assert alone == busy


def test_a_seeded_row_draws_the_same_whatever_the_other_rows_at_a_large_vocabulary():
    """The real candidate count (256) over 33,000 tokens: top-k rows and covered top-p rows go through
    the block search for their candidates."""
    from gptgen.generation import row_sampling

    V = 33000
    settings = [dict(t=1.0, k=0, p=1.0), dict(t=0.8, k=50, p=0.95), dict(t=1.0, k=0, p=0.6), dict(t=0.7, k=20, p=1.0)]
    g = torch.Generator().manual_seed(3)
    for mine in settings:
        alone, busy = [], []
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        for step in range(8):
            logits = torch.randn(5, V, generator=g) * 4.0

            def pick(rows, gen):
                cfg = [mine if r == 2 else settings[(r + step) % 4] for r in rows]
                return row_sampling.choose_tokens(
                    logits[rows], temperature=[c["t"] for c in cfg], top_k=[c["k"] for c in cfg],
                    top_p=[c["p"] for c in cfg], min_p=[0.0] * len(rows),
                    generators=[gen if r == 2 else None for r in rows])
            alone.append(pick([2], g1)[0].item())
            busy.append(pick([0, 1, 2, 3, 4], g2)[2].item())
        assert alone == busy, mine


def test_compile_on_cpu_without_a_cxx_compiler_is_one_clear_error(lm, monkeypatch):
    import gptgen.native

    monkeypatch.setattr(gptgen.native, "decoder", lambda model: None)  # inductor's step, not the native one
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(GenerationError, match="needs a C\\+\\+ compiler"):
        BatchEngine(lm, compile=True)


def test_int8_dynamic_engine_decodes_through_the_native_step_with_the_per_call_tokens(lm, tok):
    """An int8-dynamic model on CPU (where the VNNI kernel runs): the batch engine's decode step is the native
    Int8Decoder over its slot cache (rows at different positions, joining at different steps); greedy
    tokens equal the per-call engine's (its native step over a left-padded cache); warm_up compiles nothing."""
    import copy

    from gptgen.native import int8 as int8_ops
    from gptgen.quantize import quantize_model

    if not int8_ops.available():
        pytest.skip(f"the int8-dynamic kernel is unavailable here: {int8_ops.status()['detail']}")
    qlm = LanguageModel(quantize_model(copy.deepcopy(lm.model), "int8-dynamic", compute_dtype=torch.float32), tok)
    prompts = [_prompt(tok, p) for p in OTHER_PROMPTS[:4]]
    lengths = [12, 20, 16, 24]
    refs = [generate_ids(qlm.model, [p], max_new_tokens=n, eos_token_id=tok.eos_token_id)[0]
            for p, n in zip(prompts, lengths)]
    eng = BatchEngine(qlm, max_batch=4, compile=True)
    assert eng.runner.native is not None and eng.warm_up() == 0.0
    calls = []
    step_rows = eng.runner.native.step_rows

    class Counting:  # the decoder, counting its batched steps
        def step_rows(self, idx, pos):
            calls.append(idx.shape[0])
            return step_rows(idx, pos)

    eng.runner.native = Counting()
    with eng:
        sinks = [Collector() for _ in prompts]
        reqs = []
        for p, n, sink in zip(prompts, lengths, sinks):
            reqs.append(eng.submit(p, SamplingParams(max_tokens=n, temperature=0.0), sink))
            sink.first.wait(10)  # the next joins a step later: rows at different positions
        for r in reqs:
            assert r.done.wait(60)
    assert [s.tokens() for s in sinks] == refs
    assert max(calls) > 1 and len(calls) >= max(lengths) - 1  # batched native steps ran
