"""KerasHub GPT-2 preset directories, in and out.

keras_hub's `save_to_preset` writes: config.json (the GPT2Backbone, "registered_name":
"keras_hub>GPT2Backbone"), model.weights.h5 (Keras 3 weights, one HDF5 group per layer with its
variables numbered "0", "1", ...), tokenizer.json (the GPT2Tokenizer layer config, not a `tokenizers`
file), assets/tokenizer/vocabulary.json + merges.txt (GPT-2 byte-level BPE), preprocessor.json,
task.json and metadata.json. gptgen reads such a directory into its GPT (same pre-norm GPT-2 block:
tanh-GELU, LayerNorm eps 1e-5, tied head) and writes one that keras_hub.models.GPT2CausalLM.from_preset
loads. HDF5 needs h5py: pip install 'gptgen[kerashub]'.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .config import GPTConfig
from .errors import CheckpointError

WEIGHTS_FILE = "model.weights.h5"
KERAS_VERSION = "3.15.1"  # what metadata.json records; keras_hub reads presets of older and newer versions
KERAS_HUB_VERSION = "0.32.0"
END_TOKEN = "<|endoftext|>"

def _h5py():
    try:
        import h5py
    except ImportError:
        raise CheckpointError("Reading or writing KerasHub presets needs h5py: pip install 'gptgen[kerashub]'.") from None
    return h5py


def is_kerashub_dir(directory: str | Path) -> bool:
    path = Path(directory) / "config.json"
    try:
        return path.is_file() and str(json.loads(path.read_text("utf-8")).get("registered_name", "")).startswith("keras_hub>")
    except (ValueError, OSError):
        return False


def read_config(directory: str | Path) -> GPTConfig:
    directory = Path(directory)
    data = json.loads((directory / "config.json").read_text("utf-8"))
    name = data.get("registered_name")
    if name != "keras_hub>GPT2Backbone":
        raise CheckpointError(f"{directory} is a KerasHub {str(name).split('>')[-1]} preset; gptgen reads only GPT2Backbone presets.")
    cfg = data.get("config") or {}
    end_id = _end_token_id(directory)
    try:
        return GPTConfig(
            vocab_size=cfg["vocabulary_size"], n_positions=cfg.get("max_sequence_length", 1024),
            n_embd=cfg["hidden_dim"], n_layer=cfg["num_layers"], n_head=cfg["num_heads"],
            n_inner=cfg["intermediate_dim"], activation="gelu_tanh", layer_norm_epsilon=1e-5,
            tie_word_embeddings=True, dropout=0.0, bos_token_id=end_id, eos_token_id=end_id,
        )
    except KeyError as exc:
        raise CheckpointError(f"{directory / 'config.json'} lacks the GPT2Backbone field {exc.args[0]!r}.") from None


def _end_token_id(directory: Path) -> int | None:
    path = directory / "assets" / "tokenizer" / "vocabulary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text("utf-8")).get(END_TOKEN)
    except ValueError:
        return None


def read_state(directory: str | Path, config: GPTConfig) -> dict[str, torch.Tensor]:
    """gptgen state dict from model.weights.h5."""
    directory = Path(directory)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {WEIGHTS_FILE}.")
    h5py = _h5py()
    try:
        handle = h5py.File(path, "r")
    except OSError:
        raise CheckpointError(f"{path} is truncated or not an HDF5 file.") from None
    with handle as f:
        def var(group: str, index: int) -> torch.Tensor:
            key = f"layers/{group}/vars/{index}"
            if key not in f:
                raise CheckpointError(f"{path} lacks the variable {key}; it is not a GPT2Backbone weights file.")
            return torch.from_numpy(np.asarray(f[key], dtype=np.float32))

        D, inner = config.n_embd, config.attn_inner_dim
        state = {
            "embed.wte.weight": var("reversible_embedding", 0),
            "embed.wpe.weight": var("position_embedding", 0),
            "ln_f.weight": var("layer_normalization", 0),
            "ln_f.bias": var("layer_normalization", 1),
        }
        for i in range(config.n_layer):
            g = "transformer_decoder" + (f"_{i}" if i else "")
            p = f"blocks.{i}."
            att = g + "/_self_attention_layer/"
            state[p + "ln_1.weight"], state[p + "ln_1.bias"] = var(g + "/_self_attention_layer_norm", 0), var(g + "/_self_attention_layer_norm", 1)
            state[p + "attn.c_attn.weight"] = torch.cat([var(att + f"{n}_dense", 0).reshape(D, inner).t() for n in ("query", "key", "value")])
            state[p + "attn.c_attn.bias"] = torch.cat([var(att + f"{n}_dense", 1).reshape(inner) for n in ("query", "key", "value")])
            state[p + "attn.c_proj.weight"] = var(att + "output_dense", 0).reshape(inner, D).t()
            state[p + "attn.c_proj.bias"] = var(att + "output_dense", 1)
            state[p + "ln_2.weight"], state[p + "ln_2.bias"] = var(g + "/_feedforward_layer_norm", 0), var(g + "/_feedforward_layer_norm", 1)
            state[p + "mlp.c_fc.weight"] = var(g + "/_feedforward_intermediate_dense", 0).t()
            state[p + "mlp.c_fc.bias"] = var(g + "/_feedforward_intermediate_dense", 1)
            state[p + "mlp.c_proj.weight"] = var(g + "/_feedforward_output_dense", 0).t()
            state[p + "mlp.c_proj.bias"] = var(g + "/_feedforward_output_dense", 1)
        extra = f"layers/transformer_decoder_{config.n_layer}"
        if config.n_layer and extra in f:
            raise CheckpointError(f"{path} holds more decoder layers than config.json's num_layers={config.n_layer}.")
    return {k: v.contiguous() for k, v in state.items()}


# Writing ------------------------------------------------------------------------------------------
def check_exportable(config: GPTConfig, tokenizer) -> None:
    """Raise one sentence when the model or tokenizer has no KerasHub GPT-2 equivalent."""
    if (config.norm_position != "pre" or not config.final_norm or config.lm_head_bias
            or not config.tie_word_embeddings or config.activation != "gelu_tanh"
            or config.attn_inner_dim != config.n_embd or abs(config.layer_norm_epsilon - 1e-5) > 1e-12):
        raise CheckpointError(
            "Only GPT-2-shaped models (pre-norm, tanh-GELU, tied head without bias, final LayerNorm with eps "
            "1e-5, n_embd divisible by n_head) can be written as a KerasHub GPT2 preset."
        )
    if _byte_level_vocab_merges(tokenizer) is None:
        raise CheckpointError(
            f"KerasHub's GPT2Tokenizer is a byte-level BPE holding {END_TOKEN}; this {tokenizer.kind or 'custom'} "
            f"tokenizer cannot be written as one."
        )


def _byte_level_vocab_merges(tokenizer):
    data = json.loads(tokenizer.backend.to_str())
    model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if model.get("type") != "BPE" or not any(p.get("type") == "ByteLevel" for p in pres):
        return None
    vocab = tokenizer.get_vocab()
    if END_TOKEN not in vocab:
        return None
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return dict(sorted(vocab.items(), key=lambda kv: kv[1])), merges


def _layer_config(module: str, cls: str, config: dict, dtype: str = "float32") -> dict:
    return {"module": module, "class_name": cls,
            "config": {"name": _snake(cls), "trainable": True,
                       "dtype": {"module": "keras", "class_name": "DTypePolicy", "config": {"name": dtype},
                                 "registered_name": None}, **config},
            "registered_name": f"keras_hub>{cls}"}


def _snake(cls: str) -> str:
    return {"GPT2Backbone": "gpt2_backbone", "GPT2Tokenizer": "gpt2_tokenizer",
            "GPT2CausalLMPreprocessor": "gpt2_causal_lm_preprocessor", "GPT2CausalLM": "gpt2_causal_lm"}[cls]


def save_preset_files(directory: Path, model, tokenizer, sequence_length: int | None = None) -> None:
    """Write a KerasHub GPT2CausalLM preset (as save_to_preset lays it out) into an existing directory."""
    config = model.config
    check_exportable(config, tokenizer)
    vocab, merges = _byte_level_vocab_merges(tokenizer)
    if len(vocab) > config.vocab_size:
        raise CheckpointError(f"The tokenizer has {len(vocab)} tokens but the model only {config.vocab_size}.")
    backbone = _layer_config("keras_hub.src.models.gpt2.gpt2_backbone", "GPT2Backbone", {
        "vocabulary_size": config.vocab_size, "num_layers": config.n_layer, "num_heads": config.n_head,
        "hidden_dim": config.n_embd, "intermediate_dim": config.ffn_dim, "dropout": config.dropout,
        "max_sequence_length": config.n_positions})
    tok = _layer_config("keras_hub.src.models.gpt2.gpt2_tokenizer", "GPT2Tokenizer", {
        "config_file": "tokenizer.json", "sequence_length": None, "add_prefix_space": False,
        "unsplittable_tokens": [END_TOKEN]}, dtype="int32")
    pre = _layer_config("keras_hub.src.models.gpt2.gpt2_causal_lm_preprocessor", "GPT2CausalLMPreprocessor", {
        "tokenizer": tok, "config_file": "preprocessor.json",
        "sequence_length": sequence_length or config.n_positions, "add_start_token": True, "add_end_token": True})
    task = {"module": "keras_hub.src.models.gpt2.gpt2_causal_lm", "class_name": "GPT2CausalLM",
            "config": {"backbone": backbone, "preprocessor": pre, "name": "gpt2_causal_lm"},
            "registered_name": "keras_hub>GPT2CausalLM"}
    for name, obj in (("config.json", backbone), ("tokenizer.json", tok), ("preprocessor.json", pre),
                      ("task.json", task)):
        (directory / name).write_text(json.dumps(obj, indent=4), "utf-8")
    params = sum(p.numel() for p in model.parameters())
    (directory / "metadata.json").write_text(json.dumps({
        "keras_version": KERAS_VERSION, "keras_hub_version": KERAS_HUB_VERSION, "parameter_count": params,
        "tasks": ["CausalLM"]}, indent=4), "utf-8")
    assets = directory / "assets" / "tokenizer"
    assets.mkdir(parents=True, exist_ok=True)
    (assets / "vocabulary.json").write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
    (assets / "merges.txt").write_text("".join(m + "\n" for m in merges), "utf-8")
    _write_weights(directory / WEIGHTS_FILE, model)


def _write_weights(path: Path, model) -> None:
    h5py = _h5py()
    config = model.config
    D, H = config.n_embd, config.n_head
    hd = config.attn_head_dim
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}

    def arr(t: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(t.numpy())

    with h5py.File(path, "w") as f:
        def group(name: str, layer_name: str, *values) -> None:
            g = f.require_group(f"{name}/vars" if name else "vars")
            g.attrs["name"] = layer_name
            for i, value in enumerate(values):
                g.create_dataset(str(i), data=arr(value))

        group("layers/add", "embeddings_add")
        group("layers/dropout", "embeddings_dropout")
        group("layers/input_layer", "token_ids")
        group("layers/input_layer_1", "padding_mask")
        group("layers/reversible_embedding", "token_embedding", state["embed.wte.weight"])
        group("layers/position_embedding", "position_embedding", state["embed.wpe.weight"])
        group("layers/layer_normalization", "layer_norm", state["ln_f.weight"], state["ln_f.bias"])
        for i in range(config.n_layer):
            p = f"blocks.{i}."
            g = "layers/transformer_decoder" + (f"_{i}" if i else "")
            att = g + "/_self_attention_layer"
            qkv_w = state[p + "attn.c_attn.weight"].split(D, dim=0)
            qkv_b = state[p + "attn.c_attn.bias"].split(D, dim=0)
            group(g, f"transformer_layer_{i}")
            group(g + "/_self_attention_layer_norm", "self_attention_layer_norm",
                  state[p + "ln_1.weight"], state[p + "ln_1.bias"])
            group(att, "self_attention")
            for (sub, label), w, b in zip((("query_dense", "query"), ("key_dense", "key"), ("value_dense", "value")),
                                          qkv_w, qkv_b):
                group(f"{att}/{sub}", label, w.t().reshape(D, H, hd), b.reshape(H, hd))
            group(att + "/output_dense", "attention_output", state[p + "attn.c_proj.weight"].t().reshape(H, hd, D),
                  state[p + "attn.c_proj.bias"])
            group(att + "/_dropout_layer", "dropout" + (f"_{i}" if i else ""))
            group(att + "/_softmax", "softmax" + (f"_{i}" if i else ""))
            group(g + "/_self_attention_dropout", "self_attention_dropout")
            group(g + "/_feedforward_layer_norm", "feedforward_layer_norm",
                  state[p + "ln_2.weight"], state[p + "ln_2.bias"])
            group(g + "/_feedforward_intermediate_dense", "feedforward_intermediate_dense",
                  state[p + "mlp.c_fc.weight"].t(), state[p + "mlp.c_fc.bias"])
            group(g + "/_feedforward_output_dense", "feedforward_output_dense",
                  state[p + "mlp.c_proj.weight"].t(), state[p + "mlp.c_proj.bias"])
            group(g + "/_feedforward_dropout", "feedforward_dropout")
        group("", "gpt2_backbone")
