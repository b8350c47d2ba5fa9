"""`gptgen generate`: text from a model directory, with any sampler and decoding control."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ..errors import GenerationError
from ..generation.config import GenerationConfig
from ..quantize import QUANTIZE_HELP, QUANTIZE_MODES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a gptgen or Hugging Face GPT-2 model directory")
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="one or more prompts")
    p.add_argument("--model", required=True,
                   help="a model directory (gptgen, Hugging Face GPT-2, KerasHub preset) or a Hub name "
                        "(gpt2, skt/kogpt2-base-v2, gpt2_base_en)")
    p.add_argument("--tokenizer", help="tokenizer directory or file, when the model directory has none")
    add_generation_arguments(p)
    p.add_argument("--no-prompt", action="store_true", help="print only the generated text")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default as stored)")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, help=QUANTIZE_HELP)
    p.add_argument("--lora", metavar="DIR", help="a LoRA adapter directory (peft format) to run with the model")
    p.add_argument("--compile", action="store_true", default=None,
                   help="a fast one-token decode step (CPU: float32 weights go through gptgen's native step, "
                        "other weights through inductor's C++ kernels, whose first call takes seconds to a "
                        "minute; CUDA: on by default)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--stream", action="store_true", help="print tokens as they are produced (one prompt)")
    out.add_argument("--json", action="store_true", help="print a JSON object per prompt")
    p.set_defaults(handler=run_generate)


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per GenerationConfig option (--max-new-tokens, --top-p, ...), read back by generation_options()
    (shared with `gptgen chat`). Numbers are read as numbers and checked by GenerationConfig, so a bad value
    gets the sentence the API and the server give."""
    g = p.add_argument_group("decoding options (GenerationConfig; defaults: the model directory's "
                             "generation_config.json, else docs/generation.md)")
    for f in dataclasses.fields(GenerationConfig):
        if f.name in _NOT_FLAGS:
            continue
        kind, flag, text = f.metadata["kind"], "--" + f.name.replace("_", "-"), f.metadata["doc"]
        if kind in ("int", "float", "id"):
            g.add_argument(flag, type=_number, metavar="N", help=text)
        elif kind == "bool":
            g.add_argument(flag, action="store_true", default=None, help=text)
        elif kind == "texts":
            g.add_argument(flag, action="append", metavar="TEXT", help=text + " (repeatable)")
        elif kind == "ids":
            g.add_argument(flag, action="append", type=_number, metavar="ID", help=text + " (repeatable)")
        elif kind == "early_stopping":
            g.add_argument(flag, choices=["true", "false", "never"], help=text)
        else:
            g.add_argument(flag, help=text)
    p.add_argument("--truncate-prompt", action="store_true", help="keep the end of a prompt longer than the context")


# Options a command line has no use for: token-id lists, the server's logprobs, structured output.
_NOT_FLAGS = {"bad_words_ids", "logprobs", "response_format"}


def _number(text: str):
    """An int where the text is one, else a float (nan, inf, 1e-300 included): GenerationConfig judges it."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def generation_options(args) -> dict:
    """The GenerationConfig options the parsed flags give (only those given: the rest keep the model's defaults)."""
    out = {}
    for f in dataclasses.fields(GenerationConfig):
        value = getattr(args, f.name, None)
        if f.name in _NOT_FLAGS or value is None:
            continue
        if f.name == "early_stopping":
            value = {"true": True, "false": False, "never": "never"}[value]
        out[f.name] = value
    return out


def run_generate(args) -> int:
    import torch

    from ..generation import generate, stream
    from ..lm import load

    dtype = getattr(torch, args.dtype) if args.dtype else None
    lm = load(args.model, device=args.device, dtype=dtype, tokenizer=args.tokenizer, quantize=args.quantize,
              lora=args.lora)
    options = generation_options(args)
    options.update(truncate_prompt=args.truncate_prompt, compile=args.compile)
    if args.stream:
        if len(args.prompts) != 1:
            raise GenerationError("--stream takes one prompt.")
        if options.get("num_return_sequences", 1) != 1:
            raise GenerationError("--stream produces one sequence; drop --num-return-sequences.")
        if not args.no_prompt:
            sys.stdout.write(args.prompts[0])
        for piece in stream(lm, args.prompts[0], **options):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    texts = generate(lm, list(args.prompts), include_prompt=not args.no_prompt and not args.json, **options)
    for prompt, result in zip(args.prompts, texts):
        seqs = result if isinstance(result, list) else [result]
        if args.json:
            print(json.dumps({"prompt": prompt, "generations": seqs}, ensure_ascii=False))
        else:
            for i, text in enumerate(seqs):
                if len(seqs) > 1:
                    print(f"--- {i + 1} ---")
                print(text)
    return 0
