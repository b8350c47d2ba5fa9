"""The OpenAI-compatible server, called by the official `openai` client and by httpx against live uvicorn
servers on loopback, over the continuous-batching engine and tiny random models.

Oracles: a brute-force greedy loop over the model's full forward pass (tokens and log-probabilities),
LanguageModel.generate, ChatSession (the same chat template through the per-call engine), and the
tokenizer (usage counts)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from gptgen import LanguageModel, Tokenizer  # noqa: E402
from gptgen.chat import ChatSession  # noqa: E402
from gptgen.serve import create_app  # noqa: E402
from serve_live import LiveServer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SPECIALS = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}
PROMPT = "The meaning of life is"


@pytest.fixture(scope="module")
def gpt2_lm(gpt2_tokenizer_dir):
    torch.manual_seed(0)
    tok = Tokenizer.from_pretrained(gpt2_tokenizer_dir)
    lm = LanguageModel.from_preset("gpt2", tok, n_layer=2, n_embd=32, n_head=2, n_positions=96, init_std=0.2)
    lm.model.eval()
    return lm


@pytest.fixture(scope="module")
def chat_lm():
    torch.manual_seed(1)
    words = ["hello", "there", "how", "are", "you", "fine", "thanks", "good", "morning", "왜요"] * 4
    tok = Tokenizer.train("bpe", words, 80, special_tokens=dict(SPECIALS), reserved_tokens=list(SPECIALS.values()))
    lm = LanguageModel.from_preset("gpt2", tok, n_layer=1, n_embd=32, n_head=2, n_positions=64, init_std=0.2)
    lm.model.eval()
    return lm


@pytest.fixture(scope="module")
def server(gpt2_lm):
    app = create_app(gpt2_lm, max_batch=8, served_model_name="tiny-gpt2")
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def chat_server(chat_lm):
    app = create_app(chat_lm, max_batch=8, served_model_name="tiny-chat")
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def brute_force_greedy(lm, prompt: str, steps: int, top: int = 0):
    """(token ids, their log-probabilities, top alternatives) of greedy decoding by full forward passes."""
    ids = lm.tokenizer.encode(prompt)
    out, logprobs, tops = [], [], []
    with torch.no_grad():
        for _ in range(steps):
            logits = lm.model(torch.tensor([ids + out]))[0, -1].float()
            lp = torch.log_softmax(logits, -1)
            token = int(lp.argmax())
            out.append(token)
            logprobs.append(float(lp[token]))
            values, index = lp.topk(top) if top else (torch.empty(0), torch.empty(0, dtype=torch.long))
            tops.append([(int(i), float(v)) for v, i in zip(values, index)])
            if token == lm.tokenizer.eos_token_id:
                break
    return out, logprobs, tops


# Completions through the openai client ----------------------------------------------------------------
def test_greedy_completion_equals_generate_and_brute_force_with_logprobs(client, gpt2_lm):
    ids, logprobs, tops = brute_force_greedy(gpt2_lm, PROMPT, 12, top=3)
    r = client.completions.create(model="tiny-gpt2", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3)
    choice = r.choices[0]
    assert choice.text == gpt2_lm.generate(PROMPT, max_new_tokens=12, include_prompt=False)
    assert choice.text == gpt2_lm.tokenizer.decode(ids)
    assert choice.finish_reason == "length"
    lp = choice.logprobs
    assert lp.tokens == [gpt2_lm.tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs == pytest.approx(logprobs, abs=1e-4)
    for alternatives, expected, token in zip(lp.top_logprobs, tops, lp.tokens):
        assert len(alternatives) == 3 and max(alternatives, key=alternatives.get) == token
        assert sorted(alternatives.values(), reverse=True) == pytest.approx([v for _, v in expected], abs=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    n_prompt = len(gpt2_lm.tokenizer.encode(PROMPT))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 12, n_prompt + 12)
    assert r.model == "tiny-gpt2" and r.object == "text_completion" and r.id.startswith("cmpl-")


def test_streamed_completion_matches_and_reports_usage(client, gpt2_lm):
    expected = client.completions.create(model="tiny-gpt2", prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model="tiny-gpt2", prompt=PROMPT, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) >= 2  # it did stream
    assert "".join(c.choices[0].text for c in text_chunks) == expected.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == len(gpt2_lm.tokenizer.encode(PROMPT))
    assert len({c.id for c in chunks}) == 1


def test_stop_string_split_across_tokens_stops_and_is_cut(client, gpt2_lm):
    ids, _, _ = brute_force_greedy(gpt2_lm, PROMPT, 16)
    pieces = [gpt2_lm.tokenizer.decode([t]) for t in ids]
    full = "".join(pieces)
    k = next(i for i in range(2, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][:2]  # spans the boundary of tokens k and k+1
    expected = full[:full.find(stop)]
    r = client.completions.create(model="tiny-gpt2", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny-gpt2", prompt=PROMPT, max_tokens=16, temperature=0, stop=stop,
                                         stream=True)
    parts = [(c.choices[0].text, c.choices[0].finish_reason) for c in streamed]
    assert "".join(p for p, _ in parts) == expected and parts[-1][1] == "stop"


def test_seed_reproducible_and_n_choices_use_seed_plus_index(client):
    kw = dict(model="tiny-gpt2", prompt=PROMPT, max_tokens=8, temperature=1.0)
    a = client.completions.create(seed=11, **kw).choices[0].text
    b = client.completions.create(seed=11, **kw).choices[0].text
    c = client.completions.create(seed=12, **kw).choices[0].text
    assert a == b and a != c
    many = client.completions.create(seed=11, n=3, **kw)
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    assert [ch.text for ch in many.choices][:2] == [a, c]
    assert many.usage.completion_tokens == sum(len(client.completions.create(seed=11 + i, logprobs=0, **kw)
                                                   .choices[0].logprobs.tokens) for i in range(3))


def test_prompt_list_echo_and_token_prompts(client, gpt2_lm):
    greedy = dict(model="tiny-gpt2", max_tokens=4, temperature=0)
    r = client.completions.create(prompt=["Hello", "Goodbye"], n=2, **greedy)
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    one = [gpt2_lm.generate(p, max_new_tokens=4, include_prompt=False) for p in ("Hello", "Goodbye")]
    assert texts == [one[0], one[0], one[1], one[1]]
    echoed = client.completions.create(prompt="Hello", echo=True, logprobs=1, **greedy).choices[0]
    assert echoed.text == "Hello" + one[0]
    assert echoed.logprobs.token_logprobs[0] is None and len(echoed.logprobs.tokens) == 1 + 4
    ids = gpt2_lm.tokenizer.encode("Goodbye")
    assert client.completions.create(prompt=ids, **greedy).choices[0].text == one[1]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-gpt2"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)


# Chat -----------------------------------------------------------------------------------------------------
def test_chat_renders_the_template_like_chat_session(chat_server, chat_lm):
    client = openai.OpenAI(base_url=chat_server.url + "/v1", api_key="x", max_retries=0, timeout=30)
    messages = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "fine thanks"},
                {"role": "user", "content": "how are you"}]
    r = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10, temperature=0)
    session = ChatSession(chat_lm, history=[("hello there", "fine thanks")], options=dict(max_new_tokens=10))
    expected = session.ask("how are you")[0]
    assert session.last_prompt == "<s>hello there</s><s>fine thanks</s><s>how are you</s><s>"
    assert r.choices[0].message.content.strip() == expected
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    assert r.choices[0].finish_reason == ("stop" if session.last_finished[0] else "length")
    assert r.usage.prompt_tokens == len(chat_lm.tokenizer.encode(session.last_prompt))
    stream = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}, logprobs=True,
                                            top_logprobs=2)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content.strip() == expected
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    with_lp = [c for c in chunks if c.choices and c.choices[0].logprobs]
    assert with_lp and all(len(c.choices[0].logprobs.content[0].top_logprobs) == 2 for c in with_lp)


def test_chat_on_a_model_without_template_is_a_clear_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-gpt2", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert "no chat template" in info.value.message
    assert info.value.status_code == 400


# Errors ---------------------------------------------------------------------------------------------------
def _assert_error(response, status: int, param: str | None = None, words: str = ""):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    message = err["message"]
    assert message.endswith(".") and "\n" not in message and "Traceback" not in message, message
    if param is not None:
        assert err["param"] == param
    assert words.lower() in message.lower(), message
    return err


@pytest.mark.parametrize("body,param,words", [
    # decoding options get GenerationConfig's sentence, the one the API and the CLI give
    ({"prompt": "x", "temperature": "hot"}, "temperature", "temperature must be a number in [0, 100], got 'hot'."),
    ({"prompt": "x", "temperature": 250}, "temperature", "temperature must be a number in [0, 100], got 250."),
    ({"prompt": "x", "top_p": -0.1}, "top_p", "top_p must be a number in (0, 1], got -0.1."),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "max_new_tokens must be an integer of at least 1, got 0."),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens", "integer of at least 1"),
    ({"prompt": "x", "n": True}, "n", "num_return_sequences must be an integer of at least 1, got True."),
    ({"prompt": "x", "stop": [1, 2]}, "stop", "string or a list of strings"),
    ({"prompt": "x", "logprobs": 50}, "logprobs", "logprobs must be an integer from 0 to 20, got 50."),
    ({"prompt": "x", "frobnicate": 1}, "frobnicate", "The request field 'frobnicate' is not supported."),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, None, "only allowed when stream is true"),
    ({"prompt": "x", "max_tokens": 96}, "max_tokens", "context of 96 tokens"),
    ({"prompt": [], "max_tokens": 2}, "prompt", "empty"),
    ({"prompt": [10 ** 9]}, "prompt", "outside the model's vocabulary"),
    ({"prompt": {"text": "x"}}, "prompt", "must be a string"),
    ({"max_tokens": 2}, "prompt", "missing"),
    ({"prompt": "x", "use_beam_search": True}, "use_beam_search", "beam search"),
    ({"prompt": "x", "best_of": 3}, "best_of", "best_of"),
    ({"prompt": "x", "n": 9}, None, "max_batch"),
])
def test_bad_completion_requests_get_one_sentence_400(server, body, param, words):
    _assert_error(httpx.post(server.url + "/v1/completions", json=body), 400, param, words)


def test_bad_chat_requests_and_malformed_bodies(chat_server, server):
    url = chat_server.url + "/v1/chat/completions"
    _assert_error(httpx.post(url, json={"messages": []}), 400, "messages", "at least 1")
    _assert_error(httpx.post(url, json={"messages": [{"role": "robot", "content": "x"}]}), 400, "messages[0].role")
    _assert_error(httpx.post(url, json={"messages": [{"role": "user", "content": 5}]}), 400, "messages[0].content")
    _assert_error(httpx.post(url, json={"messages": [{"role": "assistant", "content": "x"}]}), 400, "messages",
                  "last message")
    _assert_error(httpx.post(url, json={"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}), 400,
                  None, "needs logprobs")
    user = [{"role": "user", "content": "x"}]
    _assert_error(httpx.post(url, json={"messages": user, "tools": [{"type": "function"}]}), 400, "tools")
    _assert_error(httpx.post(url, json={"messages": user, "response_format": {"type": "regex"}}), 400,
                  "response_format", "response_format must be")
    _assert_error(httpx.post(url, json={"messages": user, "logit_bias": {"5": 100}}), 400, "logit_bias")
    ok = httpx.post(url, json={"messages": user, "max_tokens": 2, "response_format": {"type": "text"}, "tools": []})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"
    for raw in (b"{", b"[1, 2]", b"\xff\xfe", b""):
        _assert_error(httpx.post(url, content=raw), 400, None, "json")
    _assert_error(httpx.get(server.url + "/v1/nothing"), 404, None, "no GET /v1/nothing")
    _assert_error(httpx.get(server.url + "/v1/completions"), 405)
    # Fields the server does not know are refused by name (above), never silently ignored.


def test_api_key_body_limit_and_cors(gpt2_lm):
    app = create_app(gpt2_lm, api_key="sekret", max_body_bytes=2048, served_model_name="m")
    with LiveServer(app) as live:
        url = live.url + "/v1/completions"
        _assert_error(httpx.post(url, json={"prompt": "x"}), 401, None, "no API key")
        _assert_error(httpx.post(url, json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"}), 401, None,
                      "not valid")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=live.url + "/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(model="m", prompt="x", max_tokens=2).usage.completion_tokens == 2
        auth = {"Authorization": "Bearer sekret"}
        _assert_error(httpx.post(url, json={"prompt": "x" * 3000}, headers=auth), 413, None, "2,048 bytes")
        assert httpx.get(live.url + "/health").status_code == 200  # not behind the key
        # CORS is off unless asked for: no Access-Control-Allow-Origin header.
        pre = httpx.options(url, headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in pre.headers
    with LiveServer(create_app(gpt2_lm, cors="http://ok.example")) as live:
        pre = httpx.options(live.url + "/v1/completions", headers={"Origin": "http://ok.example",
                                                                   "Access-Control-Request-Method": "POST"})
        assert pre.headers["access-control-allow-origin"] == "http://ok.example"


# Queue, 429 and disconnects ---------------------------------------------------------------------------
def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    match = re.search(rf"^{re.escape(name)}(?:{{model=\"[^\"]*\"}})? (\S+)$", text, re.M)  # every series: model
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def _next_chunk(lines) -> dict:
    """The next data event of a stream's line iterator (kept by the caller: dropping an httpx line
    iterator closes the connection)."""
    for line in lines:
        if line.startswith("data: "):
            return json.loads(line[6:])
    raise AssertionError("no data")


def test_queue_429_and_disconnect_frees_the_slot(gpt2_tokenizer_dir):
    torch.manual_seed(0)
    tok = Tokenizer.from_pretrained(gpt2_tokenizer_dir)
    # Big enough that 900 tokens take seconds: the requests below are still running when we look.
    lm = LanguageModel.from_preset("gpt2", tok, n_layer=4, n_embd=256, n_head=4, n_positions=1024)
    lm.model.eval()
    with LiveServer(create_app(lm, max_batch=1, max_queue=1, served_model_name="slow")) as live:
        url = live.url + "/v1/completions"
        long = {"prompt": "a", "max_tokens": 900, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=30) as c1, httpx.Client(timeout=30) as c2:
            with c1.stream("POST", url, json=long) as first:
                first_lines = first.iter_lines()
                assert first.status_code == 200 and _next_chunk(first_lines)["choices"][0]["text"] is not None
                assert _metric(live.url, "gptgen_engine_active_slots") == 1
                with c2.stream("POST", url, json=dict(long, max_tokens=3)) as queued:
                    deadline = time.monotonic() + 5
                    while _metric(live.url, "gptgen_engine_queue_depth") < 1:
                        assert time.monotonic() < deadline
                        time.sleep(0.01)
                    full = httpx.post(url, json={"prompt": "b", "max_tokens": 2})
                    err = _assert_error(full, 429, None, "retry later")
                    assert err["type"] == "rate_limit_error" and full.headers["retry-after"] == "1"
                    with pytest.raises(openai.RateLimitError):
                        openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0).completions.create(
                            model="slow", prompt="c", max_tokens=2)
                    first.close()  # the client goes away mid-stream
                    # Its slot goes to the queued request, which now runs to the end.
                    lines = [ln for ln in queued.iter_lines() if ln.startswith("data: ")]
                    assert lines[-1] == "data: [DONE]"
                    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
            tokens_after = _metric(live.url, "gptgen_engine_tokens_generated_total")
            time.sleep(0.2)
            assert _metric(live.url, "gptgen_engine_tokens_generated_total") == tokens_after  # nothing runs on
            assert tokens_after < 900  # the first request did not run to its end
            assert _metric(live.url, "gptgen_engine_active_slots") == 0
            assert _metric(live.url, "gptgen_requests_cancelled_total") == 1
            assert _metric(live.url, "gptgen_requests_running") == 0
            text = httpx.get(live.url + "/metrics").text
            assert 'gptgen_requests_total{model="slow",endpoint="/v1/completions",status="429"} 2' in text
            assert 'gptgen_time_to_first_token_seconds_count{model="slow"} 2' in text
            assert 'gptgen_queue_time_seconds_count{model="slow"} 2' in text  # the two that ran
            assert 'gptgen_prefill_time_seconds_count{model="slow"} 2' in text


# The command ------------------------------------------------------------------------------------------
def test_gptgen_serve_command_serves_a_model_directory(gpt2_lm, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    model_dir = gpt2_lm.save(tmp_path / "my-model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "gptgen", "serve", "--model", str(model_dir), "--port", str(port),
                             "--api-key", "k", "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "gptgen serve did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["my-model"]  # the directory's name
        r = client.completions.create(model="my-model", prompt=PROMPT, max_tokens=5, temperature=0)
        assert r.choices[0].text == gpt2_lm.generate(PROMPT, max_new_tokens=5, include_prompt=False)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert "serving my-model" in out and "Traceback" not in out


def test_gptgen_serve_bad_flags_exit_2(tmp_path, capsys):
    from gptgen.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "error" in capsys.readouterr().err


def test_an_engine_passed_in_is_used_and_sets_the_context(gpt2_lm):
    from fastapi.testclient import TestClient

    from gptgen.generation.batcher import BatchEngine

    with BatchEngine(gpt2_lm, max_batch=2, max_context=48) as engine:
        app = create_app(gpt2_lm, engine=engine, served_model_name="shared")
        with TestClient(app) as http:
            assert http.get("/v1/models").json()["data"][0]["max_model_len"] == 48
            ok = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
            assert ok.json()["choices"][0]["text"] == gpt2_lm.generate(PROMPT, max_new_tokens=4, include_prompt=False)
            _assert_error(http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 47}), 400, "max_tokens",
                          "context of 48 tokens")
        assert engine.stats()["requests_finished"] == 1  # the app did not close the engine it was given
        assert engine.generate(gpt2_lm.tokenizer.encode("x"))[0].completion_tokens == 16


@pytest.mark.parametrize("mode", ["int8", "int8-dynamic"])
def test_an_int8_model_is_served_with_its_own_greedy_text(gpt2_lm, mode):
    """`gptgen serve --quantize int8` loads through gptgen.load(quantize=...); the batch engine then runs
    the int8 layers and gives the text the per-call engine gives for the same quantized model (int8-dynamic:
    the per-call engine's native step and the batch engine's layers agree)."""
    import copy

    from fastapi.testclient import TestClient

    from gptgen.quantize import quantize_model

    lm = LanguageModel(quantize_model(copy.deepcopy(gpt2_lm.model), mode, compute_dtype=torch.float32),
                       gpt2_lm.tokenizer)
    want = lm.generate(PROMPT, max_new_tokens=6, include_prompt=False)
    with TestClient(create_app(lm, max_batch=4, served_model_name="int8")) as http:
        texts = [http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0}
                           ).json()["choices"][0]["text"] for _ in range(2)]
    assert texts == [want, want]


def test_gptgen_serve_passes_quantize_int8_to_load(monkeypatch, capsys):
    """`gptgen serve --quantize int8` reaches gptgen.load (the load is stopped there, before serving)."""
    import uvicorn

    import gptgen.lm
    from gptgen.cli import main
    from gptgen.errors import GptgenError

    seen = {}

    def fake_load(model, **kwargs):
        seen.update(kwargs, model=model)
        raise GptgenError("stopped before serving.")

    def run(app, **kw):  # uvicorn stubbed: the loading app's build runs as it would once the port is bound
        try:
            app.build()
        except GptgenError as exc:
            app.error = exc

    monkeypatch.setattr(gptgen.lm, "load", fake_load)
    monkeypatch.setattr(uvicorn, "run", run)
    assert main(["serve", "--model", "m", "--quantize", "int8"]) == 2
    assert seen["model"] == "m" and seen["quantize"] == "int8"
    assert "stopped before serving." in capsys.readouterr().err


def test_gptgen_serve_compile_warms_the_engine_up_before_serving(monkeypatch, capsys, gpt2_lm):
    """`gptgen serve --compile` on CPU serves an app over BatchEngine(compile=True) whose warm-up ran (and
    was timed) before uvicorn started, so the app's own start-up warm-up has nothing left to do (warm-up
    and uvicorn stubbed: no compile, no socket)."""
    import gptgen.native

    monkeypatch.setattr(gptgen.native, "decoder", lambda model: None)  # inductor's step (the native one compiles nothing)
    import uvicorn

    import gptgen.lm
    from gptgen.cli import main
    from gptgen.generation.batcher import BatchEngine

    seen = {"warm_ups": 0}
    monkeypatch.setattr(gptgen.lm, "load", lambda model, **kw: gpt2_lm)

    def warm_up(self):
        seen["warm_ups"] += 1
        seen["started"] = self._thread is not None
        return 1.5

    def run(app, **kw):  # the loading app builds the real one (load, create_app, warm-up) once the port is bound
        real = app.build()
        seen["engine"] = real.state.gptgen.engine
        seen["warm_ups_before_serving"] = seen["warm_ups"]

    monkeypatch.setattr(BatchEngine, "warm_up", warm_up)
    monkeypatch.setattr(uvicorn, "run", run)
    monkeypatch.setattr("gptgen.generation.runner.shutil.which", lambda name: f"/usr/bin/{name}")
    assert main(["serve", "--model", "m", "--compile", "--max-batch", "3"]) == 0
    assert seen["warm_ups_before_serving"] == 1 and seen["started"] is False
    assert seen["engine"].runner.compile is True and seen["engine"].max_batch == 3
    assert "compiled in 1.5 s" in capsys.readouterr().out


def test_serve_compile_says_there_is_nothing_to_compile_when_the_native_step_runs(monkeypatch, capsys, gpt2_lm):
    """gptgen serve --compile on a model the native step decodes: no warm-up, and one line saying why."""
    import uvicorn

    import gptgen.lm
    import gptgen.native
    from gptgen.cli import main
    from gptgen.generation.batcher import BatchEngine

    if gptgen.native.decoder(gpt2_lm.model) is None:
        pytest.skip("the native step does not run here")
    seen = {"warm_ups": 0}
    monkeypatch.setattr(gptgen.lm, "load", lambda model, **kw: gpt2_lm)
    monkeypatch.setattr(BatchEngine, "warm_up", lambda self: seen.__setitem__("warm_ups", seen["warm_ups"] + 1) or 0.0)

    def run(app, **kw):
        seen["engine"] = app.build().state.gptgen.engine

    monkeypatch.setattr(uvicorn, "run", run)
    assert main(["serve", "--model", "m", "--compile", "--max-batch", "2"]) == 0
    out = capsys.readouterr().out
    assert seen["engine"].runner.backend == "native" and seen["warm_ups"] == 0
    assert "nothing to compile" in out and "native one-token step" in out and "compiled in" not in out


def test_create_app_compile_warms_its_engine_up_before_starting_it(monkeypatch, gpt2_lm):
    """create_app(lm, compile=True) builds BatchEngine(compile=True) and runs its warm-up in the app's
    lifespan, before the engine thread starts (warm-up stubbed: no compile)."""
    import gptgen.native

    monkeypatch.setattr(gptgen.native, "decoder", lambda model: None)  # inductor's step (the native one compiles nothing)
    from fastapi.testclient import TestClient

    from gptgen.generation.batcher import BatchEngine

    seen = []
    monkeypatch.setattr("gptgen.generation.runner.shutil.which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(BatchEngine, "warm_up", lambda self: seen.append(self._thread is None) or 0.5)
    app = create_app(gpt2_lm, max_batch=2, compile=True)
    assert app.state.gptgen.engine.runner.compile is True and not seen
    with TestClient(app) as http:
        assert seen == [True]
        # one token: it comes from the prefill, so no decode step compiles here
        assert http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1, "temperature": 0}
                         ).json()["choices"][0]["text"] == gpt2_lm.generate(PROMPT, max_new_tokens=1,
                                                                           include_prompt=False)
