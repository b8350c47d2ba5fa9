"""`gptgen train`, `gptgen finetune`, `gptgen eval` and `gptgen quickstart`: flags in, gptgen.train out.

Each command turns its flags into the keywords of the public API (gptgen.train, gptgen.pipeline.evaluate_corpus)
and prints what comes back; the pipeline itself (corpus, tokenizer, model, Trainer) lives in gptgen.pipeline.
A recipe (`--recipe keras-mini`) is a set of defaults (gptgen.recipes); flags given explicitly win.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from ..config import parse_overrides
from ..options import check_minutes
from ..recipes import RECIPES


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


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="a model directory (gptgen, Hugging Face GPT-2, KerasHub preset) or a Hub name "
                        "(gpt2, skt/kogpt2-base-v2, gpt2_base_en)")
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


def _memory_args(p: argparse.ArgumentParser, lora: bool) -> None:
    g = p.add_argument_group("memory (LoRA, activation checkpointing, FSDP; see docs/training.md)")
    if lora:
        g.add_argument("--lora-rank", type=int, metavar="R",
                       help="train rank-R LoRA adapters only, the base frozen (peft-format adapters in the run's "
                            "last/ and best/)")
        g.add_argument("--lora-alpha", type=float, help="LoRA scaling numerator: adapters scale by alpha/rank "
                                                        "(default 16)")
        g.add_argument("--lora-dropout", type=float, help="dropout on the adapters' input (default 0)")
        g.add_argument("--lora-target", nargs="+", metavar="NAME",
                       help="layers given adapters: c_attn c_proj c_fc (the default: every block Linear), or a "
                            "regex of whole names such as 'blocks\\.[0-5]\\..*'")
    g.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute each block's activations in the backward pass: less memory, ~30%% more time")
    g.add_argument("--fsdp", action="store_true", default=None,
                   help="under torchrun: shard weights, gradients and Adam state over the processes (FSDP2) "
                        "instead of copying them to each (DDP)")


class _MemoryHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Fills the description's {memory_table} only when --help is shown (the estimate takes a moment)."""

    def _fill_text(self, text, width, indent):
        if "{memory_table}" in text:
            try:
                from ..pipeline import memory_table

                table = "Estimated memory (gptgen.training.memory.estimate_memory), " + memory_table(devices=4)
            except Exception:  # --help never fails on the estimate
                table = ""
            text = text.replace("{memory_table}", table)
        return super()._fill_text(text, width, indent)


def _memory_settings(args) -> dict[str, Any]:
    target = getattr(args, "lora_target", None)
    if target is not None and len(target) == 1 and any(c in target[0] for c in "\\.*[("):
        target = target[0]  # one regex
    return dict(lora_rank=getattr(args, "lora_rank", None), lora_alpha=getattr(args, "lora_alpha", None),
                lora_dropout=getattr(args, "lora_dropout", None), lora_target=target,
                gradient_checkpointing=args.gradient_checkpointing, fsdp=args.fsdp)


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
    _memory_args(p, lora=False)
    p.set_defaults(handler=run_train)

    p = sub.add_parser(
        "finetune", help="fine-tune a gptgen or Hugging Face GPT-2 model directory",
        formatter_class=_MemoryHelpFormatter,
        description="Fine-tune a model. Which mode fits your memory (printed before training starts):\n"
                    "  full (default)   every weight trains; ~16 bytes a parameter plus activations\n"
                    "  --lora-rank 8    adapters only (<1% of the weights train): the model fits where full\n"
                    "                   fine-tuning does not; add --gradient-checkpointing for long sequences\n"
                    "  --fsdp           under torchrun: full fine-tuning sharded over the processes\n"
                    "                   (weights, gradients and Adam state divided by their number)\n\n"
                    "{memory_table}")
    _model_args(p)
    _data_args(p)
    _train_args(p)
    _memory_args(p, lora=True)
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
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --output")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=True)
    p.set_defaults(handler=run_quickstart)


# Flags -> API keywords -----------------------------------------------------------------------------
def _data_settings(args) -> dict[str, Any]:
    return dict(data=args.data, dataset=args.dataset, val_data=getattr(args, "val_data", None), reader=args.reader,
                field=args.field, template=args.template, split=getattr(args, "split", None),
                min_length=args.min_length, seq_len=args.seq_len, packing=args.packing, add_bos=args.add_bos,
                add_eos=args.add_eos)


def _train_settings(args) -> dict[str, Any]:
    check_minutes(args.minutes, "--minutes")
    betas = None
    if args.beta1 is not None or args.beta2 is not None:
        betas = (0.9 if args.beta1 is None else args.beta1, 0.999 if args.beta2 is None else args.beta2)
    return dict(
        **_data_settings(args), epochs=args.epochs, max_steps=args.max_steps,
        max_time=args.minutes * 60 if args.minutes is not None else None, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, schedule=args.schedule, warmup_steps=args.warmup_steps,
        min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, betas=betas, eps=args.adam_eps,
        grad_clip=args.grad_clip, precision=args.precision, compile=args.compile, device=args.device,
        threads=args.threads, seed=args.seed, output_dir=args.output, resume=args.resume or None,
        overwrite=args.overwrite or None, eval_every=args.eval_every, eval_batch_size=args.eval_batch_size,
        save_every=args.save_every, early_stopping=args.early_stopping, samples=args.samples,
        sample_prompt=args.sample_prompt, sample_tokens=args.sample_tokens, sampler=args.sampler, top_k=args.top_k,
        progress=args.progress, print_fn=None if args.json else _print, **_memory_settings(args),
    )


def _print(line: str) -> None:
    print(line, flush=True)


def _report(run, as_json: bool) -> int:
    if not run.is_main:
        return 0
    summary = run.summary()
    if as_json:
        print(json.dumps(summary, indent=2))
        return 0
    if run.result.stopped:
        print(f"Stopped early: {run.result.stopped}.")
    if run.val:
        print(f"Validation: loss {run.val['loss']:.4f}, perplexity {run.val['perplexity']:.2f}, "
              f"accuracy {run.val['accuracy']:.4f}.")
    print(f"Trained {run.steps} steps in {run.result.elapsed:.1f} s.")
    if run.output_dir:
        print(f"Checkpoint: {summary['last']}" + (f"; best model: {summary['best']}" if summary["best"] else ""))
        if summary["curves"]:
            print(f"Loss curves: {summary['curves']}")
    return 0


# Ctrl-C ------------------------------------------------------------------------------------------------
def _resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted run: the same flags, --resume instead of --overwrite."""
    import shlex

    flags = [a for a in argv if a != "--overwrite"]
    if "--resume" not in flags:
        flags.append("--resume")
    return shlex.join(["gptgen", *flags])


def _interruptible(handler):
    """A command whose training stops cleanly on Ctrl-C: one line saying where the checkpoint is and the
    command that resumes it, exit status 130."""
    import functools
    import sys

    @functools.wraps(handler)
    def run(args) -> int:
        try:
            return handler(args)
        except KeyboardInterrupt as exc:  # gptgen.training.checkpointing.TrainingInterrupted carries a step
            if getattr(exc, "step", None) is None:
                raise
            if exc.checkpoint is None:
                print(f"gptgen: {exc} (pass --output to keep a checkpoint)", file=sys.stderr, flush=True)
            else:
                print(f"gptgen: interrupted at step {exc.step}; saved {exc.checkpoint}; resume with: "
                      f"{_resume_command(sys.argv[1:])}", file=sys.stderr, flush=True)
            return 130

    return run


# Commands ----------------------------------------------------------------------------------------------
@_interruptible
def run_train(args) -> int:
    from ..pipeline import train

    reserved = [t for t in (args.reserved_tokens or "").split(",") if t] or None
    run = train(args.recipe, preset=args.preset, config=parse_overrides(args.config) or None,
                tokenizer=args.tokenizer, train_tokenizer=args.train_tokenizer, vocab_size=args.vocab_size,
                lowercase=args.lowercase, reserved_tokens=reserved, **_train_settings(args))
    return _report(run, args.json)


@_interruptible
def run_finetune(args) -> int:
    from ..pipeline import train

    run = train(args.recipe, model=args.model, tokenizer=args.tokenizer, **_train_settings(args))
    return _report(run, args.json)


def run_eval(args) -> int:
    from ..pipeline import evaluate_corpus

    metrics = evaluate_corpus(args.model, tokenizer=args.tokenizer, **_data_settings(args),
                              batch_size=args.batch_size, device=args.device, precision=args.precision,
                              threads=args.threads)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"loss {metrics['loss']:.4f}  perplexity {metrics['perplexity']:.2f}  accuracy "
              f"{metrics['accuracy']:.4f}  ({metrics['tokens']:,} tokens in {metrics['examples']:,} examples)")
    return 0


def run_quickstart(args) -> int:
    from ..lm import load
    from ..pipeline import train

    check_minutes(args.minutes, "--minutes")
    run = train("quickstart", output_dir=args.output, max_time=args.minutes * 60, epochs=args.epochs,
                threads=args.threads, seed=args.seed, overwrite=args.overwrite or None, progress=args.progress,
                print_fn=_print)
    print()
    if run.result.stopped:
        print(f"Stopped: {run.result.stopped}.")
    val_ppl = run.val["perplexity"] if run.val else math.nan
    print(f"Validation perplexity after {run.steps} steps ({run.result.elapsed:.0f} s): {val_ppl:.1f}")
    if run.best_dir is not None and (run.best_dir / "metrics.json").is_file():
        best = json.loads((run.best_dir / "metrics.json").read_text("utf-8"))
        print(f"Best validation perplexity: {best['perplexity']:.1f} (epoch {best['epoch']}, step {best['step']}); "
              "the samples below come from that model.")
    model = load(run.model_dir)
    for name, options in (("greedy", dict(sampler="greedy")), ("top-k 10", dict(sampler="top_k", top_k=10))):
        print(f"Sample ({name}): {model.generate('', max_new_tokens=40, seed=args.seed, **options)}")
    print(f"Model directory: {run.model_dir}")
    print(f"Loss curves: {run.result.curves_path}" if run.result.curves_path
          else "No loss-curve PNG: install matplotlib (pip install 'gptgen[plot]').")
    print(f"Try: gptgen generate --model {run.model_dir} 'the' --sampler top_k --top-k 10")
    return 0
