"""LoRA adapters: peft (on transformers' GPT-2) is the oracle for the adapter format and the logits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from gptgen import load  # noqa: E402
from gptgen.checkpoint import load_model  # noqa: E402
from gptgen.config import preset  # noqa: E402
from gptgen.errors import CheckpointError, ConfigError, GptgenError  # noqa: E402
from gptgen.lora import enable_lora, has_lora, load_adapter, lora_layers, merge_lora  # noqa: E402
from gptgen.model import GPT  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
VOCAB = 50257  # the GPT-2 tokenizer's, so the fine-tune can read text


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A GPT-2-shaped transformers model (random, biases too) saved with save_pretrained."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_layer=2, n_embd=32, n_head=4, n_positions=64)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    path = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    hf.save_pretrained(path)
    return path


def hf_model(path):
    return transformers.GPT2LMHeadModel.from_pretrained(path).eval()


def ids(seed=1, shape=(2, 24)):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def randomise_b(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.2)


def test_gpt2_124m_lora_trains_under_two_percent():
    with torch.device("meta"):
        model = GPT(preset("gpt2"))
    total = model.num_parameters()
    trainable = enable_lora(model, rank=8)
    # r * (in + out) per Linear: c_attn 8*(768+2304), attn c_proj 8*1536, c_fc and mlp c_proj 8*3840 each
    assert trainable == 12 * 8 * ((768 + 2304) + 1536 + 2 * 3840)
    assert trainable / total < 0.02
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)
    only_attn = GPT(preset("gpt2", n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=32))
    assert enable_lora(only_attn, rank=4, target=["c_attn"]) == 2 * 4 * (64 + 192)
    assert set(lora_layers(only_attn)) == {"blocks.0.attn.c_attn", "blocks.1.attn.c_attn"}


def test_gptgen_adapter_loads_in_peft_with_equal_logits(hf_dir, tmp_path):
    model = load_model(hf_dir).eval()
    enable_lora(model, rank=4, alpha=8, target=["c_attn", "c_fc"])
    randomise_b(model)  # B = 0 would make the adapter a no-op and the check empty
    x = ids()
    base = logits(hf_model(hf_dir), x)
    from gptgen.lora import save_adapter_files

    save_adapter_files(tmp_path, model)
    keys = set(json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"])
    assert keys == {"c_attn", "c_fc"}
    ours = logits(model, x)
    assert (ours - base).abs().max() > 1e-2  # the adapter changes the output
    theirs = logits(peft.PeftModel.from_pretrained(hf_model(hf_dir), tmp_path).eval(), x)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["plain", "rslora-rank-pattern"])
def test_peft_made_adapter_loads_into_gptgen(hf_dir, gpt2_tokenizer_dir, tmp_path, variant):
    extra = dict(use_rslora=True, rank_pattern={"c_fc": 2}, alpha_pattern={"h.1.attn.c_attn": 3.0}) \
        if variant != "plain" else {}
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                          init_lora_weights=False, task_type="CAUSAL_LM", **extra)  # random A and B
    torch.manual_seed(5)
    theirs_model = peft.get_peft_model(hf_model(hf_dir), cfg).eval()
    theirs_model.save_pretrained(tmp_path / "adapter")
    x = ids(2)
    theirs = logits(theirs_model, x)
    assert (theirs - logits(hf_model(hf_dir), x)).abs().max() > 1e-2
    model = load_adapter(load_model(hf_dir).eval(), tmp_path / "adapter")
    assert has_lora(model)
    if variant != "plain":
        assert lora_layers(model)["blocks.0.mlp.c_fc"].rank == 2
    torch.testing.assert_close(logits(model, x), theirs, atol=1e-4, rtol=0)
    merge_lora(model)  # merged weights give the same logits as base + adapter
    assert not has_lora(model)
    torch.testing.assert_close(logits(model, x), theirs, atol=1e-4, rtol=0)
    # load(..., lora=DIR): what generate/serve --lora run
    lm = load(hf_dir, tokenizer=gpt2_tokenizer_dir, lora=tmp_path / "adapter")
    torch.testing.assert_close(logits(lm.model, x), theirs, atol=1e-4, rtol=0)


def _finetune(hf_dir, data_dir, out, **extra):
    from gptgen import train

    options = dict(model=str(hf_dir), tokenizer=str(data_dir / "gpt2-tokenizer"),
                   data=[str(data_dir / "tinyshakespeare" / "input.txt")], reader="paragraphs",
                   split="every_nth:20", limit=400, seq_len=32, batch_size=4, lr=1e-2, lora_rank=8,
                   lora_alpha=16, precision="fp32", device="cpu", seed=1, samples=False, progress=False,
                   print_fn=None, output_dir=str(out), eval_each_epoch=False)
    options.update(extra)
    return train(**options)


def test_lora_finetune_adapter_matches_peft_and_merge(hf_dir, data_dir, tmp_path):
    run = _finetune(hf_dir, data_dir, tmp_path / "run", max_steps=3)
    begin = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][0]
    assert begin["trainable_parameters"] == 2 * 8 * ((32 + 96) + 64 + 2 * (32 + 128))
    assert begin["trainable_parameters"] / begin["parameters"] < 0.02
    last = run.result.last_dir
    assert (last / "adapter_config.json").is_file() and (last / "adapter_model.safetensors").is_file()
    # The base stayed frozen: the checkpoint's base tensors are transformers' own.
    from safetensors.torch import load_file

    saved = load_file(str(last / "model.safetensors"))
    hf = hf_model(hf_dir)
    torch.testing.assert_close(saved["blocks.0.attn.c_attn.weight"], hf.transformer.h[0].attn.c_attn.weight.t())
    adapter_keys = load_file(str(last / "adapter_model.safetensors")).keys()
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in adapter_keys
    assert "base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight" in adapter_keys
    assert len(adapter_keys) == 2 * 4 * 2
    x = ids(4)
    base = logits(hf, x)
    with_peft = logits(peft.PeftModel.from_pretrained(hf_model(hf_dir), last).eval(), x)
    assert (with_peft - base).abs().max() > 1e-3  # training moved the adapters
    ours = load_adapter(load_model(hf_dir).eval(), last)  # base + adapter, unmerged
    torch.testing.assert_close(logits(ours, x), with_peft, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits(load(last).model, x), with_peft, atol=1e-4, rtol=0)  # the run dir: merged
    # gptgen convert --merge-lora writes a merged Hugging Face directory transformers loads.
    proc = subprocess.run([sys.executable, "-m", "gptgen", "convert", str(hf_dir), str(tmp_path / "merged"),
                           "--to", "hf", "--tokenizer", str(data_dir / "gpt2-tokenizer"), "--merge-lora", str(last)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "LoRA adapter" in proc.stdout
    merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(merged, x), with_peft, atol=1e-4, rtol=0)


def test_lora_resume_is_exact(hf_dir, data_dir, tmp_path):
    straight = _finetune(hf_dir, data_dir, tmp_path / "a", max_steps=4, save_every=2)
    losses = [r["loss"] for r in straight.result.history if r["event"] == "step"]
    _finetune(hf_dir, data_dir, tmp_path / "b", max_steps=2, save_every=2)
    resumed = _finetune(hf_dir, data_dir, tmp_path / "b", max_steps=4, save_every=2, resume=True)
    again = [r["loss"] for r in resumed.result.history if r["event"] == "step"]
    assert again == losses  # bit-equal: same data order, adapters, Adam state and RNG
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "last" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "last" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(GptgenError, match="lora_rank 8 and cannot resume with 4"):
        _finetune(hf_dir, data_dir, tmp_path / "b", max_steps=6, resume=True, lora_rank=4)


def test_bad_lora_settings_and_adapters(hf_dir, tmp_path):
    model = load_model(hf_dir)
    with pytest.raises(ConfigError, match="rank"):
        enable_lora(model, rank=0)
    with pytest.raises(ConfigError, match="names no Linear"):
        enable_lora(model, target=["q_proj"])
    enable_lora(model, rank=2)
    with pytest.raises(ConfigError, match="already has LoRA"):
        enable_lora(model, rank=2)
    with pytest.raises(CheckpointError, match="not a LoRA adapter directory"):
        load_adapter(load_model(hf_dir), tmp_path)
    cfg = peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    other = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_layer=2, n_embd=48, n_head=4,
                                                                 n_positions=64))
    peft.get_peft_model(other, cfg).save_pretrained(tmp_path / "wide")
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_adapter(load_model(hf_dir), tmp_path / "wide")
    dora = peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True, task_type="CAUSAL_LM")
    peft.get_peft_model(hf_model(hf_dir), dora).save_pretrained(tmp_path / "dora")
    with pytest.raises(CheckpointError, match="use_dora"):
        load_adapter(load_model(hf_dir), tmp_path / "dora")


def test_finetune_cli_lora_prints_memory_and_writes_adapter(hf_dir, data_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "gptgen", "finetune", "--model", str(hf_dir), "--tokenizer",
         str(data_dir / "gpt2-tokenizer"), "--data", str(data_dir / "tinyshakespeare" / "input.txt"), "--reader",
         "paragraphs", "--seq-len", "32", "--batch-size", "4", "--max-steps", "2", "--lora-rank", "4",
         "--lora-target", "c_attn", "--gradient-checkpointing", "--threads", "1", "--no-progress", "--no-samples",
         "--output", str(tmp_path / "run")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Memory estimate, 4 x 32 tokens: lora: ~" in proc.stdout and "full would need" in proc.stdout
    config = json.loads((tmp_path / "run" / "last" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"] == ["c_attn"] and config["lora_alpha"] == 16
    bad = subprocess.run([sys.executable, "-m", "gptgen", "finetune", "--model", str(hf_dir), "--tokenizer",
                          str(data_dir / "gpt2-tokenizer"), "--data", str(data_dir / "tinyshakespeare" / "input.txt"),
                          "--lora-rank", "4", "--lora-target", "q_proj", "--max-steps", "1", "--no-progress"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bad.returncode == 2 and "names no Linear" in bad.stderr and "Traceback" not in bad.stderr


def test_finetune_style_recipe_with_lora(data_dir, tmp_path):
    """recipes/finetune_style.py --lora-rank: only adapters train; the merged model equals base + adapter."""
    import importlib

    recipes = REPO / "recipes"
    if str(recipes) not in sys.path:
        sys.path.insert(0, str(recipes))
    recipe = importlib.import_module("finetune_style")
    r = recipe.main(["--data-dir", str(data_dir), "--output", str(tmp_path), "--threads", "1", "--limit", "120",
                     "--pretrain-steps", "12", "--max-steps", "10", "--batch-size", "8", "--seq-len", "32",
                     "--train-tokenizer", "600", "--max-new-tokens", "8", "--lora-rank", "4", "--lr", "3e-3",
                     "--config", "n_layer=1", "--config", "n_embd=64", "--config", "n_head=2", "--quiet"])
    assert r["lora_rank"] == 4 and r["steps"] == 10
    assert r["after"]["shakespeare_val_perplexity"] < r["before"]["shakespeare_val_perplexity"]
    base, merged = load(r["base"]).model, load(r["model_dir"]).model
    with_adapter = load_adapter(load(r["base"]).model, tmp_path / "adapter")
    x = torch.randint(0, 600, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(merged, x), logits(with_adapter, x), atol=1e-4, rtol=0)
    assert (logits(merged, x) - logits(base, x)).abs().max() > 1e-3


def test_quantizing_a_model_with_unmerged_adapters_is_refused_and_merged_is_not():
    from gptgen import LanguageModel, Tokenizer
    from gptgen.quantize import quantize_model

    torch.manual_seed(0)
    tok = Tokenizer.train("byte-bpe", ["a small text for a tiny tokenizer"] * 5, 280)
    lm = LanguageModel.from_preset("gpt2", tok, n_layer=1, n_embd=32, n_head=2, n_positions=64)
    lm.enable_lora(rank=2, alpha=4)
    with pytest.raises(ConfigError, match="LoRA adapters that are not merged"):
        quantize_model(lm.model, "int8-dynamic")
    ids = torch.tensor([tok.encode("a small text")])
    with torch.no_grad():
        before = lm.model(ids)
    lm.merge_lora()
    quantize_model(lm.model, "int8-dynamic")
    with torch.no_grad():
        after = lm.model(ids)
    assert lm.model.quantized == "int8-dynamic"
    assert torch.allclose(before.float(), after.float(), atol=0.05 * float(before.abs().max()))
