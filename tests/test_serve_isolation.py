"""No request harms another: each harmful body is sent beside 31 clean seeded streams; every harmful one is
refused (4xx, one sentence) or completes, every clean stream equals its solo run byte for byte, and /health
answers 200 throughout. Oracle: the same clean requests run one at a time afterwards."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from gptgen import LanguageModel, Tokenizer  # noqa: E402
from gptgen.serve import create_app  # noqa: E402
from serve_live import LiveServer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CLEAN = 31

# (body fields or raw bytes, content type): what a careless or hostile client sends.
HARMFUL = [
    {"temperature": 1e-300}, {"repetition_penalty": 1e-300}, {"temperature": 1e300}, {"top_p": 1e-300},
    {"presence_penalty": 1e300}, {"frequency_penalty": -1e300}, {"top_k": 10 ** 12}, {"min_p": 1.0},
    {"max_tokens": 10 ** 12}, {"n": 10 ** 6}, {"seed": 2 ** 80}, {"logprobs": 10 ** 6},
    {"stop": ["x" * 100_000]}, {"bad_words": ["\ufffd" * 10]}, {"frobnicate": 1},
    {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
    {"prompt": [10 ** 9]}, {"prompt": "hello " * 300_000},
    b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "top_p": Infinity}',
    b'{"prompt": "x", "stop": ' + b"[" * 5000 + b"]" * 5000 + b"}", b"\xff\xfe", b'{"prompt": "x"',
]


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    tok = Tokenizer.train("byte-bpe", ["the sea was blue and the sky was grey over the town"] * 10, 300)
    model = LanguageModel.from_preset("gpt2", tok, n_layer=1, n_embd=32, n_head=2, n_positions=96, init_std=0.2)
    model.model.eval()
    return model


def _clean(i: int) -> dict:
    return {"model": "m", "prompt": ["the sea", "blue sky", "over the town"][i % 3], "max_tokens": 20,
            "temperature": 0.9, "top_k": 50, "seed": 100 + i, "stream": True}


async def _stream(client, url, body) -> str:
    text = ""
    async with client.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                assert "error" not in event, event
                text += "".join(c["text"] for c in event["choices"])
    return text


async def _harmful(client, url, item):
    if isinstance(item, bytes):
        return await client.post(url, content=item, headers={"content-type": "application/json"})
    return await client.post(url, json={"model": "m", "prompt": "the sea", "max_tokens": 8, **item})


async def _round(base: str, item):
    url = base + "/v1/completions"
    async with httpx.AsyncClient(timeout=60) as client:
        clean = [asyncio.create_task(_stream(client, url, _clean(i))) for i in range(CLEAN)]
        bad = asyncio.create_task(_harmful(client, url, item))
        health = await client.get(base + "/health")
        texts = await asyncio.gather(*clean)
        return texts, await bad, health.status_code


def test_harmful_bodies_beside_31_clean_streams(lm):
    app = create_app(lm, max_batch=32, max_queue=256, served_model_name="m")
    with LiveServer(app) as live:
        solo = [asyncio.run(_solo(live.url, i)) for i in range(CLEAN)]
        for item in HARMFUL:
            texts, bad, health = asyncio.run(_round(live.url, item))
            assert health == 200
            assert texts == solo, f"a clean stream changed beside {item!r:.80}"
            assert bad.status_code in (200, 400, 413, 415), (item, bad.text)
            if bad.status_code != 200:
                message = bad.json()["error"]["message"]
                assert message.endswith(".") and "Traceback" not in message, message
        assert httpx.get(live.url + "/health").status_code == 200


async def _solo(base: str, i: int) -> str:
    async with httpx.AsyncClient(timeout=60) as client:
        return await _stream(client, base + "/v1/completions", _clean(i))
