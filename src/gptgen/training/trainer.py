"""The Trainer: AdamW, LR schedules, clipping, accumulation, mixed precision, DDP, exact resume.

Data order is a pure function of (seed, epoch): each epoch draws its own permutation, so a checkpoint
needs only the position (epoch, batch) besides the model, optimizer, scheduler and RNG states to
continue exactly where an interrupted run left off. The loss is the masked cross-entropy averaged over
all counted tokens of the global batch (every rank and every accumulation micro-batch), so gradient
accumulation and DistributedDataParallel give the gradients of one big batch.

Output directory (rank 0 writes it):
    last/            model directory + training_state.pt/.json (the resumable checkpoint)
    best/            model directory with the best validation loss so far
    metrics.jsonl    one JSON record per step, evaluation, epoch and text sample
    curves.png       loss and perplexity curves (needs matplotlib)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from .. import checkpoint
from ..errors import DataError, TrainingError
from ..lm import LanguageModel, check_vocab_fits
from . import distributed as D
from .callbacks import Callback, EarlyStopping, LossCurvePlot
from .metrics import TokenMetrics, linear_cross_entropy
from .schedules import SCHEDULES, make_scheduler

logger = logging.getLogger("gptgen.training")

STATE_FILE = "training_state.pt"
STATE_JSON = "training_state.json"
METRICS_FILE = "metrics.jsonl"
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

    def validate(self) -> None:
        if self.epochs < 1 and not self.max_steps:
            raise TrainingError(f"epochs must be at least 1, got {self.epochs}.")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise TrainingError("batch_size and grad_accum must be positive integers.")
        if self.schedule not in SCHEDULES:
            raise TrainingError(f"Unknown learning-rate schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}.")
        if self.precision not in PRECISIONS:
            raise TrainingError(f"Unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainingError(f"The learning rate must be a positive number, got {self.lr}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise TrainingError(f"max_steps must be positive, got {self.max_steps}.")

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


@dataclass
class FitResult:
    steps: int
    epochs: int  # completed epochs
    history: list[dict[str, Any]] = field(default_factory=list)
    val: dict[str, float] | None = None  # the last validation metrics
    train: dict[str, float] | None = None  # the metrics of the last (partial) epoch
    stopped: str | None = None  # why training ended early
    elapsed: float = 0.0
    last_dir: Path | None = None
    best_dir: Path | None = None
    curves_path: Path | None = None


# Data --------------------------------------------------------------------------------------------
class _Examples:
    """Packed examples as three tensors (input_ids, labels, loss_mask), or any map-style dataset of dicts."""

    def __init__(self, data) -> None:
        self.tensors = None
        self.dataset = None
        if all(hasattr(data, k) for k in ("input_ids", "labels")) and isinstance(getattr(data, "input_ids"), torch.Tensor):
            self.tensors = self._check(data.input_ids, data.labels, getattr(data, "loss_mask", None))
        elif isinstance(data, dict):
            if "input_ids" not in data or "labels" not in data:
                raise TrainingError("A dict of training data needs 'input_ids' and 'labels' tensors.")
            self.tensors = self._check(data["input_ids"], data["labels"], data.get("loss_mask"))
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            self.dataset = data
        else:
            raise TrainingError(
                f"Cannot train on a {type(data).__name__}; pass texts, gptgen.data PackedExamples, "
                "a dict of tensors or a map-style dataset of dicts."
            )

    @staticmethod
    def _check(input_ids, labels, loss_mask):
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        labels = torch.as_tensor(labels, dtype=torch.long)
        if input_ids.dim() != 2 or input_ids.shape != labels.shape:
            raise TrainingError(
                f"input_ids and labels must be (examples, seq_len) tensors of one shape, got "
                f"{tuple(input_ids.shape)} and {tuple(labels.shape)}."
            )
        if loss_mask is None:
            loss_mask = labels >= 0
        loss_mask = torch.as_tensor(loss_mask, dtype=torch.bool)
        labels = labels.clamp_min(0)  # ignore_index-style labels (-100) are masked out
        return input_ids.contiguous(), labels.contiguous(), loss_mask.contiguous()

    def __len__(self) -> int:
        return self.tensors[0].shape[0] if self.tensors is not None else len(self.dataset)

    @property
    def seq_len(self) -> int:
        return self.get(torch.tensor([0]))["input_ids"].shape[1]

    def get(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.tensors is not None:
            x, y, m = self.tensors
            return {"input_ids": x[idx], "labels": y[idx], "loss_mask": m[idx]}
        items = [self.dataset[int(i)] for i in idx]
        out = {}
        for key in ("input_ids", "labels", "loss_mask"):
            if key in items[0]:
                out[key] = torch.stack([torch.as_tensor(it[key]) for it in items])
        if "loss_mask" not in out:
            out["loss_mask"] = out["labels"] >= 0
        out["labels"] = out["labels"].clamp_min(0)
        out["loss_mask"] = out["loss_mask"].bool()
        return out

    def max_token_id(self) -> int:
        if self.tensors is None:
            return -1
        return int(max(self.tensors[0].max(), self.tensors[1].max())) if self.tensors[0].numel() else -1


def as_examples(lm: LanguageModel, data, seq_len: int | None = None, add_bos: bool | None = None,
                add_eos: bool = False) -> _Examples:
    """Texts (a list of str) are tokenised and packed; other forms are used as they are."""
    if isinstance(data, _Examples):
        return data
    if isinstance(data, str):
        raise TrainingError("Pass a list of texts (or packed examples), not a single string.")
    if isinstance(data, (list, tuple)) and data and all(isinstance(t, str) for t in data):
        from ..data.packing import pack_texts

        if add_bos is None:
            add_bos = bool(lm.config.extra.get("add_bos", False))
        return _Examples(pack_texts(list(data), lm.tokenizer, seq_len or lm.config.n_positions, "pad",
                                    add_bos, add_eos))
    if isinstance(data, (list, tuple)) and not data:
        raise DataError("There are no training examples (the list of texts is empty).")
    return _Examples(data)


# The loss module: the model body, then the fused head + masked cross-entropy ------------------
def hidden_states(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The final hidden states of GPT (causal attention; right padding needs no mask)."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    x = model.embed(input_ids, positions)
    for block in model.blocks:
        x = block(x)
    return model.ln_f(x)


class LossModule(nn.Module):
    """forward(input_ids, labels, loss_mask) -> (sum of token losses, correct predictions)."""

    def __init__(self, model: nn.Module, compile: bool = False, chunk_rows: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.chunk_rows = chunk_rows
        body = lambda ids: hidden_states(self.model, ids)  # noqa: E731
        self.body = torch.compile(body, dynamic=False) if compile else body

    def forward(self, input_ids, labels, loss_mask):
        h = self.body(input_ids)
        keep = loss_mask.reshape(-1)
        rows, targets = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
        if not bool(keep.all()):  # only counted positions reach the head (padding costs no head FLOPs)
            rows, targets = rows[keep], targets[keep]
        head = self.model.lm_head
        return linear_cross_entropy(rows, head.weight, head.bias, targets, self.chunk_rows)


# The trainer -----------------------------------------------------------------------------------
class Trainer:
    def __init__(self, lm: LanguageModel, train_data, val_data=None, config: TrainConfig | None = None,
                 callbacks: Sequence[Callback] = (), **options: Any) -> None:
        self.lm = lm
        self.config = config or TrainConfig.from_options(options)
        if config is not None and options:
            self.config = TrainConfig.from_options({**dataclasses.asdict(config), **options})
        cfg = self.config
        check_vocab_fits(lm.tokenizer, lm.config)
        self.callbacks = list(callbacks)
        if cfg.early_stopping:
            self.callbacks.append(EarlyStopping(patience=cfg.early_stopping))
        self.output_dir = Path(cfg.output_dir) if cfg.output_dir else None
        if self.output_dir is not None and not any(isinstance(c, LossCurvePlot) for c in self.callbacks):
            self.callbacks.append(LossCurvePlot())
        self.train_data = as_examples(lm, train_data, cfg.seq_len, cfg.add_bos, cfg.add_eos)
        self.val_data = (as_examples(lm, val_data, cfg.seq_len, cfg.add_bos, cfg.add_eos)
                         if val_data is not None else None)
        self._check_data(self.train_data, "training")
        if self.val_data is not None:
            if len(self.val_data) == 0:
                self.val_data = None
            else:
                self._check_data(self.val_data, "validation")
        # Run state (saved in checkpoints).
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best_val = math.inf
        self.log_records = 0
        self.epoch_metrics = TokenMetrics()
        self.history: list[dict[str, Any]] = []
        self.should_stop = False
        self.stop_reason: str | None = None
        self.curves_path: Path | None = None
        self.last_val: dict[str, float] | None = None
        self._last_eval_step = -1
        self._metrics_file = None

    # Checks ------------------------------------------------------------------------------------
    def _check_data(self, data: _Examples, what: str) -> None:
        if len(data) == 0:
            raise DataError(f"There are no {what} examples.")
        seq_len = data.seq_len
        ctx = self.lm.config.n_positions
        if seq_len > ctx:
            raise TrainingError(
                f"The {what} examples are {seq_len} tokens long but the model's context holds only {ctx} "
                f"positions; use seq_len <= {ctx} or a model with n_positions >= {seq_len}."
            )
        top = data.max_token_id()
        if top >= self.lm.config.vocab_size:
            raise TrainingError(
                f"The {what} data holds token id {top} but the model's vocabulary has only "
                f"{self.lm.config.vocab_size:,} entries; the tokenizer and the model do not match."
            )

    # Public API --------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.dist.is_main if hasattr(self, "dist") else True

    def request_stop(self, reason: str) -> None:
        self.should_stop = True
        self.stop_reason = reason

    def log(self, record: dict[str, Any]) -> None:
        """Append a record to the history and (rank 0, with an output_dir) to metrics.jsonl."""
        self.history.append(record)
        self.log_records += 1
        if self._metrics_file is not None:
            self._metrics_file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._metrics_file.flush()

    # Setup -------------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.config
        device_type = "cuda" if (cfg.device == "auto" and torch.cuda.is_available()) else (
            "cpu" if cfg.device == "auto" else torch.device(cfg.device).type)
        self.dist = D.init_distributed(device_type)
        if cfg.device == "auto":
            self.device = torch.device(f"cuda:{self.dist.local_rank}" if device_type == "cuda" else "cpu")
        else:
            self.device = torch.device(cfg.device)
            if self.device.type == "cuda" and self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())  # set per rank by torchrun
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        precision = cfg.precision
        self.precision_reason = "chosen"
        if precision == "auto":  # bf16 on CUDA and on CPUs with bf16 units (AMX, AVX512-BF16), else fp32/fp16
            from ..hardware import auto_precision

            precision, self.precision_reason = auto_precision(self.device)
        self.precision = precision
        if precision == "fp32":
            self.autocast = nullcontext
        else:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            self.autocast = lambda: torch.autocast(self.device.type, dtype=dtype)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        self.lm.to(self.device)
        model = self.lm.model
        model.train()
        self.loss_module = LossModule(model, compile=cfg.compile, chunk_rows=cfg.chunk_rows)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_module = DDP(self.loss_module, device_ids=ids)
        else:
            self.train_module = self.loss_module

        decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        extra = {"fused": True} if self.device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **extra)

        n = len(self.train_data)
        self.steps_per_epoch = math.ceil(n / cfg.batch_size)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.num_epochs = cfg.epochs if not cfg.max_steps else math.ceil(cfg.max_steps / self.steps_per_epoch)
        self.scheduler = make_scheduler(self.optimizer, cfg.schedule, self.total_steps, cfg.warmup_steps,
                                        cfg.min_lr_ratio)

    # Checkpoints -------------------------------------------------------------------------------
    def _state(self, finished: bool = False) -> dict[str, Any]:
        np_state = np.random.get_state()
        return {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "best_val": self.best_val, "log_records": self.log_records, "finished": finished,
            "epoch_metrics": self.epoch_metrics.state(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
                "python_gauss": random.getstate()[2],
                "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                          int(np_state[3]), float(np_state[4])],
            },
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "train_config": _jsonable(dataclasses.asdict(self.config)),
            "model_config": self.lm.config.to_dict(),
        }

    def save_checkpoint(self, finished: bool = False) -> Path | None:
        if not self.is_main or self.output_dir is None:
            return None
        state = self._state(finished)
        summary = {k: state[k] for k in ("step", "epoch", "batch_in_epoch", "best_val", "log_records", "finished")}
        summary["train_config"] = state["train_config"]

        def fill(tmp: Path) -> None:
            checkpoint.save_model_files(tmp, self.lm.model)
            self.lm.tokenizer.save(tmp)
            torch.save(state, tmp / STATE_FILE)
            (tmp / STATE_JSON).write_text(json.dumps(summary, indent=2), "utf-8")

        return checkpoint.write_dir_atomically(self.output_dir / "last", fill)

    def _save_best(self) -> None:
        if not self.is_main or self.output_dir is None:
            return

        def fill(tmp: Path) -> None:
            checkpoint.save_model_files(tmp, self.lm.model)
            self.lm.tokenizer.save(tmp)
            (tmp / "metrics.json").write_text(json.dumps({"step": self.step, "epoch": self.epoch + 1,
                                                          **(self.last_val or {})}, indent=2), "utf-8")

        checkpoint.write_dir_atomically(self.output_dir / "best", fill)

    def _resume(self) -> None:
        checkpoint.recover_dir(self.output_dir / "last")  # a kill between the checkpoint's two renames
        path = self.output_dir / "last" / STATE_FILE
        if not path.is_file():
            if self.is_main:
                logger.warning("No checkpoint in %s; training starts from scratch.", self.output_dir / "last")
            return
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file
            raise TrainingError(f"The checkpoint {path} cannot be read ({type(exc).__name__}); "
                                "resume from another copy or start again without --resume.") from None
        if state["model_config"] != self.lm.config.to_dict():
            raise TrainingError(f"The checkpoint in {path.parent} was made with a different model configuration; "
                                "resume with the same command that started the run.")
        from safetensors.torch import load_file

        weights = load_file(str(path.parent / checkpoint.WEIGHTS_FILE), device=str(self.device))
        model = self.lm.model
        missing, unexpected = model.load_state_dict(weights, strict=False)
        allowed = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        if set(missing) - allowed or unexpected:
            raise TrainingError(f"The weights in {path.parent} do not fit the model.")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.best_val = float(state["best_val"])
        self.log_records = int(state["log_records"])
        self.epoch_metrics.load_state(state["epoch_metrics"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_gauss"]))
        npst = rng["numpy"]
        np.random.set_state((npst[0], npst[1].numpy().astype(np.uint32), npst[2], npst[3], npst[4]))
        for cb, cb_state in zip(self.callbacks, state.get("callbacks", [])):
            if cb_state:
                cb.load_state_dict(cb_state)
        if self.is_main:
            logger.info("Resumed from %s at step %d (epoch %d, batch %d).", path.parent, self.step,
                        self.epoch + 1, self.batch_in_epoch)

    def _open_log(self) -> None:
        if not self.is_main or self.output_dir is None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / METRICS_FILE
        kept: list[str] = []
        if self.config.resume and path.is_file():
            # Drop records written after the checkpoint we resumed from; they will be written again.
            kept = path.read_text("utf-8").splitlines()[: self.log_records]
            self.history = [json.loads(line) for line in kept]
        checkpoint.atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode("utf-8"))
        self._metrics_file = open(path, "a", encoding="utf-8")

    # Training ----------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> torch.Tensor:
        n = len(self.train_data)
        if not self.config.shuffle:
            return torch.arange(n)
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=g)

    def _train_step(self, global_idx: torch.Tensor) -> dict[str, float]:
        cfg, env = self.config, self.dist
        mine = torch.tensor_split(global_idx, env.world_size)[env.rank]
        micro = torch.tensor_split(mine, cfg.grad_accum)
        batches, weights = [], []
        for idx in micro:
            if len(idx) == 0:  # every rank runs the same number of backward passes (DDP)
                idx, w = global_idx[:1], 0.0
            else:
                w = 1.0
            batch = self.train_data.get(idx)
            batches.append(batch)
            weights.append(w)
        local_count = sum(float(b["loss_mask"].sum()) * w for b, w in zip(batches, weights))
        (global_count,) = D.all_reduce_sum([local_count], env, self.device)
        if global_count == 0:
            raise TrainingError("A training batch has no counted tokens (every label is padding).")
        scale = env.world_size / global_count
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        padded_tokens = 0
        for i, (batch, w) in enumerate(zip(batches, weights)):
            sync = i == len(batches) - 1
            ctx = self.train_module.no_sync() if (env.enabled and not sync) else nullcontext()
            x = batch["input_ids"].to(self.device, non_blocking=True)
            y = batch["labels"].to(self.device, non_blocking=True)
            m = batch["loss_mask"].to(self.device, non_blocking=True)
            with ctx:
                with self.autocast():
                    ls, corr = self.train_module(x, y, m)
                self.scaler.scale(ls * (scale * w)).backward()
            loss_sum += ls.detach().double() * w
            correct += corr.double() * w
            padded_tokens += x.numel() if w else 0
        stats = torch.stack([loss_sum, correct])
        stats = D.all_reduce_tensor(stats, env).tolist()
        loss = stats[0] / global_count
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise _NonFiniteLoss(loss)
        grad_norm = None
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.lm.model.parameters(), cfg.grad_clip))
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.epoch_metrics.update(stats[0], stats[1], global_count)
        out = {"loss": loss, "accuracy": stats[1] / global_count, "lr": lr, "tokens": int(global_count),
               "input_tokens": padded_tokens * env.world_size}
        if grad_norm is not None:
            out["grad_norm"] = grad_norm
        return out

    @torch.no_grad()
    def evaluate(self, data: _Examples | None = None) -> dict[str, float]:
        """Token-weighted loss, perplexity and accuracy over all of `data` (default the validation set)."""
        data = data if data is not None else self.val_data
        was_training = self.lm.model.training
        self.lm.model.eval()
        bs = self.config.eval_batch_size or self.config.batch_size
        mine = torch.tensor_split(torch.arange(len(data)), self.dist.world_size)[self.dist.rank]
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        for start in range(0, len(mine), bs):
            batch = data.get(mine[start:start + bs])
            with self.autocast():
                ls, corr = self.loss_module(batch["input_ids"].to(self.device), batch["labels"].to(self.device),
                                            batch["loss_mask"].to(self.device))
            totals += torch.stack([ls.double(), corr.double(), batch["loss_mask"].sum().to(self.device).double()])
        totals = D.all_reduce_tensor(totals, self.dist).tolist()
        self.lm.model.train(was_training)
        metrics = TokenMetrics()
        metrics.update(*totals)
        return metrics.compute()

    def _run_eval(self) -> dict[str, float]:
        if self._last_eval_step == self.step and self.last_val is not None:
            return self.last_val
        val = self.evaluate()
        self.last_val = val
        self._last_eval_step = self.step
        self.log({"event": "eval", "step": self.step, "epoch": self.epoch + 1, "split": "val", **val})
        if val["loss"] < self.best_val:
            self.best_val = val["loss"]
            self._save_best()
        for cb in self.callbacks:
            cb.on_evaluate(self, val)
        return val

    def fit(self) -> FitResult:
        cfg = self.config
        self._setup()
        if self.output_dir is not None and self.is_main:
            if (self.output_dir / "last").exists() and not cfg.resume and not cfg.overwrite:
                raise TrainingError(f"{self.output_dir} already holds a training run; resume it with --resume "
                                    "(resume=True), or choose another output directory, or pass --overwrite.")
        if cfg.resume and self.output_dir is not None:
            self._resume()
        elif cfg.resume:
            raise TrainingError("resume needs an output directory to resume from.")
        self._open_log()
        if self.log_records == 0:  # a resumed run keeps the record its first start wrote
            self.log({"event": "begin", "step": self.step, "precision": self.precision,
                      "precision_reason": self.precision_reason})
        if self.is_main and cfg.precision == "auto":
            print(f"precision auto -> {self.precision} ({self.precision_reason})", file=sys.stderr, flush=True)
        if self.is_main and self.output_dir is not None and not cfg.resume:
            shutil.rmtree(self.output_dir / "best", ignore_errors=True)  # a best model of an earlier run
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and self.is_main))
        start = time.perf_counter()
        last_dir = None
        try:
            for cb in self.callbacks:
                cb.on_train_begin(self)
            done = already_done = self.step >= self.total_steps
            while not done and self.epoch < self.num_epochs:
                order = self._epoch_order(self.epoch)
                while self.batch_in_epoch < self.steps_per_epoch:
                    b = self.batch_in_epoch
                    t0 = time.perf_counter()
                    try:
                        logs = self._train_step(order[b * cfg.batch_size:(b + 1) * cfg.batch_size])
                    except _NonFiniteLoss as exc:
                        raise self._nan_error(exc.value) from None
                    dt = time.perf_counter() - t0
                    self.step += 1
                    self.batch_in_epoch += 1
                    record = {"event": "step", "step": self.step, "epoch": self.epoch + 1, **logs,
                              "tokens_per_s": logs["input_tokens"] / dt if dt > 0 else None}
                    self.log(record)
                    bar.update(1)
                    bar.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                    refresh=False)
                    for cb in self.callbacks:
                        cb.on_step_end(self, record)
                    if cfg.eval_every and self.val_data is not None and self.step % cfg.eval_every == 0:
                        self._run_eval()
                    if self.step >= self.total_steps:
                        done = True
                    elif cfg.max_time is not None and time.perf_counter() - start >= cfg.max_time:
                        self.request_stop(f"the time budget of {cfg.max_time:.0f} s is spent")
                    if done or self.should_stop:
                        break
                    if cfg.save_every and self.step % cfg.save_every == 0 and self.batch_in_epoch < self.steps_per_epoch:
                        last_dir = self.save_checkpoint()
                if self.batch_in_epoch >= self.steps_per_epoch:
                    self._end_epoch(time.perf_counter() - start)
                    last_dir = self.save_checkpoint(finished=done or self.epoch >= self.num_epochs)
                if done or self.should_stop:
                    break
            if already_done:  # resumed a finished run: nothing to train, nothing to rewrite
                last_dir = self.output_dir / "last" if self.output_dir is not None else None
            else:
                if self.val_data is not None and self._last_eval_step != self.step:
                    self._run_eval()
                last_dir = self.save_checkpoint(finished=True) or last_dir
            elapsed = time.perf_counter() - start
            partial = self.epoch_metrics.compute() if self.epoch_metrics.tokens else None
            end_logs = {"event": "end", "step": self.step, "elapsed": elapsed}
            if self.stop_reason:
                end_logs["stopped"] = self.stop_reason
            for cb in self.callbacks:
                cb.on_train_end(self, end_logs)
        finally:
            bar.close()
            if self._metrics_file is not None:
                self._metrics_file.close()
                self._metrics_file = None
            D.shutdown(self.dist)
        best = self.output_dir / "best" if self.output_dir is not None and (self.output_dir / "best").is_dir() else None
        return FitResult(steps=self.step, epochs=self.epoch, history=self.history, val=self.last_val,
                         train=partial, stopped=self.stop_reason, elapsed=elapsed,
                         last_dir=last_dir if self.output_dir is not None else None, best_dir=best,
                         curves_path=self.curves_path)

    def _end_epoch(self, elapsed: float) -> None:
        train = self.epoch_metrics.compute()
        record = {"event": "epoch", "step": self.step, "epoch": self.epoch + 1, "elapsed": elapsed,
                  **{f"train_{k}": v for k, v in train.items()}}
        if self.config.eval_each_epoch and self.val_data is not None:
            val = self._run_eval()
            record.update({f"val_{k}": v for k, v in val.items()})
        self.log(record)
        for cb in self.callbacks:
            cb.on_epoch_end(self, self.epoch, record)
        self.epoch += 1
        self.batch_in_epoch = 0
        self.epoch_metrics.reset()

    def _nan_error(self, value: float) -> TrainingError:
        where = ""
        if self.output_dir is not None and (self.output_dir / "last" / STATE_JSON).is_file():
            saved = json.loads((self.output_dir / "last" / STATE_JSON).read_text("utf-8"))
            where = f"; the last good checkpoint (step {saved['step']}) is kept in {self.output_dir / 'last'}"
        elif self.output_dir is not None:
            where = "; no checkpoint had been written yet"
        return TrainingError(
            f"The training loss became {value} at step {self.step + 1}, so training stopped without applying "
            f"that update{where}; lower the learning rate or enable gradient clipping."
        )


class _NonFiniteLoss(Exception):
    def __init__(self, value: float) -> None:
        super().__init__(value)
        self.value = value


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


# Functional entry points ------------------------------------------------------------------------
def fit(lm: LanguageModel, train_data, val_data=None, *, callbacks: Sequence[Callback] = (), **options) -> FitResult:
    """Train lm on train_data (texts, PackedExamples, a dict of tensors or a dataset of dicts).

    Options are the fields of TrainConfig (epochs, batch_size, lr, schedule, precision, output_dir, ...).
    """
    return Trainer(lm, train_data, val_data, callbacks=callbacks, **options).fit()


@torch.no_grad()
def evaluate(lm: LanguageModel, data, *, batch_size: int = 32, seq_len: int | None = None,
             add_bos: bool | None = None, add_eos: bool = False, device: str | None = None,
             precision: str = "fp32") -> dict[str, float]:
    """Loss, perplexity (exp of the token-weighted mean loss) and token accuracy of lm on data."""
    examples = as_examples(lm, data, seq_len, add_bos, add_eos)
    trainer = Trainer.__new__(Trainer)
    trainer.lm = lm
    trainer.config = TrainConfig(batch_size=batch_size, precision=precision, device=device or "auto")
    trainer._check_data(examples, "evaluation")
    trainer.dist = D.DistEnv()
    trainer.device = torch.device(device) if device else lm.device
    trainer.autocast = nullcontext
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        trainer.autocast = lambda: torch.autocast(trainer.device.type, dtype=dtype)
    lm.to(trainer.device)
    trainer.loss_module = LossModule(lm.model)
    return trainer.evaluate(examples)
