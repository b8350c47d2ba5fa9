"""Continuous batching: aggregate output tokens/s of BatchEngine at several concurrencies, beside the
per-call engine serving the same requests one at a time (the naive baseline), in one process.

    python bench/bench_batcher.py                           # 6-layer 384-wide GPT-2 shape, 2 threads
    python bench/bench_batcher.py --concurrency 1,8,32,64 --max-tokens 128 --tokenizer DIR
    python bench/bench_batcher.py --compile --quantize int8   # + a BatchEngine(compile=True) beside the eager one

Every request: a 16-token prompt, `--sampling` (default top-k 50 / top-p 0.95 / temperature 0.8), `--max-tokens` new tokens
(EOS ignored, so every run produces the same number of tokens). Each concurrency level submits that
many requests at once and times until the last finishes; cases are interleaved over the repeats and
the median is printed, with the ratio to concurrency 1. With --compile a second engine, its CPU decode step
compiled by inductor (warmed up before timing; the warm-up time is printed), is timed beside the eager one.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from gptgen.quantize import QUANTIZE_HELP, QUANTIZE_MODES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-embd", type=int, default=384)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-head", type=int, default=6)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sampling", choices=["top-k-p", "plain", "greedy"], default="top-k-p",
                   help="top-k-p: top_k 50, top_p 0.95, temperature 0.8 (HF's sampling defaults); plain: "
                        "temperature 1 over the whole vocabulary (OpenAI's defaults); greedy")
    p.add_argument("--compile", action="store_true",
                   help="also time BatchEngine(compile=True) (CPU: the decode step compiled by inductor)")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, help=QUANTIZE_HELP)
    p.add_argument("--tokenizer", help="a tokenizer directory (text deltas are then decoded as a server would)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from gptgen import GPT, LanguageModel, Tokenizer
    from gptgen.config import preset
    from gptgen.generation import generate_ids
    from gptgen.generation.batcher import BatchEngine, SamplingParams

    torch.manual_seed(0)
    cfg = preset("gpt2", n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head)
    model = GPT(cfg).eval().to(args.device)
    if args.quantize:
        from gptgen.quantize import quantize_model

        quantize_model(model, args.quantize)
    default_tok = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2-tokenizer"
    tok_dir = args.tokenizer or (default_tok if default_tok.is_dir() else None)
    lm = LanguageModel(model, Tokenizer.from_pretrained(tok_dir)) if tok_dir else model
    levels = [int(c) for c in args.concurrency.split(",")]
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, cfg.vocab_size, (max(levels + [2]), args.prompt_len), generator=g).tolist()
    options = {"top-k-p": dict(temperature=0.8, top_k=50, top_p=0.95), "plain": dict(temperature=1.0),
               "greedy": dict(temperature=0.0)}[args.sampling]
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, **options)
    engines = {"BatchEngine": BatchEngine(lm, max_batch=args.max_batch, max_queue=4096)}
    if args.compile:
        compiled = BatchEngine(lm, max_batch=args.max_batch, max_queue=4096, compile=True)
        warm = compiled.warm_up()
        print(f"compiled BatchEngine: warm-up (batches 1-{args.max_batch}) took {warm:.1f} s")
        engines["BatchEngine compiled"] = compiled
    for engine in engines.values():
        engine.start()

    def run_engine(engine, c):
        t0 = time.perf_counter()
        reqs = [engine.submit(prompts[i], params, lambda ev: None) for i in range(c)]
        for r in reqs:
            r.done.wait()
        return c * args.max_tokens / (time.perf_counter() - t0)

    def run_per_call():  # one request at a time through lm.generate's engine
        t0 = time.perf_counter()
        generate_ids(model, [prompts[0]], max_new_tokens=args.max_tokens, do_sample=options["temperature"] > 0,
                     temperature=options["temperature"] or None, top_k=options.get("top_k", 0),
                     top_p=options.get("top_p"), eos_token_id=[])
        return args.max_tokens / (time.perf_counter() - t0)

    for engine in engines.values():
        run_engine(engine, 2)  # warm-up
    results = {(name, c): [] for name in engines for c in levels}
    baseline = []
    for _ in range(args.repeats):
        baseline.append(run_per_call())
        for c in levels:
            for name, engine in engines.items():
                results[name, c].append(run_engine(engine, c))
    for engine in engines.values():
        engine.close()
    print(f"model: GPT-2 shape {args.n_layer} layers x {args.n_embd} wide, {model.num_parameters():,} parameters"
          f"{', int8 weights' if args.quantize else ''}; {args.threads} threads; {args.max_tokens} new tokens per "
          f"request; {args.sampling} sampling; median of {args.repeats}")
    base = statistics.median(baseline)
    print(f"{'per-call engine, 1 request at a time':<44} {base:9.1f} tok/s")
    for name in engines:
        one = statistics.median(results[name, levels[0]])
        for c in levels:
            med = statistics.median(results[name, c])
            extra = ""
            if name != "BatchEngine":
                extra = f"   x{med / statistics.median(results['BatchEngine', c]):5.2f} vs eager BatchEngine"
            print(f"{f'{name}, concurrency {c}':<44} {med:9.1f} tok/s   x{med / one:5.2f} vs concurrency "
                  f"{levels[0]}   x{med / base:5.2f} vs per-call{extra}")


if __name__ == "__main__":
    main()
