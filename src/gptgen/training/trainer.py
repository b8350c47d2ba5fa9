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

This file holds the step loop; its parts live beside it: the options in config.py (TrainConfig), the data
forms in examples.py, the loss module in loss.py, and the checkpoint, resume and metrics-log files in
checkpointing.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..config import check_vocab_fits
from ..errors import TrainingError
from . import checkpointing
from . import distributed as D
from .callbacks import Callback, EarlyStopping, LossCurvePlot
from .checkpointing import METRICS_FILE, STATE_FILE, STATE_JSON  # noqa: F401  (re-exported)
from .config import MAX_SEED, PRECISIONS, TrainConfig, int_option, number_option, check_device  # noqa: F401
from .examples import Examples, as_examples, check_examples
from .loss import LossModule, hidden_states  # noqa: F401  (re-exported)
from .metrics import TokenMetrics
from .rundir import check_run_dir, claim_run_dir
from .schedules import make_scheduler

logger = logging.getLogger("gptgen.training")

if TYPE_CHECKING:  # the training package does not import lm.py (lm.py imports it)
    from ..lm import LanguageModel


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


# The trainer -----------------------------------------------------------------------------------
class Trainer:
    def __init__(self, lm: LanguageModel, train_data, val_data=None, config: TrainConfig | None = None,
                 callbacks: Sequence[Callback] = (), **options: Any) -> None:
        self.lm = lm
        self.config = config or TrainConfig.from_options(options)
        if config is not None and options:
            self.config = TrainConfig.from_options({**dataclasses.asdict(config), **options})
        cfg = self.config
        cfg.validate()
        if cfg.output_dir:  # read-only; every rank sees the same answer before any work
            check_run_dir(cfg.output_dir, cfg.resume, cfg.overwrite)
        check_vocab_fits(lm.tokenizer, lm.config)
        self.callbacks = list(callbacks)
        if cfg.early_stopping:
            self.callbacks.append(EarlyStopping(patience=cfg.early_stopping))
        self.output_dir = Path(cfg.output_dir) if cfg.output_dir else None
        if self.output_dir is not None and not any(isinstance(c, LossCurvePlot) for c in self.callbacks):
            self.callbacks.append(LossCurvePlot())
        self.train_data = as_examples(lm, train_data, cfg.seq_len, cfg.add_bos, cfg.add_eos)
        self.val_data = (as_examples(lm, val_data, cfg.seq_len, cfg.add_bos, cfg.add_eos, what="validation")
                         if val_data is not None else None)
        check_examples(lm, self.train_data, "training")
        if self.val_data is not None:
            if len(self.val_data) == 0:
                self.val_data = None
            else:
                check_examples(lm, self.val_data, "validation")
        # Run state (saved in checkpoints).
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best_val = math.inf
        self.log_records = 0
        self.epoch_metrics = TokenMetrics()
        self.history: list[dict[str, Any]] = []
        self.should_stop = False
        self.interrupt_requested = False  # set by the first Ctrl-C (checkpointing.graceful_interrupt)
        self.stop_reason: str | None = None
        self.curves_path: Path | None = None
        self.last_val: dict[str, float] | None = None
        self._last_eval_step = -1
        self._metrics_file = None
        self.fsdp = False  # set by _setup from config.fsdp
        self._first_loss: float | None = None  # of this process's first step, for the divergence warning
        self._warned_divergence = False

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
        self.fsdp = bool(cfg.fsdp)
        if self.fsdp and not self.dist.enabled:
            raise TrainingError("fsdp=True (--fsdp) shards the model over torchrun's processes; launch the run with "
                                "torchrun --nproc-per-node N (N >= 2), or train without it.")
        model.gradient_checkpointing = bool(cfg.gradient_checkpointing)  # per block, in GPT.hidden_states
        if cfg.lora_rank:  # only the adapters train (and are in the optimizer); the base stays frozen
            from ..lora import enable_lora, has_lora

            if not has_lora(model):
                enable_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target)
        self.trainable_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.loss_module = LossModule(model, compile=cfg.compile, chunk_rows=cfg.chunk_rows)
        if self.fsdp:  # blocks and the root sharded (fsdp.py); the optimizer is built below, after sharding
            from . import fsdp

            fsdp.shard(self.loss_module, model, precision)
            self.train_module = self.loss_module
            if precision == "bf16":
                self.autocast = nullcontext  # the mixed-precision policy casts the parameters
        elif self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_module = DDP(self.loss_module, device_ids=ids)
        else:
            self.train_module = self.loss_module

        decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # The fused kernel (one pass over each parameter's state) on CUDA and CPU: for GPT-2 124M on CPU
        # the per-op update took ~0.57 s of a ~1.3 s step (bench/bench_train.py, docs/performance.md).
        extra = {"fused": True} if self.device.type in ("cuda", "cpu") else {}
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **extra)

        n = len(self.train_data)
        self.steps_per_epoch = math.ceil(n / cfg.batch_size)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.num_epochs = cfg.epochs if not cfg.max_steps else math.ceil(cfg.max_steps / self.steps_per_epoch)
        self.scheduler = make_scheduler(self.optimizer, cfg.schedule, self.total_steps, cfg.warmup_steps,
                                        cfg.min_lr_ratio)

    # Checkpoints (checkpointing.py) ----------------------------------------------------------------
    # Under FSDP they see the gathered full model and optimizer state (fsdp.py): the same files as one process.
    def save_checkpoint(self, finished: bool = False) -> Path | None:
        if self.fsdp:
            from . import fsdp

            view = fsdp.save_view(self) if self.output_dir is not None else None
            return checkpointing.save_last(view, finished) if view is not None else None
        return checkpointing.save_last(self, finished)

    def _save_best(self) -> None:
        if self.fsdp:
            from . import fsdp

            view = fsdp.save_view(self, with_optimizer=False) if self.output_dir is not None else None
            if view is not None:
                checkpointing.save_best(view)
            return
        checkpointing.save_best(self)

    def _resume(self) -> None:
        _check_resume_lora(self.config, self.output_dir / "last" / STATE_JSON)
        if self.fsdp:
            from . import fsdp

            checkpointing.resume(fsdp.resume_view(self))
            return
        checkpointing.resume(self)

    def _open_log(self) -> None:
        checkpointing.open_metrics_log(self)

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
            ctx = self.train_module.no_sync() if (env.enabled and not sync and not self.fsdp) else nullcontext()
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
            norm = torch.nn.utils.clip_grad_norm_(self.lm.model.parameters(), cfg.grad_clip)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP
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
    def evaluate(self, data: Examples | None = None) -> dict[str, float]:
        """Token-weighted loss, perplexity and accuracy over all of `data` (default the validation set)."""
        data = data if data is not None else self.val_data
        return _evaluate_examples(self.loss_module, data, self.config.eval_batch_size or self.config.batch_size,
                                  self.device, self.autocast, self.dist, lockstep=self.fsdp)

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
        # Rank 0 locks the run directory for the whole run; an earlier run there needs resume or overwrite.
        try:
            claim = (claim_run_dir(self.output_dir, cfg.resume, cfg.overwrite)
                     if self.output_dir is not None and self.is_main else None)
        except BaseException:
            D.shutdown(self.dist)
            raise
        try:
            with checkpointing.graceful_interrupt(self):  # Ctrl-C: a checkpoint of this step, then stop
                return self._fit()
        finally:
            if claim is not None:
                claim.release()

    def _fit(self) -> FitResult:
        cfg = self.config
        if cfg.resume and self.output_dir is not None:
            self._resume()
        self._open_log()
        if self.log_records == 0:  # a resumed run keeps the record its first start wrote
            self.log({"event": "begin", "step": self.step, "precision": self.precision,
                      "precision_reason": self.precision_reason,
                      "trainable_parameters": self.trainable_parameters,
                      "parameters": self.lm.model.num_parameters()})
        if self.is_main and cfg.precision == "auto":
            print(f"precision auto -> {self.precision} ({self.precision_reason})", file=sys.stderr, flush=True)
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
                    self._watch_divergence(logs["loss"])
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
                    if self.interrupt_requested and self.batch_in_epoch < self.steps_per_epoch:
                        saved = cfg.save_every and self.step % cfg.save_every == 0
                        raise checkpointing.interrupt(self, last_dir if saved else None)
                if self.batch_in_epoch >= self.steps_per_epoch:
                    self._end_epoch(time.perf_counter() - start)
                    last_dir = self.save_checkpoint(finished=done or self.epoch >= self.num_epochs)
                if done or self.should_stop:
                    break
                if self.interrupt_requested:  # the epoch's end just wrote the checkpoint
                    raise checkpointing.interrupt(self, last_dir)
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
            if self.fsdp:  # every rank's lm gets a plain model with the trained weights
                from . import fsdp

                fsdp.unshard_into(self)
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

    def _watch_divergence(self, loss: float) -> None:
        """Warn once when a finite loss has exploded: above twice the larger of the first loss and ln(vocab)
        (a model predicting uniformly scores ln(vocab); diverging runs climb far past both)."""
        if self._first_loss is None:
            self._first_loss = loss
            return
        limit = 2.0 * max(self._first_loss, math.log(self.lm.config.vocab_size))
        if self._warned_divergence or not loss > limit:
            return
        self._warned_divergence = True
        if self.is_main:
            logger.warning(
                "The training loss has exploded to %.4g at step %d (it started at %.4g; a uniform guess scores "
                "%.3g): the run is diverging, so stop it and resume with a lower learning rate (resume=True, "
                "--resume --lr ...) or enable gradient clipping (grad_clip, --grad-clip).",
                loss, self.step, self._first_loss, math.log(self.lm.config.vocab_size))

    def _nan_error(self, value: float) -> TrainingError:
        where = ""
        if self.output_dir is not None and (self.output_dir / "last" / STATE_JSON).is_file():
            saved = json.loads((self.output_dir / "last" / STATE_JSON).read_text("utf-8"))
            where = f"; the last good checkpoint (step {saved['step']}) is kept in {self.output_dir / 'last'}"
        elif self.output_dir is not None:
            where = "; no checkpoint had been written yet"
        return TrainingError(
            f"The training loss became {value} at step {self.step + 1}, so training stopped without applying "
            f"that update{where}; resume it with a lower learning rate (resume=True with a smaller lr, "
            f"--resume --lr ...; the new rate applies from the checkpoint on) or enable gradient clipping."
        )


def _check_resume_lora(cfg: TrainConfig, state_json: Path) -> None:
    """A LoRA run resumes with the adapters it saved: the same rank, alpha and targets (and a full run as full)."""
    if not state_json.is_file():
        return
    try:
        saved = json.loads(state_json.read_text("utf-8")).get("train_config") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return  # the resume itself reports an unreadable checkpoint
    target = saved.get("lora_target")
    now = cfg.lora_target if isinstance(cfg.lora_target, (str, type(None))) else list(cfg.lora_target)
    for name, old, new in (("lora_rank", saved.get("lora_rank") or 0, cfg.lora_rank or 0),
                           ("lora_alpha", saved.get("lora_alpha", 16.0) if saved.get("lora_rank") else None,
                            cfg.lora_alpha if cfg.lora_rank else None),
                           ("lora_target", target if saved.get("lora_rank") else None, now if cfg.lora_rank else None)):
        if old != new:
            flag = "--" + name.replace("_", "-")
            raise TrainingError(f"The run in {state_json.parent.parent} was trained with {name} {old!r} and cannot "
                                f"resume with {new!r}; resume with the run's {name} ({flag}) or start a new run.")


class _NonFiniteLoss(Exception):
    def __init__(self, value: float) -> None:
        super().__init__(value)
        self.value = value


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
    int_option("batch_size", batch_size, 1)
    if seq_len is not None:
        int_option("seq_len", seq_len, 1)
    if precision not in PRECISIONS:
        raise TrainingError(f"Unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    check_device(device)
    examples = as_examples(lm, data, seq_len, add_bos, add_eos, what="evaluation")
    check_examples(lm, examples, "evaluation")
    dev = torch.device(device) if device else lm.device
    autocast = nullcontext
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        autocast = lambda: torch.autocast(dev.type, dtype=dtype)  # noqa: E731
    lm.to(dev)
    return _evaluate_examples(LossModule(lm.model), examples, batch_size, dev, autocast, D.DistEnv())


@torch.no_grad()
def _evaluate_examples(loss_module: LossModule, data: Examples, batch_size: int, device: torch.device,
                       autocast, dist: D.DistEnv, lockstep: bool = False) -> dict[str, float]:
    """Token-weighted loss, perplexity and accuracy of loss_module's model over all of data (each rank a share)."""
    model = loss_module.model
    was_training = model.training
    model.eval()
    mine = torch.tensor_split(torch.arange(len(data)), dist.world_size)[dist.rank]
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    starts = list(range(0, len(mine), batch_size))
    if lockstep:  # FSDP gathers weights in every forward: every rank runs as many batches (extra ones count 0)
        most = -(-len(data) // dist.world_size)
        starts += [None] * (-(-most // batch_size) - len(starts))
    for start in starts:
        batch = data.get(mine[start:start + batch_size] if start is not None else torch.arange(1))
        with autocast():
            ls, corr = loss_module(batch["input_ids"].to(device), batch["labels"].to(device),
                                   batch["loss_mask"].to(device))
        if start is not None:
            totals += torch.stack([ls.double(), corr.double(), batch["loss_mask"].sum().to(device).double()])
    totals = D.all_reduce_tensor(totals, dist).tolist()
    model.train(was_training)
    metrics = TokenMetrics()
    metrics.update(*totals)
    return metrics.compute()
