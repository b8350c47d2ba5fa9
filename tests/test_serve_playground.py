"""The web playground end to end in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright for
Python): type a prompt, generate, watch the text stream in, press stop, switch to chat and get a reply.

Set GPTGEN_UPDATE_SCREENSHOTS=1 to refresh docs/img/playground*.png from this run."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")

from gptgen import LanguageModel, Tokenizer  # noqa: E402
from gptgen.serve import create_app  # noqa: E402
from serve_live import LiveServer  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
DOCS_IMG = Path(__file__).resolve().parents[1] / "docs" / "img"
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} not installed")]


def _metric(url: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)}(?:{{model=\"[^\"]*\"}})? (\S+)$", httpx.get(url + "/metrics").text, re.M)
    return float(match.group(1))


@pytest.mark.slow
def test_playground_streams_stops_and_chats(gpt2_tokenizer_dir, tmp_path):
    torch.manual_seed(0)
    tok = Tokenizer.from_pretrained(gpt2_tokenizer_dir)
    # Slow enough (a few ms a token) that a 900-token answer is still streaming when stop is pressed.
    lm = LanguageModel.from_preset("gpt2", tok, n_layer=4, n_embd=256, n_head=4, n_positions=1024)
    lm.model.eval()
    app = create_app(lm, max_batch=4, served_model_name="playground-model", chat_template="plain")
    shots = []
    with LiveServer(app) as live, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1180, "height": 760})
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(live.url + "/")
            sync_api.expect(page.locator("#model")).to_contain_text("playground-model")

            # Complete: text streams in, then stop cancels the request on the server.
            page.fill("#prompt", "Once upon a time")
            page.fill("#max_tokens", "900")
            page.fill("#seed", "7")
            page.click("#generate")
            sync_api.expect(page.locator("#status")).to_have_text("generating…")
            page.wait_for_function("document.querySelector('#out-text').textContent.length > 40")
            first = len(page.text_content("#out-text"))
            page.wait_for_function(f"document.querySelector('#out-text').textContent.length > {first + 20}")
            assert page.is_enabled("#stop") and page.is_disabled("#generate")
            assert "tokens/s" in page.text_content("#speed")
            page.click("#stop")
            sync_api.expect(page.locator("#status")).to_have_text("stopped")
            stopped_at = page.text_content("#out-text")
            page.wait_for_timeout(300)
            assert page.text_content("#out-text") == stopped_at  # nothing arrives after stop
            assert page.text_content("#out-prompt") == "Once upon a time"
            deadline = 50
            while _metric(live.url, "gptgen_requests_cancelled_total") < 1 and deadline:
                page.wait_for_timeout(100)
                deadline -= 1
            assert _metric(live.url, "gptgen_requests_cancelled_total") == 1
            assert _metric(live.url, "gptgen_engine_active_slots") == 0
            shots.append(tmp_path / "playground.png")
            page.screenshot(path=str(shots[-1]))

            # Chat: the conversation keeps the question and the streamed reply.
            page.click("#mode-chat")
            assert page.is_visible("#chat-pane") and not page.is_visible("#complete-pane")
            page.fill("#max_tokens", "16")
            page.fill("#message", "Where is the castle?")
            page.click("#generate")
            sync_api.expect(page.locator("#status")).to_have_text(re.compile(r"^done"), timeout=30_000)
            bubbles = page.locator("#conversation .msg")
            sync_api.expect(bubbles).to_have_count(2)
            assert bubbles.nth(0).text_content() == "Where is the castle?"
            assert "user" in bubbles.nth(0).get_attribute("class")
            reply = bubbles.nth(1).text_content()
            assert reply.strip() and "assistant" in bubbles.nth(1).get_attribute("class")
            assert re.search(r"\d+ tokens, [\d.]+ tokens/s", page.text_content("#speed"))
            # A second turn: the prompt carries the first exchange, so it is longer than the question alone.
            before = _metric(live.url, "gptgen_prompt_tokens_total")
            page.fill("#message", "And the king?")
            page.click("#generate")
            sync_api.expect(bubbles).to_have_count(4)
            sync_api.expect(page.locator("#status")).to_have_text(re.compile(r"^done"), timeout=30_000)
            second_prompt = _metric(live.url, "gptgen_prompt_tokens_total") - before
            first_turn = len(tok.encode("Q: Where is the castle?\nA: "))
            assert second_prompt > first_turn + len(tok.encode(reply))
            shots.append(tmp_path / "playground-chat.png")
            page.screenshot(path=str(shots[-1]))
            assert not errors, errors
        finally:
            browser.close()
    assert all(s.stat().st_size > 10_000 for s in shots)
    if os.environ.get("GPTGEN_UPDATE_SCREENSHOTS") == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        for shot in shots:
            shutil.copy(shot, DOCS_IMG / shot.name)


def test_playground_error_mid_stream_greedy_controls_and_json_mode(monkeypatch):
    """A stream the engine fails midway reads as an error, not "done"; greedy disables temperature, top-k
    and top-p; the JSON mode toggle sends response_format json_object and the answer parses."""
    import json

    pytest.importorskip("llguidance")
    from gptgen.generation.batcher import BatchEngine

    torch.manual_seed(0)
    # a SentencePiece-style BPE: every token is whole text (no byte pieces), so each token gets its own span
    tok = Tokenizer.train("bpe", ['{"name": "Anne", "age": 27} hello there, 0123456789 abc'] * 20, 200,
                          special_tokens={"bos": "<s>", "eos": "</s>", "unk": "<unk>"},
                          reserved_tokens=["<s>", "</s>", "<unk>"])
    lm = LanguageModel.from_preset("gpt2", tok, n_layer=1, n_embd=32, n_head=2, n_positions=256, init_std=0.2)
    lm.model.eval()
    app = create_app(lm, max_batch=2, served_model_name="small", chat_template="plain")
    real_commit = BatchEngine._commit

    def failing_commit(self, seq, token, logprob, top):  # a prompt of "FAIL" breaks after 3 tokens
        if seq.request.prompt_ids == tok.encode("FAIL") and len(seq.tokens) == 3:
            return self._finish_seq(seq, "error")
        return real_commit(self, seq, token, logprob, top)

    monkeypatch.setattr(BatchEngine, "_commit", failing_commit)
    with LiveServer(app) as live, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-background-networking"])
        try:
            page = browser.new_page()
            page.goto(live.url + "/")
            sync_api.expect(page.locator("#model")).to_contain_text("small")
            page.select_option("#sampler", "greedy")
            assert page.is_disabled("#temperature") and page.is_disabled("#top_k") and page.is_disabled("#top_p")
            page.select_option("#sampler", "top_k")
            assert page.is_enabled("#temperature") and page.is_enabled("#top_k") and page.is_disabled("#top_p")

            page.fill("#prompt", "FAIL")
            page.fill("#max_tokens", "50")
            page.click("#generate")
            sync_api.expect(page.locator("#status")).to_have_text("error")
            sync_api.expect(page.locator("#error")).to_contain_text("failed")

            # Token probabilities: one coloured span per token, the alternatives in its tooltip.
            page.select_option("#sampler", "greedy")
            page.check("#show_probs")
            page.fill("#prompt", "hello")
            page.fill("#max_tokens", "12")
            page.click("#generate")
            sync_api.expect(page.locator("#status")).to_contain_text("done", timeout=30000)
            spans = page.locator("#out-text .tok")
            assert spans.count() >= 1
            assert "".join(spans.all_text_contents()) == page.text_content("#out-text")
            assert all("%" in (spans.nth(i).get_attribute("title") or "") for i in range(spans.count()))
            page.uncheck("#show_probs")

            page.fill("#prompt", "person:")
            page.fill("#max_tokens", "60")
            page.fill("#seed", "3")
            page.check("#json_mode")
            with page.expect_request("**/v1/completions") as sent:
                page.click("#generate")
            assert json.loads(sent.value.post_data)["response_format"] == {"type": "json_object"}
            sync_api.expect(page.locator("#status")).to_contain_text("done", timeout=30000)
            assert page.text_content("#out-text").startswith("{")  # the grammar's first token (validity: test_structured_output)
            page.uncheck("#json_mode")

            # n choices: each in its own block, each the text the API gives that choice (seed + i).
            page.select_option("#sampler", "random")
            page.fill("#prompt", "hello")
            page.fill("#max_tokens", "8")
            page.fill("#seed", "5")
            page.fill("#n", "2")  # the server has 2 slots
            with page.expect_request("**/v1/completions") as sent:
                page.click("#generate")
            assert json.loads(sent.value.post_data)["n"] == 2
            sync_api.expect(page.locator("#status")).to_contain_text("done", timeout=30000)
            shown = [page.text_content("#out-text")] + page.locator("#more-outputs .choice-text").all_text_contents()
            api = httpx.post(live.url + "/v1/completions", json={
                "model": "small", "prompt": "hello", "max_tokens": 8, "n": 2, "seed": 5, "temperature": 0.8})
            assert shown == [c["text"] for c in sorted(api.json()["choices"], key=lambda c: c["index"])]
            page.click("#mode-chat")
            assert page.is_disabled("#n")
        finally:
            browser.close()
