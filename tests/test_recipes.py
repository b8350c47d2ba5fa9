"""Every recipe of recipes/ at toy scale on CPU (tiny models, a few hundred examples, a few steps),
asserting the facts each workflow is about."""

from __future__ import annotations

import importlib
import json
import random
import sys
from pathlib import Path

import pytest
import torch

from gptgen import Tokenizer, load

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = ["--config", "n_layer=1", "--config", "n_embd=64", "--config", "n_head=2", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")


def recipe(name):
    if str(RECIPES) not in sys.path:
        sys.path.insert(0, str(RECIPES))
    return importlib.import_module(name)


def run(name, data_dir, out, *argv):
    results = recipe(name).main(["--data-dir", str(data_dir), "--output", str(out), "--threads", "1", *argv])
    assert json.loads((Path(out) / "results.json").read_text("utf-8"))["recipe"] == name
    return results


def test_mini_gpt_perplexity_falls_and_samplers_side_by_side(data_dir, tmp_path):
    r = run("mini_gpt", data_dir, tmp_path, "--limit", "160", "--epochs", "2", "--batch-size", "16",
            "--vocab-size", "800", "--max-new-tokens", "12", "--no-epoch-samples", "--config", "n_embd=64",
            "--config", "head_dim=32", "--config", "n_head=2", "--config", "n_inner=64", "--quiet")
    curve = r["val_perplexity_by_epoch"]
    assert len(curve) == 3 and curve[0] > curve[1] > curve[2]  # untrained, epoch 1, epoch 2
    assert set(r["samples"]) == {"greedy", "beam (10)", "random", "top-k (10)", "top-p (0.5)"}
    assert all(isinstance(t, str) and "\ufffd" not in t for t in r["samples"].values())
    assert r["reload_greedy_identical"] is True
    lm = load(r["model_dir"])
    assert lm.config.extra["add_bos"] is True and lm.config.n_layer == 2  # the mini preset's two blocks
    assert lm.tokenizer.special_tokens == {"pad": "[PAD]", "unk": "[UNK]", "bos": "[BOS]"}
    assert [lm.tokenizer.token_to_id(t) for t in ("[PAD]", "[UNK]", "[BOS]")] == [0, 1, 2]
    # Greedy text is what the reloaded model produces from [BOS].
    assert lm.generate("", sampler="greedy", max_new_tokens=12, include_prompt=False) == r["samples"]["greedy"]


def test_finetune_style_from_a_hf_gpt2_directory(data_dir, tmp_path):
    r = run("finetune_style", data_dir, tmp_path, "--limit", "120", "--pretrain-steps", "12", "--max-steps", "10",
            "--batch-size", "8", "--seq-len", "32", "--train-tokenizer", "600", "--max-new-tokens", "8", *TINY)
    base = Path(r["base"])
    assert json.loads((base / "config.json").read_text())["model_type"] == "gpt2"  # a Hugging Face GPT-2 dir
    assert r["after"]["shakespeare_val_perplexity"] < r["before"]["shakespeare_val_perplexity"]
    assert r["steps"] == 10
    for stage in ("before", "after"):
        for table in r[stage]["generations"].values():
            assert set(table) == {"greedy", "top-k (10)"} and all(isinstance(t, str) for t in table.values())
    tuned = load(r["model_dir"])
    gen = r["after"]["generations"]["My lord,"]["greedy"]
    assert tuned.generate("My lord,", sampler="greedy", max_new_tokens=8, include_prompt=False) == gen


def test_utf8_constraint_matches_python_decoder(gpt2_tokenizer_dir):
    """The byte-level validity table against Python's UTF-8 decoder on random token sequences."""
    cp = recipe("chinese_poems")
    tok = Tokenizer.from_gpt2_files(gpt2_tokenizer_dir / "encoder.json", gpt2_tokenizer_dir / "vocab.bpe")
    table = cp.utf8_transitions(tok)
    decoder = cp._byte_decoder()
    vocab = tok.get_vocab()
    # Tokens that are pieces of multi-byte characters, so that random sequences are often invalid.
    pieces = [i for t, i in vocab.items() if t != "<|endoftext|>" and any(decoder[c] >= 0x80 for c in t)]
    rng = random.Random(0)
    seen = {True: 0, False: 0}
    for _ in range(3000):
        ids = [rng.choice(pieces) for _ in range(rng.randint(1, 4))]
        data = b"".join(bytes(decoder[c] for c in tok.id_to_token(i)) for i in ids)
        s = 0
        for i in ids:
            s = int(table[i, s]) if s >= 0 else -1
        try:
            data.decode("utf-8")
            valid_complete = True
        except UnicodeDecodeError:
            valid_complete = False
        assert (s == 0) == valid_complete, (ids, data)
        seen[valid_complete] += 1
    assert seen[True] > 50 and seen[False] > 50


@pytest.fixture(scope="module")
def poems(data_dir, tmp_path_factory):
    return run("chinese_poems", data_dir, tmp_path_factory.mktemp("chinese_poems"), "--limit", "64",
               "--max-steps", "6", "--batch-size", "8", "--seq-len", "32", "--max-length", "24", *TINY)


def test_chinese_poems_gpt2_bpe_valid_utf8(poems):
    r = poems
    assert r["val_perplexity_after"] < r["val_perplexity_before"]
    assert r["replacement_chars"] == 0
    for text in list(r["samples_before"].values()) + list(r["samples_after"].values()):
        assert "\ufffd" not in text
        assert text.encode("utf-8").decode("utf-8") == text
    assert load(r["model_dir"]).tokenizer.vocab_size == 50257


class _State:
    """The two things a plain sampler's select() reads from the decode state."""

    generator = None

    def __init__(self, generated):
        self.generated = generated

    def row_generated(self):
        return self.generated

    def process(self, scores):
        return scores


def test_utf8_constrained_sampler_masks_broken_characters(gpt2_tokenizer_dir):
    cp = recipe("chinese_poems")
    from gptgen.generation import GreedySampler

    tok = Tokenizer.from_gpt2_files(gpt2_tokenizer_dir / "encoder.json", gpt2_tokenizer_dir / "vocab.bpe")
    ids = tok.encode("雨")  # one character, three bytes, split over byte-level tokens
    assert len(ids) >= 2 and tok.decode(ids[:1]).endswith("\ufffd")
    cont = ids[-1]  # a token that continues a character: invalid at the start of one
    sampler = cp.Utf8Constrained(GreedySampler(), tok)
    logits = torch.zeros(2, tok.vocab_size)
    logits[:, cont] = 10.0
    logits[:, tok.encode("a")[0]] = 5.0
    chosen, _ = sampler.select(logits, None, _State([[], ids[:-1]]))
    # Row 0 (between characters) may not start with a continuation; row 1 (inside 雨) finishes it.
    assert chosen.tolist() == [tok.encode("a")[0], cont]
    assert GreedySampler().select(logits, None, _State([[], []]))[0].tolist() == [cont, cont]


@pytest.fixture(scope="module")
def chatbot(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("korean_chatbot")
    return run("korean_chatbot", data_dir, out, "--limit", "400", "--epochs", "3", "--max-len", "32",
               "--vocab-size", "800", "--batch-size", "16", "--max-new-tokens", "16", "--candidates", "5",
               "--questions", "배고프다", "헤어졌어", *TINY)


def test_korean_chatbot_answers_end_at_marker_without_unk(chatbot):
    r = chatbot
    assert r["val_perplexity_after"] < r["val_perplexity_before"]
    assert r["unk_in_answers"] == 0
    assert len(r["answers"]) == 2 and all(len(a["answers"]) == 5 for a in r["answers"])
    for a in r["answers"]:
        for text in a["answers"]:
            assert not any(t in text for t in ("<s>", "</s>", "<pad>", "<unk>"))
    assert r["finished_fraction"] > 0
    lm = load(r["model_dir"])
    assert lm.tokenizer.special_tokens == {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}
    assert lm.config.n_positions == 32


def test_few_shot_prompts_use_special_tokens_and_stop_at_marker(chatbot, data_dir, tmp_path):
    r = run("few_shot", data_dir, tmp_path, "--model", r_model(chatbot), "--queries", "6",
            "--max-new-tokens", "6", "--quiet")
    assert r["end_marker"] == "</s>"
    assert r["tasks"]["qa 0-shot"]["prompt"] == "<s>영국의 수도는?</s><s>"
    assert r["tasks"]["translation 1-shot"]["prompt"] == "<s>사과</s><s>apple</s><s>강아지</s><s>"
    for task in r["tasks"].values():
        assert "</s>" not in task["answer"] and "<s>" not in task["answer"]
    assert set(r["sentiment_accuracy"]) == {"0-shot", "1-shot", "3-shot"}
    assert all(0 <= v <= 1 for v in r["sentiment_accuracy"].values())
    # The toy tokenizer knows only Korean: the plain "Q: ...\n" template cannot be written with it.
    assert r["plain_template"] is None


def r_model(results) -> str:
    return results["model_dir"]


def test_korean_sentences_reload_generates_identically(data_dir, tmp_path):
    r = run("korean_sentences", data_dir, tmp_path, "--limit", "300", "--epochs", "2", "--batch-size", "16",
            "--max-len", "16", "--vocab-size", "800", "--max-new-tokens", "10", *TINY)
    assert r["reload_identical"] is True
    assert r["reloaded_val_loss"] == pytest.approx(r["val_loss"], abs=1e-6)
    assert r["val_loss_by_epoch"][-1] < r["val_loss_before"]
    assert len(r["epochs"]) == 2 and 0 <= r["val_accuracy"] <= 1
    lm = load(r["model_dir"])
    assert lm.config.extra["add_bos"] is True
    # Rows are <s> + tokens + </s>, padded to MAX_LEN: the greedy text of the reloaded model is the one saved.
    for prompt, table in r["after"].items():
        assert lm.generate(prompt, sampler="greedy", max_new_tokens=10, include_prompt=False) == table["greedy"]
