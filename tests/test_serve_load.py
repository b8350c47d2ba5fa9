"""A bounded load test: 200 concurrent streaming requests against one live server on loopback all finish
with complete, well-formed streams, and their greedy texts equal LanguageModel.generate's."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from gptgen import LanguageModel, Tokenizer  # noqa: E402
from gptgen.serve import create_app  # noqa: E402
from serve_live import LiveServer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CONCURRENT = 200
PROMPTS = ["Once upon a time", "The weather today", "In 1905, Einstein", "My favourite food is", "Hello"]


async def _stream(client: httpx.AsyncClient, url: str, i: int) -> dict:
    body = {"model": "load", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 6, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    chunks, done = [], False
    async with client.stream("POST", url, json=body) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: ") and not done, line  # nothing after [DONE]
            if line == "data: [DONE]":
                done = True
                continue
            chunks.append(json.loads(line[6:]))
    assert done
    return {"text": "".join(c["choices"][0]["text"] for c in chunks if c["choices"]),
            "finish": [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]],
            "usage": chunks[-1]["usage"], "ids": {c["id"] for c in chunks}}


async def _run_all(url: str) -> list[dict]:
    limits = httpx.Limits(max_connections=CONCURRENT + 10, max_keepalive_connections=CONCURRENT + 10)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return await asyncio.gather(*(_stream(client, url, i) for i in range(CONCURRENT)))


@pytest.mark.slow
def test_200_concurrent_streams_all_complete_and_match_generate(gpt2_tokenizer_dir):
    torch.manual_seed(0)
    tok = Tokenizer.from_pretrained(gpt2_tokenizer_dir)
    lm = LanguageModel.from_preset("gpt2", tok, n_layer=1, n_embd=32, n_head=2, n_positions=64, init_std=0.2)
    lm.model.eval()
    expected = {p: lm.generate(p, max_new_tokens=6, include_prompt=False) for p in PROMPTS}
    with LiveServer(create_app(lm, max_batch=32, max_queue=256, served_model_name="load")) as live:
        start = time.perf_counter()
        results = asyncio.run(_run_all(live.url + "/v1/completions"))
        elapsed = time.perf_counter() - start
        metrics = httpx.get(live.url + "/metrics").text
    assert len(results) == CONCURRENT
    for i, r in enumerate(results):
        prompt = PROMPTS[i % len(PROMPTS)]
        assert r["text"] == expected[prompt]
        assert r["finish"][-1] in ("length", "stop") and all(f is None for f in r["finish"][:-1])
        assert r["usage"]["prompt_tokens"] == len(tok.encode(prompt)) and len(r["ids"]) == 1
    assert len({next(iter(r["ids"])) for r in results}) == CONCURRENT
    assert f'gptgen_requests_total{{model="load",endpoint="/v1/completions",status="200"}} {CONCURRENT}' in metrics
    assert 'gptgen_requests_running{model="load"} 0' in metrics
    assert f'gptgen_queue_time_seconds_count{{model="load"}} {CONCURRENT}' in metrics
    assert elapsed < 60
