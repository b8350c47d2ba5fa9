"""`gptgen generate` passes transformers' warper options through to generate()."""

from __future__ import annotations

import pytest

import gptgen
from gptgen.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    tok = gptgen.Tokenizer.train("wordpiece", ["the sea is blue and the sky is grey over the hills"] * 20,
                                 vocab_size=60)
    lm = gptgen.LanguageModel.from_preset("mini", tok, n_layer=1, n_embd=32, n_head=2, n_inner=64, n_positions=32)
    return lm.save(tmp_path_factory.mktemp("m") / "model")


def _cli(capsys, *args):
    code = main(["generate", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("flags, option", [
    (["--min-p", "0.2"], dict(min_p=0.2)),
    (["--typical-p", "0.5"], dict(typical_p=0.5)),
    (["--epsilon-cutoff", "0.02"], dict(epsilon_cutoff=0.02)),
    (["--eta-cutoff", "0.01", "--min-tokens-to-keep", "2"], dict(eta_cutoff=0.01, min_tokens_to_keep=2)),
])
def test_warper_flags_match_the_api(model_dir, capsys, flags, option):
    lm = gptgen.load(model_dir)
    expected = lm.generate("the sea", do_sample=True, seed=3, max_new_tokens=12, **option)
    code, out, _ = _cli(capsys, "--model", model_dir, "the sea", "--do-sample", "--seed", 3,
                        "--max-new-tokens", 12, *flags)
    assert code == 0
    assert out.rstrip("\n") == expected


def test_min_length_flag_matches_the_api(model_dir, capsys):
    import json

    lm = gptgen.load(model_dir)
    prompt_len = len(lm.tokenizer.encode("the sea"))
    code, out, _ = _cli(capsys, "--model", model_dir, "the sea", "--json", "--min-length", prompt_len + 6,
                        "--max-new-tokens", 10, "--do-sample", "--seed", 5)
    assert code == 0
    expected = lm.generate("the sea", min_length=prompt_len + 6, max_new_tokens=10, do_sample=True, seed=5,
                           include_prompt=False)
    assert json.loads(out)["generations"] == [expected]


@pytest.mark.parametrize("flag, value", [("--min-p", "nan"), ("--typical-p", "inf"), ("--epsilon-cutoff", "-1")])
def test_bad_warper_values_are_one_sentence(model_dir, capsys, flag, value):
    code, out, err = _cli(capsys, "--model", model_dir, "the sea", "--do-sample", flag, value)
    assert code == 2
    assert err.startswith("gptgen: error: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.slow
def test_compile_flag_gives_the_eager_greedy_text(model_dir, capsys, monkeypatch):
    """--compile reaches the runner (compile=True: the native step where its library runs, else inductor's
    compiled step): the same greedy text as without it."""
    import shutil

    from gptgen.generation import runner

    if shutil.which("g++") is None and shutil.which("gcc") is None:
        pytest.skip("inductor needs a C++ compiler")
    seen = []
    real = runner.Runner.__init__

    def init(self, model, *args, **kw):
        real(self, model, *args, **kw)
        seen.append((kw.get("compile"), self.backend))

    monkeypatch.setattr(runner.Runner, "__init__", init)
    code, eager, _ = _cli(capsys, "--model", model_dir, "the sea", "--max-new-tokens", 8)
    assert code == 0 and [c for c, _ in seen] == [None]
    code, compiled, err = _cli(capsys, "--model", model_dir, "the sea", "--max-new-tokens", 8, "--compile")
    assert code == 0, err
    assert seen[1][0] is True and seen[1][1] in ("native", "compiled")  # one fast step, native or inductor's
    assert compiled == eager
