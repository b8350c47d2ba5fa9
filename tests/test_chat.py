"""Chat templates, sessions, few-shot prompts and the `gptgen chat` REPL, on a tiny model trained here to
answer two questions in the KoGPT-2 format."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch

from gptgen import GenerationError, LanguageModel, Tokenizer
from gptgen.chat import ChatSession, ChatTemplate, complete_few_shot, few_shot_prompt, get_template
from gptgen.cli import main as cli_main

SPECIALS = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}
# "뭐해" is answered with <unk> tokens, so banning <unk> has something to ban.
DIALOGUES = ["<s>안녕</s><s>반가워요</s>", "<s>뭐해</s><s><unk><unk><unk></s>"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    torch.manual_seed(0)
    words = ["안녕", "반가워요", "뭐해", "좋아요", "싫어요", "배고파"] * 5
    tok = Tokenizer.train("bpe", words, 60, special_tokens=dict(SPECIALS), reserved_tokens=list(SPECIALS.values()))
    lm = LanguageModel.from_preset("gpt2", tok, n_layer=1, n_embd=48, n_head=2, n_positions=48)
    lm.fit(DIALOGUES * 320, epochs=1, batch_size=16, lr=1e-2, seq_len=12, progress=False, device="cpu")  # 40 steps
    return lm, lm.save(tmp_path_factory.mktemp("chat") / "model")


def test_template_renders_turns_and_knows_its_end_marker():
    t = ChatTemplate()
    assert t.render([("q1", "a1")], "q2") == "<s>q1</s><s>a1</s><s>q2</s><s>"
    assert t.end_marker == "</s>" and t.assistant_prefix == "<s>"
    plain = get_template("plain")
    assert plain.render([], "x {y}") == "Q: x {y}\nA: " and plain.end_marker == "\n"
    assert few_shot_prompt([("좋아", "긍정")], "싫어") == "<s>좋아</s><s>긍정</s><s>싫어</s><s>"
    assert few_shot_prompt([], "싫어", instruction="감정: ") == "감정: <s>싫어</s><s>"
    with pytest.raises(GenerationError, match="exactly once"):
        ChatTemplate(user="{text}{text}")
    with pytest.raises(GenerationError, match="end with a marker"):
        ChatTemplate(assistant="A: {text}")
    with pytest.raises(GenerationError, match="Unknown chat template"):
        get_template("nope")


def test_template_for_tokenizer_uses_its_special_tokens(chat_model):
    lm, _ = chat_model
    t = ChatTemplate.for_tokenizer(lm.tokenizer)
    assert (t.user, t.assistant) == ("<s>{text}</s>", "<s>{text}</s>")
    gpt2_like = Tokenizer.train("byte-bpe", ["hello world"] * 5, 300)  # BOS == EOS == <|endoftext|>
    with pytest.raises(GenerationError, match="no end-of-sequence token distinct"):
        ChatTemplate.for_tokenizer(gpt2_like)


def test_answer_ends_at_the_end_marker(chat_model):
    lm, _ = chat_model
    session = ChatSession(lm, options=dict(sampler="greedy", max_new_tokens=10))
    assert session.ask("안녕") == ["반가워요"]
    assert session.last_finished == [True]
    assert session.last_raw[0].endswith("</s>") and session.last_raw[0].count("</s>") == 1
    assert session.last_prompt == "<s>안녕</s><s>"
    # The same prompt without stopping runs on past the marker: the stop is the session's doing.
    longer = lm.generate(session.last_prompt, sampler="greedy", max_new_tokens=10, eos_token_id=[],
                         include_prompt=False, skip_special_tokens=False, add_bos=False)
    assert longer.startswith(session.last_raw[0]) and len(longer) > len(session.last_raw[0])


def test_long_budget_shortens_the_answer_not_the_question(chat_model):
    lm, _ = chat_model
    # 100 new tokens do not fit the 48-token context with the prompt; the question must survive.
    session = ChatSession(lm, history_turns=0, options=dict(sampler="greedy", max_new_tokens=100))
    assert session.ask("안녕") == ["반가워요"] and session.ask("뭐해") != ["반가워요"]


def test_answer_cut_by_max_new_tokens_is_not_finished(chat_model):
    lm, _ = chat_model
    session = ChatSession(lm, options=dict(sampler="greedy", max_new_tokens=1))
    answers = session.ask("안녕")
    assert session.last_finished == [False]
    # One token ("반가워요" is one token of this vocabulary) and no room left for the marker.
    assert answers == ["반가워요"] and not session.last_raw[0].endswith("</s>")


def test_banned_unk_never_appears(chat_model):
    lm, _ = chat_model
    unk = lm.tokenizer.unk_token_id
    free = ChatSession(lm, history_turns=0, options=dict(sampler="greedy", max_new_tokens=6))
    free.ask("뭐해")
    assert "<unk>" in free.last_raw[0]  # the model does want to say <unk>
    banned = ChatSession(lm, history_turns=0, candidates=8,
                         options=dict(do_sample=True, top_k=50, top_p=0.95, max_new_tokens=6, seed=1,
                                      bad_words=["<unk>"]))
    banned.ask("뭐해")
    for raw in banned.last_raw:
        assert "<unk>" not in raw
        assert unk not in lm.tokenizer.encode(raw)
    assert len(banned.last_raw) == 8


def test_history_window_and_reset(chat_model):
    lm, _ = chat_model
    session = ChatSession(lm, history_turns=1, options=dict(sampler="greedy", max_new_tokens=8))
    session.ask("안녕")
    second = session.ask("뭐해")[0]
    assert session.last_prompt == "<s>안녕</s><s>반가워요</s><s>뭐해</s><s>"
    assert session.history == [("안녕", "반가워요"), ("뭐해", second)]
    # Only the last exchange stays in the prompt.
    assert session.prompt_for("안녕") == f"<s>뭐해</s><s>{second}</s><s>안녕</s><s>"
    session.set_history(0)
    assert session.prompt_for("안녕") == "<s>안녕</s><s>"
    session.set_history(3)
    session.reset()
    assert session.history == [] and session.prompt_for("안녕") == "<s>안녕</s><s>"


def test_history_is_dropped_to_fit_the_context(chat_model):
    lm, _ = chat_model
    session = ChatSession(lm, history_turns=50, options=dict(sampler="greedy", max_new_tokens=8))
    session.history = [("안녕", "반가워요")] * 30
    prompt = session.prompt_for("뭐해")
    assert len(lm.tokenizer.encode(prompt)) <= lm.config.n_positions - 8
    assert prompt.endswith("<s>뭐해</s><s>") and prompt.startswith("<s>안녕</s>")


def test_session_checks_its_settings(chat_model):
    lm, _ = chat_model
    with pytest.raises(GenerationError, match="positive integer"):
        ChatSession(lm, candidates=0)
    with pytest.raises(GenerationError, match="0 or more"):
        ChatSession(lm, history_turns=-1)
    with pytest.raises(GenerationError, match="candidates="):
        ChatSession(lm, options=dict(num_return_sequences=2))
    with pytest.raises(GenerationError, match="empty"):
        ChatSession(lm).ask("   ")


def test_complete_few_shot_stops_at_the_marker(chat_model):
    lm, _ = chat_model
    # Zero-shot: the tiny model only knows single exchanges.
    assert complete_few_shot(lm, [], "안녕", sampler="greedy", max_new_tokens=10) == \
        ("반가워요", True, "<s>안녕</s><s>")
    assert complete_few_shot(lm, [], "안녕", sampler="greedy", max_new_tokens=1)[:2] == ("반가워요", False)
    # Shots that do not fit the context (48 positions) with room for the answer are dropped, oldest first.
    shots = [(f"뭐해{i}", "좋아요") for i in range(12)]
    _, _, sent = complete_few_shot(lm, shots, "안녕", sampler="greedy", max_new_tokens=10)
    assert len(lm.tokenizer.encode(sent)) <= 48 - 10
    assert sent.endswith("<s>뭐해11</s><s>좋아요</s><s>안녕</s><s>")
    assert "뭐해0<" not in sent


def _chat(argv, stdin_text, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin_text))
    code = cli_main(["chat", *argv])
    return code, capsys.readouterr()


def test_cli_chat_reads_turns_and_commands_from_stdin(chat_model, monkeypatch, capsys):
    _, model_dir = chat_model
    code, out = _chat(["--model", str(model_dir), "--json", "--sampler", "greedy", "--max-new-tokens", "8"],
                      "안녕\n\n/history 0\n/reset\n안녕\n/quit\n뭐해\n", monkeypatch, capsys)
    assert code == 0
    records = [json.loads(line) for line in out.out.splitlines()]
    assert records == [
        {"question": "안녕", "answers": ["반가워요"], "finished": [True]},
        {"command": "history", "value": 0},
        {"command": "reset"},
        {"question": "안녕", "answers": ["반가워요"], "finished": [True]},
    ]


def test_cli_chat_candidates_and_sampler_flags(chat_model, monkeypatch, capsys):
    _, model_dir = chat_model
    code, out = _chat(["--model", str(model_dir), "--do-sample", "--top-k", "50", "--top-p", "0.95",
                       "--bad-words", "<unk>", "--seed", "3", "--max-new-tokens", "6", "--candidates", "5"],
                      "뭐해\n/candidates 2\n안녕\n", monkeypatch, capsys)
    assert code == 0
    lines = out.out.splitlines()
    assert [line.split(">")[0] for line in lines] == ["bot[1]", "bot[2]", "bot[3]", "bot[4]", "bot[5]",
                                                      "(candidates: 2)", "bot[1]", "bot[2]"]


def test_cli_chat_errors_exit_2(chat_model, monkeypatch, capsys):
    _, model_dir = chat_model
    code, out = _chat(["--model", str(model_dir)], "/nonsense\n", monkeypatch, capsys)
    assert code == 2 and "Unknown command /nonsense" in out.err
    code, out = _chat(["--model", str(model_dir), "--sampler", "greedy", "--candidates", "2"], "안녕\n",
                      monkeypatch, capsys)
    assert code == 2 and "num_return_sequences=2" in out.err


def test_cli_chat_as_a_piped_process(chat_model):
    _, model_dir = chat_model
    proc = subprocess.run([sys.executable, "-m", "gptgen", "chat", "--model", str(model_dir), "--sampler", "greedy",
                           "--max-new-tokens", "8"], input="안녕\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "bot> 반가워요\n"


def test_text_end_marker_stops_the_answer():
    """A plain-text template on a byte-level model: the newline ends the answer."""
    torch.manual_seed(0)
    # No space after "A:": byte-level BPE would make "A: " end in a lone space token never seen in training.
    template = ChatTemplate(user="Q:{text}\n", assistant="A:{text}\n")
    lines = ["Q:hi\nA:hello there\n", "Q:hi\nA:hello there\nQ:bye\n"]
    tok = Tokenizer.train("byte-bpe", lines * 5, 300)
    lm = LanguageModel.from_preset("gpt2", tok, n_layer=1, n_embd=48, n_head=2, n_positions=32)
    lm.fit(lines * 8, epochs=60, batch_size=16, lr=1e-2, seq_len=24, add_eos=True, progress=False, device="cpu")
    session = ChatSession(lm, template=template, history_turns=0,
                          options=dict(sampler="greedy", max_new_tokens=8, eos_token_id=[]))
    assert session.ask("hi") == ["hello there"] and session.last_finished == [True]
    assert session.last_prompt == "Q:hi\nA:"
    # Without the stop string the model goes on after the newline.
    more = lm.generate("Q:hi\nA:", sampler="greedy", max_new_tokens=8, eos_token_id=[], include_prompt=False)
    assert more.startswith("hello there\n") and len(more) > len("hello there\n")
    session.options["max_new_tokens"] = 1
    assert session.ask("hi")[0] != "hello there" and session.last_finished == [False]


def test_seeded_session_is_reproducible_and_turns_differ(chat_model):
    lm, _ = chat_model
    options = dict(do_sample=True, top_k=50, max_new_tokens=6, seed=5)
    a, b = ChatSession(lm, history_turns=0, candidates=4, options=options), \
        ChatSession(lm, history_turns=0, candidates=4, options=options)
    first = [a.ask("뭐해") for _ in range(3)]
    assert [b.ask("뭐해") for _ in range(3)] == first  # same seed, same conversation
    assert a.turns_asked == 3
    direct = lm.generate("<s>뭐해</s><s>", do_sample=True, top_k=50, max_new_tokens=6, seed=6, num_return_sequences=4,
                         include_prompt=False, skip_special_tokens=False, add_bos=False,
                         eos_token_id=[lm.tokenizer.eos_token_id], truncate_prompt=True)
    assert ChatSession(lm, history_turns=0, candidates=4, options=options).ask("뭐해") == first[0]
    c = ChatSession(lm, history_turns=0, candidates=4, options=options)
    c.ask("뭐해")
    c.ask("뭐해")
    assert c.last_raw == direct  # the second question is answered with seed + 1


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_cli_chat_repl_at_a_terminal(chat_model):
    """At a terminal: a greeting, `you> ` prompts, errors printed without leaving, /quit."""
    import os
    import pty
    import select
    import time

    _, model_dir = chat_model
    pid, fd = pty.fork()
    if pid == 0:  # the child: the REPL on the pseudo-terminal
        os.execv(sys.executable, [sys.executable, "-m", "gptgen", "chat", "--model", str(model_dir),
                                  "--sampler", "greedy", "--max-new-tokens", "8"])
    out = b""

    def read_until_prompt(seconds=60):
        nonlocal out
        end = time.time() + seconds
        while time.time() < end:
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    return
                out += data
                if out.endswith(b"you> "):
                    return

    read_until_prompt()
    for line in ("안녕", "/candidates x", "/quit"):
        os.write(fd, (line + "\n").encode())
        read_until_prompt(10)
    for _ in range(100):  # the child must leave on /quit; do not hang the suite if it does not
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.2)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("gptgen chat did not exit on /quit")
    os.close(fd)
    text = out.decode("utf-8", "replace").replace("\r", "")
    assert os.WEXITSTATUS(status) == 0
    assert "/help for commands" in text
    assert "you> 안녕\nbot> 반가워요\nyou> " in text
    assert "error: /candidates takes a whole number, got 'x'." in text
