"""`gptgen serve`: an OpenAI-compatible HTTP server and web playground for a model directory."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import ConfigError, GptgenError
from ..quantize import QUANTIZE_HELP, QUANTIZE_MODES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API with a web playground")
    p.add_argument("--model", required=True, help="a model directory or a Hub name (gpt2, skt/kogpt2-base-v2)")
    p.add_argument("--tokenizer", help="tokenizer directory or file, when the model directory has none")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (KV-cache slots, default 16)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a slot before new ones get 429 (default 256)")
    p.add_argument("--max-body-size", type=int, default=1 << 20, help="largest request body in bytes (default 1 MiB)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (default: open)")
    p.add_argument("--cors", action="append", metavar="ORIGIN",
                   help="allow browser calls from this origin (repeatable; '*' for any; default: none)")
    p.add_argument("--served-model-name", help="the model name clients send (default: the directory's name)")
    p.add_argument("--chat-template", default="auto", metavar="NAME|FILE",
                   help="auto (the model directory's Jinja chat_template, else <bos>{text}<eos> with the "
                        "tokenizer's tokens, KoGPT-2's <s>{text}</s>), kogpt2, plain, chatml, a Jinja file or "
                        "a model directory holding one, or none (chat refused)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default as stored)")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, help=QUANTIZE_HELP)
    p.add_argument("--lora", metavar="DIR", help="a LoRA adapter directory (peft format) to run with the model")
    p.add_argument("--compile", action="store_true",
                   help="CPU: compile the decode step with inductor (C++ kernels) before serving; takes tens "
                        "of seconds at start, then serves 1-1.5x faster in fp32 and 2-3x with --quantize int8 "
                        "(needs a C++ compiler; CUDA replays CUDA graphs without it)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="recompute every prompt instead of reusing the KV of a prefix it shares with an earlier one "
                        "(outputs are the same either way; for measuring)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="close a connection whose request headers are not complete within this time (default 10)")
    p.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="close a connection whose request body is not complete within this time after its "
                        "headers (default 30)")
    p.add_argument("--keep-alive-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="close an idle keep-alive connection after this time (default 5)")
    p.set_defaults(handler=run_serve)


def run_serve(args) -> int:
    try:
        import uvicorn
    except ImportError:
        raise GptgenError("gptgen serve needs FastAPI and uvicorn; "
                          "install them with pip install 'gptgen[serve]'.") from None
    import torch

    from ..lm import load
    from ..serve import create_app

    if not 0 < args.port < 65536:
        raise GptgenError(f"--port must be between 1 and 65535, got {args.port}.")
    for option, value in (("--header-timeout", args.header_timeout), ("--body-timeout", args.body_timeout),
                          ("--keep-alive-timeout", args.keep_alive_timeout)):
        if not 0 < value <= 86400:  # also refuses nan
            raise ConfigError(f"{option} must be a number of seconds above 0 and at most 86400, got {value}.")
    from ..chat import check_template_name

    try:  # before the model loads: a wrong name fails in a second, not after the load
        check_template_name(args.chat_template)
    except GptgenError as exc:
        raise GptgenError(f"--chat-template: {exc}") from None
    from ..checkpoint import resolve_dir
    from ..serve.loading import LoadingApp

    dtype = getattr(torch, args.dtype) if args.dtype else None
    if os.sep in args.model or Path(args.model).exists():  # a missing directory fails now, before binding
        resolve_dir(args.model, config_only=True)
        from ..checkpoint import read_config

        # sizes that cannot fit are refused before the port is bound (and again, exactly, once loaded)
        check_serve_sizes(read_config(args.model), dtype or torch.float32, args.max_batch, args.max_queue,
                          args.max_body_size)
    name = args.served_model_name or Path(args.model).resolve().name

    def build():  # in a thread, while the port already answers /health with 503 {"status": "loading"}
        lm = load(args.model, device=args.device, dtype=dtype, tokenizer=args.tokenizer, quantize=args.quantize,
                  lora=args.lora)
        check_serve_sizes(lm.config, next(lm.model.parameters()).dtype, args.max_batch, args.max_queue,
                          args.max_body_size)
        template = None if args.chat_template == "none" else args.chat_template
        app = create_app(lm, max_batch=args.max_batch, max_queue=args.max_queue, api_key=args.api_key,
                         cors=args.cors, served_model_name=name, chat_template=template,
                         max_body_bytes=args.max_body_size, compile=args.compile,
                         prefix_caching=not args.no_prefix_caching)
        engine = app.state.gptgen.engine
        if engine.compile_cpu:  # here rather than in the app's start-up, so the time is printed
            print(f"gptgen: compiling the decode step for batches 1-{args.max_batch} ...", flush=True)
            print(f"gptgen: compiled in {engine.warm_up():.1f} s", flush=True)
        elif args.compile and engine.runner.backend == "native":
            from ..native import status as native_status

            print("gptgen: --compile has nothing to compile: the native one-token step decodes this model "
                  f"({native_status()['decoder'].get('path')} path)", flush=True)
        print(f"gptgen: {name} ({lm.num_parameters():,} parameters) is ready: /health answers 200", flush=True)
        return app

    loading = LoadingApp(build)
    print(f"gptgen: serving {name} at http://{args.host}:{args.port}/ (playground at /, API at /v1); "
          f"loading the model, /health answers 503 until it is ready", flush=True)
    from ..serve.hardening import timed_protocol

    uvicorn.run(loading, host=args.host, port=args.port, log_level=args.log_level,
                http=timed_protocol(args.header_timeout, args.body_timeout),  # slow clients are cut off
                timeout_keep_alive=args.keep_alive_timeout)
    if loading.error is not None:
        if isinstance(loading.error, GptgenError):
            raise loading.error
        raise GptgenError(f"Loading the model failed: {loading.error}") from None
    return 0


def check_serve_sizes(config, dtype, max_batch: int, max_queue: int, max_body_size: int) -> None:
    """Refuse --max-batch, --max-queue and --max-body-size that could not fit the machine's memory, before the
    engine allocates its KV-cache slots (one sentence naming the option, exit 2)."""
    from ..limits import check_allocation, kv_cache_bytes

    for option, value in (("--max-batch", max_batch), ("--max-queue", max_queue),
                          ("--max-body-size", max_body_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{option} must be a positive integer, got {value!r}.")
    # every slot's cache over the whole context, and each step's (slots, vocab) float32 scores a few times over
    slots = kv_cache_bytes(config, max_batch, config.n_positions, dtype) + 8 * 4 * max_batch * config.vocab_size
    check_allocation("--max-batch", slots, value=max_batch, error=ConfigError)
    # a body is held (and parsed: a few times its size) while read; a queued request holds its prompt's ids
    check_allocation("--max-body-size", 4 * max_body_size, value=max_body_size, error=ConfigError)
    per_request = 64 * config.n_positions + (16 << 10)
    check_allocation("--max-queue", max_queue * per_request, value=max_queue, error=ConfigError)
