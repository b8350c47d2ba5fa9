"""Helpers shared by the recipes: flags, data location, model construction, training with a per-evaluation
log, side-by-side samples and the results file. Only the public gptgen API is used here."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gptgen import LanguageModel
from gptgen.config import parse_overrides
from gptgen.training import Callback, fit

REPO = Path(__file__).resolve().parents[1]


def data_root(value: str | None) -> Path:
    """--data-dir, else $GPTGEN_DATA_DIR, else ../shared/data beside the checkout, else ~/.cache/gptgen/data."""
    if value:
        return Path(value).expanduser()
    if os.environ.get("GPTGEN_DATA_DIR"):
        return Path(os.environ["GPTGEN_DATA_DIR"]).expanduser()
    beside = REPO.parent / "shared" / "data"
    if beside.is_dir():
        return beside
    from gptgen.data import data_dir

    return data_dir()


def parser(name: str, description: str, **defaults: Any) -> argparse.ArgumentParser:
    """The flags every recipe takes; `defaults` are the recipe's full-size values."""
    p = argparse.ArgumentParser(prog=f"recipes/{name}.py", description=description)
    p.add_argument("--data-dir", help="folder holding books/, tinyshakespeare/, chatbot-ko/, ... "
                                      "(default $GPTGEN_DATA_DIR or ../shared/data)")
    p.add_argument("--output", default=f"runs/{name}", help=f"run directory (default runs/{name})")
    p.add_argument("--epochs", type=int, default=defaults.get("epochs", 1))
    p.add_argument("--max-steps", type=int, default=None, help="stop training after this many optimizer steps")
    p.add_argument("--limit", type=int, default=defaults.get("limit"),
                   help="use at most N training examples (validation: N/10, at least 8)")
    p.add_argument("--batch-size", type=int, default=defaults.get("batch_size", 32))
    p.add_argument("--lr", type=float, default=defaults.get("lr", 1e-3))
    p.add_argument("--seq-len", type=int, default=defaults.get("seq_len", 128), help="tokens per example")
    p.add_argument("--preset", default=defaults.get("preset", "mini"), help="model preset for a new model")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset field of a new model, e.g. --config n_layer=4 (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=defaults.get("max_new_tokens", 60),
                   help="tokens per generated sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, help="CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar and less printing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def setup(args) -> Path:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    return out


def limit_split(train: list, val: list, limit: int | None) -> tuple[list, list]:
    if not limit:
        return list(train), list(val)
    return list(train[:limit]), list(val[:max(8, limit // 10)])


def new_model(args, tokenizer, **defaults: Any) -> LanguageModel:
    """A fresh model of --preset sized to the tokenizer, with the recipe's defaults and --config on top."""
    overrides = {**defaults, **parse_overrides(args.config)}
    return LanguageModel.from_preset(args.preset, tokenizer, **overrides)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class EvalLog(Callback):
    """Records every validation evaluation (step, epoch, loss, perplexity, accuracy) and prints epochs."""

    def __init__(self, quiet: bool = False) -> None:
        self.evals: list[dict[str, float]] = []
        self.epochs: list[dict[str, float]] = []
        self.quiet = quiet

    def on_evaluate(self, trainer, logs):
        self.evals.append({"step": trainer.step, **{k: logs[k] for k in ("loss", "perplexity", "accuracy")}})

    def on_epoch_end(self, trainer, epoch, logs):
        rec = {"epoch": epoch + 1, "train_loss": logs["train_loss"], "train_accuracy": logs["train_accuracy"]}
        if "val_loss" in logs:
            rec.update(val_loss=logs["val_loss"], val_perplexity=logs["val_perplexity"],
                       val_accuracy=logs["val_accuracy"])
        self.epochs.append(rec)
        if not self.quiet:
            line = f"epoch {epoch + 1}: train loss {logs['train_loss']:.4f} acc {logs['train_accuracy']:.4f}"
            if "val_loss" in logs:
                line += (f" | val loss {logs['val_loss']:.4f} ppl {logs['val_perplexity']:.2f} "
                         f"acc {logs['val_accuracy']:.4f}")
            print(line, flush=True)


def train(lm: LanguageModel, train_data, val_data, args, callbacks=(), **options: Any):
    """fit() with the recipe's flags; returns (FitResult, EvalLog)."""
    log = EvalLog(quiet=args.quiet)
    opts = dict(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                seed=args.seed, device=args.device, precision=args.precision,
                progress=not (args.quiet or args.no_progress))
    opts.update(options)
    result = fit(lm, train_data, val_data, callbacks=[log, *callbacks], **opts)
    return result, log


def generate_table(lm: LanguageModel, prompt: str, samplers: dict[str, dict[str, Any]],
                   **common: Any) -> dict[str, str]:
    """One generation of `prompt` per named sampler setting."""
    out = {}
    for name, options in samplers.items():
        text = lm.generate(prompt, include_prompt=False, **{**common, **options})
        out[name] = text if isinstance(text, str) else text[0]
    return out


def print_table(title: str, table: dict[str, str], quiet: bool = False) -> None:
    if quiet:
        return
    print(f"\n{title}")
    width = max(len(k) for k in table)
    for name, text in table.items():
        print(f"  {name:<{width}} | {text!r}")


def ppl(metrics: dict[str, float]) -> float:
    return float(metrics["perplexity"]) if math.isfinite(metrics["perplexity"]) else float("inf")


def save_results(out: Path, results: dict[str, Any]) -> Path:
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str), "utf-8")
    return path


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return round(time.perf_counter() - self.t0, 1)


def run_main(main) -> None:
    sys.exit(0 if main(sys.argv[1:]) is not None else 1)
