"""A run's checkpoints: the resumable training state in last/, the best model in best/, and the metrics log.

The state holds the position (epoch, batch), the optimizer, scheduler, scaler and RNG states and the
callbacks' states; with the seeded per-epoch data order that is all an interrupted run needs to continue
exactly. These functions read and write a Trainer's run state; the Trainer calls them from its step loop.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import checkpoint
from ..errors import TrainingError

if TYPE_CHECKING:
    from .trainer import Trainer

logger = logging.getLogger("gptgen.training")

STATE_FILE = "training_state.pt"
STATE_JSON = "training_state.json"
METRICS_FILE = "metrics.jsonl"


def training_state(trainer: Trainer, finished: bool = False) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "step": trainer.step, "epoch": trainer.epoch, "batch_in_epoch": trainer.batch_in_epoch,
        "best_val": trainer.best_val, "log_records": trainer.log_records, "finished": finished,
        "epoch_metrics": trainer.epoch_metrics.state(),
        "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
            "python_gauss": random.getstate()[2],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                      int(np_state[3]), float(np_state[4])],
        },
        "callbacks": [cb.state_dict() for cb in trainer.callbacks],
        "train_config": _jsonable(dataclasses.asdict(trainer.config)),
        "model_config": trainer.lm.config.to_dict(),
    }


def save_last(trainer: Trainer, finished: bool = False) -> Path | None:
    if not trainer.is_main or trainer.output_dir is None:
        return None
    state = training_state(trainer, finished)
    summary = {k: state[k] for k in ("step", "epoch", "batch_in_epoch", "best_val", "log_records", "finished")}
    summary["train_config"] = state["train_config"]

    def fill(tmp: Path) -> None:
        checkpoint.save_model_files(tmp, trainer.lm.model)
        trainer.lm.tokenizer.save(tmp)
        torch.save(state, tmp / STATE_FILE)
        (tmp / STATE_JSON).write_text(json.dumps(summary, indent=2), "utf-8")

    return _write_checkpoint(trainer, "last", fill, state)


def save_best(trainer: Trainer) -> None:
    if not trainer.is_main or trainer.output_dir is None:
        return

    def fill(tmp: Path) -> None:
        checkpoint.save_model_files(tmp, trainer.lm.model)
        trainer.lm.tokenizer.save(tmp)
        (tmp / "metrics.json").write_text(json.dumps({"step": trainer.step, "epoch": trainer.epoch + 1,
                                                      **(trainer.last_val or {})}, indent=2), "utf-8")

    _write_checkpoint(trainer, "best", fill, None)


def _state_bytes(trainer: Trainer, state: dict | None) -> int:
    """About what a checkpoint takes on disk: the weights, and the optimizer's state when it is saved."""
    total = sum(t.numel() * t.element_size() for t in trainer.lm.model.state_dict().values())
    if state is not None:
        for value in state["optimizer"].get("state", {}).values():
            for t in value.values():
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total + (1 << 20)  # the tokenizer, the configuration, the RNG states


def _is_disk_full(exc: BaseException) -> bool:
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)  # torch.save and safetensors report it in their own exception types
    return any(m in text for m in ("No space left", "os error 28", "Disk quota", "file write failed"))


def _write_checkpoint(trainer: Trainer, name: str, fill, state: dict | None) -> Path:
    """write_dir_atomically, with a full disk said in one sentence: the earlier checkpoint is intact (the new
    one is written beside it and moved in only when complete) and how much space the new one needs."""
    import shutil

    target = trainer.output_dir / name
    try:
        return checkpoint.write_dir_atomically(target, fill, overwrite=True)
    except Exception as exc:
        if not (_is_disk_full(exc) or (exc.__cause__ is not None and _is_disk_full(exc.__cause__))):
            raise
        need = _state_bytes(trainer, state)
        try:
            free = f", {shutil.disk_usage(trainer.output_dir).free / 1e6:,.0f} MB are free"
        except OSError:
            free = ""
        earlier = _saved_step(target)
        kept = (f"the earlier checkpoint in {target} (step {earlier}) is intact" if earlier is not None
                else f"nothing was written to {target}")
        raise TrainingError(
            f"The disk is full: the checkpoint of step {trainer.step} needs about {need / 1e6:,.0f} MB in "
            f"{trainer.output_dir}{free}; {kept}; free some space and continue with --resume.") from None


def _saved_step(directory: Path) -> int | None:
    try:
        return int(json.loads((directory / STATE_JSON).read_text("utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resume(trainer: Trainer) -> None:
    checkpoint.recover_dir(trainer.output_dir / "last")  # a kill between the checkpoint's two renames
    path = trainer.output_dir / "last" / STATE_FILE
    if not path.is_file():
        if trainer.is_main:
            logger.warning("No checkpoint in %s; training starts from scratch.", trainer.output_dir / "last")
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise TrainingError(f"The checkpoint {path} cannot be read ({type(exc).__name__}); "
                            "resume from another copy or start again without --resume.") from None
    missing = [k for k in REQUIRED_STATE if k not in state] if isinstance(state, dict) else list(REQUIRED_STATE)
    if missing:
        raise TrainingError(f"The checkpoint {path} is not a complete training state (it lacks "
                            f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}); resume from another copy "
                            "or start again without --resume.")
    try:
        _apply_state(trainer, state, path)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise TrainingError(f"The checkpoint {path} holds a training state this run cannot use "
                            f"({type(exc).__name__}: {str(exc)[:120]}); resume from another copy or start again "
                            "without --resume.") from None


REQUIRED_STATE = ("step", "epoch", "batch_in_epoch", "best_val", "log_records", "epoch_metrics", "optimizer",
                  "scheduler", "scaler", "rng", "model_config")


def _apply_state(trainer: Trainer, state: dict, path: Path) -> None:
    if state["model_config"] != trainer.lm.config.to_dict():
        raise TrainingError(f"The checkpoint in {path.parent} was made with a different model configuration; "
                            "resume with the same command that started the run.")
    check_resume_options(trainer, state.get("train_config") or {}, path.parent)
    weights = checkpoint.load_safetensors(path.parent / checkpoint.WEIGHTS_FILE)  # CheckpointError if cut
    model = trainer.lm.model
    missing, unexpected = model.load_state_dict(weights, strict=False)
    allowed = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise TrainingError(f"The weights in {path.parent} do not fit the model.")
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.step, trainer.epoch = int(state["step"]), int(state["epoch"])
    apply_new_lr(trainer, state.get("train_config") or {})
    trainer.batch_in_epoch = int(state["batch_in_epoch"])
    trainer.best_val = float(state["best_val"])
    trainer.log_records = int(state["log_records"])
    trainer.epoch_metrics.load_state(state["epoch_metrics"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_gauss"]))
    npst = rng["numpy"]
    np.random.set_state((npst[0], npst[1].numpy().astype(np.uint32), npst[2], npst[3], npst[4]))
    for cb, cb_state in zip(trainer.callbacks, state.get("callbacks", [])):
        if cb_state:
            cb.load_state_dict(cb_state)
    if trainer.is_main:
        logger.info("Resumed from %s at step %d (epoch %d, batch %d).", path.parent, trainer.step,
                    trainer.epoch + 1, trainer.batch_in_epoch)


def check_resume_options(trainer: Trainer, saved: dict[str, Any], where: Path) -> None:
    """Options a resume cannot change: the batch size fixes which examples each step of an epoch takes."""
    old = saved.get("batch_size")
    if old is not None and old != trainer.config.batch_size:
        raise TrainingError(
            f"The run in {where.parent} was trained with batch_size {old} and cannot resume with "
            f"{trainer.config.batch_size} (the position in the epoch counts batches); resume with batch_size "
            f"{old} (--batch-size {old}) or start a new run.")


def apply_new_lr(trainer: Trainer, saved: dict[str, Any]) -> None:
    """A resume with a different lr (say after a NaN stop) continues the schedule from the new base rate."""
    old, new = saved.get("lr"), trainer.config.lr
    if old is None or old == new:
        return
    for group in trainer.optimizer.param_groups:
        group["initial_lr"] = new
    trainer.scheduler.base_lrs = [new for _ in trainer.optimizer.param_groups]
    factors = [f(trainer.scheduler.last_epoch) for f in trainer.scheduler.lr_lambdas]
    for group, factor in zip(trainer.optimizer.param_groups, factors):
        group["lr"] = new * factor
    trainer.scheduler._last_lr = [g["lr"] for g in trainer.optimizer.param_groups]
    if trainer.is_main:
        msg = f"Resuming with learning rate {new:g} instead of the run's {old:g} (from step {trainer.step + 1} on)."
        logger.warning(msg)


def open_metrics_log(trainer: Trainer) -> None:
    if not trainer.is_main or trainer.output_dir is None:
        return
    trainer.output_dir.mkdir(parents=True, exist_ok=True)
    path = trainer.output_dir / METRICS_FILE
    kept: list[str] = []
    if trainer.config.resume and path.is_file():
        # Drop records written after the checkpoint we resumed from; they will be written again.
        kept = path.read_text("utf-8").splitlines()[: trainer.log_records]
        trainer.history = [json.loads(line) for line in kept]
    checkpoint.atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode("utf-8"))
    trainer._metrics_file = open(path, "a", encoding="utf-8")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


# Ctrl-C: the first SIGINT asks for a checkpoint at the current step, a second one aborts at once -------------
class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C after a resumable checkpoint of the current step was written.

    A KeyboardInterrupt, so code that stops on Ctrl-C still stops; `step` and `checkpoint` (last/, or None
    without an output directory) say where the run can go on (resume=True, --resume)."""

    def __init__(self, step: int, checkpoint_dir: Path | None) -> None:
        where = f"; a checkpoint of step {step} is in {checkpoint_dir}" if checkpoint_dir else \
            " (no output directory, so nothing was saved)"
        super().__init__(f"Training interrupted at step {step}{where}.")
        self.step = step
        self.checkpoint = checkpoint_dir


class graceful_interrupt:
    """While training in the main thread of a single process, the first SIGINT sets trainer.interrupt_requested
    (the step loop saves and raises TrainingInterrupted at the next step boundary); the second raises
    KeyboardInterrupt at once. Other handlers (a caller's own) are left alone."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.previous = None

    def _handle(self, signum, frame) -> None:
        import signal

        if self.trainer.interrupt_requested:
            signal.signal(signal.SIGINT, self.previous)
            raise KeyboardInterrupt
        self.trainer.interrupt_requested = True  # the one line is printed by whoever catches the exception

    def __enter__(self) -> "graceful_interrupt":
        import signal
        import threading

        self.trainer.interrupt_requested = False
        if (threading.current_thread() is threading.main_thread() and not self.trainer.dist.enabled
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self.previous = signal.default_int_handler
            signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self.previous is not None and signal.getsignal(signal.SIGINT) == self._handle:
            signal.signal(signal.SIGINT, self.previous)
        self.previous = None


def interrupt(trainer: Trainer, saved: Path | None = None) -> TrainingInterrupted:
    """The exception that ends an interrupted run, after the checkpoint of the current step (unless `saved`
    already holds it)."""
    if saved is None and trainer.output_dir is not None:
        saved = trainer.save_checkpoint()
    return TrainingInterrupted(trainer.step, saved)
