"""Inputs that used to end in a raw exception give one sentence and exit 2."""

import errno
import io
import json
import sys

import pytest
import torch

import gptgen
from gptgen.cli import main
from gptgen.errors import ConfigError, DataError, GptgenError, TokenizerError, TrainingError

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "\n".join(f"line {i} of the little corpus, with words that repeat and repeat {i % 7}" for i in range(80))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    (root / "corpus.txt").write_text(TEXT, "utf-8")
    tok = gptgen.Tokenizer.train("bpe", [str(root / "corpus.txt")], 120)
    tok.save(root / "tok")
    lm = gptgen.LanguageModel.from_preset("gpt2", tok, n_layer=1, n_embd=16, n_head=2, n_positions=32)
    lm.save(root / "model")
    return root


def _one_sentence(capsys, argv, *words):
    code = main(argv)
    everything = capsys.readouterr().err.strip()
    assert code == 2, everything
    assert "Traceback" not in everything
    err = everything.splitlines()[-1]  # progress lines (the precision chosen) may come before
    assert err.startswith("gptgen: error: ") and everything.count("gptgen: error") == 1, everything
    for word in words:
        assert word in err, err
    return err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_it(files, capsys):
    lm = gptgen.load(files / "model")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        lm.to("cuda")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        gptgen.load(files / "model", device="cuda")
    _one_sentence(capsys, ["generate", "--model", str(files / "model"), "--device", "cuda", "line"], "CUDA")


def test_an_empty_data_list(files):
    from gptgen.data.corpus import read_corpus

    with pytest.raises(DataError, match="empty"):
        read_corpus([])
    with pytest.raises(DataError, match="empty"):
        gptgen.train(preset="gpt2", config={"n_layer": 1, "n_embd": 16, "n_head": 2}, tokenizer=str(files / "tok"),
                     data=[], max_steps=1, print_fn=None)


def test_text_that_is_not_unicode_is_refused_by_the_tokenizer(files):
    tok = gptgen.Tokenizer.from_pretrained(files / "tok")
    with pytest.raises(TokenizerError, match="lone surrogate U\\+DCFF"):
        tok.encode("line \udcff")


def test_invalid_utf8_on_chat_stdin(files, capsys, monkeypatch):
    for data in (b"line one\nline \xff\xfe two\n", b"\xc3\n"):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
        _one_sentence(capsys, ["chat", "--model", str(files / "model"), "--max-new-tokens", "2"], "not valid UTF-8")


def _train(files, out, *extra):
    return ["train", "--preset", "gpt2", "--config", "n_layer=1", "--config", "n_embd=16", "--config", "n_head=2",
            "--config", "n_positions=32", "--tokenizer", str(files / "tok"), "--data", str(files / "corpus.txt"),
            "--batch-size", "4", "--no-samples", "--no-progress", "--output", str(out), *extra]


def test_a_training_state_missing_keys(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train(files, out, "--max-steps", "2")) == 0
    path = out / "last" / "training_state.pt"
    whole = torch.load(path, weights_only=True)
    for drop in (("optimizer",), ("rng", "scheduler"), ("step",)):
        torch.save({k: v for k, v in whole.items() if k not in drop}, path)
        capsys.readouterr()
        _one_sentence(capsys, _train(files, out, "--max-steps", "4", "--resume"), "not a complete training state",
                      drop[0])
    torch.save({**whole, "optimizer": {"state": {}, "param_groups": "nonsense"}}, path)
    capsys.readouterr()
    _one_sentence(capsys, _train(files, out, "--max-steps", "4", "--resume"), "cannot use")


def test_a_full_disk_while_saving_keeps_the_earlier_checkpoint(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) >= 2:  # the first checkpoint is written; the second finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    err = _one_sentence(capsys, _train(files, out, "--max-steps", "4", "--save-every", "2"),
                        "disk is full", "step 4", "MB", "(step 2) is intact", "--resume")
    monkeypatch.setattr(torch, "save", real_save)
    assert json.loads((out / "last" / "training_state.json").read_text())["step"] == 2
    assert not [p for p in out.iterdir() if p.name.startswith(".last.")]  # the partial copy is gone
    capsys.readouterr()
    assert main(_train(files, out, "--max-steps", "4", "--save-every", "2", "--resume")) == 0
    assert json.loads((out / "last" / "training_state.json").read_text())["step"] == 4
    # the API raises the same sentence as a TrainingError
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    lm = gptgen.load(files / "model")
    with pytest.raises(TrainingError, match="disk is full"):
        lm.fit([TEXT[:100]] * 4, output_dir=tmp_path / "api", max_steps=1, batch_size=4)
    assert isinstance(TrainingError("x"), GptgenError)
