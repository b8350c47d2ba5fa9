"""`gptgen train`, `gptgen finetune`, `gptgen eval` and `gptgen quickstart`.

The commands parse flags and call the public API (gptgen.data readers and packing, Tokenizer.train,
LanguageModel.from_preset / gptgen.load, gptgen.training.fit / evaluate); they hold no training logic.
A recipe (`--recipe keras-mini`) is a set of flag defaults; flags given explicitly win.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from ..config import parse_overrides
from ..errors import ConfigError, DataError, TrainingError

# Flag defaults of the named recipes. keras-mini: the KerasHub mini-GPT tutorial (seed 002) on the
# paragraphs of the books corpus, exactly as described in docs/training.md.
RECIPES: dict[str, dict[str, Any]] = {
    "keras-mini": dict(
        preset="mini", train_tokenizer="wordpiece", vocab_size=5000, lowercase=True,
        reserved_tokens="[PAD],[UNK],[BOS]", dataset="books", reader="paragraphs", split="every_nth:10",
        min_length=512, seq_len=128, packing="pad", add_bos=True, batch_size=64, epochs=5, lr=1e-3,
        schedule="constant", weight_decay=0.0, adam_eps=1e-7, samples=True,
    ),
}

# Defaults of flags left unset by both the command line and the recipe.
DEFAULTS: dict[str, Any] = dict(
    reader="lines", packing="pad", epochs=1, batch_size=32, grad_accum=1, lr=3e-4,
    schedule="constant", warmup_steps=0, min_lr_ratio=0.0, weight_decay=0.0, adam_eps=1e-8, beta1=0.9,
    beta2=0.999, precision="auto", device="auto", seed=0, vocab_size=8000, lowercase=False, samples=True,
    sampler="top_k", sample_tokens=80, sample_prompt="", top_k=10, eval_batch_size=None,
)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# Argument groups ------------------------------------------------------------------------------------
def _data_args(p: argparse.ArgumentParser, with_split: bool = True) -> None:
    g = p.add_argument_group("data")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--data", nargs="+", metavar="PATH", help="text files, directories or globs")
    src.add_argument("--dataset", help="a named data set of gptgen.data.registry (e.g. books, tinyshakespeare)")
    g.add_argument("--reader", choices=["lines", "paragraphs", "documents", "json", "jsonl", "csv"],
                   help="how files become examples (default lines)")
    g.add_argument("--field", help="JSON/JSONL field holding the text")
    g.add_argument("--template", help="CSV template, e.g. '<s>{Q}</s><s>{A}</s>'")
    g.add_argument("--min-length", type=int, help="drop examples of this many characters or fewer (after the split)")
    g.add_argument("--seq-len", type=int, help="tokens per example (default the model's context)")
    g.add_argument("--packing", choices=["pad", "chunk"],
                   help="pad: one example per row, padded (default); chunk: concatenate and cut windows")
    g.add_argument("--add-bos", dest="add_bos", action="store_true", default=None, help="prefix examples with BOS")
    g.add_argument("--no-add-bos", dest="add_bos", action="store_false")
    g.add_argument("--add-eos", action="store_true", default=None, help="end examples with EOS")
    if with_split:
        g.add_argument("--val-data", nargs="+", metavar="PATH", help="validation files (instead of --split)")
        g.add_argument("--split", help="validation split of the data: 'every_nth:10' or 'fraction:0.1'")


def _packing_for(lm, args) -> tuple[int, bool]:
    """The example length and BOS choice for this model: --seq-len within its context, BOS as it was trained."""
    ctx = lm.config.n_positions
    if args.seq_len and args.seq_len > ctx:
        raise TrainingError(
            f"--seq-len {args.seq_len} is longer than the model's context of {ctx} positions; "
            f"use --seq-len {ctx} or less, or a model with a longer context."
        )
    add_bos = args.add_bos if args.add_bos is not None else bool(lm.config.extra.get("add_bos", False))
    return args.seq_len or ctx, add_bos


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (gptgen or Hugging Face GPT-2)")
    p.add_argument("--tokenizer", help="tokenizer directory or file, when the model directory has none")


def _train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--recipe", choices=sorted(RECIPES), help="a named set of defaults (see docs/training.md)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    g.add_argument("--minutes", type=float, help="stop (at a step boundary) after this much training time")
    g.add_argument("--batch-size", type=int, help="examples per optimizer step over all processes")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float)
    g.add_argument("--schedule", choices=["constant", "linear", "cosine"])
    g.add_argument("--warmup-steps", type=int)
    g.add_argument("--min-lr-ratio", type=float, help="floor of the linear/cosine decay, as a fraction of --lr")
    g.add_argument("--weight-decay", type=float, help="AdamW decay of weight matrices (0 = Adam)")
    g.add_argument("--adam-eps", type=float)
    g.add_argument("--beta1", type=float)
    g.add_argument("--beta2", type=float)
    g.add_argument("--grad-clip", type=float, help="clip the global gradient norm to this value")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model body")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--threads", type=int, help="CPU threads per process (default: cores / processes)")
    g.add_argument("--seed", type=int)
    g = p.add_argument_group("evaluation, checkpoints, samples")
    g.add_argument("--output", help="run directory (checkpoints, metrics.jsonl, curves.png)")
    g.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace a finished or abandoned run in --output")
    g.add_argument("--eval-every", type=int, help="evaluate every N steps (also at each epoch end)")
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument("--save-every", type=int, help="write a checkpoint every N steps (also at each epoch end)")
    g.add_argument("--early-stopping", type=int, metavar="PATIENCE",
                   help="stop when validation loss has not improved for this many evaluations")
    g.add_argument("--no-samples", dest="samples", action="store_false", default=None,
                   help="no text sample at epoch ends")
    g.add_argument("--sample-prompt", help="prompt of the epoch-end samples (default: empty, i.e. BOS only)")
    g.add_argument("--sample-tokens", type=int)
    g.add_argument("--sampler", help="sampler of the epoch-end samples (default top_k)")
    g.add_argument("--top-k", type=int)
    g.add_argument("--no-progress", dest="progress", action="store_false", default=True)
    g.add_argument("--json", action="store_true", help="print the final result as JSON")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a preset (and a tokenizer, given or trained here)")
    p.add_argument("--preset", help="model preset (mini, gpt2, ...)")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset field, e.g. --config n_layer=4 (repeatable)")
    tg = p.add_mutually_exclusive_group()
    tg.add_argument("--tokenizer", help="tokenizer directory or file")
    tg.add_argument("--train-tokenizer", choices=["wordpiece", "bpe", "byte-bpe", "unigram"],
                    help="train a tokenizer of this kind on the training examples first")
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--lowercase", action="store_true", default=None)
    p.add_argument("--reserved-tokens", help="comma-separated tokens placed first in the vocabulary")
    _data_args(p)
    _train_args(p)
    p.set_defaults(handler=run_train)

    p = sub.add_parser("finetune", help="fine-tune a gptgen or Hugging Face GPT-2 model directory")
    _model_args(p)
    _data_args(p)
    _train_args(p)
    p.set_defaults(handler=run_finetune)

    p = sub.add_parser("eval", help="loss, perplexity and token accuracy of a model on data")
    _model_args(p)
    _data_args(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.set_defaults(handler=run_eval)

    p = sub.add_parser("quickstart", help="train a small model on the packaged corpus in a few minutes (offline)")
    p.add_argument("--output", default="runs/quickstart", help="run directory (default ./runs/quickstart)")
    p.add_argument("--minutes", type=float, default=3.0, help="training time budget (default 3)")
    p.add_argument("--epochs", type=int, default=20, help="at most this many epochs (default 20)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=True)
    p.set_defaults(handler=run_quickstart)


# Option resolution ------------------------------------------------------------------------------
def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    recipe = RECIPES.get(getattr(args, "recipe", None) or "", {})
    for key, value in {**DEFAULTS, **recipe}.items():
        if key in recipe and getattr(args, key, None) is None:
            setattr(args, key, value)
        elif getattr(args, key, None) is None and key in DEFAULTS:
            setattr(args, key, DEFAULTS[key])
    # A recipe's dataset applies only when no --data was given.
    if getattr(args, "data", None):
        args.dataset = None
    return args


# Data ---------------------------------------------------------------------------------------------
def _reader_options(args) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if args.reader in ("json", "jsonl") and args.field:
        opts["field"] = args.field
    if args.reader == "csv" and args.template:
        opts["template"] = args.template
    return opts


def _read(paths, args) -> list[str]:
    from ..data.readers import read_texts

    return read_texts(paths, args.reader, **_reader_options(args))


def load_corpus(args) -> tuple[list[str], list[str] | None]:
    """The training and validation texts the flags describe (split first, then the length filter)."""
    from ..data.readers import apply_split, filter_min_length

    if args.data:
        examples = _read(args.data, args)
        source = " ".join(args.data)
    elif args.dataset:
        from ..data import registry

        options = {}
        if args.split:
            options["split"] = None if args.split == "none" else args.split
        resolved = registry.resolve_dataset(args.dataset, min_length=args.min_length, seed=args.seed or 0, **options)
        if isinstance(resolved, tuple):
            return resolved
        return resolved, None
    else:
        raise DataError("Say what to train on: --data PATH... (files, directories, globs) or --dataset NAME.")
    val = None
    if getattr(args, "val_data", None):
        val = _read(args.val_data, args)
        train = examples
    elif getattr(args, "split", None):
        split = apply_split(examples, args.split, seed=args.seed or 0)
        train, val = split if isinstance(split, tuple) else (split, None)
    else:
        train = examples
    train = filter_min_length(train, args.min_length or 0, source=source)
    if val is not None:
        val = filter_min_length(val, args.min_length or 0, source=f"{source} (validation)")
    return train, val


# Shared run logic ----------------------------------------------------------------------------------
def _epoch_printer(json_mode: bool):
    """A callback printing one line per epoch on rank 0 (built lazily: the CLI imports torch late)."""
    from ..training.callbacks import Callback

    class EpochPrinter(Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            if not trainer.is_main or json_mode:
                return
            line = (f"epoch {epoch + 1}/{trainer.num_epochs}: train loss {logs['train_loss']:.4f} "
                    f"ppl {logs['train_perplexity']:.1f} acc {logs['train_accuracy']:.4f}")
            if "val_loss" in logs:
                line += (f" | val loss {logs['val_loss']:.4f} ppl {logs['val_perplexity']:.1f} "
                         f"acc {logs['val_accuracy']:.4f}")
            print(line + f" | {logs['elapsed']:.0f} s", flush=True)

    return EpochPrinter()


def _train_options(args, output: Path | None) -> dict[str, Any]:
    return dict(
        epochs=args.epochs, max_steps=args.max_steps, max_time=args.minutes * 60 if args.minutes else None,
        batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, schedule=args.schedule,
        warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
        betas=(args.beta1, args.beta2), eps=args.adam_eps, grad_clip=args.grad_clip, precision=args.precision,
        compile=bool(args.compile), device=args.device, num_threads=None, eval_every=args.eval_every,
        eval_batch_size=args.eval_batch_size, save_every=args.save_every,
        output_dir=str(output) if output else None, resume=args.resume, overwrite=args.overwrite,
        early_stopping=args.early_stopping, seed=args.seed, progress=args.progress,
    )


def _set_threads(args, env) -> None:
    import torch

    threads = args.threads or max(1, _cores() // max(1, env.local_world_size))
    torch.set_num_threads(threads)


def _run(args, lm, train_texts, val_texts, output: Path | None, env, timings: dict[str, float]) -> int:
    from ..training import SampleText, fit

    seq_len, add_bos = _packing_for(lm, args)
    add_eos = bool(args.add_eos)
    if add_bos and args.packing == "pad":
        lm.config.extra["add_bos"] = True
    t0 = time.perf_counter()
    from ..data.packing import pack_texts

    train = pack_texts(train_texts, lm.tokenizer, seq_len, args.packing, add_bos, add_eos)
    val = pack_texts(val_texts, lm.tokenizer, seq_len, args.packing, add_bos, add_eos) if val_texts else None
    timings["tokenize_s"] = time.perf_counter() - t0
    if env.is_main and not args.json:
        print(f"{len(train):,} training and {len(val) if val is not None else 0:,} validation examples of "
              f"{seq_len} tokens; model {lm.num_parameters():,} parameters.", flush=True)
    callbacks = [_epoch_printer(args.json)]
    if args.samples:
        callbacks.append(SampleText(prompt=args.sample_prompt, max_new_tokens=args.sample_tokens,
                                    sampler=args.sampler, top_k=args.top_k, seed=args.seed,
                                    print_fn=None if args.json else print))
    result = fit(lm, train, val, callbacks=callbacks, **_train_options(args, output))
    timings["fit_s"] = result.elapsed
    if not env.is_main:
        return 0
    summary = {"steps": result.steps, "epochs": result.epochs, "stopped": result.stopped,
               "val": result.val, "train": result.train, **{k: round(v, 3) for k, v in timings.items()},
               "output": str(output) if output else None,
               "last": str(result.last_dir) if result.last_dir else None,
               "best": str(result.best_dir.resolve()) if result.best_dir else None,
               "curves": str(result.curves_path) if result.curves_path else None}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        if result.stopped:
            print(f"Stopped early: {result.stopped}.")
        if result.val:
            print(f"Validation: loss {result.val['loss']:.4f}, perplexity {result.val['perplexity']:.2f}, "
                  f"accuracy {result.val['accuracy']:.4f}.")
        print(f"Trained {result.steps} steps in {result.elapsed:.1f} s.")
        if output:
            print(f"Checkpoint: {result.last_dir}" + (f"; best model: {result.best_dir.resolve()}" if result.best_dir else ""))
            if result.curves_path:
                print(f"Loss curves: {result.curves_path}")
    return 0


def _init_env(args):
    from ..training import distributed as D

    device_type = "cuda" if (args.device in (None, "auto") and _cuda()) or str(args.device).startswith("cuda") else "cpu"
    return D.init_distributed(device_type)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_train(args) -> int:
    import torch

    from ..lm import LanguageModel
    from ..tokenizer import Tokenizer
    from ..training import distributed as D

    _resolve(args)
    if not args.preset:
        raise ConfigError("gptgen train needs --preset (mini, gpt2, ...) or --recipe; to start from a trained "
                          "model use gptgen finetune --model DIR.")
    if not args.tokenizer and not args.train_tokenizer:
        raise ConfigError("Give --tokenizer DIR, or --train-tokenizer KIND to train one on the training data.")
    output = Path(args.output) if args.output else None
    env = _init_env(args)
    try:
        _set_threads(args, env)
        timings: dict[str, float] = {}
        train_texts, val_texts = load_corpus(args)
        resumed_tok = output / "last" if (args.resume and output and (output / "last" / "tokenizer.json").is_file()) else None
        if args.tokenizer:
            tok = Tokenizer.from_pretrained(args.tokenizer)
        elif resumed_tok is not None:
            tok = Tokenizer.from_pretrained(resumed_tok)
        else:
            tok_dir = (output / "tokenizer") if output else None
            if env.is_main:
                t0 = time.perf_counter()
                reserved = [t for t in (args.reserved_tokens or "").split(",") if t] or None
                tok = Tokenizer.train(args.train_tokenizer, train_texts, args.vocab_size,
                                      lowercase=bool(args.lowercase), reserved_tokens=reserved)
                timings["tokenizer_s"] = time.perf_counter() - t0
                if not args.json:
                    print(f"Trained a {args.train_tokenizer} tokenizer of {tok.vocab_size:,} tokens in "
                          f"{timings['tokenizer_s']:.1f} s.", flush=True)
                if tok_dir is not None:
                    tok.save(tok_dir)
            if env.enabled:
                if tok_dir is None:
                    raise TrainingError("Distributed training with --train-tokenizer needs --output.")
                D.barrier(env)
                if not env.is_main:
                    tok = Tokenizer.from_pretrained(tok_dir)
        overrides = parse_overrides(args.config)
        torch.manual_seed(args.seed)
        try:
            lm = LanguageModel.from_preset(args.preset, tok, **overrides)
        except TypeError as exc:
            raise ConfigError(f"Bad --config override: {exc}.") from None
        if args.add_bos is None:
            args.add_bos = args.packing == "pad" and tok.bos_token_id is not None
        return _run(args, lm, train_texts, val_texts, output, env, timings)
    finally:
        D.shutdown(env)


def run_finetune(args) -> int:
    import torch

    from ..lm import load
    from ..training import distributed as D

    _resolve(args)
    output = Path(args.output) if args.output else None
    env = _init_env(args)
    try:
        _set_threads(args, env)
        lm = load(args.model, tokenizer=args.tokenizer)
        torch.manual_seed(args.seed)
        train_texts, val_texts = load_corpus(args)
        return _run(args, lm, train_texts, val_texts, output, env, {})
    finally:
        D.shutdown(env)


def run_eval(args) -> int:
    import torch

    from ..lm import load
    from ..training import evaluate

    for key in ("reader", "packing"):
        if getattr(args, key) is None:
            setattr(args, key, DEFAULTS[key])
    args.seed = 0
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(args.model, tokenizer=args.tokenizer)
    train_texts, val_texts = load_corpus(args)
    texts = val_texts if val_texts is not None else train_texts
    seq_len, add_bos = _packing_for(lm, args)
    from ..data.packing import pack_texts

    data = pack_texts(texts, lm.tokenizer, seq_len, args.packing, add_bos, bool(args.add_eos))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    metrics = evaluate(lm, data, batch_size=args.batch_size, device=device, precision=args.precision)
    metrics["examples"] = len(data)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"loss {metrics['loss']:.4f}  perplexity {metrics['perplexity']:.2f}  accuracy "
              f"{metrics['accuracy']:.4f}  ({metrics['tokens']:,} tokens in {len(data):,} examples)")
    return 0


# Quickstart --------------------------------------------------------------------------------------
def quickstart_corpus() -> list[Path]:
    """The files of the public-domain corpus packaged with gptgen (the `quickstart` data set)."""
    from ..data.registry import dataset_files

    return dataset_files("quickstart")


def run_quickstart(args) -> int:
    import torch

    from ..data.registry import resolve_dataset
    from ..lm import LanguageModel
    from ..tokenizer import Tokenizer
    from ..training import SampleText, fit

    threads = args.threads or _cores()
    torch.set_num_threads(threads)
    output = Path(args.output)
    files = quickstart_corpus()
    train_texts, val_texts = resolve_dataset("quickstart")
    print(f"Corpus: {len(files)} packaged file(s), {len(train_texts):,} training and {len(val_texts):,} "
          f"validation paragraphs; {threads} CPU thread(s).", flush=True)
    t0 = time.perf_counter()
    tok = Tokenizer.train("wordpiece", train_texts, 4000, lowercase=True,
                          reserved_tokens=["[PAD]", "[UNK]", "[BOS]"])
    print(f"Trained a WordPiece tokenizer of {tok.vocab_size:,} tokens in {time.perf_counter() - t0:.1f} s.",
          flush=True)
    torch.manual_seed(args.seed)
    lm = LanguageModel.from_preset("mini", tok)
    lm.config.extra["add_bos"] = True
    seq_len = lm.config.n_positions
    from ..data.packing import pack_texts

    train = pack_texts(train_texts, tok, seq_len, "pad", True, False)
    val = pack_texts(val_texts, tok, seq_len, "pad", True, False)
    print(f"Model: the mini preset, {lm.num_parameters():,} parameters; {len(train):,} training examples of "
          f"{seq_len} tokens. Training for at most {args.minutes:g} minutes / {args.epochs} epochs.", flush=True)
    sampler_cb = SampleText(prompt="", max_new_tokens=40, sampler="top_k", top_k=10, seed=args.seed)
    result = fit(lm, train, val, callbacks=[_epoch_printer(False), sampler_cb], epochs=args.epochs,
                 max_time=args.minutes * 60, batch_size=32, lr=1e-3, schedule="constant", eps=1e-7,
                 output_dir=str(output), overwrite=True, seed=args.seed, progress=args.progress,
                 early_stopping=2)
    print()
    if result.stopped:
        print(f"Stopped: {result.stopped}.")
    val_ppl = result.val["perplexity"] if result.val else math.nan
    print(f"Validation perplexity after {result.steps} steps ({result.elapsed:.0f} s): {val_ppl:.1f}")
    model_dir = result.best_dir or result.last_dir
    if result.best_dir is not None and (result.best_dir / "metrics.json").is_file():
        best_metrics = json.loads((result.best_dir / "metrics.json").read_text("utf-8"))
        print(f"Best validation perplexity: {best_metrics['perplexity']:.1f} (epoch {best_metrics['epoch']}, "
              f"step {best_metrics['step']}); the samples below come from that model.")
    from ..lm import load

    best = load(model_dir)
    for name, options in (("greedy", dict(sampler="greedy")), ("top-k 10", dict(sampler="top_k", top_k=10))):
        text = SampleText(prompt="", max_new_tokens=40, seed=args.seed, print_fn=None, **options).generate(best)
        if text is not None:
            print(f"Sample ({name}): {text}")
    print(f"Model directory: {model_dir}")
    if result.curves_path:
        print(f"Loss curves: {result.curves_path}")
    else:
        print("No loss-curve PNG: install matplotlib (pip install 'gptgen[plot]').")
    print(f"Try: gptgen generate --model {model_dir} 'the' --sampler top_k --top-k 10")
    return 0
