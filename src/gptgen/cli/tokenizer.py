"""`gptgen tokenizer train|encode`."""

from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path

from ..errors import TokenizerError
from ..tokenizer import KINDS, Tokenizer


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train or inspect a tokenizer")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    tsub.required = True

    t = tsub.add_parser("train", help="train a tokenizer on text files")
    t.add_argument("files", nargs="+", help="text files, directories or globs")
    t.add_argument("--kind", required=True, help=f"one of {', '.join(KINDS)}")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--output", "-o", required=True, help="directory to write tokenizer.json into")
    t.add_argument("--lowercase", action="store_true")
    t.add_argument("--reserved", nargs="*", default=None,
                   help="tokens placed first, in order (e.g. [PAD] [UNK] [BOS])")
    t.add_argument("--special", action="append", default=[], metavar="ROLE=TOKEN",
                   help="special token by role (pad, unk, bos, eos); repeatable")
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--overwrite", action="store_true",
                   help="replace a tokenizer gptgen wrote in the output directory (never a file of yours)")
    t.set_defaults(handler=run_train)

    e = tsub.add_parser("encode", help="print the ids of a text")
    e.add_argument("--tokenizer", required=True, help="tokenizer directory or file")
    e.add_argument("text")
    e.set_defaults(handler=run_encode)


def expand_paths(patterns: list[str]) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            matched = sorted(Path(p) for p in glob.glob(pattern))
            if not matched:
                raise TokenizerError(f"No file matches {pattern!r}.")
            files += matched
    return files


def parse_roles(items: list[str]) -> dict[str, str] | None:
    if not items:
        return None
    roles = {}
    for item in items:
        role, sep, token = item.partition("=")
        if not sep or not token:
            raise TokenizerError(f"--special takes ROLE=TOKEN, got {item!r}.")
        roles[role] = token
    return roles


def run_train(args) -> int:
    from ..options import check_output_dir

    from ..tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE
    from ..written import check_replaceable, record

    check_output_dir(args.output, "the output directory (-o)")
    written = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE)
    check_replaceable(args.output, written, args.overwrite)
    files = expand_paths(args.files)
    roles = parse_roles(args.special)
    if roles is None and args.reserved:
        roles = {}
        for token in args.reserved:
            for role, guess in (("pad", "[PAD]"), ("unk", "[UNK]"), ("bos", "[BOS]"), ("eos", "[EOS]"),
                                ("pad", "<pad>"), ("unk", "<unk>"), ("bos", "<s>"), ("eos", "</s>")):
                if token == guess:
                    roles.setdefault(role, token)
    start = time.perf_counter()
    tok = Tokenizer.train(args.kind, files, args.vocab_size, special_tokens=roles,
                          reserved_tokens=args.reserved, lowercase=args.lowercase,
                          min_frequency=args.min_frequency)
    check_replaceable(args.output, written, args.overwrite)  # again: the files may have appeared meanwhile
    tok.save(args.output)
    record(args.output, written)
    print(f"Trained a {args.kind} tokenizer of {tok.vocab_size:,} tokens on {len(files)} file(s) in "
          f"{time.perf_counter() - start:.1f} s; wrote {Path(args.output) / 'tokenizer.json'}.")
    print("Special tokens: " + json.dumps(tok.special_tokens, ensure_ascii=False))
    return 0


def run_encode(args) -> int:
    tok = Tokenizer.from_pretrained(args.tokenizer)
    ids = tok.encode(args.text)
    print(json.dumps({"ids": ids, "tokens": [tok.id_to_token(i) for i in ids]}, ensure_ascii=False))
    return 0
