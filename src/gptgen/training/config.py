"""TrainConfig: the options of fit(), and the checks that refuse values training cannot use."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import TrainingError
from ..options import MAX_SEED  # one bound for the API and the CLI
from .schedules import SCHEDULES

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Options of fit(); every field can be passed to fit() / LanguageModel.fit() by name."""

    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (over all epochs)
    max_time: float | None = None  # seconds of training after which to stop at a step boundary
    batch_size: int = 32  # examples per optimizer step, over all ranks and accumulation micro-batches
    grad_accum: int = 1
    seq_len: int | None = None  # for raw text inputs; default the model's context
    add_bos: bool | None = None  # for raw text inputs; default config.extra["add_bos"]
    add_eos: bool = False
    lr: float = 3e-4
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0  # 0 reproduces plain Adam; decay applies to matrices only
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = None
    precision: str = "auto"  # fp32 | bf16 (autocast) | fp16 (autocast + grad scaler) | auto
    compile: bool = False
    device: str = "auto"
    num_threads: int | None = None
    eval_every: int | None = None  # steps; evaluation also runs at each epoch end (eval_each_epoch)
    eval_each_epoch: bool = True
    eval_batch_size: int | None = None
    save_every: int | None = None  # steps; a checkpoint is also written at each epoch end
    output_dir: str | None = None
    resume: bool = False
    overwrite: bool = False
    early_stopping: int | None = None  # patience, in evaluations of the validation loss
    seed: int = 0
    shuffle: bool = True
    progress: bool = True
    chunk_rows: int | None = None  # rows per chunk of the fused head + cross-entropy
    # Memory: LoRA adapters (gptgen.lora; only they train), activation checkpointing, FSDP2 under torchrun.
    lora_rank: int | None = None  # None/0: full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target: Any = None  # module names (default c_attn, c_proj, c_fc) or a regex of whole names
    gradient_checkpointing: bool = False  # recompute each block's activations in the backward pass
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the torchrun processes

    def validate(self) -> None:
        """Raise TrainingError (one sentence naming the option) for any value training cannot use."""
        int_option("epochs", self.epochs, 0 if self.max_steps else 1)  # max_steps alone may bound the run
        for name in ("max_steps", "eval_batch_size", "num_threads", "seq_len"):
            if getattr(self, name) is not None:
                int_option(name, getattr(self, name), 1)
        int_option("batch_size", self.batch_size, 1)
        int_option("grad_accum", self.grad_accum, 1)
        for name in ("eval_every", "save_every", "early_stopping", "chunk_rows"):  # 0 or None: off
            if getattr(self, name) is not None:
                int_option(name, getattr(self, name), 0)
        int_option("warmup_steps", self.warmup_steps, 0)
        int_option("seed", self.seed, 0)
        if self.seed > MAX_SEED:
            raise TrainingError(f"seed must be at most {MAX_SEED:,}, got {self.seed}.")
        if self.schedule not in SCHEDULES:
            raise TrainingError(f"Unknown learning-rate schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}.")
        if self.precision not in PRECISIONS:
            raise TrainingError(f"Unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}.")
        if not (number_option("lr", self.lr) > 0 and math.isfinite(self.lr)):
            raise TrainingError(f"The learning rate must be a positive number, got {self.lr}.")
        if not (number_option("eps", self.eps) > 0 and math.isfinite(self.eps)):
            raise TrainingError(f"The Adam epsilon (eps, --adam-eps) must be a positive number, got {self.eps}.")
        if not (0 <= number_option("weight_decay", self.weight_decay) and math.isfinite(self.weight_decay)):
            raise TrainingError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}.")
        if not 0 <= number_option("min_lr_ratio", self.min_lr_ratio) <= 1:
            raise TrainingError(f"min_lr_ratio must be between 0 and 1, got {self.min_lr_ratio}.")
        if self.grad_clip is not None and not (0 <= number_option("grad_clip", self.grad_clip) and math.isfinite(self.grad_clip)):
            raise TrainingError(f"grad_clip must be a positive number (or 0/None for no clipping), got {self.grad_clip}.")
        if self.max_time is not None and not (number_option("max_time", self.max_time) > 0):
            raise TrainingError(f"The time budget (max_time, --minutes) must be positive, got {self.max_time}.")
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise TrainingError(f"betas must be a pair (beta1, beta2), got {self.betas!r}.")
        for i, beta in enumerate(self.betas, 1):
            if not 0 <= number_option(f"beta{i}", beta) < 1:
                raise TrainingError(f"beta{i} (--beta{i}) must be in [0, 1), got {beta}.")
        check_device(self.device)
        if self.lora_rank is not None:
            int_option("lora_rank", self.lora_rank, 0)
        if not (number_option("lora_alpha", self.lora_alpha) > 0 and math.isfinite(self.lora_alpha)):
            raise TrainingError(f"lora_alpha (--lora-alpha) must be a positive number, got {self.lora_alpha}.")
        if not 0 <= number_option("lora_dropout", self.lora_dropout) < 1:
            raise TrainingError(f"lora_dropout (--lora-dropout) must be in [0, 1), got {self.lora_dropout}.")
        if isinstance(self.lora_target, list):
            self.lora_target = tuple(self.lora_target)
        if self.lora_target is not None and not (isinstance(self.lora_target, str) or (
                isinstance(self.lora_target, tuple) and self.lora_target
                and all(isinstance(t, str) and t for t in self.lora_target))):
            raise TrainingError(f"lora_target (--lora-target) must be module names or a regex, got {self.lora_target!r}.")
        if self.resume and not self.output_dir:
            raise TrainingError("resume needs an output directory to resume from (output_dir, --output).")
        if self.resume and self.overwrite:
            raise TrainingError("resume=True (--resume) continues a run and overwrite=True (--overwrite) replaces "
                                "it; pass only one of them.")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(options) - known)
        if bad:
            raise TrainingError(f"Unknown training option(s): {', '.join(bad)}; see gptgen.training.TrainConfig.")
        cfg = cls(**options)
        if isinstance(cfg.betas, list):
            cfg.betas = tuple(cfg.betas)
        cfg.validate()
        return cfg


def number_option(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # NaN fails the range checks
        raise TrainingError(f"{name} must be a number, got {value!r}.")
    return value


def int_option(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TrainingError(f"{name} must be a whole number, got {value!r}.")
    if value < minimum:
        raise TrainingError(f"{name} must be at least {minimum}, got {value}.")


def check_device(device) -> None:
    """TrainingError for a device string torch cannot parse or a device this machine does not have."""
    if device in (None, "auto") or isinstance(device, torch.device) and device.type == "cpu":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise TrainingError(f"Unknown device {device!r}; use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise TrainingError(f"Device {device!r} was asked for but this machine has no usable CUDA GPU; use "
                                "--device cpu (device='cpu').")
        if dev.index is not None and dev.index >= count:
            raise TrainingError(f"Device {device!r} does not exist: this machine has {count} CUDA GPU(s).")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise TrainingError(f"Device {device!r} was asked for but MPS is not available here; use cpu.")
    elif dev.type != "cpu":
        raise TrainingError(f"Device type {dev.type!r} is not supported; use auto, cpu, cuda or cuda:N.")
