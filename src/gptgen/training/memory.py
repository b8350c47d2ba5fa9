"""How much memory a fine-tuning run needs: full, LoRA, LoRA + activation checkpointing, FSDP over N devices.

estimate_memory() counts the model's parameters exactly (the GPT built on the meta device, LoRA layers
added as enable_lora adds them) and the rest by what the Trainer keeps:

- weights: 4 bytes a parameter (fp32 master weights; a bf16 run autocasts from them);
- gradients and AdamW's two moments: 4 + 8 bytes a *trainable* parameter (LoRA: the adapters only);
- activations kept for the backward pass, per token of a micro-batch (batch_size / grad_accum rows, each
  rank's share under DDP/FSDP): per block the two layer-norm inputs and outputs, q/k/v, the attention
  output, and the MLP's hidden layer before and after GELU, about 4*n_embd + 4*attn_inner + 2*ffn floats
  (16 * n_embd for GPT-2; SDPA's fused kernel keeps no T x T scores), plus the embeddings and final norm;
  with activation checkpointing only each block's input stays, and one block's activations are rebuilt at a
  time in the backward pass; the fused head + cross-entropy works in chunks of a few MB;
- FSDP over N devices: weights, gradients and Adam state divided by N, plus the groups gathered while they
  run (the root group — embeddings, final norm, head — for the whole step, two blocks at a time, and their
  unsharded gradients before the reduce-scatter).

The figures leave out the framework's own footprint (a few hundred MB for PyTorch on CPU, the CUDA context
on a GPU) and allocator slack; bench/bench_finetune_memory.py sets them beside measured peaks.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch

MODES = ("full", "lora", "fsdp")
GiB = 1024 ** 3


@dataclass
class MemoryEstimate:
    mode: str
    parameters: int
    trainable: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    devices: int = 1

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        per = " per device" if self.devices > 1 else ""
        return (f"{self.mode}: ~{self.total / GiB:.1f} GiB{per} (weights {self.weights / GiB:.2f}, gradients "
                f"{self.gradients / GiB:.2f}, Adam {self.optimizer / GiB:.2f}, activations "
                f"{self.activations / GiB:.2f}; {self.trainable:,} of {self.parameters:,} parameters train)")


def _counts(config, lora_rank: int | None, lora_target) -> tuple[int, int, int, int]:
    """(parameters, trainable, largest block, root group) of the model, counted on the meta device."""
    target = lora_target if lora_target is None or isinstance(lora_target, str) else tuple(lora_target)
    return _counts_cached(config.to_json(), lora_rank, target)


@functools.lru_cache(maxsize=64)
def _counts_cached(config_json: str, lora_rank: int | None, lora_target) -> tuple[int, int, int, int]:
    from ..config import GPTConfig
    from ..lora import enable_lora
    from ..model import GPT

    config = GPTConfig.from_json(config_json) if hasattr(GPTConfig, "from_json") else GPTConfig.from_dict(
        json.loads(config_json))
    with torch.device("meta"):
        model = GPT(config)
        total = model.num_parameters()
        trainable = enable_lora(model, lora_rank, 16, 0.0, lora_target) if lora_rank else total
    block = max(sum(p.numel() for p in b.parameters()) for b in model.blocks) if len(model.blocks) else 0
    root = total - sum(sum(p.numel() for p in b.parameters()) for b in model.blocks)
    return total, trainable, block, root


def _activation_floats_per_token(config, gradient_checkpointing: bool) -> int:
    per_block = 4 * config.n_embd + 4 * config.attn_inner_dim + 2 * config.ffn_dim
    outside = 4 * config.n_embd  # embedding sum, final norm in/out, the head's input gradient
    if gradient_checkpointing:
        return config.n_layer * config.n_embd + per_block + outside
    return config.n_layer * per_block + outside


def estimate_memory(config, mode: str = "full", *, batch_size: int = 8, seq_len: int | None = None,
                    grad_accum: int = 1, devices: int = 1, lora_rank: int | None = None, lora_target=None,
                    gradient_checkpointing: bool = False) -> MemoryEstimate:
    """The memory one device needs to fine-tune a model of `config` (a GPTConfig or a preset name).

    mode: "full" (every weight trains), "lora" (rank lora_rank adapters, default 8), "fsdp" (full fine-tuning
    sharded over `devices`). batch_size is the global batch (split over devices and grad_accum micro-batches);
    seq_len defaults to the model's context."""
    from ..config import preset
    from ..errors import ConfigError

    if isinstance(config, str):
        config = preset(config)
    if mode not in MODES:
        raise ConfigError(f"Unknown memory mode {mode!r}; choose one of {', '.join(MODES)}.")
    if mode == "lora":
        lora_rank = lora_rank or 8
    elif mode == "full":
        lora_rank = None
    devices = max(1, int(devices))
    total, trainable, block, root = _counts(config, lora_rank, lora_target)
    seq_len = seq_len or config.n_positions
    rows = max(1, -(-batch_size // (devices * max(1, grad_accum))))
    acts = 4 * rows * seq_len * _activation_floats_per_token(config, gradient_checkpointing)
    if lora_rank:  # the adapters' rank-r intermediate per targeted layer: small beside the rest
        acts += 4 * rows * seq_len * lora_rank * 4 * config.n_layer
    shard = devices if mode == "fsdp" else 1
    weights = 4 * total // shard
    gradients = 4 * trainable // shard
    optimizer = 8 * trainable // shard
    if mode == "fsdp" and devices > 1:  # gathered groups: the root for the step, two blocks, their gradients
        weights += 4 * (root + 2 * block)
        gradients += 4 * (root + block)
    return MemoryEstimate(mode, total, trainable, weights, gradients, optimizer, acts, devices)


def memory_table(presets=("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"), *, batch_size: int = 8,
                 seq_len: int = 1024, devices: int = 4) -> str:
    """A text table of the memory each mode needs for the GPT-2 sizes (GiB per device)."""
    header = (f"{'model':<12} {'params':>7} {'full':>7} {'full+ckpt':>9} {'LoRA r8':>8} {'LoRA+ckpt':>9} "
              f"{'FSDP/' + str(devices):>7} {'FSDP+ckpt':>9}")
    lines = [f"batch {batch_size} x {seq_len} tokens, fp32 weights + AdamW; GiB per device", header]
    for name in presets:
        row = [estimate_memory(name, "full", batch_size=batch_size, seq_len=seq_len),
               estimate_memory(name, "full", batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=True),
               estimate_memory(name, "lora", batch_size=batch_size, seq_len=seq_len),
               estimate_memory(name, "lora", batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=True),
               estimate_memory(name, "fsdp", batch_size=batch_size, seq_len=seq_len, devices=devices),
               estimate_memory(name, "fsdp", batch_size=batch_size, seq_len=seq_len, devices=devices,
                               gradient_checkpointing=True)]
        cells = [f"{e.total / GiB:.1f}" for e in row]
        lines.append(f"{name:<12} {row[0].parameters / 1e6:>6.0f}M {cells[0]:>7} {cells[1]:>9} {cells[2]:>8} "
                     f"{cells[3]:>9} {cells[4]:>7} {cells[5]:>9}")
    return "\n".join(lines)
