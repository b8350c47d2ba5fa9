"""Bad options of the training commands: one sentence, exit 2, no traceback, and before any work (a corpus
path that does not exist would be the error if the option were checked after reading it)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gptgen.cli import main

REPO = Path(__file__).resolve().parents[1]
MISSING = "/nonexistent/corpus.txt"
TRAIN = ["train", "--preset", "mini", "--train-tokenizer", "wordpiece", "--data", MISSING, "--no-progress"]

pytestmark = pytest.mark.usefixtures("one_thread")


def cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_sentence(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("gptgen: error: "), err
    assert MISSING not in err, f"the option was checked after reading the corpus: {err}"
    for word in words:
        assert word in err, err


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("mine\n")
    return path


@pytest.mark.parametrize("flags, words", [
    (["--seed", str(2**64)], ["seed", "18446744073709551616"]),
    (["--seed", "-1"], ["seed"]),
    (["--threads", "-2"], ["threads", "-2"]),
    (["--threads", "0"], ["threads"]),
    (["--threads", str(2**63)], ["threads"]),
    (["--grad-accum", str(2**63)], ["grad_accum"]),
    (["--device", "tpu"], ["'tpu'"]),
    (["--seq-len", "0"], ["seq_len (--seq-len)"]),
    (["--minutes", "0"], ["--minutes", "0"]),
    (["--minutes", "-1"], ["--minutes"]),
    (["--minutes", "nan"], ["--minutes"]),
    (["--batch-size", "0"], ["batch_size"]),
    (["--sampler", "nope"], ["'nope'"]),
    (["--sample-tokens", "-1"], ["sample_tokens"]),
    (["--top-k", "-3"], ["top_k"]),
    (["--vocab-size", "0"], ["vocab_size"]),
    (["--min-length", "-1"], ["min_length"]),
])
def test_train_option_refused_before_reading_the_corpus(capsys, tmp_path, flags, words):
    out = tmp_path / "run"
    code, _, err = cli(capsys, *TRAIN, "--output", out, *flags)
    assert_one_sentence(code, err, *words)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("command", [TRAIN, ["eval", "--model", "/nonexistent/model", "--data", MISSING]])
def test_cuda_device_without_a_gpu(capsys, command):
    code, _, err = cli(capsys, *command, "--device", "cuda")
    assert_one_sentence(code, err, "CUDA GPU")


def test_output_that_is_a_file_or_under_one(capsys, a_file):
    for target in (a_file, a_file / "run"):
        for command in (TRAIN + ["--output", target],
                        ["finetune", "--model", "/nonexistent/model", "--data", MISSING, "--output", target],
                        ["quickstart", "--output", target],
                        ["prepare", MISSING, "--tokenizer", "/nonexistent/tok", "-o", target],
                        ["tokenizer", "train", MISSING, "--kind", "bpe", "--vocab-size", "100", "-o", target]):
            code, _, err = cli(capsys, *command)
            assert_one_sentence(code, err, str(a_file), "is a file")
    assert a_file.read_text() == "mine\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_output_under_an_unwritable_directory(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = cli(capsys, *TRAIN, "--output", locked / "run")
    assert_one_sentence(code, err, "not writable")


def test_eval_options_and_missing_data(capsys):
    model = "/nonexistent/model"  # the options are refused before the model is loaded
    code, _, err = cli(capsys, "eval", "--model", model, "--data", MISSING, "--batch-size", "0")
    assert_one_sentence(code, err, "batch_size")
    code, _, err = cli(capsys, "eval", "--model", model, "--data", MISSING, "--threads", "-2")
    assert_one_sentence(code, err, "threads")
    code, _, err = cli(capsys, "eval", "--model", model)
    assert_one_sentence(code, err, "evaluate on")
    assert "train on" not in err


def test_quickstart_options(capsys, tmp_path):
    for flags, word in ((["--seed", str(2**70)], "seed"), (["--minutes", "0"], "--minutes"),
                        (["--threads", "-2"], "threads")):
        code, _, err = cli(capsys, "quickstart", "--output", tmp_path / "qs", *flags)
        assert_one_sentence(code, err, word)
    assert not (tmp_path / "qs").exists()


def test_overwrite_flags_reach_the_api(capsys, monkeypatch, tmp_path):
    import gptgen.pipeline

    seen = []

    def fake_train(recipe=None, **settings):
        seen.append((recipe, settings.get("overwrite"), settings.get("resume")))
        raise gptgen.pipeline.ConfigError("stop here.")

    monkeypatch.setattr(gptgen.pipeline, "train", fake_train)
    out = str(tmp_path / "run")
    cli(capsys, *TRAIN, "--output", out, "--overwrite")
    cli(capsys, *TRAIN, "--output", out)
    cli(capsys, "finetune", "--model", "m", "--data", MISSING, "--output", out, "--overwrite", "--resume")
    cli(capsys, "quickstart", "--output", out, "--overwrite")
    cli(capsys, "quickstart", "--output", out)
    assert seen == [(None, True, None), (None, None, None), (None, True, True), ("quickstart", True, None),
                    ("quickstart", None, None)]


def test_process_level_one_line_no_traceback(tmp_path, a_file):
    """The same refusals as real processes see them (exit status 2, one line on stderr)."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    for argv, word in (([*TRAIN, "--seed", str(2**64)], "seed"),
                       (["eval", "--model", "/nonexistent/model", "--data", MISSING, "--batch-size", "0"], "batch_size")):
        proc = subprocess.run([sys.executable, "-m", "gptgen", *map(str, argv)], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=120)
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and word in proc.stderr


# Property: any number in any numeric option gives exit 0 or 2 and one sentence, never a traceback ------------
INT_FLAGS = ["--epochs", "--max-steps", "--batch-size", "--grad-accum", "--warmup-steps", "--seed", "--threads",
             "--seq-len", "--eval-every", "--eval-batch-size", "--save-every", "--early-stopping", "--sample-tokens",
             "--top-k", "--min-length"]
FLOAT_FLAGS = ["--minutes", "--lr", "--min-lr-ratio", "--weight-decay", "--adam-eps", "--beta1", "--beta2",
               "--grad-clip"]
BAD_INTS = st.sampled_from([0, -1, -2, 2**31, 2**63, 2**64, 2**70, -2**70]) | st.integers(-10**30, 10**30)
BAD_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -1.0, 1.5, 1e308, -1e308, 5e-324]) | st.floats()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A corpus and tokenizer small enough that an accepted option trains two steps in well under a second."""
    from gptgen import Tokenizer

    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    lines = [f"line {i} of a small corpus with some words in it" for i in range(40)]
    path.write_text("\n".join(lines) + "\n")
    tok = tmp_path_factory.mktemp("tok")
    Tokenizer.train("bpe", lines, 120, reserved_tokens=["<pad>", "<s>"], special_tokens={"pad": "<pad>", "bos": "<s>"}
                    ).save(tok)
    return ["train", "--preset", "mini", "--tokenizer", tok, "--data", path, "--split", "every_nth:5",
            "--config", "n_layer=1", "--config", "n_embd=16", "--config", "n_head=2", "--config", "n_inner=32",
            "--config", "n_positions=16", "--max-steps", "2", "--batch-size", "8", "--sample-tokens", "4",
            "--threads", "1", "--no-progress"]


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(choice=st.one_of(st.tuples(st.sampled_from(INT_FLAGS), BAD_INTS),
                        st.tuples(st.sampled_from(FLOAT_FLAGS), BAD_FLOATS)))
def test_numeric_options_exit_0_or_2_never_a_traceback(capsys, small_run, choice):
    flag, value = choice
    assume(not (flag == "--max-steps" and value > 2))  # a valid step count that large would just train on
    code, _, err = cli(capsys, *small_run, flag, repr(value))
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2 and err.startswith("gptgen: error: "):
        assert err.count("\n") == 1, err
