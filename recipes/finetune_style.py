"""Recipe 2: fine-tune a GPT-2-format model on a new style (the KerasHub GPT-2 tutorial's Reddit step).

The tutorial fine-tunes pretrained GPT-2 124M on Reddit TIFU posts (batch 32, 500 batches, Adam with a
linear decay from 5e-5 to 0). No GPT-2 weights nor Reddit data are reachable offline, so by default this
recipe first *pretrains briefly* a small GPT-2-shaped model (GPT-2's own byte-level BPE from
gpt2-tokenizer/) on the books corpus and saves it as a Hugging Face GPT-2 directory, then fine-tunes that
directory on a different style, tinyshakespeare, with the linear-decay schedule; generations and
perplexities before and after show the style change. `--base DIR` starts from any GPT-2 directory instead
(e.g. `--base gpt2`, the real GPT-2 124M from the Hugging Face Hub).

    python recipes/finetune_style.py --base gpt2 --lr 5e-5 --batch-size 32 --max-steps 500   # the tutorial
    python recipes/finetune_style.py --pretrain-steps 300 --max-steps 300                        # CPU demo
    python recipes/finetune_style.py --base gpt2 --lora-rank 8 --lr 1e-3 --max-steps 500           # LoRA
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402

from gptgen import LanguageModel, Tokenizer, load  # noqa: E402
from gptgen.config import parse_overrides  # noqa: E402
from gptgen.data import Corpus, chunk_tokens, data_dir, resolve_dataset  # noqa: E402
from gptgen.options import resolve_device  # noqa: E402
from gptgen.training import PrintEpochs  # noqa: E402

PROMPTS = ["The king said", "My lord,"]
SAMPLERS = {"greedy": dict(sampler="greedy"), "top-k (10)": dict(sampler="top_k", top_k=10)}
MODEL = dict(n_layer=4, n_embd=256, n_head=4)


def build_parser():
    p = C.parser("finetune_style", __doc__.split("\n\n")[0], preset="gpt2", epochs=1, batch_size=16, lr=3e-4,
                 seq_len=128, max_new_tokens=40)
    p.add_argument("--base", help="a GPT-2 to fine-tune: a directory (Hugging Face or gptgen) or a Hub name such "
                                  "as gpt2; default: pretrain a small one")
    p.add_argument("--pretrain-steps", type=int, default=300, help="steps of the brief pretraining on books")
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--train-tokenizer", type=int, metavar="VOCAB",
                   help="train a GPT-2-style byte-level BPE of VOCAB tokens on books instead of GPT-2's own")
    p.add_argument("--prompts", nargs="+", default=PROMPTS)
    p.add_argument("--lora-rank", type=int, help="fine-tune rank-R LoRA adapters only (the base frozen; try a 10x "
                                                 "higher --lr); the adapter is saved in peft's format too")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    return p


def chunks(tok, texts, seq_len):
    """Pretraining-style windows: the texts joined with the end-of-text token and cut into seq_len."""
    return chunk_tokens(tok.encode_batch(texts), seq_len, eos_id=tok.eos_token_id)


def measure(lm, prompts, args, style_val, books_val):
    """Validation perplexity on both styles, and greedy and top-k continuations of each prompt."""
    gens = {p: {name: lm.generate(p, max_new_tokens=args.max_new_tokens, seed=args.seed, include_prompt=False, **opts)
                for name, opts in SAMPLERS.items()} for p in prompts}
    return {"shakespeare_val_perplexity": lm.evaluate(style_val)["perplexity"],
            "books_val_perplexity": lm.evaluate(books_val)["perplexity"], "generations": gens}


def show(title: str, table: dict[str, str]) -> None:
    print(f"\n{title}")
    for name, text in table.items():
        print(f"  {name:<10} | {text!r}")


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    out = Path(args.output)
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.data_dir or data_dir())
    books_train, books_val = Corpus(*resolve_dataset("books", root=root, min_length=0)).limit(args.limit)
    style_train, style_val = Corpus(*resolve_dataset("tinyshakespeare", root=root)).limit(args.limit)
    torch.manual_seed(args.seed)
    pretrain = None
    progress = not (args.quiet or args.no_progress)
    if args.base:
        base_dir = args.base
    else:
        if args.train_tokenizer:
            tok = Tokenizer.train("byte-bpe", books_train, args.train_tokenizer)
        else:
            gpt2 = root / "gpt2-tokenizer"
            tok = Tokenizer.from_gpt2_files(gpt2 / "encoder.json", gpt2 / "vocab.bpe")
        lm = LanguageModel.from_preset(args.preset, tok, **{**MODEL, "n_positions": args.seq_len,
                                                             **parse_overrides(args.config)})
        data = chunks(tok, books_train, args.seq_len)
        if not args.quiet:
            print(f"Pretraining a {lm.num_parameters():,}-parameter GPT-2-shaped model on {len(data):,} windows "
                  f"of books for {args.pretrain_steps} steps.")
        res = lm.fit(data, epochs=max(1, args.epochs), max_steps=args.pretrain_steps, batch_size=args.batch_size,
                     lr=args.pretrain_lr, schedule="cosine", warmup_steps=min(50, args.pretrain_steps // 10),
                     seed=args.seed, device=args.device, precision=args.precision, progress=progress)
        # a Hugging Face GPT-2 directory
        base_dir = lm.save(out / "base-gpt2", format="hf", overwrite=args.overwrite)
        pretrain = {"steps": res.steps, "train_loss": res.train["loss"] if res.train else None}
    lm = load(base_dir).to(resolve_device(args.device))
    tok = lm.tokenizer
    seq_len = min(args.seq_len, lm.config.n_positions)
    style_data, style_v = chunks(tok, style_train, seq_len), chunks(tok, style_val, seq_len)
    books_v = chunks(tok, books_val, seq_len)
    before = measure(lm, args.prompts, args, style_v, books_v)
    if not args.quiet:
        print(f"Fine-tuning {base_dir} on {len(style_data):,} windows of tinyshakespeare (linear decay from "
              f"{args.lr:g} to 0).")
    lora = dict(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha) if args.lora_rank else {}
    result = lm.fit(style_data, val_data=style_v, schedule="linear", eval_each_epoch=True,
                    callbacks=[] if args.quiet else [PrintEpochs()], **C.fit_options(args), **lora)
    if args.lora_rank:  # the adapter alone (peft format); the model directory below has it merged in
        lm.save_lora(out / "adapter", overwrite=args.overwrite)
    model_dir = lm.save(out / "model", format="hf", overwrite=args.overwrite)
    after = measure(lm, args.prompts, args, style_v, books_v)
    if not args.quiet:
        for p in args.prompts:
            show(f"{p!r} before fine-tuning:", before["generations"][p])
            show(f"{p!r} after fine-tuning:", after["generations"][p])
        print(f"\ntinyshakespeare validation perplexity {before['shakespeare_val_perplexity']:.1f} -> "
              f"{after['shakespeare_val_perplexity']:.1f}; books validation perplexity "
              f"{before['books_val_perplexity']:.1f} -> {after['books_val_perplexity']:.1f}.")
    results = {"recipe": "finetune_style", "base": str(base_dir), "pretrain": pretrain, "lora_rank": args.lora_rank,
               "parameters": lm.num_parameters(), "vocab_size": tok.vocab_size, "steps": result.steps,
               "style_windows": len(style_data), "before": before, "after": after, "epochs": [r for r in result.history if r["event"] == "epoch"],
               "model_dir": str(model_dir), "seconds": round(time.perf_counter() - start, 1)}
    C.save_results(out, results)
    return results


if __name__ == "__main__":
    main()
