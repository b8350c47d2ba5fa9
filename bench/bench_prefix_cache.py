"""Time to first token with and without prefix caching, in one run: a 600-token shared prefix (a system prompt,
few-shot examples) plus a 20-token question, through the batch engine (the engine `gptgen serve` runs).

Two engines over the same random GPT-2 (6 layers, 384 wide, 1024 positions, GPT-2's vocabulary, as
bench/bench_serve.py's default model): one with prefix_caching on, one off. Each round sends one new question
to each (interleaved); the cached engine has seen the prefix before (a first request, not timed). Prints the
median time to first token of each and the ratio.

    python bench/bench_prefix_cache.py [--prefix-tokens 600] [--question-tokens 20] [--rounds 9]
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from pathlib import Path

import torch


def ttft(engine, prompt, config) -> float:
    first = threading.Event()
    done = threading.Event()

    def on_event(event):
        if event.token_id is not None:
            first.set()
        if event.finish_reason is not None:
            done.set()

    t0 = time.perf_counter()
    engine.submit(prompt, config, on_event)
    first.wait(120)
    took = time.perf_counter() - t0
    done.wait(120)
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(os.environ.get("GPTGEN_DATA_DIR", "/work/shared/data")) / "gpt2-tokenizer"
    ap.add_argument("--tokenizer", default=str(default))
    ap.add_argument("--prefix-tokens", type=int, default=600)
    ap.add_argument("--question-tokens", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from gptgen import GenerationConfig, LanguageModel, Tokenizer
    from gptgen.generation.batcher import BatchEngine

    torch.manual_seed(0)
    tok = Tokenizer.from_pretrained(args.tokenizer)
    lm = LanguageModel.from_preset("gpt2", tok, n_layer=6, n_embd=384, n_head=6, n_positions=1024)
    lm.model.eval()
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, tok.vocab_size, (args.prefix_tokens,), generator=g).tolist()
    questions = [torch.randint(0, tok.vocab_size, (args.question_tokens,), generator=g).tolist()
                 for _ in range(args.rounds + 1)]
    config = GenerationConfig(max_new_tokens=2, do_sample=False)
    times = {"prefix caching on": [], "prefix caching off": []}
    with BatchEngine(lm, max_batch=4, prefix_caching=True) as on, \
            BatchEngine(lm, max_batch=4, prefix_caching=False) as off:
        ttft(on, prefix + questions[-1], config)  # the prefix enters the cache (and both engines warm up)
        ttft(off, prefix + questions[-1], config)
        for q in questions[:-1]:
            times["prefix caching on"].append(ttft(on, prefix + q, config))
            times["prefix caching off"].append(ttft(off, prefix + q, config))
        reused = on.stats()["prefix_tokens_reused"]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.prefix_tokens}-token shared prefix + {args.question_tokens}-token question, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} (rounds interleaved)")
    for k, v in med.items():
        print(f"  {k:20s} time to first token {v * 1e3:8.1f} ms")
    print(f"  prefix tokens reused: {reused}; speed-up {med['prefix caching off'] / med['prefix caching on']:.1f}x")


if __name__ == "__main__":
    main()
