"""Sizes a user sets are refused before they are allocated; long lines are read in bounded memory."""

import io
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptgen import limits
from gptgen.cli import main
from gptgen.data import readers
from gptgen.data.packing import pack_texts
from gptgen.tokenizer import TRAINER_BYTES_PER_TOKEN, Tokenizer

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the of and a to in is was that for it with as his on be at by this had not are but from or have an they "
         "which one you were her all she there would their we him been has when who will more no if out so said "
         "what up its about into than them can only other new some could time these two may then do first any "
         "my now such like our over man me even most made after also did many before must through").split()


def _words(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from gptgen.lm import LanguageModel

    root = tmp_path_factory.mktemp("tiny")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(_words(30, seed) for seed in range(60)), "utf-8")
    tok = Tokenizer.train("wordpiece", [str(corpus)], 200)
    lm = LanguageModel.from_preset("gpt2", tok, n_layer=1, n_embd=16, n_head=2, n_positions=64)
    lm.save(root / "model")
    return root


def _refused(capsys, argv, *names):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith("gptgen: error: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in err, err
    return err


def _ten_times_memory(bytes_per_unit: int) -> int:
    return 10 * limits.available_memory() // bytes_per_unit + 1


def test_every_size_option_is_refused_at_ten_times_memory(tiny_model, capsys, tmp_path, monkeypatch):
    """Each size-like option of the CLI (tokenizer, training, evaluation, server) set to allocate 10x the
    machine's memory gets one sentence naming it and exit 2, before anything is allocated."""
    corpus = tiny_model / "corpus.txt"
    model = str(tiny_model / "model")
    vocab = _ten_times_memory(TRAINER_BYTES_PER_TOKEN)
    _refused(capsys, ["tokenizer", "train", str(corpus), "--kind", "bpe", "--vocab-size", str(vocab),
                      "-o", str(tmp_path / "tok")], "--vocab-size", "memory")
    assert not (tmp_path / "tok").exists()
    _refused(capsys, ["train", "--preset", "mini", "--train-tokenizer", "bpe", "--vocab-size", str(vocab),
                      "--data", str(corpus), "--max-steps", "1", "--no-samples"], "--vocab-size")
    # a model of 10x memory: 16 bytes a parameter for weights, gradients and Adam's moments
    width = int((10 * limits.available_memory() / 16 / 48) ** 0.5) + 1
    _refused(capsys, ["train", "--preset", "gpt2", "--config", f"n_embd={width}", "--config", "n_head=1",
                      "--config", "n_layer=4", "--tokenizer", model, "--data", str(corpus), "--max-steps", "1",
                      "--no-samples"], "--preset/--config", "parameters")
    # batches: the memory gptgen sees is capped so that the 60 texts' batch is 10x of it
    from gptgen.config import GPTConfig

    config = GPTConfig(vocab_size=200, n_positions=64, n_embd=16, n_layer=1, n_head=2)
    need = limits.activation_bytes(config, 60, 64)
    monkeypatch.setenv("GPTGEN_MEMORY_LIMIT", str(need * 2 // 10))
    _refused(capsys, ["finetune", "--model", model, "--data", str(corpus), "--batch-size", "60", "--seq-len", "64",
                      "--max-steps", "1", "--no-samples"], "--batch-size", "memory")
    _refused(capsys, ["eval", "--model", model, "--data", str(corpus), "--batch-size", "60", "--seq-len", "64"],
             "--batch-size")
    monkeypatch.delenv("GPTGEN_MEMORY_LIMIT")
    # the server: checked after the model loads and before the engine allocates its slots
    slot = limits.kv_cache_bytes(config, 1, 64, 4) + 8 * 4 * 200
    for option, unit in (("--max-batch", slot), ("--max-queue", 64 * 64 + (16 << 10)), ("--max-body-size", 4)):
        _refused(capsys, ["serve", "--model", model, option, str(_ten_times_memory(unit)), "--port",
                          str(_free_port()), "--log-level", "critical"], option)
    from gptgen.data.shards import WORKER_BYTES

    _refused(capsys, ["prepare", str(corpus), "--tokenizer", model, "-o", str(tmp_path / "shards"), "--workers",
                      str(_ten_times_memory(WORKER_BYTES))], "--workers")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_size_of_the_python_api_is_refused_at_ten_times_memory(tiny_model, tmp_path, monkeypatch):
    """The same sizes given to the Python API: Tokenizer.train, LanguageModel.from_preset, lm.fit, lm.evaluate,
    prepare_shards (one exception naming the option, nothing allocated)."""
    import gptgen
    from gptgen.data.shards import WORKER_BYTES, prepare_shards
    from gptgen.errors import ConfigError, DataError, TokenizerError

    corpus = str(tiny_model / "corpus.txt")
    with pytest.raises(TokenizerError, match="vocab_size"):
        Tokenizer.train("bpe", [corpus], _ten_times_memory(TRAINER_BYTES_PER_TOKEN))
    lm = gptgen.load(tiny_model / "model")
    width = int((10 * limits.available_memory() / 4 / 48) ** 0.5) + 1  # fp32 weights: 4 bytes a parameter
    with pytest.raises(ConfigError, match="parameters"):
        gptgen.LanguageModel.from_preset("gpt2", lm.tokenizer, n_embd=width, n_head=1, n_layer=4)
    texts = readers.read_lines(corpus)
    need = limits.activation_bytes(lm.config, len(texts), 64)
    monkeypatch.setenv("GPTGEN_MEMORY_LIMIT", str(need * 2 // 10))
    with pytest.raises(ConfigError, match="batch_size"):
        lm.fit(texts, batch_size=len(texts), seq_len=64, max_steps=1)
    with pytest.raises(ConfigError, match="batch_size"):
        lm.evaluate(texts, batch_size=len(texts), seq_len=64)
    lm.evaluate(texts[:2], batch_size=len(texts), seq_len=8)  # a batch holds at most the examples there are
    monkeypatch.delenv("GPTGEN_MEMORY_LIMIT")
    with pytest.raises(DataError, match="--workers"):
        prepare_shards(corpus, lm.tokenizer, tmp_path / "shards", num_workers=_ten_times_memory(WORKER_BYTES))
    assert not any(tmp_path.iterdir())


def test_negative_min_frequency_is_one_sentence(tiny_model, capsys, tmp_path):
    _refused(capsys, ["tokenizer", "train", str(tiny_model / "corpus.txt"), "--kind", "bpe", "--vocab-size", "100",
                      "--min-frequency", "-1", "-o", str(tmp_path / "tok")], "--min-frequency")


@pytest.mark.parametrize("limit", [8, 16, 64])
def test_long_lines_come_in_bounded_pieces_that_join_to_the_file(limit):
    lines = [_words(40, 1), "", "é漢字🙂" * 30, "x" * 100, _words(3, 2) + "\r", ""]
    raw = "\n".join(lines).encode("utf-8")
    pieces = list(readers._bounded_lines(io.BytesIO(raw), limit))
    assert b"".join(p for p, _ in pieces) == raw
    assert all(len(p) <= limit + max(limit // 4, 4) for p, _ in pieces)
    for piece, _ in pieces:
        piece.decode("utf-8")  # never cut inside a character
    assert sum(ends for _, ends in pieces) == raw.count(b"\n") + (not raw.endswith(b"\n"))


def test_a_file_with_no_line_end_becomes_documents_of_bounded_length(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_LINE_BYTES", 4096)
    monkeypatch.setattr(readers._bounded_lines, "__defaults__", (4096,))
    text = _words(20_000)
    (tmp_path / "one.txt").write_text(text, "utf-8")
    docs = readers.read_lines(tmp_path / "one.txt")
    assert len(docs) > 20 and max(map(len, docs)) <= 4096 + 1024
    assert " ".join(d.strip() for d in docs) == text  # cut at spaces: no word split, nothing lost


@pytest.mark.parametrize("kind", ["byte-bpe", "wordpiece", "unigram", "bpe"])
def test_pad_packing_of_long_texts_equals_encoding_them_whole(kind):
    texts = [_words(n, n) for n in (3, 50, 2000, 5000)] + ["短い" * 3000 + " " + _words(1000)]
    tok = Tokenizer.train(kind, texts, 300)
    for seq_len in (8, 100):
        packed = pack_texts(texts, tok, seq_len, "pad")
        for row, text in enumerate(texts):
            full = tok.encode(text)[: seq_len + 1]
            k = len(full) - 1
            assert packed.input_ids[row, :k].tolist() == full[:-1]
            assert packed.labels[row, :k].tolist() == full[1:]


@pytest.mark.slow
def test_a_50_mb_single_line_corpus_trains_and_scores_in_bounded_memory_and_time(tmp_path, gpt2_tokenizer_dir):
    corpus = tmp_path / "oneline.txt"
    rng = random.Random(0)
    with open(corpus, "w", encoding="utf-8") as f:
        written = 0
        while written < 50_000_000:
            chunk = " ".join(rng.choice(WORDS) for _ in range(10_000)) + " "
            f.write(chunk)
            written += len(chunk)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    run = tmp_path / "run"
    start = time.perf_counter()
    for argv in (["train", "--preset", "mini", "--config", "n_layer=1", "--config", "n_embd=32", "--config",
                  "n_head=2", "--tokenizer", str(gpt2_tokenizer_dir), "--data", str(corpus), "--seq-len", "32",
                  "--batch-size", "8", "--max-steps", "1", "--no-samples", "--no-progress", "--threads", "2",
                  "--output", str(run)],
                 ["eval", "--model", str(run / "last"), "--data", str(corpus), "--seq-len", "32"]):
        done = subprocess.run([sys.executable, "-m", "gptgen", *argv], env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    assert "tokens in" in done.stdout
    assert peak < 1 << 30, f"peak memory {peak / 1e6:.0f} MB"
    assert seconds < 60 * 2, f"{seconds:.0f} s for both commands"
