"""Ctrl-C during training: a checkpoint of the current step, one line with the command that resumes it,
exit status 130; the resumed run's loss curve equals an uninterrupted run's."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEXT = "\n".join(f"line {i} of the little corpus, with words that repeat and repeat {i % 7}" for i in range(200))


def _steps(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line being written
            break
    return [r for r in records if r.get("event") == "step"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import gptgen

    root = tmp_path_factory.mktemp("sigint")
    (root / "corpus.txt").write_text(TEXT, "utf-8")
    gptgen.Tokenizer.train("bpe", [str(root / "corpus.txt")], 150).save(root / "tok")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    return root, env


def _argv(root: Path, out: Path) -> list[str]:
    return ["train", "--preset", "gpt2", "--config", "n_layer=2", "--config", "n_embd=32", "--config", "n_head=2",
            "--config", "n_positions=32", "--tokenizer", str(root / "tok"), "--data", str(root / "corpus.txt"),
            "--batch-size", "4", "--epochs", "3", "--lr", "3e-3", "--split", "every_nth:10", "--eval-every", "25",
            "--no-samples", "--no-progress", "--threads", "1", "--seed", "3", "--output", str(out)]


def _gptgen(argv, env, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "gptgen", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.slow
def test_ctrl_c_saves_the_current_step_and_the_printed_command_resumes_to_the_same_curve(setup):
    root, env = setup
    whole, cut = root / "whole", root / "cut"
    uninterrupted = _gptgen(_argv(root, whole), env)
    proc = _gptgen(_argv(root, cut), env)
    deadline = time.monotonic() + 120
    while len(_steps(cut)) < 30 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.startswith("gptgen:")]
    assert len(lines) == 1 and lines[0].startswith("gptgen: interrupted at step "), err
    step = int(lines[0].split("step ")[1].split(";")[0])
    assert step >= 30
    state = json.loads((cut / "last" / "training_state.json").read_text())
    assert state["step"] == step and not state["finished"]
    command = shlex.split(lines[0].split("resume with: ", 1)[1])
    assert command[0] == "gptgen" and "--resume" in command
    resumed = subprocess.run([sys.executable, "-m", "gptgen", *command[1:]], env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.stderr.read()
    a, b = _steps(whole), _steps(cut)
    assert len(a) == len(b) > step
    assert [r["step"] for r in b] == list(range(1, len(b) + 1))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # the same curve, to the last bit


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once(setup):
    root, env = setup
    run = root / "twice"
    proc = _gptgen(_argv(root, run), env)
    deadline = time.monotonic() + 120
    while len(_steps(run)) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert len([l for l in err.splitlines() if l.startswith("gptgen:")]) == 1
