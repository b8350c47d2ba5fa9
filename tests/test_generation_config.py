"""GenerationConfig: one list of decoding options, judged the same by the API, the CLI and the server."""

from __future__ import annotations

import functools
import io
import json
import math
import threading
from pathlib import Path

import pytest
import torch

import gptgen
from gptgen import GenerationConfig, GenerationError
from gptgen.cli import main
from gptgen.generation import batcher as batcher_module
from gptgen.generation.batcher import BatchEngine
from gptgen.generation.config import markdown_table, numeric_options

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    tok = gptgen.Tokenizer.train("byte-bpe", ["the sea is blue and the sky is grey over the hills"] * 20,
                                 vocab_size=300, show_progress=False)
    return gptgen.LanguageModel.from_preset("mini", tok, n_layer=1, n_embd=32, n_head=2, n_inner=64,
                                            n_positions=64)


@pytest.fixture(scope="module")
def model_dir(lm, tmp_path_factory):
    return lm.save(tmp_path_factory.mktemp("m") / "model")


@pytest.fixture(scope="module")
def client(lm):
    from fastapi.testclient import TestClient

    from gptgen.serve import create_app

    with TestClient(create_app(lm, max_batch=8)) as c:
        yield c


# Edge values of every numeric option, from the class itself ---------------------------------------------
def _edges(spec) -> list:
    values = [0, -1, 1e-300, 1e300, math.nan, math.inf, -math.inf]
    for bound in (spec["low"], spec["high"]):
        if bound is None:
            continue
        if spec["kind"] == "int":
            values += [bound - 1, bound, bound + 1]
        else:
            values += [float(bound), math.nextafter(bound, -math.inf), math.nextafter(bound, math.inf)]
    out = []
    for v in values:  # distinct, keeping int and float apart (1 and 1.0 are different inputs)
        if not any(type(v) is type(w) and (v == w or (v != v and w != w)) for w in out):
            out.append(v)
    return out


CASES = [(name, value) for name, spec in numeric_options().items() for value in _edges(spec)]
BASE = dict(max_new_tokens=2, do_sample=True, seed=0)
# what the batch engine does not run (whole-batch samplers, other warpers): it refuses them, the rest runs
BATCH_ONLY_REFUSES = ("not available in the batch engine", "which the batching server does not run")


def _api(lm, name, value):
    try:
        lm.generate("the sea", **dict(BASE, **{name: value}))
    except GenerationError as exc:
        return str(exc)
    return None


def _cli(model_dir, capsys, name, value):
    flag = "--" + name.replace("_", "-")
    args = ["generate", "--model", str(model_dir), "the sea", "--max-new-tokens", "2", "--do-sample", "--seed", "0"]
    code = main(args + [f"{flag}={value!r}"])  # --flag=-inf: a value that starts with "-"
    err = capsys.readouterr().err
    assert code in (0, 2), err
    assert "Traceback" not in err
    return None if code == 0 else err.strip().removeprefix("gptgen: error: ")


def _server(client, name, value):
    key = {"max_new_tokens": "max_tokens", "num_return_sequences": "n"}.get(name, name)
    body = {"prompt": "the sea", "max_tokens": 2, "do_sample": True, "seed": 0, key: value}
    r = client.post("/v1/completions", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert r.status_code in (200, 400), r.text
    return None if r.status_code == 200 else r.json()["error"]["message"]


@pytest.mark.parametrize("name, value", CASES, ids=[f"{n}={v!r}" for n, v in CASES])
def test_api_cli_and_server_agree_on_every_numeric_option(lm, model_dir, client, capsys, name, value):
    api = _api(lm, name, value)
    if api is not None:  # refused: one sentence, the same everywhere
        assert api.endswith(".") and "\n" not in api
    if name in {a.dest for a in _parser_actions()}:
        assert _cli(model_dir, capsys, name, value) == api
    server = _server(client, name, value)
    if api is None and server is not None:
        assert any(words in server for words in BATCH_ONLY_REFUSES), server
    else:
        assert server == api


@functools.lru_cache(maxsize=1)
def _parser_actions():
    from gptgen.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["generate"]._actions


def test_every_option_has_a_spec_and_the_numeric_ones_are_enumerated():
    names = [f for f in GenerationConfig.__dataclass_fields__]
    for required in ("max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "sampler",
                     "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
                     "min_tokens_to_keep", "num_beams", "length_penalty", "early_stopping", "penalty_alpha",
                     "repetition_penalty", "presence_penalty", "frequency_penalty", "no_repeat_ngram_size",
                     "bad_words", "bad_words_ids", "eos_token_id", "pad_token_id", "stop", "stop_token_ids",
                     "include_stop_str_in_output", "ignore_eos", "num_return_sequences", "seed", "logprobs",
                     "response_format"):
        assert required in names
    assert len(CASES) > 150 and {n for n, _ in CASES} >= {"temperature", "top_p", "repetition_penalty", "seed"}


# Values that could once make a non-finite distribution ---------------------------------------------------
def test_tiny_temperature_acts_as_greedy_and_huge_penalties_are_refused(lm):
    greedy = lm.generate(["the sea", "blue"], max_new_tokens=6)
    assert lm.generate(["the sea", "blue"], max_new_tokens=6, do_sample=True, temperature=1e-300, seed=1) == greedy
    assert lm.generate(["the sea", "blue"], max_new_tokens=6, do_sample=True, temperature=100.0, seed=1)
    for bad in (1e-300, 0.0, 1e300, math.nan):
        with pytest.raises(GenerationError, match="repetition_penalty must be a number in"):
            GenerationConfig(repetition_penalty=bad)
    with pytest.raises(GenerationError, match="length_penalty"):
        GenerationConfig(length_penalty=1e300)


def test_temperature_scaling_is_finite_for_any_accepted_value():
    from gptgen.generation.samplers import apply_temperature

    scores = torch.tensor([[3.0e38, -3.0e38, 0.0, float("-inf")], [1.0, 2.0, float("-inf"), 0.5]])
    for t in (1e-300, 5e-324, 1e-40, 0.01, 0.5, 1.0, 2.0, 100.0):
        for temperature in (t, torch.tensor([t, t], dtype=torch.float64)):
            out = apply_temperature(scores, temperature)
            assert not torch.isnan(out).any() and not torch.isposinf(out).any()
            assert torch.equal(out.argmax(-1), scores.argmax(-1))
            assert torch.isfinite(torch.softmax(out, -1)).all()


# Config object, keyword form, model directory ------------------------------------------------------------
@pytest.mark.parametrize("options", [
    dict(max_new_tokens=8),
    dict(max_new_tokens=6, num_beams=3, length_penalty=0.7, num_return_sequences=2),
    dict(max_new_tokens=6, penalty_alpha=0.6, top_k=4),
    dict(max_new_tokens=8, do_sample=True, top_k=20, top_p=0.9, temperature=0.8, seed=5, num_return_sequences=2),
    dict(max_new_tokens=8, do_sample=True, presence_penalty=1.0, frequency_penalty=0.5, seed=2),
    dict(max_length=9, repetition_penalty=1.3, no_repeat_ngram_size=2, stop=["zz"], bad_words=["the"]),
])
def test_config_equals_the_keyword_form(lm, options):
    prompts = ["the sea", "grey over"]
    assert lm.generate(prompts, config=GenerationConfig(**options)) == lm.generate(prompts, **options)
    base = GenerationConfig(**options)
    assert lm.generate(prompts, config=base, max_new_tokens=3) == lm.generate(prompts, **dict(options, max_new_tokens=3))


def test_names_of_hf_kerashub_and_openai_map_onto_one_config():
    assert GenerationConfig.from_kwargs(max_tokens=5, n=2, min_tokens=1, do_sample=True) == GenerationConfig(
        max_new_tokens=5, num_return_sequences=2, min_new_tokens=1, do_sample=True)
    assert GenerationConfig.from_kwargs(sampler="top-k", max_length=20).sampler == "top_k"
    c = GenerationConfig.from_openai({"max_tokens": 7, "n": 3, "temperature": 0, "stop": "x", "min_tokens": 2,
                                      "stop_token_ids": [5], "include_stop_str_in_output": True, "logprobs": 2,
                                      "presence_penalty": 0.5, "response_format": {"type": "json_object"}})
    assert (c.max_new_tokens, c.num_return_sequences, c.do_sample, c.stop, c.min_new_tokens) == (7, 3, False, ("x",), 2)
    assert c.stop_token_ids == (5,) and c.include_stop_str_in_output and c.logprobs == 2
    assert c.response_format == {"type": "json_object"}
    assert GenerationConfig.from_openai({"response_format": {"type": "text"}}).response_format is None
    assert GenerationConfig(top_k=-1).top_k == 0 == GenerationConfig.from_openai({"top_k": -1}).top_k  # vLLM's off
    with pytest.raises(GenerationError, match="'best_off' is not supported"):
        GenerationConfig.from_openai({"best_off": 2})
    with pytest.raises(GenerationError, match="response_format must be"):
        GenerationConfig(response_format={"type": "json_schema", "json_schema": "nope"})
    with pytest.raises(GenerationError, match="min_new_tokens \\(5\\) must not exceed max_new_tokens \\(2\\)"):
        GenerationConfig(max_new_tokens=2, min_new_tokens=5)
    with pytest.raises(GenerationError, match="generate\\(\\) has no option 'top_q'"):
        GenerationConfig.from_kwargs(top_q=0.5)


def test_generation_config_json_round_trip_and_transformers_reads_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    c = GenerationConfig(max_new_tokens=40, do_sample=True, temperature=0.7, top_k=30, top_p=0.9,
                         repetition_penalty=1.2, no_repeat_ngram_size=3, eos_token_id=[2, 5], pad_token_id=0,
                         stop=["\n\n"], min_new_tokens=2, bad_words_ids=[[7, 8]], num_return_sequences=2)
    c.save(tmp_path)
    assert GenerationConfig.from_model_dir(tmp_path) == c
    hf = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert (hf.max_new_tokens, hf.do_sample, hf.temperature, hf.top_k, hf.top_p) == (40, True, 0.7, 30, 0.9)
    assert (hf.repetition_penalty, hf.no_repeat_ngram_size, hf.eos_token_id, hf.pad_token_id) == (1.2, 3, [2, 5], 0)
    assert (hf.stop_strings, hf.min_new_tokens, hf.bad_words_ids, hf.num_return_sequences) == (["\n\n"], 2, [[7, 8]], 2)
    # and what transformers writes, gptgen reads (options it does not know are skipped)
    transformers.GenerationConfig(max_new_tokens=9, do_sample=True, top_p=0.5, num_beams=1, diversity_penalty=0.0,
                                  eos_token_id=3).save_pretrained(tmp_path / "hf")
    assert GenerationConfig.from_model_dir(tmp_path / "hf") == GenerationConfig(
        max_new_tokens=9, do_sample=True, top_p=0.5, num_beams=1, eos_token_id=3)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "generation_config.json").write_text('{"temperature": -1}')
    with pytest.raises(GenerationError, match="temperature must be"):
        GenerationConfig.from_model_dir(tmp_path / "bad")


def test_a_model_directory_sets_the_defaults_of_api_cli_chat_and_server(lm, tmp_path, capsys, monkeypatch):
    from fastapi.testclient import TestClient

    from gptgen.serve import create_app

    defaults = dict(max_new_tokens=5, do_sample=True, top_k=5, temperature=0.7, seed=11)
    lm2 = gptgen.LanguageModel(lm.model, lm.tokenizer)
    lm2.generation_config = GenerationConfig(**defaults)
    path = lm2.save(tmp_path / "tuned")
    loaded = gptgen.load(path)
    assert loaded.generation_config == lm2.generation_config
    expected = lm.generate("the sea", **defaults)
    assert loaded.generate("the sea") == expected != lm.generate("the sea")
    assert loaded.generate("the sea", max_new_tokens=2) == lm.generate("the sea", **dict(defaults, max_new_tokens=2))
    assert main(["generate", "--model", str(path), "the sea"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    chats = []
    for args in ([str(path)], [str(lm.save(tmp_path / "plain")), "--max-new-tokens", "5", "--do-sample", "--top-k",
                               "5", "--temperature", "0.7", "--seed", "11"]):
        monkeypatch.setattr("sys.stdin", io.StringIO("the sea\nblue\n"))
        assert main(["chat", "--json", "--template", "plain", "--model", *args]) == 0
        chats.append(capsys.readouterr().out)
    assert chats[0] == chats[1] and len(chats[0].splitlines()) == 2
    with TestClient(create_app(loaded, max_batch=2)) as c:
        got = c.post("/v1/completions", json={"prompt": "the sea", "max_tokens": 5}).json()["choices"][0]["text"]
    with BatchEngine(lm, max_batch=2) as eng:
        same = eng.generate(lm.tokenizer.encode("the sea"), GenerationConfig(**defaults))[0].text
    assert got == same


def test_cli_flags_are_generated_from_the_config():
    dests = {a.dest for a in _parser_actions()}
    assert set(GenerationConfig.__dataclass_fields__) - {"bad_words_ids", "logprobs", "response_format"} <= dests


def test_docs_table_is_the_generated_one():
    doc = (ROOT / "docs" / "generation.md").read_text(encoding="utf-8")
    assert markdown_table() in doc


# Rows fail alone in the batch engine ---------------------------------------------------------------------
def _run_all(eng, tok, jobs):
    done, results = [], {}
    lock = threading.Lock()
    reqs = []
    for i, (prompt, config) in enumerate(jobs):
        def sink(ev, i=i):
            with lock:
                results.setdefault(i, []).append(ev)
        reqs.append(eng.submit(tok.encode(prompt), config, sink))
    for r in reqs:
        assert r.done.wait(60)
    out = []
    for i in range(len(jobs)):
        evs = results[i]
        out.append(("".join(e.text for e in evs), [e.token_id for e in evs if e.token_id is not None],
                    evs[-1].finish_reason))
    return out


CLEAN = ["the sea", "blue and", "grey over the", "hills", "the sky is", "over", "and the", "is blue",
         "sea sky", "the hills are", "grey", "blue sky over"]


@pytest.mark.parametrize("failure", ["raises", "nan"])
def test_a_failing_row_ends_alone_and_clean_greedy_rows_are_unchanged(lm, monkeypatch, failure):
    tok = lm.tokenizer
    greedy = GenerationConfig(max_new_tokens=12, temperature=0, ignore_eos=True)
    with BatchEngine(lm, max_batch=16) as eng:
        solo = [_run_all(eng, tok, [(p, greedy)])[0] for p in CLEAN]
        poison = greedy.replace(repetition_penalty=1.7)
        real = batcher_module.RepetitionPenalty.__call__

        def broken(self, scores, state):
            if 1.7 not in self.penalty:
                return real(self, scores, state)
            if failure == "raises":
                raise RuntimeError("a processor failed")
            out = real(self, scores, state).clone()
            out[[i for i, p in enumerate(self.penalty) if p == 1.7]] = float("nan")
            return out

        monkeypatch.setattr(batcher_module.RepetitionPenalty, "__call__", broken)
        jobs = [(p, greedy) for p in CLEAN]
        jobs.insert(5, ("the sea", poison))
        jobs.insert(9, ("blue", poison))
        out = _run_all(eng, tok, jobs)
        assert [o[2] for o in (out[5], out[9])] == ["error", "error"]
        clean = [o for i, o in enumerate(out) if i not in (5, 9)]
        assert clean == solo
        assert all(o[2] == "length" for o in clean)
        # and the engine goes on
        assert _run_all(eng, tok, [(CLEAN[0], greedy)])[0] == solo[0]


def test_submit_takes_a_generation_config_and_refuses_what_it_cannot_run(lm):
    with BatchEngine(lm, max_batch=2) as eng:
        ids = lm.tokenizer.encode("the sea")
        with pytest.raises(GenerationError, match="beam sampler is not available in the batch engine"):
            eng.submit(ids, GenerationConfig(num_beams=2, max_new_tokens=2), lambda ev: None)
        with pytest.raises(GenerationError, match="typical_p is not available in the batch engine"):
            eng.submit(ids, GenerationConfig(do_sample=True, typical_p=0.5, max_new_tokens=2), lambda ev: None)
        with pytest.raises(GenerationError, match="takes a GenerationConfig"):
            eng.submit(ids, {"max_tokens": 2}, lambda ev: None)
        # min_length counts the prompt, as in the per-call engine
        long = eng.generate(ids, GenerationConfig(max_new_tokens=10, temperature=0, min_length=len(ids) + 6))[0]
        assert long.completion_tokens >= 6


# Sizes are checked against memory before anything is allocated -------------------------------------------
@pytest.mark.parametrize("options, option", [
    (dict(num_return_sequences=10 ** 6, do_sample=True), "num_return_sequences=1,000,000"),
    (dict(num_beams=10 ** 5), "num_beams=100,000"),
    (dict(penalty_alpha=0.6, top_k=10 ** 6), "top_k=1,000,000"),
])
def test_generation_sizes_are_refused_before_allocation(lm, model_dir, capsys, monkeypatch, options, option):
    monkeypatch.setenv("GPTGEN_MEMORY_LIMIT", "256M")
    with pytest.raises(GenerationError) as info:
        lm.generate("the sea", max_new_tokens=2, **options)
    message = str(info.value)
    assert message.startswith(f"{option} would need about ") and message.endswith(".")
    flags = [f"--{k.replace('_', '-')}={v}" if v is not True else f"--{k.replace('_', '-')}" for k, v in options.items()]
    assert main(["generate", "--model", str(model_dir), "the sea", "--max-new-tokens", "2", *flags]) == 2
    assert capsys.readouterr().err.strip() == f"gptgen: error: {message}"


def test_stop_token_ids_and_include_stop_str_in_output_in_both_engines(lm):
    from gptgen.generation import generate_ids

    ids = lm.tokenizer.encode("the sea")
    full_ids = generate_ids(lm.model, [ids], max_new_tokens=12, ignore_eos=True)[0]
    stop_id = full_ids[3]
    first = full_ids.index(stop_id)
    assert generate_ids(lm.model, [ids], max_new_tokens=12, ignore_eos=True, stop_token_ids=[stop_id])[0] == \
        full_ids[:first + 1]
    full = lm.generate("the sea", max_new_tokens=12, ignore_eos=True, include_prompt=False)
    stop = next(full[i:i + 2] for i in range(2, len(full) - 2) if full[i:i + 2].strip())
    at = full.find(stop)
    greedy = GenerationConfig(max_new_tokens=12, temperature=0, ignore_eos=True)
    with BatchEngine(lm, max_batch=2) as eng:
        for include in (False, True):
            want = full[:at + (len(stop) if include else 0)]
            config = greedy.replace(stop=[stop], include_stop_str_in_output=include)
            assert lm.generate("the sea", config=config, include_prompt=False) == want
            assert eng.generate(ids, config)[0].text == want
        batch = eng.generate(ids, greedy.replace(stop_token_ids=[stop_id]))[0]
        assert batch.token_ids == full_ids[:first + 1] and batch.finish_reason == "stop"


def test_extreme_but_accepted_values_beside_12_clean_greedy_http_requests(client):
    from concurrent.futures import ThreadPoolExecutor

    extremes = [{"temperature": 1e-300}, {"temperature": 100}, {"top_p": 5e-324}, {"min_p": 1.0},
                {"repetition_penalty": 0.01}, {"repetition_penalty": 100},
                {"presence_penalty": -2, "frequency_penalty": 2}, {"presence_penalty": 2, "frequency_penalty": -2}]

    def post(body):
        return client.post("/v1/completions", json=body)

    clean = [{"prompt": p, "max_tokens": 8, "temperature": 0} for p in CLEAN]
    solo = [post(b).json()["choices"][0]["text"] for b in clean]
    bodies = clean + [dict(prompt="the sea", max_tokens=8, seed=i, **e) for i, e in enumerate(extremes)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(post, bodies))
    assert [r.status_code for r in results] == [200] * len(bodies), [r.text for r in results if r.status_code != 200]
    assert all(r.json()["choices"][0]["finish_reason"] in ("length", "stop") for r in results)
    assert [r.json()["choices"][0]["text"] for r in results[:12]] == solo
