"""Nothing lost, nothing raw: writes never destroy what a user had, runs do not collide, bad options are one
sentence before any work. Data-loss cases compare every file's checksum before and after."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import os
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import gptgen
from gptgen import CheckpointError, DataError, LanguageModel, Tokenizer, TokenizerError, TrainingError
from gptgen.checkpoint import atomic_write_bytes, is_model_dir
from gptgen.data import read_lines, read_paragraphs, read_texts
from gptgen.data.packing import pack_examples
from gptgen.training import Callback, TrainConfig, evaluate, fit
from gptgen.training.rundir import RUN_LOCK, claim_run_dir

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
TINY = dict(n_layer=1, n_embd=16, n_head=2, n_inner=32, n_positions=16)
TEXTS = [f"the {w} sat on the {v} and it was {u}" for w in ("cat", "dog", "bird", "fish")
         for v in ("mat", "log", "tree", "rock") for u in ("good", "bad", "odd")]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train("wordpiece", TEXTS, 80, lowercase=True, min_frequency=1,
                           reserved_tokens=["[PAD]", "[UNK]", "[BOS]"])


def tiny_lm(tok, seed=0):
    torch.manual_seed(seed)
    return LanguageModel.from_preset("mini", tok, vocab_size=80, **TINY)


def packed(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pack_examples([torch.randint(3, 80, (12,), generator=g).tolist() for _ in range(n)], 16, bos_id=2, pad_id=0)


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry under root (hidden ones too) -> sha256 of a file's bytes, or "dir"."""
    out = {}
    for path in sorted(Path(root).rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def user_dir(root: Path) -> Path:
    """A directory holding a user's own files."""
    (root / "src").mkdir(parents=True)
    (root / "notes.txt").write_text("my notes\n")
    (root / "src" / "a.py").write_text("print('mine')\n")
    return root


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "gptgen", *map(str, args)], capture_output=True, text=True,
                          env=_env(), cwd=cwd, timeout=120)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# Model directories: save and convert -----------------------------------------------------------------
def main_cli(capsys, *args):
    """The CLI in this process (same code path as `python -m gptgen`, without a second torch import)."""
    from gptgen.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return subprocess.CompletedProcess(args, code, "", err)


def test_convert_never_replaces_what_gptgen_did_not_write(tok, tmp_path, capsys, monkeypatch):
    model = tiny_lm(tok).save(tmp_path / "model")
    home = user_dir(tmp_path / "home")
    before = tree_digest(home)
    # `gptgen convert MODEL .` in a user's directory (a real process), then with --overwrite.
    assert_one_line_error(cli("convert", model, ".", cwd=home), "not a model directory gptgen wrote", "--overwrite")
    monkeypatch.chdir(home)
    assert_one_line_error(main_cli(capsys, "convert", model, ".", "--overwrite"), "never deletes")
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(main_cli(capsys, "convert", model, home / "src", "--overwrite"), "never deletes")
    assert tree_digest(home) == before
    (home / "file.bin").write_bytes(b"\x00\x01")
    before = tree_digest(home)
    assert_one_line_error(main_cli(capsys, "convert", model, home / "file.bin", "--overwrite"), "is a file",
                          "--overwrite")
    assert tree_digest(home) == before
    # A model directory gptgen wrote is replaced only with --overwrite.
    out = tiny_lm(tok, seed=1).save(tmp_path / "out")
    old = tree_digest(out)
    assert_one_line_error(main_cli(capsys, "convert", model, out), "already holds a model", "--overwrite")
    assert tree_digest(out) == old
    assert main_cli(capsys, "convert", model, out, "--to", "gptgen", "--overwrite").returncode == 0
    assert tree_digest(out) == tree_digest(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "model", "out"]  # no temporaries left


def test_save_refuses_targets_it_did_not_write(tok, tmp_path, monkeypatch):
    lm = tiny_lm(tok)
    home = user_dir(tmp_path / "home")
    before = tree_digest(home)
    monkeypatch.chdir(home)
    for target, overwrite in ((".", False), (".", True), (home / "src", True), (home / "notes.txt", False)):
        with pytest.raises(CheckpointError, match="overwrite=True") as info:
            lm.save(target, overwrite=overwrite)
        assert len(str(info.value).splitlines()) == 1
    assert tree_digest(home) == before
    monkeypatch.chdir(tmp_path)
    # An empty directory may be written; a model directory gptgen wrote only with overwrite=True.
    (tmp_path / "empty").mkdir()
    assert is_model_dir(lm.save(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match="already holds a model; pass overwrite=True"):
        lm.save(tmp_path / "empty")
    other = tiny_lm(tok, seed=3)
    other.save(tmp_path / "empty", overwrite=True)
    assert torch.equal(gptgen.load(tmp_path / "empty").model.embed.wte.weight, other.model.embed.wte.weight)
    # A model directory with a file gptgen did not write: refused even with overwrite, the file kept.
    (tmp_path / "empty" / "README.md").write_text("my model card")
    kept = tree_digest(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="README.md"):
        lm.save(tmp_path / "empty", overwrite=True)
    assert tree_digest(tmp_path / "empty") == kept
    # The HF format gptgen writes is a model directory too.
    torch.manual_seed(0)
    gpt2_shaped = LanguageModel.from_preset("gpt2", tok, vocab_size=80, **TINY)
    hf = gpt2_shaped.save(tmp_path / "hf", format="hf")
    assert is_model_dir(hf)
    gpt2_shaped.save(hf, format="hf", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "hf", "home"]


def test_save_to_root_or_under_a_file_is_one_sentence_and_leaves_nothing(tok, tmp_path):
    lm = tiny_lm(tok)
    root_before = sorted(os.listdir("/"))
    for overwrite in (False, True):
        with pytest.raises(CheckpointError) as info:
            lm.save("/", overwrite=overwrite)
        assert len(str(info.value).splitlines()) == 1
    assert sorted(os.listdir("/")) == root_before  # no "..old-*" or temporary directory
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match=r"is a file, not a directory"):
        lm.save(tmp_path / "f" / "model")
    with pytest.raises(CheckpointError, match="needs a model directory"):
        lm.save(None)
    with pytest.raises(CheckpointError, match="needs a model directory"):
        gptgen.load(None)
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_save_under_an_unwritable_directory_is_one_sentence(tok, tmp_path):
    if os.getuid() == 0:  # root ignores directory modes; /sys refuses even root
        parent = Path("/sys")
    else:
        parent = tmp_path / "locked"
        parent.mkdir()
        parent.chmod(0o555)
    before = sorted(os.listdir(parent))
    with pytest.raises(CheckpointError, match=r"Cannot write .*; check that .* is a writable directory") as info:
        tiny_lm(tok).save(parent / "model")
    assert len(str(info.value).splitlines()) == 1
    with pytest.raises(TrainingError, match="Cannot create the output directory"):
        fit(tiny_lm(tok), packed(4), output_dir=str(parent / "run"), progress=False)
    assert sorted(os.listdir(parent)) == before


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_honour_the_umask(tok, tmp_path, mask):
    old = os.umask(mask)
    try:
        target = tiny_lm(tok).save(tmp_path / "m")
        atomic_write_bytes(tmp_path / "f.bin", b"x")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~mask
    for f in [*target.iterdir(), tmp_path / "f.bin"]:
        assert stat.S_IMODE(f.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~mask, f


# Training runs: earlier runs, the lock ------------------------------------------------------------------
def test_fit_refuses_an_earlier_run_and_overwrite_keeps_foreign_files(tok, tmp_path):
    data, val = packed(8), packed(4, seed=1)
    run = tmp_path / "run"
    fit(tiny_lm(tok), data, val, batch_size=4, output_dir=str(run), progress=False)
    (run / "notes.txt").write_text("mine")
    for missing in ("", "last"):  # the complete run, then one whose last/ is gone
        if missing:
            import shutil

            shutil.rmtree(run / missing)
        before = tree_digest(run)
        with pytest.raises(TrainingError, match=r"already holds a training run; pass resume=True \(--resume\)"
                                                r".*overwrite=True \(--overwrite\)"):
            fit(tiny_lm(tok), data, val, batch_size=4, output_dir=str(run), progress=False)
        assert tree_digest(run) == before  # best/ and metrics.jsonl untouched
    with pytest.raises(TrainingError, match=r"no checkpoint \(last/\) to resume from"):
        fit(tiny_lm(tok), data, val, batch_size=4, output_dir=str(run), resume=True, progress=False)
    assert tree_digest(run) == before
    result = fit(tiny_lm(tok, seed=5), data, val, batch_size=4, output_dir=str(run), overwrite=True, progress=False)
    assert (run / "notes.txt").read_text() == "mine"
    assert result.steps == 2 and len((run / "metrics.jsonl").read_text().splitlines()) == len(result.history)
    with pytest.raises(TrainingError, match="is a file"):
        fit(tiny_lm(tok), data, output_dir=str(run / "notes.txt"), progress=False)


def test_a_second_run_on_the_same_directory_names_the_first_ones_pid(tok, tmp_path, capsys):
    run = tmp_path / "run"
    model = tiny_lm(tok).save(tmp_path / "model")
    (tmp_path / "corpus.txt").write_text("\n".join(TEXTS) + "\n")
    args = ["finetune", "--model", model, "--data", tmp_path / "corpus.txt", "--batch-size", "4", "--no-progress",
            "--no-samples", "--threads", "1", "--output", run]
    # The first run: a real training process that goes on for a while.
    holder = subprocess.Popen([sys.executable, "-m", "gptgen", *map(str, args), "--max-steps", "1000000",
                               "--minutes", "3"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(), cwd=REPO)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and holder.poll() is None:
            if (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size:
                break
            time.sleep(0.05)
        assert holder.poll() is None, holder.stderr.read()[-2000:]
        assert (run / RUN_LOCK).read_text().strip() == str(holder.pid)
        # The second run, the same command: one sentence naming the first one's pid; nothing of it touched.
        assert_one_line_error(main_cli(capsys, *args, "--max-steps", "2"),
                              f"in use by another training run (pid {holder.pid})")
        with pytest.raises(TrainingError, match=f"pid {holder.pid}"):
            claim_run_dir(run, resume=True)
        with pytest.raises(TrainingError, match=f"pid {holder.pid}"):
            subprocess_claim(run)
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel drops the lock with the process
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    with claim_run_dir(run, overwrite=True):  # the killed run's files are an earlier run now
        assert (run / RUN_LOCK).read_text().strip() == str(os.getpid())
        assert not (run / "metrics.jsonl").exists()
        with claim_run_dir(run):  # re-entrant within one process
            pass
        with pytest.raises(TrainingError, match=f"pid {os.getpid()}"):
            subprocess_claim(run)
    subprocess_claim(run, expect_ok=True)


def subprocess_claim(run, expect_ok=False):
    """Try the run directory's lock from another process, as a second run would (flock, non-blocking)."""
    code = ("import fcntl, sys\nf = open(sys.argv[1], 'a+')\ntry:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "except OSError:\n    f.seek(0); print('held by pid', f.read().strip())")
    out = subprocess.run([sys.executable, "-c", code, str(run / RUN_LOCK)], capture_output=True, text=True,
                         timeout=60).stdout.strip()
    if not expect_ok and out:
        raise TrainingError(out)
    assert not expect_ok or out == "", out


# Options: one sentence before any work -----------------------------------------------------------------
BAD_OPTIONS = [
    (dict(grad_clip=-1.0), "grad_clip"), (dict(grad_clip=float("nan")), "grad_clip"),
    (dict(weight_decay=-1.0), "weight_decay"), (dict(betas=(1.5, 0.999)), "beta1"),
    (dict(betas=(0.9, 1.0)), "beta2"), (dict(betas=(0.9, -0.1)), "beta2"), (dict(eps=-1.0), "epsilon"),
    (dict(eps=0.0), "epsilon"), (dict(lr=float("nan")), "learning rate"), (dict(lr=0.0), "learning rate"),
    (dict(lr=float("inf")), "learning rate"), (dict(seq_len=0), "seq_len"), (dict(max_time=0.0), "max_time"),
    (dict(max_time=-60.0), "max_time"), (dict(batch_size=0), "batch_size"), (dict(batch_size=-3), "batch_size"),
    (dict(grad_accum=0), "grad_accum"), (dict(epochs=0), "epochs"), (dict(max_steps=0), "max_steps"),
    (dict(eval_batch_size=0), "eval_batch_size"), (dict(num_threads=-2), "num_threads"),
    (dict(eval_every=-1), "eval_every"), (dict(save_every=-1), "save_every"), (dict(warmup_steps=-1), "warmup_steps"),
    (dict(min_lr_ratio=2.0), "min_lr_ratio"), (dict(seed=2**64), "seed"), (dict(seed=-1), "seed"),
    (dict(lr="1e-3"), "lr"), (dict(batch_size=2.5), "batch_size"), (dict(device="tpu"), "Unknown device"),
    (dict(resume=True), "output directory"), (dict(early_stopping=-1), "early_stopping"),
]


@pytest.mark.parametrize("options,needle", BAD_OPTIONS, ids=[f"{k}={v}" for o, _ in BAD_OPTIONS for k, v in o.items()])
def test_bad_training_options_are_one_sentence_before_any_work(tok, tmp_path, options, needle):
    out = tmp_path / "run"
    with pytest.raises(TrainingError) as info:
        fit(tiny_lm(tok), packed(4), output_dir=str(out) if "resume" not in options else None, progress=False,
            **options)
    message = str(info.value)
    assert needle in message and len(message.splitlines()) == 1 and message.endswith(".")
    assert not out.exists()  # refused before the run directory was made
    with pytest.raises(TrainingError):
        TrainConfig(**options).validate()


def test_cli_training_options_are_one_line(tok, tmp_path, capsys):
    model = tiny_lm(tok).save(tmp_path / "model")
    (tmp_path / "corpus.txt").write_text("\n".join(TEXTS) + "\n")
    base = ["--model", model, "--data", tmp_path / "corpus.txt", "--threads", "1"]
    for flags, needle in [(["--beta1", "1.5"], "beta1 (--beta1) must be in [0, 1), got 1.5."),
                          (["--adam-eps", "-1"], "--adam-eps"), (["--grad-clip", "-1"], "grad_clip"),
                          (["--weight-decay", "-1"], "weight_decay"), (["--lr", "nan"], "learning rate"),
                          (["--device", "tpu"], "Unknown device 'tpu'")]:
        out = tmp_path / "run"
        proc = main_cli(capsys, "finetune", *base, "--no-progress", "--no-samples", "--output", out, *flags)
        assert_one_line_error(proc, needle)
        assert not out.exists()
    assert_one_line_error(main_cli(capsys, "eval", *base, "--batch-size", "0"), "batch_size (--batch-size)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_one_sentence(tok):
    with pytest.raises(TrainingError, match="no usable CUDA GPU"):
        fit(tiny_lm(tok), packed(4), device="cuda", progress=False)


def test_evaluate_and_empty_validation_data(tok):
    lm = tiny_lm(tok)
    for bs in (-1, 0):
        with pytest.raises(TrainingError, match="batch_size must be at least 1"):
            evaluate(lm, packed(4), batch_size=bs)
    with pytest.raises(DataError) as info:
        fit(lm, TEXTS, val_data=[], progress=False)
    assert "validation data is empty" in str(info.value) and "training" not in str(info.value)
    assert math.isfinite(evaluate(lm, packed(4), batch_size=3)["loss"])


def test_resume_from_truncated_weights_is_one_checkpoint_error(tok, tmp_path):
    opts = dict(batch_size=4, epochs=2, output_dir=str(tmp_path), progress=False)
    fit(tiny_lm(tok), packed(8), **opts)
    weights = tmp_path / "last" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        fit(tiny_lm(tok), packed(8), resume=True, **{**opts, "epochs": 3})
    assert len(str(info.value).splitlines()) == 1


# Resume with changed options, divergence ----------------------------------------------------------------
class _Poison(Callback):
    """Makes step 6's loss NaN, as a too-high learning rate would."""

    def on_step_end(self, trainer, logs):
        if trainer.step == 5:
            with torch.no_grad():
                trainer.lm.model.lm_head.bias.fill_(float("nan"))


def test_resume_after_a_nan_stop_applies_a_new_learning_rate_and_says_so(tok, tmp_path, caplog):
    data = packed(16)
    opts = dict(batch_size=2, epochs=1, save_every=2, schedule="linear", output_dir=str(tmp_path), progress=False)
    with pytest.raises(TrainingError, match=r"loss became nan at step 6.*checkpoint \(step 4\).*--resume --lr"):
        fit(tiny_lm(tok), data, lr=1e-2, callbacks=[_Poison()], **opts)
    with caplog.at_level(logging.WARNING, logger="gptgen.training"):
        fit(tiny_lm(tok), data, lr=1e-3, resume=True, **opts)
    said = [r.getMessage() for r in caplog.records if "Resuming with learning rate" in r.getMessage()]
    assert said == ["Resuming with learning rate 0.001 instead of the run's 0.01 (from step 5 on)."]
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in steps if r["event"] == "step"}
    total = 8  # the linear schedule decays to 0 over 8 steps; the new base rate continues it
    for step, lr in lrs.items():
        base = 1e-2 if step <= 4 else 1e-3
        assert lr == pytest.approx(base * (1 - (step - 1) / total), rel=1e-9), step
    with pytest.raises(TrainingError, match=r"batch_size 2 and cannot resume with 4.*--batch-size 2"):
        fit(tiny_lm(tok), data, lr=1e-3, resume=True, **{**opts, "batch_size": 4, "epochs": 2})


class _Explode(Callback):
    """Scales the head's weights a thousandfold after step 2: from step 3 on the loss is huge but finite on every
    CPU (a too-high learning rate also explodes, but whether to a finite loss or to NaN depends on the CPU's
    rounding: NaN at step 3 with lr 300 on an AMD EPYC, a finite explosion on an Intel Xeon)."""

    def on_step_end(self, trainer, logs):
        if trainer.step == 2:
            with torch.no_grad():
                trainer.lm.model.lm_head.weight.mul_(1000.0)


def test_an_exploding_loss_is_warned_about_once(tok, caplog):
    with caplog.at_level(logging.WARNING, logger="gptgen.training"):
        result = fit(tiny_lm(tok), packed(32), epochs=2, batch_size=4, lr=1e-3, progress=False,
                     callbacks=[_Explode()])
    losses = [r["loss"] for r in result.history if r["event"] == "step"]
    limit = 2 * max(losses[0], math.log(80))
    assert len(losses) == 16 and all(math.isfinite(x) for x in losses)
    assert all(x < limit for x in losses[:2]) and sum(x > limit for x in losses[2:]) >= 3  # exploded, and stayed up
    warned = [r.getMessage() for r in caplog.records if "exploded" in r.getMessage()]
    assert len(warned) == 1 and "lower learning rate" in warned[0] and "at step 3" in warned[0]
    caplog.clear()
    # a learning rate of 300 explodes too: whether to a finite loss (a warning, once) or to NaN (the stop that
    # keeps the last good state) is the CPU's rounding; each outcome is reported once and clearly
    with caplog.at_level(logging.WARNING, logger="gptgen.training"):
        try:
            wild = fit(tiny_lm(tok), packed(32), epochs=2, batch_size=4, lr=300.0, progress=False)
        except TrainingError as exc:
            assert re.search(r"loss became (nan|inf|-inf) at step \d+", str(exc)), str(exc)
        else:
            wild_losses = [r["loss"] for r in wild.history if r["event"] == "step"]
            assert all(math.isfinite(x) for x in wild_losses)
            assert len([r for r in caplog.records if "exploded" in r.getMessage()]) == 1
    assert len([r for r in caplog.records if "exploded" in r.getMessage()]) <= 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gptgen.training"):
        quiet = fit(tiny_lm(tok), packed(32), epochs=2, batch_size=4, lr=1e-3, progress=False)
    assert not [r for r in caplog.records if "exploded" in r.getMessage()]
    quiet_losses = [r["loss"] for r in quiet.history if r["event"] == "step"]
    assert quiet_losses[-1] < quiet_losses[0]


# Tokenizer.train with file names -------------------------------------------------------------------------
def test_tokenizer_train_reads_a_documented_list_of_file_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("corpus.txt").write_text("\n".join(TEXTS) + "\n")
    tok = Tokenizer.train("wordpiece", ["corpus.txt"], 60, min_frequency=1, reserved_tokens=["[PAD]", "[UNK]", "[BOS]"])
    unk = tok.token_to_id("[UNK]")
    ids = tok.encode("the cat sat on the mat")
    assert len(ids) == 6 and unk not in ids
    from_path = Tokenizer.train("wordpiece", [Path("corpus.txt")], 60, min_frequency=1,
                                reserved_tokens=["[PAD]", "[UNK]", "[BOS]"])
    assert from_path.encode("the dog sat") == tok.encode("the dog sat")
    with pytest.raises(TokenizerError, match="Training file missing.txt does not exist"):
        Tokenizer.train("wordpiece", ["missing.txt"], 60)
    with pytest.raises(TokenizerError, match="mixes file names"):
        Tokenizer.train("wordpiece", ["corpus.txt", "the cat sat on the mat"], 60)
    # Texts stay texts, even one that reads like a file name among sentences.
    texts = Tokenizer.train("wordpiece", TEXTS + ["notes.txt"], 60, min_frequency=1, reserved_tokens=["[PAD]", "[UNK]"])
    assert unk not in texts.encode("the cat sat")


# Readers: binary files and model directories -------------------------------------------------------------
def test_binary_files_and_model_directories_are_refused_by_name(tok, tmp_path):
    model = tiny_lm(tok).save(tmp_path / "model")
    with pytest.raises(DataError, match=r"model\.safetensors does not look like a text file") as info:
        read_paragraphs([model])
    assert len(str(info.value).splitlines()) == 1
    for mode in ("lines", "documents", "paragraphs"):
        with pytest.raises(DataError, match="model.safetensors"):
            read_texts(model / "model.safetensors", mode)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(1 << 20))
    with pytest.raises(DataError, match="big.bin does not look like a text file: .* of its first"):
        read_lines(big)
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes("\n".join(TEXTS).encode("utf-16"))
    with pytest.raises(DataError, match="utf16.txt"):
        read_lines(utf16)


def test_a_few_bad_bytes_in_real_books_still_load_with_the_report(data_dir):
    for name in ("chesterton-ball.txt", "shakespeare-caesar.txt"):
        path = data_dir / "books" / name
        raw = path.read_bytes()
        bad = raw.decode("utf-8", errors="replace").count("\ufffd") - raw.count("\ufffd".encode())
        assert 0 < bad < 0.01 * len(raw)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lines = read_lines(path)
        assert sum(line.count("\ufffd") for line in lines) >= bad
        assert [str(w.message) for w in caught if f"replaced {bad} invalid" in str(w.message)]
