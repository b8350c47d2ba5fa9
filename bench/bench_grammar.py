"""Per-token cost of constrained decoding: llguidance (gptgen's grammar engine) against xgrammar, in one run.

Both engines take the same Hugging Face `tokenizers` vocabulary (GPT-2's 50,257 tokens by default) and the same
JSON schema; each walks the tokens of the same valid document, computing the allowed-token mask before every
token and then accepting it (the work a constrained row adds to a decode step). Prints the median per-token
time of each (rounds interleaved) and the ratio. xgrammar is optional (it pulls triton); point PYTHONPATH at a
--target install to measure it without installing it into the environment.

    python bench/bench_grammar.py --tokenizer $GPTGEN_DATA_DIR/gpt2-tokenizer
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"], "additionalProperties": False},
    "active": {"type": "boolean"}},
    "required": ["name", "age", "tags", "address", "active"], "additionalProperties": False}
DOCUMENT = {"name": "Anne Elliot", "age": 27, "tags": ["persuasion", "navy", "bath"],
            "address": {"city": "Kellynch", "zip": "BA1 2QH"}, "active": True}


def walk_gptgen(tokenizer, ids) -> float:
    from gptgen.generation.grammar import compile_constraint

    constraint = compile_constraint(tokenizer, {"type": "json_schema", "json_schema": {"schema": SCHEMA}})
    row = constraint.new_row()
    vocab = tokenizer.vocab_size
    t0 = time.perf_counter()
    for token in ids:
        mask = row.allowed_mask(vocab)
        assert mask[token], tokenizer.decode([token])
        row.accept(token)
    return (time.perf_counter() - t0) / len(ids)


def walk_llguidance_raw(tokenizer, ids) -> float:
    """The engine alone: the bitmask into a preallocated int32 buffer, then the token."""
    from gptgen.generation.grammar import compile_constraint

    row = compile_constraint(tokenizer, {"type": "json_schema", "json_schema": {"schema": SCHEMA}}).new_row()
    words = torch.zeros((tokenizer.vocab_size + 31) // 32, dtype=torch.int32)
    t0 = time.perf_counter()
    for token in ids:
        row.matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)
        assert row.matcher.consume_token(token)
    return (time.perf_counter() - t0) / len(ids)


def walk_xgrammar_raw(hf_tokenizer, ids, vocab) -> float:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab)
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA)))
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    t0 = time.perf_counter()
    for token in ids:
        matcher.fill_next_token_bitmask(bitmask)
        assert matcher.accept_token(token)
    return (time.perf_counter() - t0) / len(ids)


def walk_xgrammar(hf_tokenizer, ids, vocab) -> float:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab)
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA))
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    bits = torch.arange(32, dtype=torch.int32)
    t0 = time.perf_counter()
    for token in ids:
        matcher.fill_next_token_bitmask(bitmask)
        mask = ((bitmask[0].unsqueeze(1) >> bits) & 1).flatten()[:vocab].bool()  # the same mask gptgen hands out
        assert mask[token]
        assert matcher.accept_token(token)
    return (time.perf_counter() - t0) / len(ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(os.environ.get("GPTGEN_DATA_DIR", "/work/shared/data")) / "gpt2-tokenizer"
    ap.add_argument("--tokenizer", default=str(default), help="a tokenizer directory (tokenizer.json)")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from gptgen import Tokenizer

    tok = Tokenizer.from_pretrained(args.tokenizer)
    text = json.dumps(DOCUMENT)
    ids = tok.encode(text)
    print(f"vocabulary {tok.vocab_size:,} tokens; document of {len(ids)} tokens")
    peers = {"gptgen (llguidance)": lambda: walk_gptgen(tok, ids),
             "llguidance, engine only": lambda: walk_llguidance_raw(tok, ids)}
    try:
        import xgrammar  # noqa: F401
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_object=tok.backend)
        peers["xgrammar"] = lambda: walk_xgrammar(hf, ids, tok.vocab_size)
        peers["xgrammar, engine only"] = lambda: walk_xgrammar_raw(hf, ids, tok.vocab_size)
    except ImportError:
        print("xgrammar is not installed: measuring gptgen only")
    times: dict[str, list[float]] = {name: [] for name in peers}
    for name, walk in peers.items():  # a first walk each, not timed: compilation and caches
        walk()
    for _ in range(args.rounds):
        for name, walk in peers.items():
            times[name].append(walk())
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, value in medians.items():
        print(f"{name:26s} {value * 1e6:8.1f} us per token (median of {args.rounds})")
    if "xgrammar" in medians:
        print(f"per-token time llguidance / xgrammar: {medians['gptgen (llguidance)'] / medians['xgrammar']:.2f}x "
              f"as gptgen uses it (bool mask), "
              f"{medians['llguidance, engine only'] / medians['xgrammar, engine only']:.2f}x engine only")


if __name__ == "__main__":
    main()
