"""The flags every recipe takes, and where it writes its results. Everything else a recipe does is a call
of the public gptgen API, written out in the recipe itself."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def parser(name: str, description: str, **defaults: Any) -> argparse.ArgumentParser:
    """The flags every recipe takes; `defaults` are the recipe's full-size values."""
    p = argparse.ArgumentParser(prog=f"recipes/{name}.py", description=description)
    p.add_argument("--data-dir", help="folder holding books/, tinyshakespeare/, chatbot-ko/, ... "
                                      "(default $GPTGEN_DATA_DIR, else ~/.cache/gptgen/data)")
    p.add_argument("--output", default=f"runs/{name}", help=f"run directory (default runs/{name})")
    p.add_argument("--overwrite", action="store_true", help="replace the models an earlier run of this recipe saved")
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


def fit_options(args) -> dict[str, Any]:
    """The options of LanguageModel.fit that the common flags set."""
    return dict(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                device=args.device, precision=args.precision,
                progress=not (args.quiet or args.no_progress))


def save_results(out: Path, results: dict[str, Any]) -> Path:
    """OUTPUT/results.json: the numbers and texts the recipe printed."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str), "utf-8")
    return path
