"""A corpus in one call: read files (or a named data set), split off validation, drop short examples, pack.

    from gptgen.data import read_corpus, load_corpus
    texts = read_corpus("books/*.txt", reader="paragraphs", split="every_nth:10", min_length=512)
    packed = texts.pack(tokenizer, seq_len=128, add_bos=True)          # PackedExamples for fit()
    packed = load_corpus(dataset="books", tokenizer=tokenizer, seq_len=128, add_bos=True)   # both steps

The split is taken before the length filter, so the validation examples are the same whatever the filter
(as resolve_dataset does for the named data sets).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Union

from ..errors import DataError
from .packing import PackedExamples, pack_texts
from .readers import apply_split, filter_min_length, read_texts

PathsLike = Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]]
READERS = ("lines", "paragraphs", "documents", "json", "jsonl", "csv")


@dataclass
class PackedCorpus:
    """Training and (optional) validation examples, packed to one length."""

    train: PackedExamples
    val: PackedExamples | None = None


@dataclass
class Corpus:
    """Training and (optional) validation texts, and a description of where they came from."""

    train: list[str]
    val: list[str] | None = None
    source: str = "the corpus"

    def __iter__(self):  # train, val = read_corpus(...)
        return iter((self.train, self.val))

    def limit(self, n: int | None) -> "Corpus":
        """The first n training texts and the first n/10 (at least 8) validation texts: a toy-size run."""
        if not n:
            return self
        val = self.val[:max(8, n // 10)] if self.val is not None else None
        return Corpus(self.train[:n], val, self.source)

    def pack(self, tokenizer, seq_len: int, packing: str = "pad", add_bos: bool = False,
             add_eos: bool = False) -> PackedCorpus:
        """Tokenize and pack both parts: "pad" (one example per row) or "chunk" (concatenate and cut)."""
        check_packing(packing, seq_len)
        train = pack_texts(self.train, tokenizer, seq_len, packing, add_bos, add_eos)
        val = pack_texts(self.val, tokenizer, seq_len, packing, add_bos, add_eos) if self.val else None
        return PackedCorpus(train, val)


def check_packing(packing: str, seq_len: int | None) -> None:
    if packing not in ("pad", "chunk"):
        raise DataError(f"Unknown packing {packing!r}; choose 'pad' (one example per row) or 'chunk'.")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
        raise DataError(f"seq_len (--seq-len) must be a positive number of tokens, got {seq_len!r}.")


def _describe(paths) -> str:
    if isinstance(paths, (str, os.PathLike)):
        return str(paths)
    paths = [str(p) for p in paths]
    return paths[0] if len(paths) == 1 else f"{paths[0]} (and {len(paths) - 1} more)"


def reader_options(reader: str, field: str | None = None, template: str | None = None) -> dict:
    """The options of `reader` among field (json, jsonl) and template (csv); others do not take them."""
    opts = {}
    if field and reader in ("json", "jsonl"):
        opts["field"] = field
    if template and reader == "csv":
        opts["template"] = template
    return opts


def read_corpus(data: PathsLike | None = None, *, dataset: str | None = None, val_data: PathsLike | None = None,
                reader: str | None = None, split: str | float | None = None, min_length: int | None = None,
                seed: int = 0, root: str | os.PathLike | None = None, field: str | None = None,
                template: str | None = None) -> Corpus:
    """Training and validation texts from files (`data`, with `reader`) or a named data set (`dataset`).

    Validation comes from `val_data` files, else from `split` ("every_nth:10", "fraction:0.1"; a data set
    uses its own split unless one is given, "none" for no split), else there is none. Examples of
    `min_length` characters or fewer are then dropped from both parts.
    """
    if data is None and dataset is None:
        raise DataError("No data given: pass data=PATHS (files, directories, globs) or dataset=NAME.")
    if data is not None and dataset is not None:
        raise DataError("Give either data=PATHS or dataset=NAME, not both.")
    if data is not None and not isinstance(data, (str, os.PathLike)):
        data = list(data)
        if not data:
            raise DataError("The list of data files is empty; pass data=PATHS (files, directories or globs).")
    if min_length is not None and min_length < 0:
        raise DataError(f"min_length must be 0 or more characters, got {min_length}.")
    if dataset is not None:
        from .registry import get_spec, resolve_dataset

        spec = get_spec(dataset)
        options = {} if split is None else {"split": None if split == "none" else split}
        if val_data is not None:
            options["split"] = None
        resolved = resolve_dataset(dataset, root=root, min_length=min_length, seed=seed, **options)
        train, val = resolved if isinstance(resolved, tuple) else (resolved, None)
        if val_data is not None:
            val = read_texts(val_data, spec.mode, min_length or 0, **spec.options)
        return Corpus(train, val, f"data set {spec.name!r}")
    reader = reader or "lines"
    if reader not in READERS:
        raise DataError(f"Unknown reader {reader!r}; choose one of {', '.join(READERS)}.")
    opts = reader_options(reader, field, template)
    source = _describe(data)
    examples = read_texts(data, reader, **opts)
    if val_data is not None:
        train, val = examples, read_texts(val_data, reader, **opts)
    else:
        parts = apply_split(examples, split, seed=seed)
        train, val = parts if isinstance(parts, tuple) else (parts, None)
    train = filter_min_length(train, min_length or 0, source=source)
    if val is not None:
        val = filter_min_length(val, min_length or 0, source=f"{source} (validation)")
    return Corpus(train, val, source)


def load_corpus(data: PathsLike | None = None, *, tokenizer, seq_len: int, packing: str = "pad",
                add_bos: bool = False, add_eos: bool = False, limit: int | None = None,
                **read_options) -> PackedCorpus:
    """read_corpus(data, **read_options), cut to `limit` texts, then packed with `tokenizer` to `seq_len`."""
    check_packing(packing, seq_len)
    return read_corpus(data, **read_options).limit(limit).pack(tokenizer, seq_len, packing, add_bos, add_eos)
