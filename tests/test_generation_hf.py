"""The decode engine against HF transformers generate() on the same randomly initialised GPT-2 weights."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from gptgen.checkpoint import load_model  # noqa: E402
from gptgen.generation import generate_ids  # noqa: E402
from gptgen.generation.engine import DecodeState, ModelBackend  # noqa: E402

PAD = 1
CONFIGS = {
    # A small vocabulary and wide initialisation make EOS and repeated n-grams common, so beam
    # hypotheses finish at different lengths and the n-gram ban matters.
    "v40": dict(vocab_size=40, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.3,
                eos_token_id=39),
    "v64": dict(vocab_size=64, n_positions=48, n_embd=48, n_layer=3, n_head=3, initializer_range=0.2,
                activation_function="gelu_new", eos_token_id=7),
}
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [3], [20, 21, 22, 23, 24, 25, 26]]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    torch.manual_seed(1234)
    cfg = GPT2Config(bos_token_id=0, pad_token_id=PAD, **CONFIGS[request.param])
    hf = GPT2LMHeadModel(cfg).eval()
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, load_model(path).eval(), cfg.eos_token_id


def _cut(seq, eos):
    """Tokens up to and including the first EOS."""
    seq = list(seq)
    return seq[:seq.index(eos) + 1] if eos in seq else seq


def _left_pad(prompts):
    P = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask, P


def _hf(hf, prompts, **kw):
    ids, mask, P = _left_pad(prompts)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, pad_token_id=PAD, **kw)
    return [row[P:].tolist() for row in out]


def test_greedy_tokens_identical_single_and_batched(pair):
    hf, ours, eos = pair
    for p in PROMPTS:
        expected = _cut(_hf(hf, [p], max_new_tokens=16, do_sample=False)[0], eos)
        assert generate_ids(ours, [p], max_new_tokens=16) == [expected]
    batched = [_cut(s, eos) for s in _hf(hf, PROMPTS, max_new_tokens=16, do_sample=False)]
    assert generate_ids(ours, PROMPTS, max_new_tokens=16) == batched
    # A prompt gives the same tokens alone as left-padded in a batch.
    assert batched == [generate_ids(ours, [p], max_new_tokens=16)[0] for p in PROMPTS]


def test_greedy_with_controls_matches_hf(pair):
    hf, ours, eos = pair
    p = PROMPTS[0]
    cases = [
        dict(repetition_penalty=1.3),
        dict(repetition_penalty=0.8),
        dict(no_repeat_ngram_size=2),
        dict(bad_words_ids=[[eos - 1], [30, 31], [p[-1], 2]]),
        dict(min_new_tokens=8),
        dict(eos_token_id=[eos, 2, 3]),
        dict(min_length=len(p) + 9),
        dict(min_length=len(p) + 3, min_new_tokens=6),
        dict(bad_words_ids=[[eos], [30, 31]]),  # transformers drops EOS from the banned list
    ]
    for kw in cases:
        stop = kw.get("eos_token_id", eos)
        stop = stop if isinstance(stop, list) else [stop]
        ref = _hf(hf, [p], max_new_tokens=16, do_sample=False, **kw)[0]
        cut = next((i + 1 for i, t in enumerate(ref) if t in stop), len(ref))
        assert generate_ids(ours, [p], max_new_tokens=16, **kw) == [ref[:cut]], kw


def test_beam_search_tokens_identical(pair):
    hf, ours, eos = pair
    checked = finished_early = 0
    for num_beams in (2, 3, 4, 5):
        for i, (ngram, length_penalty) in enumerate([(0, 1.0), (2, 1.0), (0, 2.0), (2, 0.5)]):
            p = PROMPTS[(num_beams + i) % 2]
            kw = dict(max_new_tokens=10, num_beams=num_beams, no_repeat_ngram_size=ngram,
                      length_penalty=length_penalty, num_return_sequences=num_beams)
            ref = _hf(hf, [p], do_sample=False, **kw)
            got = generate_ids(ours, [p], **kw)
            assert got == [_cut(r, eos) for r in ref], kw
            # HF pads shorter hypotheses; ours are exactly as long as generated.
            assert all(all(t == PAD for t in r[len(g):]) for g, r in zip(got, ref))
            checked += 1
            finished_early += any(len(g) < 10 for g in got)
    assert checked == 16 and finished_early > 0


@pytest.mark.parametrize("early_stopping", [True, "never"])
def test_beam_search_early_stopping_and_batches(pair, early_stopping):
    hf, ours, eos = pair
    kw = dict(max_new_tokens=12, num_beams=3, num_return_sequences=2, early_stopping=early_stopping)
    ref = _hf(hf, PROMPTS, do_sample=False, **kw)
    assert generate_ids(ours, PROMPTS, **kw) == [_cut(r, eos) for r in ref]


def test_cached_logits_equal_full_forward(pair):
    hf, ours, _ = pair
    cont = [4, 17, 2, 30, 11, 9]
    prompts = PROMPTS
    state = DecodeState(prompts=prompts, rows_per_prompt=1, num_return_sequences=1, max_new_tokens=len(cont),
                        eos_ids=[], pad_id=PAD, device="cpu", generator=None, processors=[])
    backend = ModelBackend(ours)
    with torch.inference_mode():
        steps = [backend.prefill(state, None)[0]]
        for i, tok in enumerate(cont[:-1]):
            steps.append(backend.step(torch.full((len(prompts),), tok), state.prompt_len + i, None)[0])
        backend.close()
        for b, p in enumerate(prompts):
            full = torch.tensor([p + cont])
            ref_ours = ours(full)[0]
            ref_hf = hf(full).logits[0]
            for i, logits in enumerate(steps):
                torch.testing.assert_close(logits[b], ref_ours[len(p) - 1 + i], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(logits[b], ref_hf[len(p) - 1 + i], rtol=1e-4, atol=1e-4)


def test_first_sampled_token_follows_filtered_softmax(pair):
    """Sampled frequencies of the first token match HF's logits filtered by top-k then top-p."""
    hf, ours, _ = pair
    p, n = PROMPTS[1], 6000
    with torch.no_grad():
        logits = hf(torch.tensor([p])).logits[0, -1].double() / 0.8
    k, top_p = 12, 0.7
    kth = torch.topk(logits, k).values[-1]
    logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    order = torch.argsort(probs, descending=True)
    before = torch.cumsum(probs[order], 0) - probs[order]
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[order[before < top_p]] = True
    expected = torch.where(keep, probs, torch.zeros_like(probs))
    expected /= expected.sum()
    got = generate_ids(ours, [p] * n, max_new_tokens=1, do_sample=True, top_k=k, top_p=top_p, temperature=0.8,
                       seed=0, eos_token_id=[])
    counts = torch.bincount(torch.tensor([g[0] for g in got]), minlength=len(probs)).double() / n
    assert torch.all(counts[~keep] == 0)
    sigma = torch.sqrt(expected * (1 - expected) / n)
    assert torch.all((counts - expected).abs() <= 5 * sigma + 1e-3)


@pytest.mark.slow
def test_gpt2_124m_shape_text_matches_hf(tmp_path, gpt2_tokenizer_dir):
    """GPT-2 124M shapes with the real GPT-2 tokenizer: text from LanguageModel.generate equals HF's
    decoded tokens, greedy and beam, single and batched."""
    from gptgen import LanguageModel, Tokenizer

    tok = Tokenizer.from_gpt2_files(gpt2_tokenizer_dir / "encoder.json", gpt2_tokenizer_dir / "vocab.bpe")
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(initializer_range=0.05)).eval()  # 124M shapes; wider init than 0.02
    hf.save_pretrained(tmp_path)
    lm = LanguageModel(load_model(tmp_path).eval(), tok)
    prompts = ["My trip to Yosemite was", "昨夜雨疏风骤", "Hello"]
    ids = [tok.encode(p) for p in prompts]
    ref = _hf(hf, ids, max_new_tokens=8, do_sample=False)
    assert lm.generate(prompts, max_new_tokens=8, include_prompt=False) == [
        tok.decode(_cut(r, 50256), skip_special_tokens=True).rstrip("\ufffd") for r in ref]
    beam = _hf(hf, [ids[0]], max_new_tokens=6, num_beams=4, num_return_sequences=2, do_sample=False)
    assert lm.generate(prompts[0], max_new_tokens=6, num_beams=4, num_return_sequences=2, include_prompt=False) == [
        tok.decode(_cut(r, 50256), skip_special_tokens=True).rstrip("\ufffd") for r in beam]


@pytest.mark.parametrize("option", [dict(min_p=0.2), dict(typical_p=0.7), dict(epsilon_cutoff=0.02),
                                    dict(eta_cutoff=0.02), dict(top_p=0.6, min_tokens_to_keep=5)])
def test_first_sampled_token_follows_transformers_warpers(pair, option):
    """The first sampled token's frequencies follow HF's logits after HF's own warper for the option."""
    from transformers.generation import logits_process as lp

    hf, ours, _ = pair
    p, n = PROMPTS[0], 3000
    keep = option.get("min_tokens_to_keep", 1)
    warper = {"min_p": lambda v: lp.MinPLogitsWarper(v, min_tokens_to_keep=keep),
              "typical_p": lambda v: lp.TypicalLogitsWarper(v, min_tokens_to_keep=keep),
              "epsilon_cutoff": lambda v: lp.EpsilonLogitsWarper(v, min_tokens_to_keep=keep),
              "eta_cutoff": lambda v: lp.EtaLogitsWarper(v, min_tokens_to_keep=keep),
              "top_p": lambda v: lp.TopPLogitsWarper(v, min_tokens_to_keep=keep)}
    name = next(k for k in option if k != "min_tokens_to_keep")
    with torch.no_grad():
        logits = hf(torch.tensor([p])).logits[0, -1:].float() / 0.9
    filtered = warper[name](option[name])(None, logits)[0]
    keep_mask = torch.isfinite(filtered)
    expected = torch.softmax(filtered.double(), -1)
    got = generate_ids(ours, [p] * n, max_new_tokens=1, do_sample=True, top_k=0, temperature=0.9, seed=1,
                       eos_token_id=[], **option)
    counts = torch.bincount(torch.tensor([g[0] for g in got]), minlength=len(expected)).double() / n
    assert torch.all(counts[~keep_mask] == 0)
    assert 1 < int(keep_mask.sum()) < len(expected), "the warper should remove some tokens and keep several"
    sigma = torch.sqrt(expected * (1 - expected) / n)
    assert torch.all((counts - expected).abs() <= 5 * sigma + 1e-3)
