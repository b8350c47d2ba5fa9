"""Per-step cost of choosing the next token, this tree's samplers beside another git revision's, in one
process (cases interleaved, median of the repeats, one thread by default).

    python bench/bench_sampling.py                       # against main
    python bench/bench_sampling.py --against 4338341 --repeats 9

Cases: TopKSampler(k=50) and TopPSampler(p=0.95, k=50) at batch 1 and 16 (Sampler.choose), and the
continuous-batching engine's choose_tokens at batch 32 for plain temperature-1 sampling and for
top-k 50 / top-p 0.95 / temperature 0.8 and for top-p 0.9 alone, on (batch, 50257) float32 scores shaped like language-model
logits. Run it from the repository root with PYTHONPATH=src.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import gptgen.generation.row_sampling as new_rows
import gptgen.generation.samplers as new_samplers


def _load_old(rev: str):
    """(samplers, row_sampling or None) modules of git revision `rev`, loaded under private names."""
    tmp = Path(tempfile.mkdtemp())
    mods = []
    for name in ("samplers", "row_sampling"):
        try:
            text = subprocess.run(["git", "show", f"{rev}:src/gptgen/generation/{name}.py"], check=True,
                                  capture_output=True, text=True).stdout
        except subprocess.CalledProcessError:
            mods.append(None)
            continue
        text = text.replace("from .samplers import", "from ._old_samplers import")
        path = tmp / f"_old_{name}.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location(f"gptgen.generation._old_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        mods.append(mod)
    return mods


def _cases(samplers, rows, batch_sizes, vocab):
    g = torch.Generator().manual_seed(0)
    out = {}
    for b in batch_sizes:
        scores = torch.randn(b, vocab, generator=torch.Generator().manual_seed(b)) * 2.5
        topk = samplers.TopKSampler(k=50)
        topp = samplers.TopPSampler(p=0.95, k=50)
        out[f"top-k 50, batch {b}"] = (lambda s=scores, x=topk: x.choose(s, g))
        out[f"top-k 50 + top-p 0.95, batch {b}"] = (lambda s=scores, x=topp: x.choose(s, g))
    if rows is not None:
        n = 32
        scores = torch.randn(n, vocab, generator=torch.Generator().manual_seed(7)) * 2.5
        gens = [torch.Generator().manual_seed(i) for i in range(n)]
        out[f"choose_tokens plain t=1, batch {n}"] = lambda: rows.choose_tokens(
            scores, temperature=[1.0] * n, top_k=[0] * n, top_p=[1.0] * n, min_p=[0.0] * n, generators=gens)
        out[f"choose_tokens k50 p0.95 t0.8, batch {n}"] = lambda: rows.choose_tokens(
            scores, temperature=[0.8] * n, top_k=[50] * n, top_p=[0.95] * n, min_p=[0.0] * n, generators=gens)
        out[f"choose_tokens p0.9, batch {n}"] = lambda: rows.choose_tokens(
            scores * 2, temperature=[1.0] * n, top_k=[0] * n, top_p=[0.9] * n, min_p=[0.0] * n, generators=gens)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", default="main", help="git revision to compare with")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=50, help="calls timed per repeat")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vocab", type=int, default=50257)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    old_samplers, old_rows = _load_old(args.against)
    batch_sizes = (1, 16)
    new = _cases(new_samplers, new_rows, batch_sizes, args.vocab)
    old = _cases(old_samplers, old_rows, batch_sizes, args.vocab)
    times = {(k, w): [] for k in new for w in ("old", "new")}
    for _ in range(args.repeats):
        for key in new:
            for which, fns in (("old", old), ("new", new)):
                fn = fns.get(key)
                if fn is None:
                    continue
                fn()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                times[key, which].append((time.perf_counter() - t0) / args.steps * 1e3)
    print(f"ms per call, median of {args.repeats} x {args.steps} calls, {args.threads} thread(s), "
          f"vocab {args.vocab}; old = {args.against}")
    for key in new:
        o, n = times[key, "old"], times[key, "new"]
        if not o:
            print(f"{key:40s} new {statistics.median(n):.3f}")
            continue
        mo, mn = statistics.median(o), statistics.median(n)
        print(f"{key:40s} old {mo:.3f}  new {mn:.3f}  new/old {mn / mo:.2f}")


if __name__ == "__main__":
    main()
