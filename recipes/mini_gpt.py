"""Recipe 1: mini-GPT from scratch (the KerasHub "GPT text generation from scratch" example and the
DLD-2022 lecture).

A lowercased WordPiece vocabulary of 5,000 with [PAD] [UNK] [BOS] is trained on the training paragraphs of
the books corpus (every 10th paragraph to validation, paragraphs of <= 512 characters dropped); each
paragraph becomes [BOS] + its first 127 tokens with the 128 tokens as labels, padding masked out of the
loss and the perplexity; the `mini` preset (2 post-norm blocks, 3 heads, feed-forward 128, 3.26 M
parameters at 5,000 tokens) is trained with Adam 1e-3 for 5 epochs, the validation perplexity printed
after each; then greedy, beam (10), random, top-k (10) and top-p (0.5) continue the [BOS]-only prompt for
80 tokens side by side.

    python recipes/mini_gpt.py                                 # the tutorial's settings
    python recipes/mini_gpt.py --limit 200 --epochs 2 ...      # toy size (tests)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

from gptgen import Tokenizer, load  # noqa: E402
from gptgen.data import pack_examples, resolve_dataset  # noqa: E402
from gptgen.training import SampleText  # noqa: E402

SAMPLERS = {
    "greedy": dict(sampler="greedy"),
    "beam (10)": dict(sampler="beam", num_beams=10),
    "random": dict(sampler="random"),
    "top-k (10)": dict(sampler="top_k", top_k=10),
    "top-p (0.5)": dict(sampler="top_p", top_p=0.5),
}


def build_parser():
    p = C.parser("mini_gpt", __doc__.split("\n\n")[0], preset="mini", epochs=5, batch_size=64, lr=1e-3,
                 seq_len=128, max_new_tokens=80)
    p.add_argument("--vocab-size", type=int, default=5000)
    p.add_argument("--min-length", type=int, default=512, help="drop paragraphs of this many characters or fewer")
    p.add_argument("--prompt", default="", help="prompt of the samples (default: [BOS] only)")
    p.add_argument("--no-epoch-samples", action="store_true", help="no top-k sample at each epoch end")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    out = C.setup(args)
    clock = C.Timer()
    train_texts, val_texts = resolve_dataset("books", root=C.data_root(args.data_dir), min_length=args.min_length)
    train_texts, val_texts = C.limit_split(train_texts, val_texts, args.limit)
    tok = Tokenizer.train("wordpiece", train_texts, args.vocab_size, lowercase=True,
                          reserved_tokens=["[PAD]", "[UNK]", "[BOS]"])
    lm = C.new_model(args, tok, n_positions=args.seq_len)
    lm.config.extra["add_bos"] = True  # generation starts from [BOS], as the model was trained

    def pack(texts):
        return pack_examples(tok.encode_batch(texts), args.seq_len, bos_id=tok.bos_token_id, pad_id=tok.pad_token_id)

    train_data, val_data = pack(train_texts), pack(val_texts)
    if not args.quiet:
        print(f"{len(train_texts):,} training / {len(val_texts):,} validation paragraphs; WordPiece "
              f"{tok.vocab_size:,} tokens; model {lm.num_parameters():,} parameters.")
    before = lm.evaluate(val_data)
    if not args.quiet:
        print(f"epoch 0: val ppl {before['perplexity']:.1f} (untrained)")
    callbacks = [] if args.no_epoch_samples else [
        SampleText(prompt=args.prompt, max_new_tokens=args.max_new_tokens, sampler="top_k", top_k=10,
                   seed=args.seed, print_fn=None if args.quiet else print)]
    result, log = C.train(lm, train_data, val_data, args, callbacks=callbacks, eps=1e-7, schedule="constant")
    model_dir = lm.save(out / "model")
    table = C.generate_table(lm, args.prompt, SAMPLERS, max_new_tokens=args.max_new_tokens, seed=args.seed)
    C.print_table(f"Samples after training ({args.max_new_tokens} tokens from {args.prompt or '[BOS]'!r}):",
                  table, args.quiet)
    reloaded = load(model_dir).to(lm.device)
    same = reloaded.generate(args.prompt, sampler="greedy", max_new_tokens=args.max_new_tokens) == \
        lm.generate(args.prompt, sampler="greedy", max_new_tokens=args.max_new_tokens)
    curve = [C.ppl(before)] + [e["val_perplexity"] for e in log.epochs]
    results = {
        "recipe": "mini_gpt", "train_paragraphs": len(train_texts), "val_paragraphs": len(val_texts),
        "vocab_size": tok.vocab_size, "parameters": lm.num_parameters(), "steps": result.steps,
        "val_perplexity_by_epoch": curve, "val_perplexity": C.ppl(result.val), "val_accuracy": result.val["accuracy"],
        "epochs": log.epochs, "samples": table, "reload_greedy_identical": same, "model_dir": str(model_dir),
        "seconds": clock(),
    }
    C.save_results(out, results)
    if not args.quiet:
        print("\nvalidation perplexity by epoch: " + " -> ".join(f"{v:.1f}" for v in curve) +
              f"; {results['seconds']} s.\nModel: {model_dir}")
    return results


if __name__ == "__main__":
    C.run_main(main)
