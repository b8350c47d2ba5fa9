"""LoRA: low-rank adapters on a GPT's block Linears, saved and loaded in PEFT's format.

enable_lora(model, rank=8, alpha=16, ...) freezes every weight of the model and puts a trainable pair
(A: rank x in, B: out x rank, B zero at the start) beside each targeted Linear, whose output becomes

    base(x) + B(A(dropout(x))) * scaling,        scaling = alpha / rank   (alpha / sqrt(rank) with rsLoRA)

which is what peft's LoRA layer computes. gptgen's Linear weights are (out, in) like torch's, and GPT-2's
Conv1D weights in transformers are (in, out); peft stores lora_A as (rank, in) and lora_B as (out, rank) for
both layer kinds (it only transposes the merged product for Conv1D, fan_in_fan_out=True), so the tensors move
between the two without a transpose; only the key names differ:

    gptgen  blocks.0.attn.c_attn.lora_A.weight
    peft    base_model.model.transformer.h.0.attn.c_attn.lora_A.weight

An adapter directory holds adapter_config.json and adapter_model.safetensors, as
peft.PeftModel.save_pretrained writes them; peft.PeftModel.from_pretrained(GPT2LMHeadModel, dir) loads ours.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import CheckpointError, ConfigError
from .files import load_safetensors, read_json_object

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DEFAULT_TARGET = ("c_attn", "c_proj", "c_fc")  # every Linear of a block (attention and MLP)
_PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Linear):
    """A Linear with a low-rank adapter beside it; weight and bias are the base layer's own (frozen) tensors,
    under the same names, so a state dict of the model keeps its keys and gains lora_A / lora_B ones."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha, self.use_rslora = rank, float(alpha), use_rslora
        self.scaling = self.alpha / (math.sqrt(rank) if use_rslora else rank)
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        # Adapters stay float32 when the base is bf16/fp16 (small, and they are what trains).
        dtype = base.weight.dtype if base.weight.dtype == torch.float64 else torch.float32
        kw = dict(bias=False, device=base.weight.device, dtype=dtype)
        self.lora_A = nn.Linear(self.in_features, rank, **kw)
        self.lora_B = nn.Linear(rank, self.out_features, **kw)
        if not base.weight.is_meta:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's default initialisation
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        delta = self.lora_B(self.lora_A(self.lora_dropout(x).to(self.lora_A.weight.dtype)))
        return out + (delta * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, in the (out, in) layout of the base weight."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain Linear whose weight is base + scaling * B @ A (the adapter folded in)."""
        with torch.no_grad():
            weight = (self.weight.float() + self.delta_weight().float()).to(self.weight.dtype)
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device="meta")
        plain.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            plain.bias = self.bias
        return plain

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha:g}"


# Adding, finding and folding adapters --------------------------------------------------------------------
def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def _block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linears inside the decoder blocks (never the embeddings or the LM head), by module name."""
    return {name: m for name, m in model.named_modules()
            if name.startswith("blocks.") and type(m) is nn.Linear}


def _matches(name: str, target: Iterable[str] | str) -> bool:
    """peft's rule: a regex string must match the whole name; a list entry the name or its last parts."""
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _check_settings(rank, alpha, dropout) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"The LoRA rank (rank, --lora-rank) must be a whole number >= 1, got {rank!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (alpha > 0 and math.isfinite(alpha)):
        raise ConfigError(f"The LoRA alpha (alpha, --lora-alpha) must be a positive number, got {alpha!r}.")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"The LoRA dropout (dropout, --lora-dropout) must be in [0, 1), got {dropout!r}.")


def enable_lora(model: nn.Module, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
                target: Iterable[str] | str | None = None, use_rslora: bool = False) -> int:
    """Freeze the model and add trainable rank-`rank` adapters to its targeted block Linears; return the
    number of trainable parameters. target: module names or their last parts (default c_attn, c_proj, c_fc:
    every Linear of a block), or a regex matching whole names such as 'blocks\\.[0-5]\\.attn\\.c_attn'."""
    _check_settings(rank, alpha, dropout)
    if has_lora(model):
        raise ConfigError("This model already has LoRA adapters; merge them (merge_lora) before adding new ones.")
    if getattr(model, "quantized", None):
        raise ConfigError("LoRA adapters go on a float model; enable LoRA before quantizing, or merge them first.")
    target = DEFAULT_TARGET if target is None else target
    if not isinstance(target, str):
        target = tuple(target)
    chosen = {n: m for n, m in _block_linears(model).items() if _matches(n, target)}
    if not chosen:
        raise ConfigError(f"The LoRA target {target!r} names no Linear layer of the model's blocks; use names "
                          f"such as {', '.join(DEFAULT_TARGET)}.")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in chosen.items():
        _set_module(model, name, LoRALinear(linear, rank, alpha, dropout, use_rslora))
    model.lora_settings = {"r": rank, "lora_alpha": float(alpha), "lora_dropout": float(dropout),
                           "target_modules": target if isinstance(target, str) else list(target),
                           "use_rslora": bool(use_rslora)}
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (base + scaling * B @ A) and put plain Linears back; the
    model computes what it computed with the adapters, as one Linear per layer (the fast decode paths)."""
    layers = lora_layers(model)
    for name, layer in layers.items():
        _set_module(model, name, layer.merged())
    if layers:  # back to a plain model: every weight trainable again, as enable_lora found it
        for p in model.parameters():
            p.requires_grad_(True)
    if hasattr(model, "lora_settings"):
        del model.lora_settings
    return model


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every adapter folded into its base weight and no lora_ keys (the model
    itself is left as it is)."""
    state = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            w = state[name + ".weight"]
            state[name + ".weight"] = (w.float() + layer.delta_weight().float()).to(w.dtype)
    return state


def split_lora_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base tensors, adapter tensors) of a gptgen state dict."""
    base = {k: v for k, v in state.items() if ".lora_" not in k}
    return base, {k: v for k, v in state.items() if ".lora_" in k}


# PEFT's format ------------------------------------------------------------------------------------
def _to_peft_key(name: str) -> str:
    if not name.startswith("blocks."):
        raise CheckpointError(f"LoRA adapter tensor {name!r} is outside the model's blocks.")
    return _PEFT_PREFIX + "transformer.h." + name[len("blocks."):]


def _from_peft_key(key: str) -> str:
    """gptgen's name of a peft adapter tensor: base_model.model.[transformer.]h.N.... -> blocks.N...."""
    name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
    name = name[len("transformer."):] if name.startswith("transformer.") else name
    name = name.replace(".default.", ".")  # an adapter name left in the key by some writers
    if not name.startswith("h.") or not re.search(r"\.lora_[AB]\.weight$", name):
        raise CheckpointError(f"The adapter holds tensor {key!r}, which is not a LoRA A/B weight of a GPT-2 block "
                              "(only plain LoRA adapters on GPT-2's blocks load into gptgen).")
    return "blocks." + name[2:]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under peft's key names (base_model.model.transformer.h.N.<layer>.lora_A.weight)."""
    out = {}
    for name, layer in lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            out[_to_peft_key(f"{name}.{part}.weight")] = getattr(layer, part).weight.detach().contiguous()
    return out


def adapter_config(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    """adapter_config.json as peft's LoraConfig writes it for a GPT-2 causal LM."""
    settings = getattr(model, "lora_settings", None)
    layers = lora_layers(model)
    if not layers:
        raise ConfigError("The model has no LoRA adapters to save; enable LoRA first (enable_lora).")
    if settings is None:  # adapters loaded without settings: describe the layers themselves
        first = next(iter(layers.values()))
        settings = {"r": first.rank, "lora_alpha": first.alpha, "lora_dropout": 0.0,
                    "target_modules": sorted({n.rsplit(".", 1)[-1] for n in layers}), "use_rslora": first.use_rslora}
    rank_pattern = {}
    alpha_pattern = {}
    for name, layer in layers.items():  # layers whose rank or alpha differ from the default (loaded adapters)
        peft_name = _to_peft_key(name)[len(_PEFT_PREFIX):]
        if layer.rank != settings["r"]:
            rank_pattern[peft_name] = layer.rank
        if layer.alpha != settings["lora_alpha"]:
            alpha_pattern[peft_name] = layer.alpha
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": settings["r"], "lora_alpha": settings["lora_alpha"], "lora_dropout": settings["lora_dropout"],
        "target_modules": settings["target_modules"], "fan_in_fan_out": True, "bias": "none",
        "use_rslora": settings["use_rslora"], "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "inference_mode": True, "revision": None,
    }


def save_adapter_files(directory: str | os.PathLike, model: nn.Module, base_model_name_or_path: str | None = None) -> None:
    """Write adapter_config.json and adapter_model.safetensors into an existing directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    config = adapter_config(model, base_model_name_or_path)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2), "utf-8")
    save_file(adapter_state_dict(model), str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def is_adapter_dir(directory: str | os.PathLike) -> bool:
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def read_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors under gptgen's names) of a peft LoRA adapter directory."""
    directory = Path(directory)
    cfg_path = directory / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory} has no {ADAPTER_CONFIG}; it is not a LoRA adapter directory.")
    config = read_json_object(cfg_path)
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise CheckpointError(f"{directory} holds a {config.get('peft_type')} adapter; gptgen loads LoRA adapters only.")
    for key, ok in (("use_dora", False), ("bias", "none")):
        if config.get(key, ok) not in (ok, None):
            raise CheckpointError(f"The adapter in {directory} has {key}={config[key]!r}; gptgen loads plain LoRA "
                                  f"adapters ({key}={ok!r}) only.")
    if config.get("modules_to_save"):
        raise CheckpointError(f"The adapter in {directory} also trains whole modules ({config['modules_to_save']}); "
                              "gptgen loads LoRA A/B weights only.")
    weights = directory / ADAPTER_WEIGHTS
    if weights.is_file():
        raw = load_safetensors(weights)
    elif (directory / "adapter_model.bin").is_file():
        try:
            raw = torch.load(str(directory / "adapter_model.bin"), map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated zip/pickle data
            raise CheckpointError(f"{directory / 'adapter_model.bin'} cannot be read ({type(exc).__name__}).") from None
    else:
        raise CheckpointError(f"{directory} has no {ADAPTER_WEIGHTS}.")
    return config, {_from_peft_key(k): v for k, v in raw.items()}


def _alpha_for(config: dict, peft_name: str) -> float:
    """lora_alpha of one layer: alpha_pattern's entry whose pattern ends the layer's name, else the default."""
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", peft_name):
            return float(value)
    return float(config.get("lora_alpha", 8))


def apply_adapter(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor], where: str = "the adapter") -> None:
    """Put the adapter's layers on the model (frozen base, adapters trainable) with the given A/B tensors."""
    if has_lora(model):
        raise ConfigError("This model already has LoRA adapters; merge them (merge_lora) before loading others.")
    linears = _block_linears(model)
    layers = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    if not layers:
        raise CheckpointError(f"{where} holds no LoRA weights.")
    for p in model.parameters():
        p.requires_grad_(False)
    use_rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout") or 0.0)
    for name in layers:
        a, b = tensors.get(name + ".lora_A.weight"), tensors.get(name + ".lora_B.weight")
        if name not in linears or a is None or b is None:
            raise CheckpointError(f"{where} has weights for {_to_peft_key(name + '.')[:-1]!r}, which is not a "
                                  "Linear layer of this model's blocks (or lacks its lora_A / lora_B pair).")
        base = linears[name]
        rank = a.shape[0]
        if a.shape != (rank, base.in_features) or b.shape != (base.out_features, rank):
            raise CheckpointError(f"{where} does not fit this model: {name} has lora_A {tuple(a.shape)} and lora_B "
                                  f"{tuple(b.shape)} for a layer of {base.in_features} -> {base.out_features}.")
        alpha = _alpha_for(config, _to_peft_key(name)[len(_PEFT_PREFIX):])
        layer = LoRALinear(base, rank, alpha, dropout, use_rslora)
        with torch.no_grad():
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
        _set_module(model, name, layer)
    model.lora_settings = {"r": int(config.get("r", 8)), "lora_alpha": float(config.get("lora_alpha", 8)),
                           "lora_dropout": dropout,
                           "target_modules": config.get("target_modules") or sorted({n.rsplit(".", 1)[-1] for n in layers}),
                           "use_rslora": use_rslora}


def load_adapter(model: nn.Module, directory: str | os.PathLike, merge: bool = False) -> nn.Module:
    """Load a peft LoRA adapter directory onto the model; merge=True folds it into the weights at once."""
    config, tensors = read_adapter(directory)
    apply_adapter(model, config, tensors, where=str(directory))
    return merge_lora(model) if merge else model
