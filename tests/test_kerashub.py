"""KerasHub GPT-2 preset directories in and out.

The oracle tests (marked kerashub) need keras-hub itself: pip install 'gptgen[kerashub-test]' (it pulls
TensorFlow), KERAS_BACKEND=torch. Without it they skip; the round-trip tests below still run.
"""

import json
import os

import numpy as np
import pytest
import torch

import gptgen
from gptgen import Tokenizer
from gptgen.errors import CheckpointError

pytest.importorskip("h5py")
pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = ["the quick brown fox jumps over the lazy dog.", "hello keras, hello torch!",
        "presets in, presets out; the same logits both ways."] * 30
SHAPES = [dict(n_layer=2, n_embd=32, n_head=4, n_positions=64),
          dict(n_layer=3, n_embd=48, n_head=6, n_inner=80, n_positions=40)]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train("byte-bpe", TEXT, vocab_size=320)


def random_lm(tokenizer, seed, **shape):
    config = gptgen.preset("gpt2", vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, **shape)
    torch.manual_seed(seed)
    lm = gptgen.LanguageModel(gptgen.GPT(config), tokenizer)
    with torch.no_grad():  # every tensor random, biases and LayerNorms included
        for p in lm.model.parameters():
            p.normal_(0, 0.3)
    lm.model.eval()
    return lm


def ids_for(vocab, seed=3):
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", SHAPES, ids=["2x32", "3x48-ffn80"])
def test_round_trip_is_exact_and_layout_is_keras(tmp_path, tokenizer, shape):
    lm = random_lm(tokenizer, 0, **shape)
    lm.save(tmp_path / "preset", format="kerashub")
    files = sorted(str(p.relative_to(tmp_path / "preset")) for p in (tmp_path / "preset").rglob("*") if p.is_file())
    assert files == ["assets/tokenizer/merges.txt", "assets/tokenizer/vocabulary.json", "config.json",
                     "metadata.json", "model.weights.h5", "preprocessor.json", "task.json", "tokenizer.json"]
    config = json.loads((tmp_path / "preset" / "config.json").read_text())
    assert config["registered_name"] == "keras_hub>GPT2Backbone"
    assert config["config"]["num_layers"] == shape["n_layer"] and config["config"]["hidden_dim"] == shape["n_embd"]
    import h5py

    with h5py.File(tmp_path / "preset" / "model.weights.h5") as f:
        q = f[f"layers/transformer_decoder_{shape['n_layer'] - 1}/_self_attention_layer/query_dense/vars/0"]
        assert q.shape == (shape["n_embd"], shape["n_head"], shape["n_embd"] // shape["n_head"])

    back = gptgen.load(tmp_path / "preset")
    ids = ids_for(tokenizer.vocab_size)
    with torch.no_grad():
        assert torch.equal(back.model(ids), lm.model(ids))
    assert back.tokenizer.encode(TEXT[1]) == tokenizer.encode(TEXT[1])
    assert back.tokenizer.eos_token == "<|endoftext|>"

    from gptgen.cli import main

    main(["convert", str(tmp_path / "preset"), str(tmp_path / "native")])  # default: to gptgen
    again = gptgen.load(tmp_path / "native")
    with torch.no_grad():
        assert torch.equal(again.model(ids), lm.model(ids))


def test_refusals(tmp_path, tokenizer):
    mini = gptgen.LanguageModel.from_preset("mini", tokenizer, n_positions=32)
    with pytest.raises(CheckpointError, match="Only GPT-2-shaped models"):
        mini.save(tmp_path / "x", format="kerashub")
    wordpiece = Tokenizer.train("wordpiece", TEXT, vocab_size=200)
    lm = gptgen.LanguageModel(gptgen.GPT(gptgen.preset("gpt2", vocab_size=200, n_layer=1, n_embd=16, n_head=2,
                                                       n_positions=16)), wordpiece)
    with pytest.raises(CheckpointError, match="byte-level BPE"):
        lm.save(tmp_path / "y", format="kerashub")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    lm = random_lm(tokenizer, 0, **SHAPES[0])
    lm.save(tmp_path / "p", format="kerashub")
    (tmp_path / "p" / "model.weights.h5").write_bytes(b"not hdf5")
    with pytest.raises(CheckpointError, match="not an HDF5 file"):
        gptgen.load(tmp_path / "p")


# keras-hub itself as the oracle -----------------------------------------------------------------
def keras_hub_or_skip():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    return pytest.importorskip("keras_hub")


def keras_logits(task, ids):
    out = task({"token_ids": ids.numpy().astype("int32"), "padding_mask": np.ones(tuple(ids.shape), "int32")})
    out = out.detach().cpu() if hasattr(out, "detach") else out
    return torch.as_tensor(np.asarray(out), dtype=torch.float32)


@pytest.mark.kerashub
@pytest.mark.parametrize("shape", SHAPES, ids=["2x32", "3x48-ffn80"])
def test_gptgen_preset_loads_in_keras_hub(tmp_path, tokenizer, shape):
    keras_hub = keras_hub_or_skip()
    lm = random_lm(tokenizer, 1, **shape)
    lm.save(tmp_path / "preset", format="kerashub")
    task = keras_hub.models.GPT2CausalLM.from_preset(str(tmp_path / "preset"))
    ids = ids_for(tokenizer.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(keras_logits(task, ids), lm.model(ids), atol=1e-4, rtol=0)
    for text in TEXT[:3] + ["unseen words: zebra 123 ÿ<|endoftext|>"]:
        assert [int(i) for i in np.asarray(task.preprocessor.tokenizer(text))] == tokenizer.encode(text), text


@pytest.mark.kerashub
@pytest.mark.parametrize("shape", SHAPES, ids=["2x32", "3x48-ffn80"])
def test_keras_hub_preset_loads_in_gptgen(tmp_path, tokenizer, shape):
    keras_hub = keras_hub_or_skip()
    vocab = tokenizer.get_vocab()
    merges = [" ".join(m) if not isinstance(m, str) else m
              for m in json.loads(tokenizer.backend.to_str())["model"]["merges"]]
    keras_tok = keras_hub.models.GPT2Tokenizer(vocabulary=vocab, merges=merges)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=len(vocab), num_layers=shape["n_layer"], num_heads=shape["n_head"],
        hidden_dim=shape["n_embd"], intermediate_dim=shape.get("n_inner") or 4 * shape["n_embd"],
        max_sequence_length=shape["n_positions"])
    rng = np.random.default_rng(7)
    for weight in backbone.weights:  # Keras zero-initialises biases; randomise everything
        weight.assign(rng.normal(0, 0.3, tuple(weight.shape)).astype("float32"))
    task = keras_hub.models.GPT2CausalLM(
        backbone=backbone, preprocessor=keras_hub.models.GPT2CausalLMPreprocessor(tokenizer=keras_tok,
                                                                                  sequence_length=16))
    task.save_to_preset(str(tmp_path / "keras"))
    lm = gptgen.load(tmp_path / "keras")
    ids = ids_for(len(vocab))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids), keras_logits(task, ids), atol=1e-4, rtol=0)
    for text in TEXT[:3]:
        assert lm.tokenizer.encode(text) == [int(i) for i in np.asarray(keras_tok(text))]
