"""Structured output (response_format) through llguidance: JSON schemas, JSON objects, regular expressions and
grammars, in the batch engine (masks per row: constrained and free rows share a batch), lm.generate and the
server. Oracles: json.loads and jsonschema's validator on every answer; free rows against their solo runs."""

from __future__ import annotations

import json
import re
import threading

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from gptgen import GenerationConfig, GenerationError, LanguageModel, Tokenizer  # noqa: E402
from gptgen.generation.batcher import BatchEngine  # noqa: E402
from gptgen.generation.grammar import compile_constraint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "size": {"enum": ["S", "M", "L"]},
    },
    "required": ["name", "age", "member", "tags", "size"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    tok = Tokenizer.train("byte-bpe", ['{"name": "Anne", "age": 27, "member": true, "tags": ["red"]}'] * 20, 300)
    model = LanguageModel.from_preset("gpt2", tok, n_layer=1, n_embd=32, n_head=2, n_positions=128, init_std=0.2)
    model.model.eval()
    return model


def _run_all(engine, jobs):
    """Submit every (prompt ids, config) at once; their completions' texts in order."""
    texts = [""] * len(jobs)
    reasons = [None] * len(jobs)
    done = threading.Semaphore(0)

    def on_event(i):
        def handle(event):
            texts[i] += event.text
            if event.finish_reason is not None:
                reasons[i] = event.finish_reason
                done.release()
        return handle

    for i, (ids, config) in enumerate(jobs):
        engine.submit(ids, config, on_event(i))
    for _ in jobs:
        assert done.acquire(timeout=120)
    return texts, reasons


def test_200_seeded_json_schema_requests_all_validate_beside_free_ones(lm):
    tok = lm.tokenizer
    constrained = [(tok.encode(f"person {i}:"), GenerationConfig(max_new_tokens=100, do_sample=True, seed=i,
                                                                 response_format=JSON_SCHEMA))
                   for i in range(200)]
    free = [(tok.encode(f"free {i}"), GenerationConfig(max_new_tokens=12, do_sample=True, top_k=40, seed=1000 + i))
            for i in range(12)]
    jobs = []
    for i, job in enumerate(constrained):  # the free requests spread among the constrained ones
        jobs.append(job)
        if i % 17 == 0 and len(jobs) - i - 1 < len(free):
            jobs.append(free[len(jobs) - i - 1])
    assert sum(1 for j in jobs if j[1].response_format is None) == len(free)
    with BatchEngine(lm, max_batch=16) as engine:
        texts, reasons = _run_all(engine, jobs)
    validator = jsonschema.Draft202012Validator(SCHEMA)
    answers = [(t, r) for t, r, j in zip(texts, reasons, jobs) if j[1].response_format is not None]
    assert len(answers) == 200
    distinct = set()
    for text, reason in answers:
        assert reason == "stop", text
        validator.validate(json.loads(text))  # parses, and fits the schema
        distinct.add(text)
    assert len(distinct) > 150  # seeded sampling inside the grammar, not one forced answer
    # Free rows that shared every batch with constrained ones equal their solo runs, byte for byte.
    shared = [t for t, j in zip(texts, jobs) if j[1].response_format is None]
    with BatchEngine(lm, max_batch=16) as engine:
        solo = [engine.generate(ids, config)[0].text for ids, config in free]
    assert shared == solo


def test_lm_generate_takes_regex_grammar_and_schema(lm):
    regex = lm.generate("code:", response_format={"type": "regex", "regex": r"[A-Z]{2}-[0-9]{3}"}, do_sample=True,
                        seed=3, max_new_tokens=20, include_prompt=False, num_return_sequences=4)
    assert len(regex) == 4 and all(re.fullmatch(r"[A-Z]{2}-[0-9]{3}", r) for r in regex), regex
    grammar = 'start: "yes" | "no" | "maybe " NUMBER\nNUMBER: /[0-9]{1,2}/'
    answers = lm.generate(["q1", "q2", "q3"], response_format={"type": "grammar", "grammar": grammar}, do_sample=True,
                          seed=5, max_new_tokens=10, include_prompt=False)
    assert all(re.fullmatch(r"yes|no|maybe [0-9]{1,2}", a) for a in answers), answers
    doc = lm.generate("x", response_format=JSON_SCHEMA, sampler="greedy", max_new_tokens=100, include_prompt=False)
    jsonschema.validate(json.loads(doc), SCHEMA)
    anything = lm.generate("x", response_format={"type": "json_object"}, do_sample=True, seed=1, max_new_tokens=3,
                           include_prompt=False)
    assert anything.startswith("{")
    with pytest.raises(GenerationError, match="beam"):
        lm.generate("x", response_format=JSON_SCHEMA, num_beams=2, max_new_tokens=4)


def test_bad_formats_are_one_sentence(lm):
    with pytest.raises(GenerationError, match="cannot be used"):
        compile_constraint(lm.tokenizer, {"type": "json_schema", "json_schema": {"schema": {"type": "strng"}}})
    with pytest.raises(GenerationError, match="needs a schema"):
        compile_constraint(lm.tokenizer, {"type": "json_schema", "json_schema": {"name": "x"}})
    with pytest.raises(GenerationError, match="regex"):
        compile_constraint(lm.tokenizer, {"type": "regex", "regex": "("})
    assert compile_constraint(lm.tokenizer, {"type": "text"}) is None
    assert compile_constraint(lm.tokenizer, JSON_SCHEMA) is compile_constraint(lm.tokenizer, JSON_SCHEMA)  # cached


def test_mask_allows_exactly_the_tokens_that_keep_the_regex_possible(lm):
    """Brute force over the vocabulary: a token is allowed iff the text with it is still a prefix of a match."""
    tok = lm.tokenizer
    pattern = r"(ab|cd)[0-9]{2}"
    row = compile_constraint(tok, {"type": "regex", "regex": pattern}).new_row()
    prefixes = {m[:k] for m in (f"{a}{d:02d}" for a in ("ab", "cd") for d in range(100)) for k in range(1, 5)}
    text = ""
    for step in range(3):
        mask = row.allowed_mask(tok.vocab_size)
        expected = set()
        for t in range(tok.vocab_size):
            piece = tok.decode([t])
            if piece and "\ufffd" not in piece and (text + piece) in prefixes | {m for m in prefixes}:
                expected.add(t)
        allowed = {t for t in mask.nonzero().flatten().tolist() if t != tok.eos_token_id}
        assert expected <= allowed, (text, sorted(expected - allowed))
        assert all((text + tok.decode([t])) in prefixes or len(text + tok.decode([t])) == 4 for t in allowed), text
        choice = min(expected)
        row.accept(choice)
        text += tok.decode([choice])


def test_server_answers_json_schema_and_refuses_a_bad_one(lm):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from gptgen.serve import create_app
    from serve_live import LiveServer

    app = create_app(lm, max_batch=4, served_model_name="m", chat_template="plain")
    with LiveServer(app) as live:
        body = {"model": "m", "prompt": "x", "max_tokens": 100, "seed": 4, "temperature": 1.0, "n": 3,
                "response_format": JSON_SCHEMA}
        r = httpx.post(live.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            jsonschema.validate(json.loads(choice["text"]), SCHEMA)
        chat = {"model": "m", "messages": [{"role": "user", "content": "who?"}], "max_tokens": 100,
                "response_format": JSON_SCHEMA, "temperature": 0}
        r = httpx.post(live.url + "/v1/chat/completions", json=chat, timeout=60)
        assert r.status_code == 200, r.text
        jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), SCHEMA)
        bad = dict(body, response_format={"type": "json_schema", "json_schema": {"schema": {"type": "strng"}}})
        r = httpx.post(live.url + "/v1/completions", json=bad, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
