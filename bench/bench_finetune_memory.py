"""Fine-tuning modes side by side: peak memory and tokens/s of full fine-tuning, LoRA, LoRA + activation
checkpointing (and full + checkpointing) on the GPT-2 124M shape, and validation perplexity of LoRA r=8
against full fine-tuning after the same number of steps.

Speed/memory: each mode trains in a process of its own (peak RSS is per process), modes interleaved over
rounds, medians reported, with the load average beside each figure (other work on the machine slows
every mode alike within a round). The estimate of gptgen.training.memory is printed beside the measured
peak (RSS less the process's RSS before the model was built).

Quality: no pretrained GPT-2 weights are reachable offline, so a small GPT-2-shaped base is first trained
on the books corpus, then fine-tuned on Tiny Shakespeare (every 10th paragraph held out) fully and with
LoRA r=8 for the same steps; the script prints the held-out perplexity of the base and of both.

    python bench/bench_finetune_memory.py speed --rounds 2 --steps 3
    python bench/bench_finetune_memory.py quality --base-steps 300 --steps 150
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {
    "full": {},
    "full+ckpt": {"gradient_checkpointing": True},
    "lora": {"lora_rank": 8},
    "lora+ckpt": {"lora_rank": 8, "gradient_checkpointing": True},
}
DATA = Path(os.environ.get("GPTGEN_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(mode: str, steps: int, warmup: int, batch: int, seq_len: int, threads: int) -> dict:
    import torch

    from gptgen import GPT, LanguageModel, Tokenizer, preset
    from gptgen.data import PackedExamples
    from gptgen.training import Trainer
    from gptgen.training.memory import estimate_memory

    torch.set_num_threads(threads)
    cfg = preset("gpt2", n_positions=seq_len)
    g = torch.Generator().manual_seed(0)
    n = batch * (steps + warmup)
    seq = torch.randint(0, cfg.vocab_size, (n, seq_len + 1), generator=g)
    data = PackedExamples(seq[:, :-1].contiguous(), seq[:, 1:].contiguous(), torch.ones(n, seq_len, dtype=torch.bool))
    tok = Tokenizer.train("wordpiece", ["a b c"], 10, min_frequency=1)  # ids only; the data is random
    before = _rss_mb()
    torch.manual_seed(0)
    lm = LanguageModel(GPT(cfg), tok)
    load0 = os.getloadavg()[0]
    trainer = Trainer(lm, data, batch_size=batch, max_steps=warmup + steps, lr=1e-4, precision="fp32", device="cpu",
                      progress=False, shuffle=False, eval_each_epoch=False, **MODES[mode])
    result = trainer.fit()
    rates = [r["tokens_per_s"] for r in result.history if r["event"] == "step"][warmup:]
    est = estimate_memory(cfg, "lora" if "lora" in mode else "full", batch_size=batch, seq_len=seq_len,
                          gradient_checkpointing="ckpt" in mode)
    return {"mode": mode, "tokens_per_s": statistics.median(rates), "peak_rss_mb": _rss_mb(),
            "peak_over_start_mb": _rss_mb() - before, "estimate_mb": est.total / 2 ** 20,
            "trainable": trainer.trainable_parameters, "load": (load0 + os.getloadavg()[0]) / 2}


def run_speed(args) -> None:
    results: dict[str, list[dict]] = {m: [] for m in args.modes}
    for r in range(args.rounds):
        for mode in args.modes:
            cmd = [sys.executable, __file__, "worker", mode, str(args.steps), str(args.warmup), str(args.batch_size),
                   str(args.seq_len), str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results[mode].append(json.loads(out))
            print(f"round {r + 1} {mode}: {results[mode][-1]}", flush=True)
    base = statistics.median(x["tokens_per_s"] for x in results[args.modes[0]])
    print(f"\nGPT-2 124M shape, CPU fp32, batch {args.batch_size} x {args.seq_len}, {args.threads} threads, "
          f"{args.steps} timed steps after {args.warmup} warm-up, median of {args.rounds} interleaved rounds")
    print(f"{'mode':<10} {'trainable':>11} {'tokens/s':>9} {'vs ' + args.modes[0]:>8} {'peak RSS MB':>12} "
          f"{'peak-start MB':>13} {'estimate MB':>12} {'load avg':>9}")
    for mode, rows in results.items():
        tps = statistics.median(x["tokens_per_s"] for x in rows)
        print(f"{mode:<10} {rows[0]['trainable']:>11,} {tps:>9.1f} {tps / base:>8.2f} "
              f"{statistics.median(x['peak_rss_mb'] for x in rows):>12.0f} "
              f"{statistics.median(x['peak_over_start_mb'] for x in rows):>13.0f} {rows[0]['estimate_mb']:>12.0f} "
              f"{statistics.median(x['load'] for x in rows):>9.1f}")


def _pretrain(args, books, work, common) -> str:
    """A small GPT-2-shaped model (4 blocks of 256, a 4,000-token byte-level BPE) trained on the books."""
    from gptgen import train

    base = train(preset="gpt2", config=dict(n_layer=4, n_embd=256, n_head=4, n_positions=args.seq_len),
                 train_tokenizer="byte-bpe", vocab_size=4000, data=books, reader="paragraphs", packing="chunk",
                 max_steps=args.base_steps, lr=1e-3, schedule="cosine", warmup_steps=20,
                 output_dir=str(work / "base"), **common)
    return str(base.model_dir)


def run_quality(args) -> None:
    from gptgen import train
    from gptgen.pipeline import evaluate_corpus

    work = Path(tempfile.mkdtemp(prefix="bench_ft_"))
    common = dict(seq_len=args.seq_len, batch_size=args.batch_size, threads=args.threads, samples=False,
                  progress=False, print_fn=None, precision="fp32", device="cpu", seed=0, eval_each_epoch=False)
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    books = sorted(str(p) for p in (DATA / "books").glob("*.txt") if "shakespeare" not in p.name)
    base_dir = args.base
    if base_dir is None:
        base_dir = _pretrain(args, books, work, common)
    shakespeare = dict(data=[str(DATA / "tinyshakespeare" / "input.txt")], reader="paragraphs",
                       split="every_nth:10", packing="chunk")
    ppl = {"base (books only)": evaluate_corpus(base_dir, seq_len=args.seq_len, packing="chunk",
                                                batch_size=32, **{k: v for k, v in shakespeare.items()
                                                                  if k != "packing"})["perplexity"]}
    runs = {"full": dict(lr=args.full_lr), "lora r=8": dict(lr=args.lora_lr, lora_rank=8)}
    for name, extra in runs.items():
        run = train(model=str(base_dir), max_steps=args.steps, schedule="constant", output_dir=str(work / name.split()[0]),
                    **shakespeare, **common, **extra)
        ppl[name] = run.val["perplexity"]
    print(f"\nHeld-out Tiny Shakespeare (every 10th paragraph), seq {args.seq_len}: base GPT-2-shaped 4x256 trained "
          f"{args.base_steps} steps on books; then {args.steps} fine-tuning steps of batch {args.batch_size} "
          f"(full lr {args.full_lr:g}, LoRA lr {args.lora_lr:g}); {time.perf_counter() - t0:.0f} s, load average "
          f"{(load0 + os.getloadavg()[0]) / 2:.1f}")
    for name, value in ppl.items():
        print(f"  {name:<20} perplexity {value:8.2f}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        mode, steps, warmup, batch, seq_len, threads = sys.argv[2], *map(int, sys.argv[3:8])
        print(json.dumps(worker(mode, steps, warmup, batch, seq_len, threads)))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    s.add_argument("--rounds", type=int, default=2)
    s.add_argument("--steps", type=int, default=3)
    s.add_argument("--warmup", type=int, default=1)
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--threads", type=int, default=2)
    q = sub.add_parser("quality")
    q.add_argument("--base-steps", type=int, default=300)
    q.add_argument("--base", help="a base model directory from an earlier run (skips the pretraining)")
    q.add_argument("--steps", type=int, default=150)
    q.add_argument("--batch-size", type=int, default=16)
    q.add_argument("--seq-len", type=int, default=128)
    q.add_argument("--full-lr", type=float, default=3e-4)
    q.add_argument("--lora-lr", type=float, default=3e-3)
    q.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    run_speed(args) if args.part == "speed" else run_quality(args)


if __name__ == "__main__":
    main()
