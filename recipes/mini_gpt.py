"""Recipe 1: mini-GPT from scratch (the KerasHub "GPT text generation from scratch" example and the
DLD-2022 lecture).

A lowercased WordPiece vocabulary of 5,000 with [PAD] [UNK] [BOS] is trained on the training paragraphs of
the books corpus (every 10th paragraph to validation, paragraphs of <= 512 characters dropped); each
paragraph becomes [BOS] + its first 127 tokens with the 128 tokens as labels, padding masked out of the
loss and the perplexity; the `mini` preset (2 post-norm blocks, 3 heads, feed-forward 128, 3.26 M
parameters at 5,000 tokens) is trained with Adam 1e-3 for 5 epochs, the validation perplexity printed
after each; then greedy, beam (10), random, top-k (10) and top-p (0.5) continue the [BOS]-only prompt for
80 tokens side by side.

All of that is the package's `keras-mini` recipe: `gptgen.train(recipe="keras-mini")` is the whole
training, the same run as `gptgen train --recipe keras-mini`.

    python recipes/mini_gpt.py                                 # the tutorial's settings
    python recipes/mini_gpt.py --limit 200 --epochs 2 ...      # toy size (tests)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

import gptgen  # noqa: E402
from gptgen.config import parse_overrides  # noqa: E402
from gptgen.training import Callback  # noqa: E402

# The five ways of choosing the next token the tutorial compares.
SAMPLERS = {
    "greedy": dict(sampler="greedy"),
    "beam (10)": dict(sampler="beam", num_beams=10),
    "random": dict(sampler="random"),
    "top-k (10)": dict(sampler="top_k", top_k=10),
    "top-p (0.5)": dict(sampler="top_p", top_p=0.5),
}


class UntrainedPerplexity(Callback):
    """The validation perplexity before the first step: the 'epoch 0' point of the tutorial's curve."""

    def on_train_begin(self, trainer):
        self.metrics = trainer.evaluate()


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
    out = Path(args.output)
    start = time.perf_counter()

    # 1. Train: the keras-mini recipe, sized by the flags (the recipe's own values are the defaults).
    untrained = UntrainedPerplexity()
    run = gptgen.train(
        "keras-mini", data_root=args.data_dir, limit=args.limit, vocab_size=args.vocab_size,
        min_length=args.min_length, preset=args.preset, seq_len=args.seq_len,
        config={"n_positions": args.seq_len, **parse_overrides(args.config)},
        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
        samples=not args.no_epoch_samples, sample_prompt=args.prompt, sample_tokens=args.max_new_tokens,
        seed=args.seed, device=args.device, precision=args.precision, threads=args.threads,
        progress=not (args.quiet or args.no_progress), callbacks=[untrained], print_fn=None if args.quiet else print,
    )
    lm = run.lm
    model_dir = lm.save(out / "model", overwrite=args.overwrite)

    # 2. Generate: the same [BOS]-only prompt with each sampler.
    samples = {name: lm.generate(args.prompt, max_new_tokens=args.max_new_tokens, seed=args.seed,
                                 include_prompt=False, **options) for name, options in SAMPLERS.items()}
    if not args.quiet:
        print(f"\nSamples after training ({args.max_new_tokens} tokens from {args.prompt or '[BOS]'!r}):")
        for name, text in samples.items():
            print(f"  {name:<11} | {text!r}")

    # 3. Reload: the saved directory generates exactly what the model in memory does.
    reloaded = gptgen.load(model_dir).to(lm.device)
    greedy = dict(sampler="greedy", max_new_tokens=args.max_new_tokens)
    same = reloaded.generate(args.prompt, **greedy) == lm.generate(args.prompt, **greedy)

    epochs = [r for r in run.history if r["event"] == "epoch"]
    curve = [untrained.metrics["perplexity"]] + [e["val_perplexity"] for e in epochs]
    results = {
        "recipe": "mini_gpt", "train_paragraphs": run.train_examples, "val_paragraphs": run.val_examples,
        "vocab_size": lm.tokenizer.vocab_size, "parameters": lm.num_parameters(), "steps": run.steps,
        "val_perplexity_by_epoch": curve, "val_perplexity": run.val["perplexity"], "val_accuracy": run.val["accuracy"],
        "epochs": epochs, "samples": samples, "reload_greedy_identical": same, "model_dir": str(model_dir),
        "seconds": round(time.perf_counter() - start, 1),
    }
    C.save_results(out, results)
    if not args.quiet:
        print("\nvalidation perplexity by epoch: " + " -> ".join(f"{v:.1f}" for v in curve) +
              f"; {results['seconds']} s.\nModel: {model_dir}")
    return results


if __name__ == "__main__":
    main()
