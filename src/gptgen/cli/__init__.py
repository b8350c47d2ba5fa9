"""The `gptgen` command: a thin shell over the public API.

Each command module defines register(subparsers); its handler receives the parsed args. A GptgenError
is printed as one line without a traceback and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import GptgenError

# Command modules, in the order their commands appear in --help.
COMMAND_MODULES = ["model", "tokenizer", "data", "train", "generate", "chat", "serve"]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="gptgen", description="Train, fine-tune and generate with GPT models.")
    parser.add_argument("--version", action="version", version=f"gptgen {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.handler(args)
    except GptgenError as exc:
        print(f"gptgen: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptgen: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
