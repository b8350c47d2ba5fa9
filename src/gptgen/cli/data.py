"""`gptgen prepare` (tokenise a corpus into memmap shards) and `gptgen datasets list|download|verify`."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from ..data import readers, registry, shards
from ..errors import DataError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenise a corpus into memmap token shards for training",
                       description="Tokenise text files (or a named data set) into uint16/uint32 memmap shards "
                                   "plus manifest.json; train on them with ShardDataset.")
    p.add_argument("inputs", nargs="*", help="text files, directories or globs (or use --dataset)")
    p.add_argument("--dataset", help=f"a named data set instead of files: {', '.join(registry.DATASETS)}")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or file (e.g. a model directory)")
    p.add_argument("--output", "-o", required=True, help="directory to write the shards into")
    p.add_argument("--mode", default="lines", choices=readers.MODES, help="how files become examples")
    p.add_argument("--min-length", type=int, default=None, help="drop examples of <= N characters")
    p.add_argument("--field", help="JSON/JSONL field holding the text")
    p.add_argument("--join", help="separator for JSON list fields and paragraph lines")
    p.add_argument("--template", help="CSV row template, e.g. '<s>{Q}</s><s>{A}</s>'")
    p.add_argument("--val", nargs="+", metavar="FILE", help="validation files: writes OUTPUT/train and OUTPUT/val")
    p.add_argument("--split", help="split the inputs in memory: every_nth:N or fraction:F (OUTPUT/train, OUTPUT/val)")
    p.add_argument("--seed", type=int, default=0, help="seed of a fraction split")
    p.add_argument("--shard-tokens", type=int, default=shards.DEFAULT_SHARD_TOKENS, help="tokens per shard file")
    p.add_argument("--workers", type=int, default=1,
                   help="tokenising processes (1: in process, the tokenizer's own threads)")
    p.add_argument("--bos", action="store_true", help="put the BOS token before every document")
    p.add_argument("--no-eos", action="store_true", help="do not put the EOS token after every document")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in OUTPUT")
    p.set_defaults(handler=run_prepare)

    d = sub.add_parser("datasets", help="list, download or verify the named data sets")
    dsub = d.add_subparsers(dest="datasets_command", metavar="ACTION")
    ls = dsub.add_parser("list", help="the named data sets and whether they are present")
    ls.set_defaults(handler=run_list)
    dl = dsub.add_parser("download", help="download a data set into the data directory, checking sha256")
    dl.add_argument("name")
    dl.add_argument("--force", action="store_true")
    dl.set_defaults(handler=run_download)
    vf = dsub.add_parser("verify", help="check a data set's files against their sha256")
    vf.add_argument("name")
    vf.set_defaults(handler=run_verify)
    d.set_defaults(handler=run_list)


def _reader_opts(args) -> dict:
    opts = {}
    if args.min_length is not None:
        opts["min_length"] = args.min_length
    if args.field is not None:
        opts["field"] = args.field
    if args.join is not None:
        opts["join"] = args.join.replace("\\n", "\n").replace("\\t", "\t")  # "\n" typed in a shell
    if args.template is not None:
        opts["template"] = args.template
    return opts


def run_prepare(args) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", readers.InvalidUTF8Warning)
        try:
            return _prepare(args)
        finally:
            for w in caught:
                print(f"warning: {w.message}", file=sys.stderr)


def _prepare(args) -> int:
    from ..options import check_output_dir
    from ..tokenizer import Tokenizer

    check_output_dir(args.output, "the output directory (-o)")
    if bool(args.inputs) == bool(args.dataset):
        raise DataError("Give either input files or --dataset NAME, not both and not neither.")
    if args.val and args.split:
        raise DataError("Give validation files (--val) or a split (--split), not both.")
    tok = Tokenizer.from_pretrained(args.tokenizer)
    out = Path(args.output)
    common = dict(shard_tokens=args.shard_tokens, num_workers=args.workers, add_eos=not args.no_eos,
                  add_bos=args.bos, overwrite=args.overwrite)
    opts = _reader_opts(args)
    jobs: list[tuple[Path, object, dict]] = []
    if args.dataset:
        min_length = opts.pop("min_length", None)
        kwargs = {} if args.split is None else {"split": args.split}
        result = registry.resolve_dataset(args.dataset, min_length=min_length, seed=args.seed, **kwargs, **opts)
        if isinstance(result, tuple):
            jobs = [(out / "train", result[0], {}), (out / "val", result[1], {})]
        else:
            jobs = [(out, result, {})]
    elif args.split:
        examples = readers.read_texts(args.inputs, args.mode, **opts)
        train, val = readers.apply_split(examples, args.split, seed=args.seed)
        jobs = [(out / "train", train, {}), (out / "val", val, {})]
    else:
        reader = dict(opts, mode=args.mode)
        if args.val:
            jobs = [(out / "train", args.inputs, reader), (out / "val", args.val, reader)]
        else:
            jobs = [(out, args.inputs, reader)]
    for target, source, reader in jobs:
        start = time.perf_counter()
        if isinstance(source, list) and source and isinstance(source[0], str) and reader:
            source = [Path(s) for s in source]  # file names, read lazily by the reader mode
        manifest = shards.prepare_shards(source, tok, target, **common, **reader)
        seconds = time.perf_counter() - start
        print(f"Wrote {manifest['num_tokens']:,} tokens of {manifest['num_documents']:,} documents to "
              f"{target} ({len(manifest['shards'])} {manifest['dtype']} shard(s)) in {seconds:.1f} s, "
              f"{manifest['num_tokens'] / max(seconds, 1e-9):,.0f} tokens/s.")
    return 0


def run_list(args) -> int:
    root = registry.data_dir()
    print(f"data directory: {root} (set GPTGEN_DATA_DIR to change it)")
    for name, spec in registry.DATASETS.items():
        try:
            files = registry.dataset_files(spec)
            state = f"present, {len(files)} file(s)"
        except DataError:
            state = "missing"
        print(f"{name:16s} {state:22s} {spec.description}")
    return 0


def run_download(args) -> int:
    base = registry.download_dataset(args.name, force=args.force)
    print(f"{args.name} is in {base}; every file matches its sha256.")
    return 0


def run_verify(args) -> int:
    spec = registry.get_spec(args.name)
    problems = registry.verify_dataset(spec)
    base = registry.dataset_root(spec)
    if problems:
        for rel, problem in problems.items():
            print(f"{base / rel}: {problem}")
        raise DataError(f"{len(problems)} file(s) of {args.name} are missing or differ from their recorded sha256.")
    print(f"All {len(spec.sha256)} file(s) of {args.name} in {base} match their sha256.")
    return 0
