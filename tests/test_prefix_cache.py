"""Prefix caching in the batch engine: prompts that share leading tokens with a row's cache (a running
sequence or a finished one whose row is still free) start from a copy of its keys and values. Oracle: the
same requests through an engine without it, byte for byte."""

from __future__ import annotations

import threading

import pytest
import torch

from gptgen import GenerationConfig, LanguageModel, Tokenizer
from gptgen.generation.batcher import PREFIX_MIN, BatchEngine

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    tok = Tokenizer.train("byte-bpe", ["you are a helpful assistant who answers questions about the sea"] * 10, 300)
    model = LanguageModel.from_preset("gpt2", tok, n_layer=2, n_embd=32, n_head=2, n_positions=160, init_std=0.2)
    model.model.eval()
    return model


def _jobs(tok, count):
    system = tok.encode("you are a helpful assistant who answers questions about the sea. " * 3)
    few_shot = tok.encode("q: what is blue? a: the sea. q: what is grey? a: the sky. ")
    jobs = []
    for i in range(count):
        prefix = system + (few_shot if i % 3 else [])
        question = tok.encode(f" q: question number {i} about waves? a:")
        config = (GenerationConfig(max_new_tokens=12, do_sample=True, top_k=40, seed=i) if i % 2 else
                  GenerationConfig(max_new_tokens=12, do_sample=False))
        jobs.append((prefix + question, config))
    return jobs


def _run(engine, jobs, waves):
    """Submit the jobs in `waves` groups (each group at once, the next after it finished): later groups meet
    finished rows, earlier ones running rows."""
    out = [None] * len(jobs)
    size = -(-len(jobs) // waves)
    for start in range(0, len(jobs), size):
        done = threading.Semaphore(0)
        texts = {}

        def handler(i):
            def on_event(event):
                texts.setdefault(i, []).append(event.token_id)
                if event.finish_reason is not None:
                    out[i] = [t for t in texts[i] if t is not None]
                    done.release()
            return on_event

        group = range(start, min(len(jobs), start + size))
        for i in group:
            engine.submit(jobs[i][0], jobs[i][1], handler(i))
        for _ in group:
            assert done.acquire(timeout=60)
    return out


def test_outputs_identical_with_and_without_prefix_caching(lm):
    jobs = _jobs(lm.tokenizer, 100)
    with BatchEngine(lm, max_batch=8, prefix_caching=False) as plain:
        expected = _run(plain, jobs, waves=10)
        assert plain.stats()["prefix_cache_hits"] == 0
    with BatchEngine(lm, max_batch=8, prefix_caching=True) as cached:
        got = _run(cached, jobs, waves=10)
        stats = cached.stats()
    assert got == expected
    assert stats["prefix_cache_hits"] >= 80 and stats["prefix_tokens_reused"] >= 80 * PREFIX_MIN
    # The cached engine computed far fewer prompt tokens.
    assert stats["prompt_tokens"] < sum(len(p) for p, _ in jobs) / 2


def test_a_prompt_equal_to_a_cached_one_still_computes_its_last_token(lm):
    tok = lm.tokenizer
    prompt = tok.encode("you are a helpful assistant who answers questions about the sea")
    config = GenerationConfig(max_new_tokens=6, do_sample=False)
    with BatchEngine(lm, max_batch=2) as engine:
        first = engine.generate(prompt, config)[0].token_ids
        again = engine.generate(prompt, config)[0].token_ids
        assert engine.stats()["prefix_tokens_reused"] == len(prompt) - 1
    assert first == again


def test_the_server_flag_turns_prefix_caching_off(lm):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from gptgen.cli import build_parser
    from gptgen.serve import create_app

    args = build_parser().parse_args(["serve", "--model", "m", "--no-prefix-caching"])
    assert args.no_prefix_caching is True
    assert build_parser().parse_args(["serve", "--model", "m"]).no_prefix_caching is False
    system = "you are a helpful assistant who answers questions about the sea. " * 3
    body = {"model": "gptgen", "prompt": system + "q: why?", "max_tokens": 3, "temperature": 0}
    texts, hits = {}, {}
    for on in (True, False):
        app = create_app(lm, max_batch=2, prefix_caching=on)
        with TestClient(app) as client:
            texts[on] = [client.post("/v1/completions", json=body).json()["choices"][0]["text"] for _ in range(2)]
            hits[on] = app.state.gptgen.engine.stats()["prefix_cache_hits"]
    assert hits[True] >= 1 and hits[False] == 0
    assert texts[True] == texts[False]
