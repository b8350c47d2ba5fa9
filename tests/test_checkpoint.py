import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import gptgen
from gptgen import CheckpointError, LanguageModel, Tokenizer, TokenizerError
from gptgen.checkpoint import load_model

transformers = pytest.importorskip("transformers")

HF_CONFIGS = [
    dict(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4),
    dict(vocab_size=517, n_positions=48, n_embd=48, n_layer=3, n_head=6, n_inner=80, activation_function="gelu"),
    dict(vocab_size=256, n_positions=32, n_embd=64, n_layer=1, n_head=2, tie_word_embeddings=False,
         layer_norm_epsilon=1e-6),
]


def hf_model(seed=0, **cfg):
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(bos_token_id=0, eos_token_id=0, **cfg)).eval()
    with torch.no_grad():  # transformers zero-initialises biases; randomise them so the test sees them
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model


def save_hf(model, directory, safe=True):
    """save_pretrained; for safe=False, the pytorch_model.bin layout older transformers wrote."""
    model.save_pretrained(directory)
    if not safe:
        (directory / "model.safetensors").unlink()
        torch.save(model.state_dict(), directory / "pytorch_model.bin")


def random_ids(vocab, shape, seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cfg", HF_CONFIGS, ids=["small", "gelu-ninner", "untied"])
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_hf_gpt2_logits_match(tmp_path, cfg, safe):
    hf = hf_model(**cfg)
    save_hf(hf, tmp_path, safe)
    ours = load_model(tmp_path).eval()
    ids = random_ids(cfg["vocab_size"], (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_hf_gpt2_full_124m_shape(tmp_path):
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path).eval()
    assert ours.num_parameters() == 124_439_808
    ids = random_ids(50257, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


def small_tokenizer(vocab=300):
    return Tokenizer.train("byte-bpe", ["the quick brown fox jumps over the lazy dog"] * 50, vocab)


def test_export_loads_in_transformers_with_same_logits(tmp_path):
    tok = small_tokenizer()
    torch.manual_seed(0)
    lm = LanguageModel.from_preset("gpt2", tok, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    lm.save(tmp_path / "hf", format="hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = random_ids(lm.config.vocab_size, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, lm.model.eval()(ids), atol=1e-5, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.encode("the lazy fox") == tok.encode("the lazy fox")
    # And back: the exported directory imports as a gptgen model with the same weights.
    back = gptgen.load(tmp_path / "hf")
    for (name, a), (_, b) in zip(lm.model.state_dict().items(), back.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_mini_round_trip_is_bit_exact(tmp_path):
    tok = Tokenizer.train("wordpiece", ["a tiny corpus for a tiny model"] * 20, 60,
                          reserved_tokens=["[PAD]", "[UNK]", "[BOS]"], lowercase=True)
    torch.manual_seed(0)
    lm = LanguageModel.from_preset("mini", tok, vocab_size=100, n_positions=32)
    path = lm.save(tmp_path / "mini")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors",
                                                      "tokenizer.json", "tokenizer_config.json"]
    back = gptgen.load(path)
    assert back.config == lm.config
    original = lm.model.state_dict()
    for name, tensor in back.model.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    ids = random_ids(100, (2, 16))
    assert torch.equal(back.model(ids), lm.model.eval()(ids))
    assert back.tokenizer.encode("a tiny model") == tok.encode("a tiny model")


def test_tied_head_stored_once(tmp_path):
    lm = LanguageModel.from_preset("gpt2", small_tokenizer(), n_positions=16, n_embd=16, n_layer=1, n_head=2)
    lm.save(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    back = gptgen.load(tmp_path)
    assert back.model.lm_head.weight.data_ptr() == back.model.embed.wte.weight.data_ptr()


def test_save_is_atomic_and_replaces(tmp_path, monkeypatch):
    lm = LanguageModel.from_preset("mini", small_tokenizer(), vocab_size=300, n_positions=16)
    target = lm.save(tmp_path / "m")
    before = (target / "model.safetensors").read_bytes()

    def boom(directory):
        raise RuntimeError("disk full")

    monkeypatch.setattr(lm.tokenizer, "save", boom)
    torch.nn.init.zeros_(lm.model.lm_head.bias.data)
    with pytest.raises(RuntimeError):
        lm.save(target, overwrite=True)
    assert (target / "model.safetensors").read_bytes() == before  # the old model is intact
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary left behind


def test_checkpoint_errors(tmp_path, gpt2_tokenizer_dir):
    lm = LanguageModel.from_preset("mini", small_tokenizer(), vocab_size=300, n_positions=16)
    good = lm.save(tmp_path / "good")
    with pytest.raises(CheckpointError, match="does not exist"):
        gptgen.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        gptgen.load(tmp_path / "empty")

    truncated = lm.save(tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        gptgen.load(truncated)

    noweights = lm.save(tmp_path / "noweights")
    (noweights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights file"):
        gptgen.load(noweights)

    mismatch = lm.save(tmp_path / "mismatch")
    cfg = json.loads((mismatch / "config.json").read_text())
    cfg["n_embd"] = 128
    (mismatch / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="has shape"):
        gptgen.load(mismatch)

    badjson = lm.save(tmp_path / "badjson")
    (badjson / "config.json").write_text('{"format": "gptgen", "n_em')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        gptgen.load(badjson)

    big = Tokenizer.from_pretrained(gpt2_tokenizer_dir)
    with pytest.raises(TokenizerError, match="50,257 tokens but the model's embedding holds only 300"):
        gptgen.load(good, tokenizer=big)

    with pytest.raises(CheckpointError, match="Only GPT-2-shaped"):
        lm.save(tmp_path / "as-hf", format="hf")
    assert not (tmp_path / "as-hf").exists()


def test_truncated_bin_fails_cleanly(tmp_path):
    hf = hf_model(**HF_CONFIGS[0])
    save_hf(hf, tmp_path, safe=False)
    data = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[:1000])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_model(tmp_path)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "gptgen", *args], capture_output=True, text=True)


def test_cli_errors_are_one_line_exit_2(tmp_path):
    for args, needle in [(["summary", "--preset", "gpt5"], "Unknown preset 'gpt5'"),
                         (["summary", "--model", str(tmp_path / "none")], "does not exist"),
                         (["convert", str(tmp_path), str(tmp_path / "out")], "no config.json"),
                         (["tokenizer", "train", "nofile.txt", "--kind", "wordpiece", "--vocab-size", "100",
                           "-o", str(tmp_path / "t")], "No file matches"),
                         (["tokenizer", "train", __file__, "--kind", "sentencepiece", "--vocab-size", "100",
                           "-o", str(tmp_path / "t")], "Unknown tokenizer kind")]:
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_summary_and_convert(tmp_path):
    out = run_cli("summary", "--preset", "mini")
    assert out.returncode == 0
    assert "Total params: 3,255,938" in out.stdout and "329,085" in out.stdout and "(None, 128, 5000)" in out.stdout
    hf = hf_model(**HF_CONFIGS[0])
    hf.save_pretrained(tmp_path / "hf")
    small_tokenizer(300).save(tmp_path / "hf")
    res = run_cli("convert", str(tmp_path / "hf"), str(tmp_path / "native"))
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "native" / "config.json").read_text())["format"] == "gptgen"
    res = run_cli("summary", "--model", str(tmp_path / "native"))
    assert f"Total params: {sum(p.numel() for p in hf.parameters()):,}" in res.stdout
    res = run_cli("convert", str(tmp_path / "native"), str(tmp_path / "hf2"), "--to", "hf")
    assert res.returncode == 0, res.stderr
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf2").eval()
    ids = random_ids(300, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)


def test_cli_tokenizer_train(tmp_path, data_dir):
    res = run_cli("tokenizer", "train", str(data_dir / "books" / "blake-poems.txt"), "--kind", "wordpiece",
                  "--vocab-size", "500", "--lowercase", "--reserved", "[PAD]", "[UNK]", "[BOS]", "-o", str(tmp_path))
    assert res.returncode == 0, res.stderr
    tok = Tokenizer.from_pretrained(tmp_path)
    assert [tok.id_to_token(i) for i in range(3)] == ["[PAD]", "[UNK]", "[BOS]"]
    assert tok.special_tokens == {"pad": "[PAD]", "unk": "[UNK]", "bos": "[BOS]"}


class _Payload:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_bin_with_code_is_refused(tmp_path, capsys):
    hf = hf_model(**HF_CONFIGS[0])
    save_hf(hf, tmp_path, safe=False)
    torch.save({"transformer.wte.weight": _Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a plain weights file"):
        load_model(tmp_path)
    assert "pickle code ran" not in capsys.readouterr().out


def test_crash_between_the_two_renames_is_recovered(tmp_path):
    from gptgen.checkpoint import recover_dir

    lm = LanguageModel.from_preset("mini", small_tokenizer(), vocab_size=300, n_positions=16)
    target = lm.save(tmp_path / "m")
    before = (target / "model.safetensors").read_bytes()
    # What a kill between "old aside" and "new in" leaves behind:
    aside = tmp_path / ".m.old-abc"
    aside.mkdir()
    os.replace(target, aside / "x")
    (tmp_path / ".m.tmp-def").mkdir()
    recover_dir(target)
    assert (target / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert gptgen.load(target).config == lm.config
