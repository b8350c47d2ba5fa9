"""Write a gptgen model as one GGUF file (llama.cpp's format, also what Ollama loads), through the `gguf` package.

`gptgen convert MODEL OUT.gguf --to gguf [--gguf-type f32|q8_0]`. The model must have GPT-2's architecture
(llama.cpp's "gpt2": pre-norm blocks, tanh GELU, a final layer norm, learned positions, heads spanning the
embedding, no head bias) and a byte-level BPE tokenizer (tokenizer.json with a vocabulary and merges, as
GPT-2's). q8_0 stores every matrix whose rows are a multiple of 32 wide in blocks of 32 int8 values with one
fp16 scale (llama.cpp's q8_0); vectors (norms, biases) and the position table stay float32.

Tensor names (llama.cpp's gpt2 loader): token_embd, position_embd, blk.N.{attn_norm, attn_qkv, attn_output,
ffn_norm, ffn_up, ffn_down}, output_norm, output. gptgen's Linear weights are (out, in) like llama.cpp's
converted GPT-2, so they go in as they are (the writer reverses the dimensions into GGUF's order).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError, ConfigError

GGUF_TYPES = ("f32", "q8_0")


def _require_gguf():
    try:
        import gguf
    except ImportError as exc:  # an optional extra
        raise ConfigError("Writing GGUF needs the gguf package: pip install 'gptgen[gguf]'.") from exc
    return gguf


def check_exportable(model) -> None:
    """ConfigError (one sentence) where llama.cpp's gpt2 architecture cannot hold the model."""
    cfg = model.config
    problems = []
    if cfg.norm_position != "pre":
        problems.append("post-norm blocks")
    if cfg.activation != "gelu_tanh":
        problems.append(f"the {cfg.activation} activation (gpt2 uses tanh GELU)")
    if not cfg.final_norm:
        problems.append("no final layer norm")
    if getattr(model.lm_head, "bias", None) is not None:
        problems.append("a bias on the LM head")
    attn = model.blocks[0].attn
    if attn.n_head * attn.head_dim != cfg.n_embd:
        problems.append("heads that do not span the embedding")
    if getattr(model, "quantized", None):
        problems.append(f"{model.quantized} layers (export the unquantized model)")
    if problems:
        raise ConfigError(f"This model cannot be written as GGUF (llama.cpp's gpt2 architecture): it has "
                          f"{', '.join(problems)}.")


def _vocab(tokenizer, n_vocab: int):
    """(tokens, token types, merges) of a byte-level BPE tokenizer, padded to n_vocab entries."""
    data = json.loads(tokenizer.backend.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE" or "merges" not in model:
        raise ConfigError("GGUF export needs a byte-level BPE tokenizer (GPT-2's kind); this one is "
                          f"{model.get('type', 'unknown')}.")
    vocab = dict(model["vocab"])
    specials = set()
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            specials.add(added["id"])
    if max(vocab.values()) >= n_vocab:
        raise ConfigError(f"The tokenizer has ids up to {max(vocab.values())}, more than the model's {n_vocab} "
                          "embeddings.")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [5] * n_vocab  # UNUSED for padding entries
    for token, i in vocab.items():
        tokens[i] = token
        types[i] = 3 if i in specials else 1  # CONTROL / NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, types, merges


def write_gguf(lm, path: str | os.PathLike, gguf_type: str = "q8_0", overwrite: bool = False) -> Path:
    """Write `lm` (a gptgen.LanguageModel) to the GGUF file `path` atomically; returns the path."""
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"Unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}.")
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; a GGUF model is one file (e.g. {path / 'model.gguf'}).")
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} exists; pass --overwrite to replace it.")
    if lm.tokenizer is None:
        raise ConfigError("GGUF export needs the model's tokenizer (pass --tokenizer).")
    model = lm.model
    check_exportable(model)
    gguf = _require_gguf()
    cfg = model.config
    tokens, types, merges = _vocab(lm.tokenizer, cfg.vocab_size)
    q8 = gguf.GGMLQuantizationType.Q8_0
    f32 = gguf.GGMLQuantizationType.F32

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".gptgen-gguf-", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, "gpt2")
        writer.add_name(path.stem)
        writer.add_context_length(cfg.n_positions)
        writer.add_embedding_length(cfg.n_embd)
        writer.add_feed_forward_length(model.blocks[0].mlp.c_fc.out_features)
        writer.add_block_count(cfg.n_layer)
        writer.add_head_count(model.blocks[0].attn.n_head)
        writer.add_layer_norm_eps(float(model.blocks[0].ln_1.eps))
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if gguf_type == "q8_0" else gguf.LlamaFileType.ALL_F32)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        for role, adder in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id)):
            token_id = getattr(cfg, f"{role}_token_id", None)
            if token_id is None:
                token = lm.tokenizer.special_tokens.get(role)
                token_id = lm.tokenizer.backend.token_to_id(token) if token else None
            if token_id is not None:
                adder(int(token_id))
        writer.add_add_bos_token(False)

        def put(name: str, t: torch.Tensor, quantize: bool = True) -> None:
            a = t.detach().to(torch.float32).cpu().contiguous().numpy()
            if gguf_type == "q8_0" and quantize and a.ndim == 2 and a.shape[1] % 32 == 0:
                writer.add_tensor(name, gguf.quants.quantize(a, q8), raw_dtype=q8)
            else:
                writer.add_tensor(name, a, raw_dtype=f32)

        put("token_embd.weight", model.embed.wte.weight)
        put("position_embd.weight", model.embed.wpe.weight, quantize=False)
        for i, b in enumerate(model.blocks):
            for name, mod in (("attn_norm", b.ln_1), ("ffn_norm", b.ln_2)):
                put(f"blk.{i}.{name}.weight", mod.weight)
                put(f"blk.{i}.{name}.bias", mod.bias)
            for name, lin in (("attn_qkv", b.attn.c_attn), ("attn_output", b.attn.c_proj),
                              ("ffn_up", b.mlp.c_fc), ("ffn_down", b.mlp.c_proj)):
                put(f"blk.{i}.{name}.weight", lin.weight)
                if lin.bias is not None:
                    put(f"blk.{i}.{name}.bias", lin.bias)
        put("output_norm.weight", model.ln_f.weight)
        put("output_norm.bias", model.ln_f.bias)
        put("output.weight", model.lm_head.weight)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
