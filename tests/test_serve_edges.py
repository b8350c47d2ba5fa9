"""The server's edges: bodies refused before any work (media type, nesting, prompt bytes), request ids, CORS
preflights of the openai JS client, vLLM's /tokenize and /detokenize (oracle: the tokenizer and the chat
template), and a prompt tokenized off the event loop."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from gptgen import LanguageModel, Tokenizer  # noqa: E402
from gptgen.chat import get_template  # noqa: E402
from gptgen.serve import create_app  # noqa: E402
from serve_live import LiveServer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SPECIALS = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    tok = Tokenizer.train("byte-bpe", ["hello there how are you fine thanks"] * 10, 300,
                          special_tokens=dict(SPECIALS), reserved_tokens=list(SPECIALS.values()))
    model = LanguageModel.from_preset("gpt2", tok, n_layer=1, n_embd=32, n_head=2, n_positions=64, init_std=0.2)
    model.model.eval()
    return model


@pytest.fixture(scope="module")
def live(lm):
    app = create_app(lm, max_batch=4, served_model_name="m", chat_template="chatml",
                     cors=["https://app.example"], max_body_bytes=4 << 20)
    with LiveServer(app) as server:
        yield server


def _error(r, status, words):
    assert r.status_code == status, r.text
    assert words.lower() in r.json()["error"]["message"].lower(), r.text
    return r.json()["error"]


def test_bodies_refused_before_any_work(live):
    url = live.url + "/v1/completions"
    _error(httpx.post(url, content=b'{"prompt": "x"}', headers={"content-type": "text/plain"}), 415, "json")
    _error(httpx.post(url, content=b"prompt=x", headers={"content-type": "application/x-www-form-urlencoded"}),
           415, "json")
    deep = '{"prompt": "x", "response_format": ' + "[" * 5000 + "]" * 5000 + "}"
    _error(httpx.post(url, content=deep, headers={"content-type": "application/json"}), 400, "nests")
    deep_objects = '{"prompt": "x", "stop": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "}"
    _error(httpx.post(url, content=deep_objects, headers={"content-type": "application/json"}), 400, "nests")
    assert httpx.get(live.url + "/health").status_code == 200
    # A prompt larger in bytes than the context could hold in any tokens: refused before tokenizing.
    err = _error(httpx.post(url, json={"prompt": "hello " * 400_000, "max_tokens": 1}), 400, "bytes")
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    err = _error(httpx.post(live.url + "/v1/chat/completions",
                            json={"messages": [{"role": "user", "content": "hello " * 400_000}]}), 400, "bytes")
    assert err["param"] == "messages"


def test_request_ids_are_echoed_or_made(live):
    r = httpx.post(live.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                   headers={"X-Request-Id": "abc-123"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc-123"
    made = httpx.get(live.url + "/health").headers["x-request-id"]
    again = httpx.get(live.url + "/health").headers["x-request-id"]
    assert len(made) == 32 and made != again and int(made, 16) >= 0
    assert httpx.get(live.url + "/health", headers={"X-Request-Id": "x" * 500}).headers["x-request-id"] != "x" * 500


def test_cors_preflight_allows_any_request_header_for_allowed_origins(live):
    headers = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os, x-stainless-lang"}
    r = httpx.options(live.url + "/v1/chat/completions", headers=headers)
    assert r.status_code == 200
    assert "x-stainless-os" in r.headers["access-control-allow-headers"].lower()
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.options(live.url + "/v1/chat/completions", headers=dict(headers, Origin="https://evil.example"))
    assert other.headers.get("access-control-allow-origin") != "https://evil.example"


def test_tokenize_and_detokenize_as_vllm(live, lm):
    tok = lm.tokenizer
    r = httpx.post(live.url + "/tokenize", json={"model": "m", "prompt": "hello there", "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok.encode("hello there") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 64 and "".join(body["token_strs"]) == "hello there"
    messages = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello"}]
    r = httpx.post(live.url + "/tokenize", json={"messages": messages})
    expected = tok.encode(get_template("chatml", tok).apply(messages))
    assert r.json()["tokens"] == expected
    r = httpx.post(live.url + "/detokenize", json={"model": "m", "tokens": expected})
    assert r.json() == {"prompt": tok.decode(expected)}
    _error(httpx.post(live.url + "/detokenize", json={"tokens": [10 ** 6]}), 400, "outside")
    _error(httpx.post(live.url + "/tokenize", json={"prompt": "x", "frobnicate": 1}), 400, "frobnicate")
    _error(httpx.post(live.url + "/tokenize", json={}), 400, "either")


def test_a_long_prompt_is_tokenized_off_the_event_loop(lm, monkeypatch):
    """While one request's prompt is being tokenized (made slow here), /health still answers at once."""
    app = create_app(lm, max_batch=2, served_model_name="m")
    state = app.state.gptgen
    started, release = threading.Event(), threading.Event()
    real = state._completion_prompts

    def slow(prompt):
        started.set()
        release.wait(10)
        return real(prompt)

    monkeypatch.setattr(state, "_completion_prompts", slow)
    with LiveServer(app) as server:
        result = {}
        worker = threading.Thread(target=lambda: result.update(
            r=httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=30)))
        worker.start()
        assert started.wait(10)
        t0 = time.perf_counter()
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        waited = time.perf_counter() - t0
        release.set()
        worker.join(30)
    assert result["r"].status_code == 200 and waited < 2.0


def test_the_server_binds_first_and_is_ready_once_loaded(lm):
    """/health: 503 {"status": "loading"} while the model loads (liveness: it answers), 200 once ready."""
    from gptgen.serve.loading import LoadingApp

    release = threading.Event()

    def build():
        release.wait(20)
        return create_app(lm, max_batch=2, served_model_name="m")

    failures = []
    with LiveServer(LoadingApp(build, on_failure=failures.append)) as server:
        r = httpx.get(server.url + "/health")
        assert (r.status_code, r.json()) == (503, {"status": "loading"})
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "model_loading"
        release.set()
        deadline = time.monotonic() + 20
        while httpx.get(server.url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert not failures

    def broken():
        raise RuntimeError("no such model")

    with LiveServer(LoadingApp(broken, on_failure=failures.append)) as server:
        deadline = time.monotonic() + 10
        while not failures:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert httpx.get(server.url + "/health").status_code == 503
    assert str(failures[0]) == "no such model"


@pytest.mark.parametrize("kind", ["wordpiece", "byte-bpe"])
def test_logprob_tokens_join_back_into_the_text(kind):
    """Completions and chat: the logprobs' tokens concatenate to the answer and text_offset counts them, for a
    WordPiece model ("##" pieces, spaces the decoder adds) and a byte-level one (Korean: characters split
    over tokens)."""
    torch.manual_seed(3)
    words = ["hello there how are you fine thanks", "안녕하세요 반가워요 고마워요"] * 10
    if kind == "wordpiece":
        tok = Tokenizer.train("wordpiece", words, 120, special_tokens={"unk": "[UNK]", "eos": "[SEP]", "pad": "[PAD]"},
                              reserved_tokens=["[UNK]", "[SEP]", "[PAD]"])
    else:
        tok = Tokenizer.train("byte-bpe", words, 300)
    model = LanguageModel.from_preset("gpt2", tok, n_layer=1, n_embd=32, n_head=2, n_positions=64, init_std=0.2)
    app = create_app(model, max_batch=2, served_model_name="m", chat_template="plain")
    with LiveServer(app) as server:
        for echo in (False, True):
            r = httpx.post(server.url + "/v1/completions", json={
                "prompt": "hello there 안녕", "max_tokens": 12, "logprobs": 2, "echo": echo, "seed": 1,
                "temperature": 1.0, "ignore_eos": True}, timeout=30).json()["choices"][0]
            lp = r["logprobs"]
            joined = "".join(lp["tokens"])
            assert joined == (r["text"] if not echo else tok.decode(tok.encode("hello there 안녕")) +
                              r["text"][len("hello there 안녕"):])
            assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
        r = httpx.post(server.url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hello"}], "max_tokens": 12, "logprobs": True, "seed": 2,
            "temperature": 1.0}, timeout=30).json()["choices"][0]
        assert "".join(t["token"] for t in r["logprobs"]["content"]) == r["message"]["content"]
        # Streams: each chunk's tokens join into that chunk's text (a token's text may come a chunk later).
        with httpx.stream("POST", server.url + "/v1/completions", json={
                "prompt": "hello there 안녕", "max_tokens": 12, "logprobs": 1, "seed": 1, "temperature": 1.0,
                "ignore_eos": True, "stream": True}, timeout=30) as stream:
            chunks = [json.loads(line[6:]) for line in stream.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        tokens = 0
        for c in chunks:
            choice = c["choices"][0]
            if choice["logprobs"]:
                assert "".join(choice["logprobs"]["tokens"]) == choice["text"]
                tokens += len(choice["logprobs"]["tokens"])
        assert tokens == 12


@pytest.mark.parametrize("field,value", [("length_penalty", 2.0), ("early_stopping", True), ("penalty_alpha", 0.5),
                                         ("guided_json", {}), ("tool_choice", "auto"), ("skip_special_tokens", False)])
def test_fields_the_server_does_not_run_are_refused_by_name(live, field, value):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: value}
    err = _error(httpx.post(live.url + "/v1/chat/completions", json=body), 400, field)
    assert err["param"] in (field, None)
