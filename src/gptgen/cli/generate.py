"""`gptgen generate`: text from a model directory, with any sampler and decoding control."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import GenerationError
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
    """The sampler and decoding-control flags that generation_options() reads (shared with `gptgen chat`)."""
    p.add_argument("--sampler", help="greedy, beam, random, top_k, top_p or contrastive (default: greedy, "
                                     "or sampling when --do-sample / --top-k / --top-p / --temperature is given)")
    p.add_argument("--max-new-tokens", type=int, help="tokens to generate (default 50)")
    p.add_argument("--max-length", type=int, help="prompt plus generated tokens, as KerasHub and HF count them")
    p.add_argument("--do-sample", action="store_true", default=None, help="sample (HF semantics: top-k 50 by default)")
    p.add_argument("--temperature", type=float, help="softmax temperature; 0 means greedy")
    p.add_argument("--top-k", type=int, help="k of top-k (0 turns it off with --do-sample)")
    p.add_argument("--top-p", type=float, help="p of nucleus sampling, in (0, 1]")
    p.add_argument("--num-beams", type=int, help="beams of beam search")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search length penalty (default 1.0)")
    p.add_argument("--early-stopping", choices=["true", "false", "never"], default="false",
                   help="beam search stopping rule (default false)")
    p.add_argument("--penalty-alpha", type=float, help="degeneration penalty of contrastive search")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL repetition penalty (default 1.0)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0, help="ban repeated n-grams of this size")
    p.add_argument("--min-new-tokens", type=int, default=0, help="no end-of-sequence before this many tokens")
    p.add_argument("--min-length", type=int, help="no end-of-sequence before prompt plus generated reach this")
    p.add_argument("--min-p", type=float, help="drop tokens below min_p times the top token's probability")
    p.add_argument("--typical-p", type=float, help="locally typical sampling mass, in (0, 1)")
    p.add_argument("--epsilon-cutoff", type=float, help="drop tokens with probability below this")
    p.add_argument("--eta-cutoff", type=float, help="eta sampling cutoff")
    p.add_argument("--min-tokens-to-keep", type=int, help="the filters keep at least this many tokens (default 1)")
    p.add_argument("--bad-words", action="append", metavar="TEXT", help="text never to generate (repeatable)")
    p.add_argument("--stop", action="append", metavar="TEXT", help="end a sequence at this text (repeatable)")
    p.add_argument("--num-return-sequences", type=int, default=1, help="sequences per prompt")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument("--truncate-prompt", action="store_true", help="keep the end of a prompt longer than the context")


def generation_options(args) -> dict:
    """The generate() keyword arguments the parsed flags ask for."""
    early = {"true": True, "false": False, "never": "never"}[args.early_stopping]
    return dict(
        sampler=args.sampler, max_new_tokens=args.max_new_tokens, max_length=args.max_length,
        do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        num_beams=args.num_beams, length_penalty=args.length_penalty, early_stopping=early,
        penalty_alpha=args.penalty_alpha, repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size, min_new_tokens=args.min_new_tokens,
        bad_words=args.bad_words, stop=args.stop, num_return_sequences=args.num_return_sequences, seed=args.seed,
        truncate_prompt=args.truncate_prompt, compile=getattr(args, "compile", None),
        **{name: getattr(args, name) for name in _WARPERS if getattr(args, name) is not None},
    )


# transformers' warper options, passed only when given (generate() keeps its own defaults)
_WARPERS = ("min_length", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "min_tokens_to_keep")


def run_generate(args) -> int:
    import torch

    from ..generation import generate, stream
    from ..lm import load

    dtype = getattr(torch, args.dtype) if args.dtype else None
    lm = load(args.model, device=args.device, dtype=dtype, tokenizer=args.tokenizer, quantize=args.quantize,
              lora=args.lora)
    options = generation_options(args)
    if args.stream:
        if len(args.prompts) != 1:
            raise GenerationError("--stream takes one prompt.")
        if args.num_return_sequences != 1:
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
