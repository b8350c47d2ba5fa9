"""Training callbacks: text samples at epoch end, early stopping, the loss-curve PNG.

A callback subclasses Callback and overrides the hooks it needs; each hook gets the Trainer (its `lm`,
`step`, `epoch`, `is_main`, `output_dir`, `should_stop`, and `log(record)` for the metrics JSONL).
Callbacks whose decisions must survive `--resume` keep them in state_dict()/load_state_dict().
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("gptgen.training")


class Callback:
    def on_train_begin(self, trainer) -> None: ...
    def on_step_end(self, trainer, logs: dict[str, Any]) -> None: ...
    def on_evaluate(self, trainer, logs: dict[str, Any]) -> None: ...
    def on_epoch_end(self, trainer, epoch: int, logs: dict[str, Any]) -> None: ...
    def on_train_end(self, trainer, logs: dict[str, Any]) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class SampleText(Callback):
    """Generate a text sample at each epoch end (seed 002's TopKTextGenerator) and log it.

    Uses lm.generate with the given sampler; if the generation package is unavailable the callback
    warns once and does nothing.
    """

    def __init__(self, prompt: str = "", max_new_tokens: int = 80, sampler: str = "top_k", top_k: int = 10,
                 seed: int = 0, every_n_epochs: int = 1, print_fn=print, **options: Any) -> None:
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.sampler = sampler
        self.top_k = top_k
        self.seed = seed
        self.every_n_epochs = every_n_epochs
        self.print_fn = print_fn
        self.options = options
        self._disabled = False
        self.samples: list[str] = []

    def generate(self, lm) -> str | None:
        if self._disabled:
            return None
        try:
            import gptgen.generation  # noqa: F401
        except ImportError as exc:
            warnings.warn(f"Text samples are skipped: gptgen.generation is not available ({exc}).", stacklevel=2)
            self._disabled = True
            return None
        options = dict(max_new_tokens=self.max_new_tokens, sampler=self.sampler, seed=self.seed, **self.options)
        if self.sampler == "top_k":
            options["top_k"] = self.top_k
        was_training = lm.model.training
        lm.model.eval()
        try:
            with torch.random.fork_rng(devices=[]):  # sampling must not move the training RNG
                out = lm.generate(self.prompt, **options)
        except (NotImplementedError, AttributeError, TypeError) as exc:
            warnings.warn(f"Text samples are skipped: generation failed ({type(exc).__name__}: {exc}).", stacklevel=2)
            self._disabled = True
            return None
        finally:
            lm.model.train(was_training)
        text = out[0] if isinstance(out, (list, tuple)) else out
        return str(text)

    def on_epoch_end(self, trainer, epoch: int, logs: dict[str, Any]) -> None:
        if not trainer.is_main or (epoch + 1) % self.every_n_epochs or getattr(trainer, "fsdp", False):
            return  # under FSDP no rank holds the whole model until training ends
        text = self.generate(trainer.lm)
        if text is None:
            return
        self.samples.append(text)
        trainer.log({"event": "sample", "step": trainer.step, "epoch": epoch + 1, "sampler": self.sampler,
                     "text": text})
        if self.print_fn is not None:
            self.print_fn(f"[epoch {epoch + 1} sample, {self.sampler}] {text}")


class EarlyStopping(Callback):
    """Stop when the monitored validation metric has not improved for `patience` evaluations."""

    def __init__(self, monitor: str = "loss", patience: int = 2, min_delta: float = 0.0) -> None:
        self.monitor = monitor
        self.patience = patience
        self.min_delta = min_delta
        self.best = math.inf
        self.bad_evals = 0

    def on_evaluate(self, trainer, logs: dict[str, Any]) -> None:
        value = logs.get(self.monitor)
        if value is None or not math.isfinite(value):
            return
        if value < self.best - self.min_delta:
            self.best, self.bad_evals = value, 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.patience:
            trainer.request_stop(f"early stopping: validation {self.monitor} has not improved for "
                                 f"{self.patience} evaluation(s) (best {self.best:.4f})")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_evals = float(state["best"]), int(state["bad_evals"])


class LossCurvePlot(Callback):
    """Write the loss/perplexity curves of metrics.jsonl to a PNG (needs the `plot` extra: matplotlib)."""

    def __init__(self, filename: str = "curves.png", min_interval: float = 60.0) -> None:
        self.filename = filename
        self.min_interval = min_interval  # seconds between redraws during training (a redraw costs ~0.3-1 s)
        self._warned = False
        self._last_write = None

    def _write(self, trainer) -> None:
        if not trainer.is_main or trainer.output_dir is None:
            return
        try:
            path = plot_curves(trainer.output_dir / "metrics.jsonl", trainer.output_dir / self.filename)
        except ImportError:
            if not self._warned:
                logger.warning("matplotlib is not installed, so no loss-curve PNG is written "
                               "(pip install 'gptgen[plot]').")
                self._warned = True
            return
        trainer.curves_path = path

    def on_epoch_end(self, trainer, epoch: int, logs: dict[str, Any]) -> None:
        now = time.monotonic()
        if self._last_write is None or now - self._last_write >= self.min_interval:
            self._write(trainer)
            self._last_write = time.monotonic()

    def on_train_end(self, trainer, logs: dict[str, Any]) -> None:
        self._write(trainer)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


def plot_curves(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """Plot training loss per step and validation loss/perplexity per evaluation; ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..checkpoint import atomic_write_bytes

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("event") == "step"]
    val = [(r["step"], r["loss"], r["perplexity"]) for r in records if r.get("event") == "eval"]
    if not train and not val:
        return None
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot(*zip(*train), label="train loss", linewidth=0.8)
        ax_ppl.plot([s for s, _ in train], [math.exp(min(l, 50)) for _, l in train], label="train perplexity",
                    linewidth=0.8)
    if val:
        ax_loss.plot([s for s, _, _ in val], [l for _, l, _ in val], "o-", label="validation loss")
        ax_ppl.plot([s for s, _, _ in val], [p for _, _, p in val], "o-", label="validation perplexity")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy")
    ax_ppl.set_xlabel("step")
    ax_ppl.set_ylabel("perplexity")
    ax_ppl.set_yscale("log")
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    png_path = Path(png_path)
    atomic_write_bytes(png_path, buf.getvalue())
    return png_path


class PrintEpochs(Callback):
    """One line per epoch: training and validation loss, perplexity and accuracy, and the time so far."""

    def __init__(self, print_fn=print) -> None:
        self.print_fn = print_fn

    def on_epoch_end(self, trainer, epoch: int, logs: dict[str, Any]) -> None:
        if not trainer.is_main:
            return
        line = (f"epoch {epoch + 1}/{trainer.num_epochs}: train loss {logs['train_loss']:.4f} "
                f"ppl {logs['train_perplexity']:.1f} acc {logs['train_accuracy']:.4f}")
        if "val_loss" in logs:
            line += (f" | val loss {logs['val_loss']:.4f} ppl {logs['val_perplexity']:.1f} "
                     f"acc {logs['val_accuracy']:.4f}")
        self.print_fn(line + f" | {logs['elapsed']:.0f} s")
