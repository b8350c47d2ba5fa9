"""Recipe 6: Korean GPT-2 fine-tuning on sentences (the Korean GPT-2 blog, TF + HF).

One sentence per line (here: the Q and A columns of ChatbotData.csv, de-duplicated), each encoded as
`<s>` + tokens + `</s>` and padded with `<pad>` to MAX_LEN tokens (30 in the blog: inputs and labels are
the 29-token shifts); loss and accuracy are masked on padding; 10% of the sentences are held out for
validation, whose loss is printed after every epoch (on a pretrained model it rises after epoch 3 in the
blog). The model is saved, reloaded, and must generate exactly the same greedy text as before saving;
greedy and top-p generations are compared before and after fine-tuning.

Without --base (a Korean GPT-2 directory with its SentencePiece tokenizer, as the blog uses) the recipe
trains a SentencePiece-style BPE with <s> </s> <pad> <unk> on the training sentences and starts from a
small GPT-2-shaped model with random weights.

    python recipes/korean_sentences.py --base skt/kogpt2-base-v2 --epochs 10 --lr 1e-4 --batch-size 16   # the blog
    python recipes/korean_sentences.py --epochs 3                                                 # CPU demo
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
from gptgen.data import Corpus, data_dir, pack_examples, read_csv_pairs, split_fraction  # noqa: E402
from gptgen.options import resolve_device  # noqa: E402
from gptgen.training import PrintEpochs  # noqa: E402

SPECIALS = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}
PROMPTS = ["오늘", "사랑", "친구가"]
MODEL = dict(n_layer=4, n_embd=256, n_head=4)


def read_sentences(csv_path: Path) -> list[str]:
    """The Q and A texts of ChatbotData.csv as one sentence each, first occurrences only."""
    seen, out = set(), []
    for s in read_csv_pairs(csv_path, template="{Q}") + read_csv_pairs(csv_path, template="{A}"):
        s = s.strip()
        if s and s not in seen:
            seen.add(s)
            out.append(s)
    return out


def build_parser():
    p = C.parser("korean_sentences", __doc__.split("\n\n")[0], preset="gpt2", epochs=10, batch_size=16, lr=1e-3,
                 max_new_tokens=30)
    p.add_argument("--base", help="a Korean GPT-2 to fine-tune, a directory or Hub name with <s> </s> <pad> <unk> "
                                  "tokens (e.g. skt/kogpt2-base-v2)")
    p.add_argument("--max-len", type=int, default=30, help="MAX_LEN: tokens per padded sentence (blog: 30)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--prompts", nargs="+", default=PROMPTS)
    return p


def generations(lm, prompts, args) -> dict[str, dict[str, str]]:
    """Greedy and top-p continuations of each prompt."""
    samplers = {"greedy": dict(sampler="greedy"), f"top-p ({args.top_p:g})": dict(sampler="top_p", top_p=args.top_p)}
    return {p: {name: lm.generate(p, max_new_tokens=args.max_new_tokens, seed=args.seed, include_prompt=False, **opts)
                for name, opts in samplers.items()} for p in prompts}


def show(title: str, table: dict[str, str]) -> None:
    print(f"\n{title}")
    for name, text in table.items():
        print(f"  {name:<12} | {text!r}")


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    out = Path(args.output)
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    sentences = read_sentences(Path(args.data_dir or data_dir()) / "chatbot-ko" / "ChatbotData.csv")
    train_texts, val_texts = Corpus(*split_fraction(sentences, args.val_fraction, seed=args.seed)).limit(args.limit)
    torch.manual_seed(args.seed)
    if args.base:
        lm = load(args.base).to(resolve_device(args.device))
        tok = lm.tokenizer
    else:
        tok = Tokenizer.train("bpe", train_texts, args.vocab_size, special_tokens=dict(SPECIALS),
                              reserved_tokens=list(SPECIALS.values()))
        # Room to generate past MAX_LEN (the blog generates up to 100 steps).
        lm = LanguageModel.from_preset(args.preset, tok, **{**MODEL, "n_positions": max(64, args.max_len),
                                                             **parse_overrides(args.config)})
    lm.config.extra["add_bos"] = True  # prompts start with <s>, as the training sentences do

    def pack(texts):
        return pack_examples(tok.encode_batch(texts), args.max_len - 1, bos_id=tok.bos_token_id,
                             eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)

    train_data, val_data = pack(train_texts), pack(val_texts)
    if not args.quiet:
        print(f"{len(train_texts):,} training / {len(val_texts):,} validation sentences, padded to MAX_LEN "
              f"{args.max_len}; {train_data.num_target_tokens:,} counted tokens; tokenizer {tok.vocab_size:,}; "
              f"model {lm.num_parameters():,} parameters.")
        row = train_data.input_ids[0].tolist() + [train_data.labels[0, -1].item()]
        print(f"example row: {row}")
    before_metrics = lm.evaluate(val_data)
    before = generations(lm, args.prompts, args)
    result = lm.fit(train_data, val_data=val_data, schedule="constant",
                    callbacks=[] if args.quiet else [PrintEpochs()], **C.fit_options(args))
    epochs = [r for r in result.history if r["event"] == "epoch"]
    after = generations(lm, args.prompts, args)
    model_dir = lm.save(out / "model", overwrite=args.overwrite)
    reloaded = load(model_dir).to(lm.device)
    reloaded_gens = generations(reloaded, args.prompts, args)
    identical = reloaded_gens == after
    reloaded_metrics = reloaded.evaluate(val_data)
    val_losses = [e["val_loss"] for e in epochs]
    best_epoch = 1 + min(range(len(val_losses)), key=val_losses.__getitem__) if val_losses else None
    if not args.quiet:
        for p in args.prompts:
            show(f"{p!r} before fine-tuning:", before[p])
            show(f"{p!r} after fine-tuning:", after[p])
        print(f"\nvalidation loss {before_metrics['loss']:.3f} -> " + " -> ".join(f"{v:.3f}" for v in val_losses) +
              f" (lowest after epoch {best_epoch}); masked accuracy {result.val['accuracy']:.3f}.")
        print(f"Reloaded from {model_dir}: generations identical: {identical}; validation loss "
              f"{reloaded_metrics['loss']:.6f} (before saving {result.val['loss']:.6f}).")
    results = {"recipe": "korean_sentences", "train_sentences": len(train_texts), "val_sentences": len(val_texts),
               "max_len": args.max_len, "vocab_size": tok.vocab_size, "parameters": lm.num_parameters(),
               "steps": result.steps, "val_loss_before": before_metrics["loss"], "epochs": epochs,
               "val_loss_by_epoch": val_losses, "best_epoch": best_epoch, "val_accuracy": result.val["accuracy"],
               "before": before, "after": after, "reloaded": reloaded_gens, "reload_identical": identical,
               "reloaded_val_loss": reloaded_metrics["loss"], "val_loss": result.val["loss"],
               "model_dir": str(model_dir), "seconds": round(time.perf_counter() - start, 1)}
    C.save_results(out, results)
    return results


if __name__ == "__main__":
    main()
