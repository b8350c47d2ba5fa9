"""`gptgen train / finetune / eval / quickstart` as users run them: real processes, kill -9, torchrun."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", "n_layer=1", "--config", "n_embd=32", "--config", "n_head=2", "--config", "n_inner=64",
        "--config", "n_positions=32"]


def _env(threads=1):
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def gptgen(*args, threads=1, check=True, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "gptgen", *map(str, args)], capture_output=True, text=True,
                          env=_env(threads), timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"gptgen {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def tok_dir(data_dir, tmp_path_factory):
    """One trained tokenizer for the runs that are compared (HF WordPiece training is not deterministic)."""
    from gptgen import Tokenizer
    from gptgen.data import read_paragraphs, split_every_nth

    train, _ = split_every_nth(read_paragraphs([data_dir / "tinyshakespeare" / "input.txt"]), 10)
    path = tmp_path_factory.mktemp("tok")
    Tokenizer.train("wordpiece", train, 300, lowercase=True, reserved_tokens=["[PAD]", "[UNK]", "[BOS]"]).save(path)
    return path


def train_args(data_dir, out, *extra, tokenizer=None):
    tok = ["--tokenizer", tokenizer] if tokenizer else ["--train-tokenizer", "wordpiece", "--vocab-size", "300",
                                                        "--lowercase"]
    return ["train", "--preset", "mini", *TINY, *tok, "--data", data_dir / "tinyshakespeare" / "input.txt", "--reader", "paragraphs",
            "--split", "every_nth:10", "--seq-len", "32", "--lr", "3e-3", "--seed", "3", "--threads", "1",
            "--no-progress", "--no-samples", "--output", out, *extra]


def records(out, event="step"):
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if json.loads(line)["event"] == event]


def strip(rs):
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed")} for r in rs]


def test_kill_9_then_resume_gives_the_same_per_step_losses(data_dir, tmp_path, tok_dir):
    # Long enough (120 steps) that a fast machine cannot finish before the kill lands.
    common = ["--batch-size", "16", "--max-steps", "120", "--save-every", "10", "--eval-every", "50",
              "--config", "n_embd=64", "--config", "n_inner=256"]
    full = tmp_path / "full"
    gptgen(*train_args(data_dir, full, *common, tokenizer=tok_dir))
    want = records(full)
    assert len(want) == 120

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "gptgen", *map(str, train_args(data_dir, run, *common, tokenizer=tok_dir))],
                            env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:  # the checkpoint directory is being swapped now and then
            step = json.loads((run / "last" / "training_state.json").read_text())["step"]
        except (FileNotFoundError, json.JSONDecodeError):
            step = 0
        if step >= 20:
            proc.send_signal(signal.SIGKILL)
            killed_at = len(records(run))
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert 20 <= killed_at < 120
    gptgen(*train_args(data_dir, run, *common, "--resume", tokenizer=tok_dir))
    assert strip(records(run)) == strip(want)  # every step's loss, bit for bit
    assert strip(records(run, "eval")) == strip(records(full, "eval"))


def test_torchrun_two_processes_match_one_process(data_dir, tmp_path, tok_dir):
    common = ["--batch-size", "8", "--max-steps", "6", "--config", "n_embd=32"]
    one = tmp_path / "one"
    gptgen(*train_args(data_dir, one, *common, tokenizer=tok_dir))
    two = tmp_path / "two"
    for attempt in range(3):
        shutil.rmtree(two, ignore_errors=True)
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               "2", "-m", "gptgen", *map(str, train_args(data_dir, two, *common, tokenizer=tok_dir))],
                              capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
        # On the project's 2-core CI machine (torch 2.13, gloo) a worker is killed by a signal inside torch's
        # native code in roughly 1 run of 16, at the same rate on code from before gptgen's last changes
        # ("terminate called without an active exception" / SIGSEGV at the first DDP step). Only such a
        # death, reported by torchrun as a negative exit code, is retried; any other failure fails at once.
        if proc.returncode == 0 or not re.search(r"exitcode\s*:\s*-\d+", proc.stderr):
            break
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = records(one), records(two)
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert y["tokens"] == x["tokens"] and y["input_tokens"] == x["input_tokens"]
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
    assert (two / "last" / "model.safetensors").is_file()
    assert not list(two.glob("*rank*"))  # rank 0 alone writes


def test_eval_json_matches_the_api_and_errors_are_one_line(data_dir, tmp_path):
    out = tmp_path / "run"
    gptgen(*train_args(data_dir, out, "--batch-size", "32", "--max-steps", "5"))
    data = data_dir / "tinyshakespeare" / "input.txt"
    proc = gptgen("eval", "--model", out / "last", "--data", data, "--reader", "paragraphs", "--split", "every_nth:10",
                  "--json", "--threads", "1")
    metrics = json.loads(proc.stdout)
    final_val = records(out, "eval")[-1]
    assert metrics["loss"] == pytest.approx(final_val["loss"], rel=1e-6)
    assert metrics["tokens"] == final_val["tokens"]
    assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["loss"], rel=1e-6)

    bad = gptgen("eval", "--model", out / "last", "--data", data, "--seq-len", "64", check=False)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "longer than the model's context of 32" in bad.stderr
    again = gptgen(*train_args(data_dir, out, "--max-steps", "2"), check=False)
    assert again.returncode == 2 and "already holds a training run" in again.stderr


def test_finetune_hf_gpt2_directory(data_dir, gpt2_tokenizer_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "ft"
    gptgen("finetune", "--model", tmp_path / "hf", "--tokenizer", gpt2_tokenizer_dir,
           "--data", data_dir / "tinyshakespeare" / "input.txt", "--reader", "paragraphs", "--split", "every_nth:20",
           "--seq-len", "32", "--batch-size", "8", "--max-steps", "4", "--lr", "1e-3", "--schedule", "linear",
           "--threads", "1", "--no-progress", "--no-samples", "--output", out)
    steps = records(out)
    assert [round(r["lr"], 8) for r in steps] == [1e-3, 7.5e-4, 5e-4, 2.5e-4]
    # Oracle: transformers computes the same validation loss for the fine-tuned weights.
    from gptgen import load
    from gptgen.data.packing import pack_texts
    from gptgen.data import read_paragraphs, split_every_nth

    lm = load(out / "last")
    _, val = split_every_nth(read_paragraphs([data_dir / "tinyshakespeare" / "input.txt"]), 20)
    packed = pack_texts(val, lm.tokenizer, 32, "pad", False, False)
    lm.save(tmp_path / "hf_out", format="hf")
    tuned = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf_out").eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(packed), 64):
            x, y, m = packed.input_ids[i:i + 64], packed.labels[i:i + 64], packed.loss_mask[i:i + 64]
            logits = tuned(input_ids=x).logits
            losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                       reduction="none")
            total += float(losses[m.reshape(-1)].sum())
            count += int(m.sum())
    assert records(out, "eval")[-1]["loss"] == pytest.approx(total / count, rel=1e-4)


@pytest.mark.slow
def test_quickstart_leaves_a_model_and_curves(tmp_path):
    from gptgen.data.registry import dataset_files

    try:
        dataset_files("quickstart")
    except Exception as exc:  # the packaged corpus belongs to the data area
        pytest.skip(str(exc))
    out = tmp_path / "qs"
    proc = gptgen("quickstart", "--output", out, "--minutes", "0.25", "--epochs", "1", "--no-progress", threads=2)
    assert "Validation perplexity after" in proc.stdout
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    from gptgen import load

    lm = load(out / "best")
    assert lm.config.extra.get("add_bos") is True
