"""`gptgen chat`: an interactive chat with a model directory.

At a terminal it is a REPL; when stdin is not a terminal it reads one turn per line, so a conversation can
be scripted (`printf 'hi\\n/reset\\nhello\\n' | gptgen chat --model DIR`). Lines starting with "/" are
commands: /reset, /candidates N, /history N, /help, /quit. Sampler flags are those of `gptgen generate`.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import GenerationError
from ..quantize import QUANTIZE_HELP, QUANTIZE_MODES
from .generate import add_generation_arguments, generation_options

HELP = """commands:
  /reset          forget the conversation so far
  /candidates N   answer with N candidates (needs sampling or beams for N > 1)
  /history N      keep the last N exchanges in the prompt (0: none)
  /help           this text
  /quit           leave (also Ctrl-D)"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model (a REPL; reads turns from stdin when piped)")
    p.add_argument("--model", required=True,
                   help="a model directory (gptgen, Hugging Face GPT-2, KerasHub preset) or a Hub name "
                        "(gpt2, skt/kogpt2-base-v2, gpt2_base_en)")
    p.add_argument("--tokenizer", help="tokenizer directory or file, when the model directory has none")
    p.add_argument("--template", "--chat-template", dest="template", default="auto", metavar="NAME|FILE",
                   help="chat template: auto (the model directory's Jinja chat_template, else <bos>{text}<eos> "
                        "with the tokenizer's tokens, KoGPT-2's <s>{text}</s>), kogpt2, plain ('Q: ...' / "
                        "'A: ...' lines), chatml, or a Jinja file (the same templates as gptgen serve)")
    p.add_argument("--user-template", help="user turn, e.g. '<s>{text}</s>' (with --assistant-template)")
    p.add_argument("--assistant-template", help="assistant turn; the text after {text} ends an answer")
    p.add_argument("--system", default="", help="a system message, put before the conversation as its own turn")
    p.add_argument("--history", type=int, default=3, help="exchanges kept in the prompt (default 3)")
    p.add_argument("--candidates", type=int, help="answers per question (default: --num-return-sequences)")
    add_generation_arguments(p)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default as stored)")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, help=QUANTIZE_HELP)
    p.add_argument("--lora", metavar="DIR", help="a LoRA adapter directory (peft format) to run with the model")
    p.add_argument("--json", action="store_true", help="print one JSON object per answered turn")
    p.set_defaults(handler=run_chat)


def build_template(args, tokenizer):
    from ..chat import ChatTemplate, get_template

    if args.user_template or args.assistant_template:
        if not (args.user_template and args.assistant_template):
            raise GenerationError("Give both --user-template and --assistant-template.")
        return ChatTemplate(user=args.user_template, assistant=args.assistant_template,
                            system_turn="{text}\n")
    try:
        return get_template(args.template, tokenizer)
    except GenerationError as exc:
        raise GenerationError(f"--template: {exc}") from None


def run_chat(args, stdin=None, stdout=None) -> int:
    import torch

    from ..chat import ChatSession
    from ..lm import load

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    from ..chat import check_template_name

    try:  # before the model loads
        check_template_name(args.template)
    except GenerationError as exc:
        raise GenerationError(f"--template: {exc}") from None
    dtype = getattr(torch, args.dtype) if args.dtype else None
    lm = load(args.model, device=args.device, dtype=dtype, tokenizer=args.tokenizer, quantize=args.quantize,
              lora=args.lora)
    options = generation_options(args)
    candidates = options.pop("num_return_sequences", lm.generation_config.num_return_sequences)
    if args.candidates is not None:
        candidates = args.candidates
    session = ChatSession(lm, template=build_template(args, lm.tokenizer), history_turns=args.history,
                          candidates=candidates, system=args.system, options={k: v for k, v in options.items() if v is not None})
    interactive = stdin.isatty()
    if hasattr(stdin, "reconfigure"):  # invalid bytes reach the check below instead of raising while read
        try:
            stdin.reconfigure(errors="surrogateescape")
        except (ValueError, OSError):  # pragma: no cover - a stream that cannot change
            pass
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # pragma: no cover - not on every platform
            pass
    if interactive and not args.json:
        stdout.write(f"Chatting with {args.model} ({lm.num_parameters():,} parameters). /help for commands.\n")
    while True:
        if interactive:
            try:
                line = input("you> ")
            except EOFError:
                stdout.write("\n")
                break
        else:
            line = stdin.readline()
            if not line:
                break
        line = line.strip()
        if not line:
            continue
        bad = _undecodable(line)
        if bad is not None:  # stdin decodes invalid UTF-8 bytes to lone surrogates
            message = f"The input holds a line that is not valid UTF-8 (byte 0x{bad:02x}); type or pipe UTF-8 text."
            if not interactive:
                raise GenerationError(message)
            stdout.write(f"error: {message}\n")
            continue
        try:
            if line.startswith("/"):
                if not _command(line, session, stdout, args.json):
                    break
                continue
            answers = session.ask(line)
        except GenerationError as exc:
            if not interactive:
                raise
            stdout.write(f"error: {exc}\n")
            continue
        _print_answers(line, answers, session.last_finished, stdout, args.json)
        stdout.flush()
    return 0


def _undecodable(text: str) -> int | None:
    """The first byte Python's surrogateescape decoding could not read (a lone surrogate), or None."""
    for ch in text:
        if "\ud800" <= ch <= "\udfff":
            code = ord(ch)
            return code - 0xDC00 if 0xDC80 <= code <= 0xDCFF else code
    return None


def _command(line: str, session, stdout, json_mode: bool) -> bool:
    """Run a /command; False means leave."""
    name, _, value = line.partition(" ")
    value = value.strip()
    if name in ("/quit", "/exit", "/q"):
        return False
    if name == "/reset":
        session.reset()
        _note(stdout, json_mode, {"command": "reset"}, "(conversation reset)")
    elif name in ("/candidates", "/history"):
        try:
            n = int(value)
        except ValueError:
            raise GenerationError(f"{name} takes a whole number, got {value!r}.") from None
        if name == "/candidates":
            session.set_candidates(n)
        else:
            session.set_history(n)
        _note(stdout, json_mode, {"command": name[1:], "value": n}, f"({name[1:]}: {n})")
    elif name == "/help":
        if not json_mode:
            stdout.write(HELP + "\n")
    else:
        raise GenerationError(f"Unknown command {name}; type /help for the list.")
    return True


def _note(stdout, json_mode: bool, record: dict, text: str) -> None:
    stdout.write((json.dumps(record) if json_mode else text) + "\n")


def _print_answers(question: str, answers: list[str], finished: list[bool], stdout, json_mode: bool) -> None:
    if json_mode:
        stdout.write(json.dumps({"question": question, "answers": answers, "finished": finished},
                                ensure_ascii=False) + "\n")
        return
    if len(answers) == 1:
        stdout.write(f"bot> {answers[0]}\n")
        return
    for i, answer in enumerate(answers, 1):
        stdout.write(f"bot[{i}]> {answer}\n")
