"""`gptgen convert MODEL OUT --to gguf`: a GGUF file llama.cpp's gpt2 loader reads.

Oracles: the `gguf` package's own reader (tensor names, shapes, values; q8_0 dequantized by the package)
against the model's parameters; where llama-cpp-python is installed, its greedy tokens against gptgen's."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gptgen.config import GPTConfig  # noqa: E402
from gptgen.errors import ConfigError  # noqa: E402
from gptgen.gguf_export import write_gguf  # noqa: E402
from gptgen.lm import LanguageModel  # noqa: E402
from gptgen.model import GPT  # noqa: E402
from gptgen.tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tiny_lm():
    tok = Tokenizer.train("bpe", ["the cat sat on the mat", "a dog ran to the cat"] * 20, vocab_size=300,
                          special_tokens={"eos": "<|endoftext|>"})
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=320, n_positions=64, n_embd=64, n_layer=2, n_head=4, init_std=0.2,
                          eos_token_id=tok.backend.token_to_id("<|endoftext|>"))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)
    return LanguageModel(model, tok)


def read(path):
    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


def expected(model):
    out = {"token_embd.weight": model.embed.wte.weight, "position_embd.weight": model.embed.wpe.weight,
           "output_norm.weight": model.ln_f.weight, "output_norm.bias": model.ln_f.bias,
           "output.weight": model.lm_head.weight}
    for i, b in enumerate(model.blocks):
        for name, mod in (("attn_norm", b.ln_1), ("ffn_norm", b.ln_2), ("attn_qkv", b.attn.c_attn),
                          ("attn_output", b.attn.c_proj), ("ffn_up", b.mlp.c_fc), ("ffn_down", b.mlp.c_proj)):
            out[f"blk.{i}.{name}.weight"] = mod.weight
            out[f"blk.{i}.{name}.bias"] = mod.bias
    return {k: v.detach().float().numpy() for k, v in out.items()}


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_written_file_reads_back_with_the_models_tensors(tiny_lm, tmp_path, kind):
    path = write_gguf(tiny_lm, tmp_path / "m.gguf", kind)
    r, tensors = read(path)
    want = expected(tiny_lm.model)
    assert set(tensors) == set(want)
    field = r.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "gpt2"
    assert int(r.fields["gpt2.block_count"].parts[-1][0]) == 2
    assert int(r.fields["gpt2.embedding_length"].parts[-1][0]) == 64
    assert int(r.fields["gpt2.attention.head_count"].parts[-1][0]) == 4
    assert len(r.fields["tokenizer.ggml.tokens"].data) == 320
    for name, w in want.items():
        t = tensors[name]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        if kind == "f32" or w.ndim == 1 or name == "position_embd.weight":
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
            assert np.array_equal(got, w), name
        else:  # q8_0: blocks of 32 with one scale (absmax / 127, stored as fp16): within half a step (+ fp16)
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, name
            step = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
            err = np.abs(got.reshape(-1, 32) - w.reshape(-1, 32))
            assert (err <= step * 0.5 + np.abs(w.reshape(-1, 32)) * 2e-3 + 1e-7).all(), name
            assert err.max() > 0, name  # it is quantized


def test_refusals_are_one_sentence(tiny_lm, tmp_path):
    path = write_gguf(tiny_lm, tmp_path / "m.gguf", "f32")
    with pytest.raises(Exception, match="exists; pass --overwrite"):
        write_gguf(tiny_lm, path, "f32")
    write_gguf(tiny_lm, path, "q8_0", overwrite=True)
    with pytest.raises(ConfigError, match="Unknown GGUF type"):
        write_gguf(tiny_lm, tmp_path / "x.gguf", "q4")
    post = GPT(GPTConfig(vocab_size=320, n_positions=16, n_embd=32, n_layer=1, n_head=2, norm_position="post",
                         activation="relu"))
    with pytest.raises(ConfigError, match="cannot be written as GGUF .*post-norm blocks, the relu activation"):
        write_gguf(LanguageModel(post, tiny_lm.tokenizer), tmp_path / "y.gguf")
    assert not (tmp_path / "y.gguf").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_cli_convert_to_gguf(tiny_lm, tmp_path):
    src = tiny_lm.save(tmp_path / "model")
    out = tmp_path / "model.gguf"
    done = subprocess.run([sys.executable, "-m", "gptgen", "convert", str(src), str(out), "--to", "gguf",
                           "--gguf-type", "f32"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Wrote GGUF file" in done.stdout
    _, tensors = read(out)
    assert np.array_equal(tensors["output.weight"].data.reshape(320, 64), expected(tiny_lm.model)["output.weight"])
    again = subprocess.run([sys.executable, "-m", "gptgen", "convert", str(src), str(out), "--to", "gguf"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr


def test_llama_cpp_gives_gptgen_greedy_tokens(tiny_lm, tmp_path):
    """Where llama-cpp-python is installed: the f32 file's greedy continuation equals gptgen's."""
    llama_cpp = pytest.importorskip("llama_cpp")
    path = write_gguf(tiny_lm, tmp_path / "m.gguf", "f32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False, n_threads=2)
    prompt = [5, 17, 42, 9]
    got = []
    llm.reset()
    for tok in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
        got.append(int(tok))
        if len(got) == 12:
            break
    with torch.no_grad():
        ids = torch.tensor([prompt])
        for _ in range(12):
            nxt = tiny_lm.model(ids)[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], 1)
    assert got == ids[0, 4:].tolist()
