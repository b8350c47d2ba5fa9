"""Decode throughput: gptgen's engine against HF transformers generate(), same weights, same prompts.

Runs in one process: greedy at batch 1 (256 new tokens) and top-k 50 / top-p 0.95 sampling at batch 16
and 64, printing tokens/s of both and the ratio. Both generate exactly the same number of tokens (no EOS).

    python bench/bench_generate.py                      # CPU: small GPT-2 shapes (n_embd 128, 4 layers)
    python bench/bench_generate.py --device cuda        # CUDA: GPT-2 124M in bf16, compiled decode step
    python bench/bench_generate.py --n-embd 768 --n-layer 12 --n-head 12 --threads 2

On CUDA the first call of each shape compiles and captures the decode step (CUDA graphs); it is run
as a warm-up and not timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--n-embd", type=int)
    p.add_argument("--n-layer", type=int)
    p.add_argument("--n-head", type=int)
    p.add_argument("--vocab-size", type=int, default=50257)
    p.add_argument("--n-positions", type=int, default=1024)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--greedy-tokens", type=int, default=256)
    p.add_argument("--sample-tokens", type=int, help="new tokens in the sampling cases (default 64 CPU, 256 CUDA)")
    p.add_argument("--batches", default="16,64", help="sampling batch sizes")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case (median reported)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-compile", action="store_true", help="CUDA: run our decode step eagerly")
    p.add_argument("--json", action="store_true", help="print one JSON object per case")
    return p.parse_args(argv)


def build_models(args, device, dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptgen.checkpoint import load_model

    cuda = device.type == "cuda"
    n_embd = args.n_embd or (768 if cuda else 128)
    n_layer = args.n_layer or (12 if cuda else 4)
    n_head = args.n_head or (12 if cuda else 4)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=args.vocab_size, n_positions=args.n_positions, n_embd=n_embd, n_layer=n_layer,
                     n_head=n_head, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    hf = GPT2LMHeadModel(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_model(d).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    hf.to(device=device, dtype=dtype)
    ours.to(device=device, dtype=dtype)
    return hf, ours, dict(n_embd=n_embd, n_layer=n_layer, n_head=n_head, vocab_size=args.vocab_size,
                          params=sum(p.numel() for p in ours.parameters()))


def timed(fn, device, repeats):
    fn()  # warm-up (compiles on CUDA)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    from gptgen.generation import generate_ids

    hf, ours, shape = build_models(args, device, dtype)
    sample_tokens = args.sample_tokens or (256 if device.type == "cuda" else 64)
    compile_flag = False if args.no_compile else None
    cases = [("greedy", 1, args.greedy_tokens, dict(do_sample=False))]
    for b in (int(x) for x in args.batches.split(",") if x):
        cases.append(("top_k50_top_p0.95", b, sample_tokens, dict(do_sample=True, top_k=50, top_p=0.95)))
    print(f"# device={device} dtype={str(dtype).replace('torch.', '')} threads={torch.get_num_threads()} "
          f"torch={torch.__version__} shape={shape}", file=sys.stderr)
    if not args.json:
        print(f"{'case':<20}{'batch':>6}{'new':>6}{'HF tok/s':>12}{'gptgen tok/s':>14}{'ratio':>8}")
    gen = torch.Generator().manual_seed(0)
    for name, batch, new, kw in cases:
        prompts = torch.randint(0, args.vocab_size, (batch, args.prompt_len), generator=gen)
        ids = prompts.to(device)
        mask = torch.ones_like(ids)

        def run_hf():
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=None, **kw)
            assert out.shape[1] == args.prompt_len + new

        def run_ours():
            out = generate_ids(ours, prompts.tolist(), max_new_tokens=new, eos_token_id=[], seed=0,
                               compile=compile_flag, **kw)
            assert all(len(o) == new for o in out)

        t_hf = timed(run_hf, device, args.repeats)
        t_ours = timed(run_ours, device, args.repeats)
        tokens = batch * new
        row = dict(case=name, batch=batch, new_tokens=new, hf_tokens_per_s=round(tokens / t_hf, 1),
                   gptgen_tokens_per_s=round(tokens / t_ours, 1), ratio=round(t_hf / t_ours, 2),
                   device=str(device), dtype=str(dtype).replace("torch.", ""), **shape)
        if args.json:
            print(json.dumps(row))
        else:
            print(f"{name:<20}{batch:>6}{new:>6}{row['hf_tokens_per_s']:>12,.0f}{row['gptgen_tokens_per_s']:>14,.0f}"
                  f"{row['ratio']:>7.2f}x")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
