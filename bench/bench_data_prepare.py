"""Tokenising a corpus into shards: gptgen.data.prepare_shards against peers measured in the same run.

Peers: a per-text loop over the HF tokenizer's `encode` (what a naive script does) and a plain
`encode_batch` into a Python list (no files written). Prints tokens/s and ratios.

    GPTGEN_DATA_DIR=../shared/data python bench/bench_data_prepare.py [--repeat 3] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from gptgen import Tokenizer
from gptgen.data import prepare_shards, read_paragraphs
from gptgen.data.readers import InvalidUTF8Warning


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("GPTGEN_DATA_DIR", "../shared/data"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    data = Path(args.data_dir)
    tok = Tokenizer.from_pretrained(data / "gpt2-tokenizer")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InvalidUTF8Warning)
        texts = read_paragraphs(data / "books")
    chars = sum(map(len, texts))
    eos = tok.eos_token_id
    n_tokens = sum(len(ids) + 1 for ids in tok.encode_batch(texts))
    print(f"corpus: {len(texts):,} paragraphs of the books, {chars:,} characters, {n_tokens:,} GPT-2 tokens "
          f"(with EOS); {os.cpu_count()} CPU(s); best of {args.repeat}")

    def loop():
        out = []
        for t in texts:
            out.extend(tok.backend.encode(t, add_special_tokens=False).ids)
            out.append(eos)
        return np.asarray(out, dtype=np.uint16)

    def batch():
        return tok.encode_batch(texts, add_eos=True)

    results = {"per-text encode loop (peer)": best_of(args.repeat, loop),
               "encode_batch to lists (peer, no files)": best_of(args.repeat, batch)}
    tmp = Path(tempfile.mkdtemp())
    try:
        for w in args.workers:
            def prepare(w=w):
                prepare_shards(texts, tok, tmp / f"w{w}", num_workers=w, overwrite=True)
            results[f"prepare_shards, {w} worker(s)"] = best_of(args.repeat, prepare)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = results["per-text encode loop (peer)"]
    for name, seconds in results.items():
        print(f"{name:42s} {seconds:6.2f} s  {n_tokens / seconds:>12,.0f} tokens/s  x{base / seconds:.2f} vs loop")


if __name__ == "__main__":
    main()
