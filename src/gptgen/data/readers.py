"""Readers: text files, JSON, JSONL and CSV into a list of example strings, and train/validation splits.

Conventions shared by every reader:

- Paths may be files, directories (every file below, recursively, hidden files skipped) or globs; each
  argument expands in sorted order and the arguments keep the order they were given in.
- Files are decoded as UTF-8 (a leading BOM is dropped). Invalid UTF-8 does not stop reading: each bad
  byte sequence becomes U+FFFD and an ``InvalidUTF8Warning`` names the file, the number of replacements
  and the first line that holds one. Nothing else is dropped silently. A file in which more than 1% of the
  characters are undecodable bytes or NUL bytes (and at least 16 of them) is not text (a binary file, a
  model's .safetensors, UTF-16): it is refused with a ``DataError`` naming it.
- Line ends are normalised: CRLF and lone CR count as LF.
- ``min_length`` drops examples of ``<= min_length`` characters (the seed's ``MIN_STRING_LEN`` filter,
  "drop lines of <= 512 characters").
- A corpus that yields no example at all, or none left after the filter, raises ``DataError``.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import random
import string
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from ..errors import DataError

PathsLike = str | os.PathLike | Sequence[str | os.PathLike]
MODES = ("lines", "paragraphs", "documents", "json", "jsonl", "csv")
_REPLACEMENT = "\ufffd"
MAX_BAD_FRACTION = 0.01  # undecodable + NUL characters a text file may hold; more means it is not text
MIN_BAD = 16  # ... once there are this many (a short note with a few stray bytes is still text)
_SNIFF_BYTES = 1 << 16  # streaming readers judge a file after this much of it (and again at its end)
# A line (or paragraph) longer than this is cut into documents of at most this many bytes, at a space where
# there is one: a file with no line end is read in bounded memory and gives bounded examples.
MAX_LINE_BYTES = 1 << 20


class InvalidUTF8Warning(UserWarning):
    """A file held bytes that are not UTF-8; they were replaced by U+FFFD."""


# Paths ---------------------------------------------------------------------------------------------
def expand_paths(paths: PathsLike) -> list[Path]:
    """Files named by paths, directories (recursive) or globs; sorted per argument, without duplicates."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise DataError("No input files were given.")
    files: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise DataError(f"Directory {path} holds no files.")
        else:
            found = sorted(Path(p) for p in glob.glob(str(item), recursive=True) if Path(p).is_file())
            if not found:
                if glob.has_magic(str(item)):
                    raise DataError(f"No file matches the pattern {str(item)!r}.")
                raise DataError(f"Input file {path} does not exist.")
        files += found
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _warn_invalid(path: Path, count: int, line: int) -> None:
    warnings.warn(InvalidUTF8Warning(
        f"{path} is not valid UTF-8: replaced {count} invalid byte sequence(s) with U+FFFD, "
        f"the first on line {line}."), stacklevel=4)


def _refuse_binary(path: Path, bad: int, chars: int, whole: bool = True) -> None:
    """DataError when more than MAX_BAD_FRACTION of a file's characters are undecodable bytes or NULs."""
    if bad >= MIN_BAD and bad > MAX_BAD_FRACTION * chars:
        raise DataError(f"{path} does not look like a text file: {bad:,} of its {'' if whole else 'first '}"
                        f"{chars:,} characters are "
                        f"undecodable bytes or NUL bytes (more than {MAX_BAD_FRACTION:.0%}); give text files in "
                        "UTF-8, not binary or model files.")


def _decode(raw: bytes) -> tuple[str, int, int]:
    """(text, replacements made, byte offset of the first) of UTF-8 bytes; invalid sequences become U+FFFD."""
    try:
        return raw.decode("utf-8"), 0, -1
    except UnicodeDecodeError as exc:
        text = raw.decode("utf-8", errors="replace")
        # U+FFFD already present in valid UTF-8 is EF BF BD; count only the ones this decode made.
        return text, text.count(_REPLACEMENT) - raw.count(_REPLACEMENT.encode("utf-8")), exc.start


def _open(path: Path):
    try:
        return open(path, "rb")
    except OSError as exc:
        raise DataError(f"Cannot read {path}: {exc.strerror or exc}.") from None


def read_text_file(path: str | os.PathLike) -> str:
    """The text of one file: UTF-8 (BOM dropped), invalid bytes replaced and reported, newlines normalised."""
    path = Path(path)
    with _open(path) as handle:
        raw = handle.read()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    text, count, offset = _decode(raw)
    _refuse_binary(path, count + raw.count(b"\0"), len(text))
    if count:
        _warn_invalid(path, count, raw[:offset].count(b"\n") + 1)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def iter_file_lines(path: str | os.PathLike) -> Iterator[str]:
    """The lines of one file, streamed (without line ends), decoded and reported as read_text_file does.

    Lines are split on LF, CRLF and lone CR. The file is never held in memory whole; UTF-8 never puts
    an LF or CR byte inside a character, so cutting the bytes at line ends first is safe.
    """
    path = Path(path)
    total, first, nuls, chars, read, judged = 0, 0, 0, 0, 0, False
    number = 1
    with _open(path) as handle:
        for raw, ends_line in _bounded_lines(handle):
            read += len(raw)
            if read == len(raw) and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if ends_line:
                raw = raw.rstrip(b"\n")
                if raw.endswith(b"\r"):
                    raw = raw[:-1]
            text, count, _ = _decode(raw)
            nuls += raw.count(b"\0")
            chars += len(text) + 1
            if count:
                total += count
                first = first or number
            number += ends_line
            if not judged and read >= _SNIFF_BYTES:  # refuse a binary file before streaming all of it
                judged = True
                _refuse_binary(path, total + nuls, chars, whole=False)
            if "\r" in text:  # lone CR line ends inside this LF line
                yield from text.split("\r")
            else:
                yield text
    _refuse_binary(path, total + nuls, chars)
    if total:
        _warn_invalid(path, total, first)


def _bounded_lines(handle, limit: int = MAX_LINE_BYTES) -> Iterator[tuple[bytes, bool]]:
    """(bytes, ends_line) pieces of a binary file: whole lines, except that a line longer than `limit` comes
    in pieces of at most `limit` bytes cut after a space or tab (else between two UTF-8 characters)."""
    pending = b""
    while True:
        piece = handle.readline(limit)
        if not piece:
            if pending:
                yield pending, True
            return
        data = pending + piece if pending else piece
        if piece.endswith(b"\n") or len(piece) < limit:
            pending = b""
            yield data, True
            continue
        lo = max(1, len(data) - max(limit // 4, 4))
        cut = max(data.rfind(b" ", lo), data.rfind(b"\t", lo)) + 1
        if cut <= 0:  # no space near the end: cut before a UTF-8 lead byte (never inside a character)
            cut = len(data) - 1  # the piece ends before the last lead byte: its character may go on
            while cut > lo and (data[cut] & 0xC0) == 0x80:
                cut -= 1
        pending = data[cut:]
        yield data[:cut], False


# Per-file example generators (shared by the list readers below and by streaming shard preparation) ------
def lines_of(path: Path) -> Iterator[str]:
    return (line for line in iter_file_lines(path) if line.strip())


def iter_paragraphs(lines: Iterable[str] | str, join: str = " ") -> Iterator[str]:
    """Blank-line separated paragraphs of lines (or of a text); a line of only whitespace counts as blank.

    Each line is stripped of surrounding whitespace and the lines of a paragraph are joined with `join`
    (one space undoes hard wrapping; "\n" keeps the lines).
    """
    if isinstance(lines, str):
        lines = lines.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    block: list[str] = []
    size = 0
    for line in lines:
        stripped = line.strip()
        if stripped:
            block.append(stripped)
            size += len(stripped)
            if size >= MAX_LINE_BYTES:  # a paragraph of bounded length (see MAX_LINE_BYTES)
                yield join.join(block)
                block, size = [], 0
        elif block:
            yield join.join(block)
            block, size = [], 0
    if block:
        yield join.join(block)


def paragraphs_of(path: Path, join: str = " ") -> Iterator[str]:
    return iter_paragraphs(iter_file_lines(path), join)


def document_of(path: Path) -> Iterator[str]:
    text = read_text_file(path).strip()
    if text:
        yield text


def _render_field(value, join: str, where: str, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return join.join(value)
    raise DataError(f"{where}: field {field!r} is a {type(value).__name__}, not a string or a list of strings.")


def json_items_of(path: Path, field: str = "paragraphs", join: str = "") -> Iterator[str]:
    try:
        data = json.loads(read_text_file(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}).") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path} holds a JSON {type(data).__name__}; expected a list of objects.")
    for i, item in enumerate(data):
        if not isinstance(item, dict) or field not in item:
            raise DataError(f"{path}: item {i} has no field {field!r}; choose the field with field=....")
        rendered = _render_field(item[field], join, f"{path} item {i}", field)
        if rendered.strip():
            yield rendered


def jsonl_items_of(path: Path, field: str = "text") -> Iterator[str]:
    for lineno, line in enumerate(iter_file_lines(path), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {lineno} is not valid JSON ({exc.msg}).") from None
        if not isinstance(item, dict) or field not in item:
            raise DataError(f"{path} line {lineno} has no field {field!r}; choose the field with field=....")
        rendered = _render_field(item[field], "\n", f"{path} line {lineno}", field)
        if rendered.strip():
            yield rendered


def template_fields(template: str) -> list[str]:
    """The {placeholders} of a str.format template, in order of first use."""
    names = []
    try:
        for _, name, _, _ in string.Formatter().parse(template):
            if name is not None and name not in names:
                if not name or not name.isidentifier():
                    raise DataError(f"Template {template!r} uses a placeholder {{{name}}}; name each one, e.g. {{Q}}.")
                names.append(name)
    except ValueError as exc:
        raise DataError(f"Template {template!r} is not a valid format string ({exc}).") from None
    if not names:
        raise DataError(f"Template {template!r} has no {{column}} placeholder.")
    return names


def csv_rows_of(path: Path, template: str = "<s>{Q}</s><s>{A}</s>",
                columns: dict[str, str] | None = None) -> Iterator[str]:
    names = template_fields(template)
    mapping = {name: (columns or {}).get(name, name) for name in names}
    reader = csv.reader(io.StringIO(read_text_file(path), newline=""))
    header = next(reader, None)
    if header is None:
        return
    missing = [c for c in mapping.values() if c not in header]
    if missing:
        raise DataError(f"{path} has no column {missing[0]!r}; its columns are {', '.join(header)}.")
    index = {name: header.index(col) for name, col in mapping.items()}
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            raise DataError(f"{path} row at line {reader.line_num} has {len(row)} fields; the header has "
                            f"{len(header)}.")
        yield template.format(**{name: row[i] for name, i in index.items()})


def iter_examples(paths: PathsLike, mode: str = "lines", **opts) -> Iterator[str]:
    """Examples of every file in turn, streamed where the format allows (lines, paragraphs, jsonl);
    no length filter and no emptiness check (see read_texts for those)."""
    if mode not in _PER_FILE:
        raise DataError(f"Unknown reader mode {mode!r}; choose one of {', '.join(MODES)}.")
    per_file = _PER_FILE[mode]
    allowed = _OPTIONS[mode]
    unknown = sorted(set(opts) - allowed)
    if unknown:
        raise DataError(f"The {mode} reader does not take the option {unknown[0]!r}; it takes "
                        f"{', '.join(sorted(allowed | {'min_length'})) }.")
    if mode == "csv":
        template_fields(opts.get("template", "<s>{Q}</s><s>{A}</s>"))  # fail before reading
    for path in expand_paths(paths):
        yield from per_file(path, **opts)


_PER_FILE = {"lines": lines_of, "paragraphs": paragraphs_of, "documents": document_of, "json": json_items_of,
             "jsonl": jsonl_items_of, "csv": csv_rows_of}
_OPTIONS = {"lines": set(), "paragraphs": {"join"}, "documents": set(), "json": {"field", "join"},
            "jsonl": {"field"}, "csv": {"template", "columns"}}


# Filtering -----------------------------------------------------------------------------------------
def filter_min_length(examples: Iterable[str], min_length: int = 0, *, source: str = "the corpus") -> list[str]:
    """Keep examples of more than min_length characters; DataError if none was there or none is left."""
    examples = list(examples)
    if not examples:
        raise DataError(f"{source} holds no examples: it is empty.")
    if min_length <= 0:
        return examples
    kept = [e for e in examples if len(e) > min_length]
    if not kept:
        longest = max(map(len, examples))
        raise DataError(f"All {len(examples):,} examples of {source} are {min_length} characters or shorter "
                        f"(the longest has {longest}); lower min_length below {longest}.")
    return kept


def _describe(paths: PathsLike) -> str:
    if isinstance(paths, (str, os.PathLike)):
        return str(paths)
    paths = list(paths)
    if len(paths) <= 1:
        return str(paths[0]) if paths else "the input"
    return f"{paths[0]} (and {len(paths) - 1} more)"


def read_texts(paths: PathsLike, mode: str = "lines", min_length: int = 0, **opts) -> list[str]:
    """Examples of `mode` (lines, paragraphs, documents, json, jsonl, csv) with its options, then the
    min_length filter; DataError when there is none, or none left."""
    if not isinstance(paths, (str, os.PathLike)):
        paths = list(paths)
    return filter_min_length(iter_examples(paths, mode, **opts), min_length, source=_describe(paths))


# The readers by name --------------------------------------------------------------------------------
def read_lines(paths: PathsLike, min_length: int = 0) -> list[str]:
    """One example per line (the seed's TextLineDataset); lines holding only whitespace are skipped."""
    return read_texts(paths, "lines", min_length)


def read_paragraphs(paths: PathsLike, min_length: int = 0, join: str = " ") -> list[str]:
    """Blank-line separated paragraphs, hard-wrapped lines joined with one space (see iter_paragraphs)."""
    return read_texts(paths, "paragraphs", min_length, join=join)


def read_documents(paths: PathsLike, min_length: int = 0) -> list[str]:
    """One example per file, its whole text with surrounding whitespace stripped; blank files skipped."""
    return read_texts(paths, "documents", min_length)


def read_json(paths: PathsLike, field: str = "paragraphs", join: str = "", min_length: int = 0) -> list[str]:
    """Each file a JSON list of objects; one example per object from `field` (a list is joined with `join`).

    The 全唐诗 files (poet.tang.*.json): field="paragraphs", join="" gives one poem per example.
    """
    return read_texts(paths, "json", min_length, field=field, join=join)


def read_jsonl(paths: PathsLike, field: str = "text", min_length: int = 0) -> list[str]:
    """One JSON object per line ({"text": ...}); blank lines skipped."""
    return read_texts(paths, "jsonl", min_length, field=field)


def read_csv_pairs(path: PathsLike, template: str = "<s>{Q}</s><s>{A}</s>",
                   columns: dict[str, str] | None = None, min_length: int = 0) -> list[str]:
    """One example per CSV row, rendered through `template` (seed 004: "<s>{Q}</s><s>{A}</s>").

    The first row is the header. Placeholders name columns; `columns` maps a placeholder to a differently
    named column, e.g. template="<s>{Q}</s><s>{A}</s>", columns={"Q": "question", "A": "answer"}.
    """
    return read_texts(path, "csv", min_length, template=template, columns=columns)


# Splits --------------------------------------------------------------------------------------------
def split_fraction(examples: Sequence[str], val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """A seeded random validation split of round(n * val_fraction) examples (at least one when the
    fraction is positive); both halves keep the original order."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    examples = list(examples)
    n = len(examples)
    n_val = round(n * val_fraction)
    if val_fraction > 0:
        n_val = max(1, n_val)
    if n - n_val < 1:
        raise DataError(f"A validation fraction of {val_fraction} of {n} example(s) leaves no training example.")
    chosen = set(random.Random(seed).sample(range(n), n_val))
    train = [e for i, e in enumerate(examples) if i not in chosen]
    val = [e for i, e in enumerate(examples) if i in chosen]
    return train, val


def split_every_nth(examples: Sequence[str], n: int) -> tuple[list[str], list[str]]:
    """Every n-th example (the n-th, 2n-th, ... counting from one) to validation, the rest to training."""
    if n < 2:
        raise DataError(f"split_every_nth needs n >= 2, got {n}.")
    examples = list(examples)
    if len(examples) < n:
        raise DataError(f"Every {n}th example of {len(examples)} gives no validation example; use fewer.")
    train = [e for i, e in enumerate(examples, 1) if i % n]
    val = [e for i, e in enumerate(examples, 1) if not i % n]
    return train, val


def parse_split(spec: str | float | None) -> tuple[str, float] | None:
    """"every_nth:10" -> ("every_nth", 10); "fraction:0.1" or 0.1 -> ("fraction", 0.1); None/"none" -> None."""
    if spec is None or spec == "none":
        return None
    if isinstance(spec, (int, float)):
        return ("fraction", float(spec))
    kind, _, value = str(spec).partition(":")
    try:
        if kind == "every_nth":
            return ("every_nth", int(value))
        if kind == "fraction":
            return ("fraction", float(value))
    except ValueError:
        pass
    raise DataError(f"Unknown split {spec!r}; use 'every_nth:N', 'fraction:F' or a number in [0, 1).")


def apply_split(examples: Sequence[str], spec: str | float | None, seed: int = 0):
    """Split by a parse_split spec; with no spec, return the examples unchanged."""
    parsed = parse_split(spec)
    if parsed is None:
        return list(examples)
    kind, value = parsed
    if kind == "every_nth":
        return split_every_nth(examples, int(value))
    return split_fraction(examples, value, seed=seed)
