"""`gptgen summary`, `gptgen convert` and `gptgen download`."""

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
    src.add_argument("--model", help="a model directory or a Hub name (gpt2, user/repo@REV, gpt2_base_en)")
    p.add_argument("--vocab-size", type=int, help="override the preset's vocabulary size")
    p.add_argument("--seq-len", type=int, dest="n_positions", help="override the preset's context length")
    p.set_defaults(handler=run_summary)

    p = sub.add_parser("convert", help="convert between gptgen, Hugging Face GPT-2 and KerasHub preset directories, "
                                       "or write a GGUF file for llama.cpp / Ollama")
    p.add_argument("source", help="a model directory (gptgen, Hugging Face GPT-2, KerasHub) or a Hub name")
    p.add_argument("target", help="the directory to write (--to gguf: the .gguf file)")
    p.add_argument("--to", choices=["gptgen", "hf", "kerashub", "gguf"], default=None,
                   help="target format (default: gptgen for HF/KerasHub sources, hf for gptgen ones); gguf: one "
                        "file llama.cpp and Ollama load (GPT-2 architecture; needs pip install 'gptgen[gguf]')")
    p.add_argument("--gguf-type", choices=["f32", "q8_0"], default="q8_0",
                   help="--to gguf: the weights' type (q8_0: int8 blocks of 32 with an fp16 scale; f32: exact)")
    p.add_argument("--tokenizer", help="tokenizer directory or file, when the source has none beside it")
    p.add_argument("--merge-lora", metavar="ADAPTER_DIR",
                   help="fold this LoRA adapter (peft format, e.g. a LoRA run's last/) into the source's weights")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a model directory gptgen wrote at the target (other directories are never replaced)")
    p.set_defaults(handler=run_convert)

    p = sub.add_parser("download", help="fetch a pretrained model by name into the Hugging Face cache, for offline use")
    p.add_argument("name", help="a Hub repo id (gpt2, skt/kogpt2-base-v2, user/repo@REV) or a KerasHub preset "
                                "name (gpt2_base_en, gpt2_medium_en, gpt2_large_en, gpt2_extra_large_en)")
    p.add_argument("--revision", help="branch, tag or commit (same as NAME@REV)")
    p.set_defaults(handler=run_download)


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
    if args.to == "gguf":
        from ..gguf_export import write_gguf

        lm = load(checkpoint.resolve_dir(args.source), tokenizer=args.tokenizer, lora=args.merge_lora)
        path = write_gguf(lm, args.target, args.gguf_type, overwrite=args.overwrite)
        print(f"Wrote GGUF file {path} ({args.gguf_type}, {lm.num_parameters():,} parameters).")
        return 0
    checkpoint.check_write_target(args.target, args.overwrite)  # refuse before loading anything
    source = checkpoint.resolve_dir(args.source)
    if args.to:
        to = args.to
    else:
        from ..kerashub import is_kerashub_dir

        to = "gptgen" if checkpoint.is_hf_gpt2_dir(source) or is_kerashub_dir(source) else "hf"
    lm = load(source, tokenizer=args.tokenizer, lora=args.merge_lora)
    path = lm.save(args.target, format=to, overwrite=args.overwrite)
    merged = f", LoRA adapter {args.merge_lora} merged" if args.merge_lora else ""
    print(f"Wrote {to} model directory {path} ({lm.num_parameters():,} parameters{merged}).")
    return 0


def run_download(args) -> int:
    from ..hub import download

    print(download(args.name, args.revision))
    return 0
