"""`gptgen summary` and `gptgen convert`."""

from __future__ import annotations

import argparse

from .. import checkpoint
from ..config import PRESETS, preset
from ..errors import ConfigError
from ..lm import load
from ..model import GPT
from ..summary import format_summary


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("summary", help="print a per-layer table of a preset or a model directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help=f"one of {', '.join(PRESETS)}")
    src.add_argument("--model", help="a gptgen or Hugging Face GPT-2 model directory")
    p.add_argument("--vocab-size", type=int, help="override the preset's vocabulary size")
    p.add_argument("--seq-len", type=int, dest="n_positions", help="override the preset's context length")
    p.set_defaults(handler=run_summary)

    p = sub.add_parser("convert", help="convert between gptgen and Hugging Face GPT-2 directories")
    p.add_argument("source", help="a gptgen or Hugging Face GPT-2 model directory")
    p.add_argument("target", help="the directory to write")
    p.add_argument("--to", choices=["gptgen", "hf"], default=None,
                   help="target format (default: the other one)")
    p.add_argument("--tokenizer", help="tokenizer directory or file, when the source has none beside it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a model directory gptgen wrote at the target (other directories are never replaced)")
    p.set_defaults(handler=run_convert)


def run_summary(args) -> int:
    if args.preset:
        config = preset(args.preset, vocab_size=args.vocab_size, n_positions=args.n_positions)
        title = args.preset
    else:
        if args.vocab_size or args.n_positions:
            raise ConfigError("--vocab-size and --seq-len apply to --preset, not to --model.")
        config = checkpoint.read_config(args.model)
        title = args.model
    import torch

    with torch.device("meta"):
        model = GPT(config)
    print(format_summary(model, title))
    return 0


def run_convert(args) -> int:
    checkpoint.check_write_target(args.target, args.overwrite)  # refuse before loading anything
    to = args.to or ("gptgen" if checkpoint.is_hf_gpt2_dir(__import__("pathlib").Path(args.source)) else "hf")
    lm = load(args.source, tokenizer=args.tokenizer)
    path = lm.save(args.target, format=to, overwrite=args.overwrite)
    print(f"Wrote {to} model directory {path} ({lm.num_parameters():,} parameters).")
    return 0
