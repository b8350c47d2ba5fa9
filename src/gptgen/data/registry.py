"""Named data sets, read from a local data directory; each knows where to download it and its checksums.

The data directory is ``$GPTGEN_DATA_DIR``, else ``~/.cache/gptgen/data``. Each spec names its files
relative to that directory, the reader that turns them into examples, a default split and length filter,
its public source and a sha256 per file. Nothing is downloaded unless ``download_dataset`` is called.

>>> train, val = resolve_dataset("books")          # 3,012 / 329 paragraphs of more than 512 characters
>>> poems = resolve_dataset("tang-poems")          # one example per poem, its lines joined
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import urllib.request
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import DataError
from ._checksums import SHA256
from .readers import apply_split, expand_paths, filter_min_length, read_texts

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
_DEFAULT = object()


@dataclass(frozen=True)
class Download:
    """One file of a data set: fetched from url (or member of the zip archive at url) to path."""

    path: str
    url: str
    member: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    files: tuple[str, ...]                 # paths or globs relative to the data directory
    mode: str                              # reader mode (see readers.read_texts)
    options: dict[str, Any] = field(default_factory=dict)
    split: str | None = None               # "every_nth:N", "fraction:F" or None
    val_files: tuple[str, ...] = ()        # separate validation files (instead of a split)
    min_length: int = 0                    # applied after the split
    url: str = ""                          # public source (page or archive)
    license: str = ""
    downloads: tuple[Download, ...] = ()
    sha256: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    packaged: bool = False                 # files live in gptgen/assets, not in the data directory


_NLTK_GUTENBERG = "https://raw.githubusercontent.com/nltk/nltk_data/gh-pages/packages/corpora/gutenberg.zip"
_SHAKESPEARE = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
_TANG = "https://raw.githubusercontent.com/chinese-poetry/chinese-poetry/master/%E5%85%A8%E5%94%90%E8%AF%97/"


def _spec(name: str, description: str, **kw) -> DatasetSpec:
    return DatasetSpec(name, description, sha256=dict(SHA256.get(name, {})), **kw)


DATASETS: dict[str, DatasetSpec] = {
    "books": _spec(
        "books",
        "13 Project Gutenberg books (the NLTK selection), one example per paragraph; every 10th paragraph to "
        "validation, then paragraphs of <= 512 characters dropped (3,012 train / 329 validation).",
        files=("books/*.txt",), mode="paragraphs", split="every_nth:10", min_length=512,
        url=_NLTK_GUTENBERG, license="public domain",
        downloads=tuple(Download(p, _NLTK_GUTENBERG, "gutenberg/" + Path(p).name) for p in SHA256["books"]),
    ),
    "tinyshakespeare": _spec(
        "tinyshakespeare",
        "The 1.1 MB Shakespeare excerpt; one example per speech (blank-line separated, lines kept), 10% "
        "to validation (seeded).",
        files=("tinyshakespeare/input.txt",), mode="paragraphs", options={"join": "\n"}, split="fraction:0.1",
        url=_SHAKESPEARE, license="public domain", downloads=(Download("tinyshakespeare/input.txt", _SHAKESPEARE),),
    ),
    "chatbot-ko": _spec(
        "chatbot-ko",
        "Korean chatbot Q/A pairs (11,823), each rendered as <s>Q</s><s>A</s>.",
        files=("chatbot-ko/ChatbotData.csv",), mode="csv", options={"template": "<s>{Q}</s><s>{A}</s>"},
        url="https://github.com/songys/Chatbot_data", license="MIT",
        downloads=(Download("chatbot-ko/ChatbotData.csv",
                            "https://raw.githubusercontent.com/songys/Chatbot_data/master/ChatbotData.csv"),),
    ),
    "tang-poems": _spec(
        "tang-poems",
        "全唐诗 (Complete Tang Poems, traditional characters): one example per poem, its paragraphs joined.",
        files=("chinese-poetry/tang/poet.tang.*.json",), mode="json", options={"field": "paragraphs", "join": ""},
        url="https://github.com/chinese-poetry/chinese-poetry", license="MIT",
        downloads=tuple(Download(p, _TANG + Path(p).name) for p in SHA256["tang-poems"]),
    ),
    "quickstart": DatasetSpec(
        "quickstart",
        "Jane Austen's Persuasion (1818), packaged with gptgen for the offline quickstart; one example per "
        "paragraph, every 10th to validation.",
        files=("persuasion.txt",), mode="paragraphs", split="every_nth:10",
        url=_NLTK_GUTENBERG, license="public domain", packaged=True,
    ),
}


def data_dir() -> Path:
    """$GPTGEN_DATA_DIR, else ~/.cache/gptgen/data."""
    env = os.environ.get("GPTGEN_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gptgen" / "data"


def get_spec(name: str | DatasetSpec) -> DatasetSpec:
    if isinstance(name, DatasetSpec):
        return name
    if name not in DATASETS:
        raise DataError(f"Unknown data set {name!r}; choose one of {', '.join(DATASETS)} or pass file paths.")
    return DATASETS[name]


def dataset_root(spec: DatasetSpec, root: str | os.PathLike | None = None) -> Path:
    if spec.packaged:
        return ASSETS_DIR
    return Path(root) if root is not None else data_dir()


def dataset_files(name: str | DatasetSpec, root: str | os.PathLike | None = None) -> list[Path]:
    """The files of a data set, or DataError with one sentence naming the fix."""
    spec = get_spec(name)
    base = dataset_root(spec, root)
    try:
        return expand_paths([str(base / pattern) for pattern in spec.files])
    except DataError:
        hint = (f"download it with `gptgen datasets download {spec.name}`" if spec.downloads
                else "reinstall gptgen")
        raise DataError(f"Data set {spec.name!r} is not in {base} (looked for {', '.join(spec.files)}); set "
                        f"GPTGEN_DATA_DIR to the folder holding it or {hint}.") from None


def resolve_dataset(name: str | DatasetSpec, *, root: str | os.PathLike | None = None, split=_DEFAULT,
                    min_length: int | None = None, seed: int = 0, **options):
    """Examples of a named data set: a list, or (train, val) when it has a split.

    split / min_length / reader options override the spec's (split=None gives every example unsplit; a
    spec with val_files reads its validation examples from them unless a split is passed).
    The split is taken before the length filter, so validation is the same paragraphs whatever the filter.
    """
    spec = get_spec(name)
    files = dataset_files(spec, root)
    opts = {**spec.options, **options}
    examples = read_texts(files, spec.mode, **opts)
    min_length = spec.min_length if min_length is None else min_length
    if spec.val_files and split is _DEFAULT:
        val_spec = replace(spec, files=spec.val_files, val_files=())
        result = (examples, read_texts(dataset_files(val_spec, root), spec.mode, **opts))
    else:
        result = apply_split(examples, spec.split if split is _DEFAULT else split, seed=seed)
    if isinstance(result, tuple):
        train, val = result
        return (filter_min_length(train, min_length, source=f"the {spec.name} training split"),
                filter_min_length(val, min_length, source=f"the {spec.name} validation split"))
    return filter_min_length(result, min_length, source=f"data set {spec.name!r}")


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_dataset(name: str | DatasetSpec, root: str | os.PathLike | None = None) -> dict[str, str]:
    """Check each file against its recorded sha256; return {relative path: problem} (empty when all match)."""
    spec = get_spec(name)
    base = dataset_root(spec, root)
    problems = {}
    for rel, expected in spec.sha256.items():
        path = base / rel
        if not path.is_file():
            problems[rel] = "missing"
        elif sha256_file(path) != expected:
            problems[rel] = "checksum mismatch"
    return problems


def _fetch(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read()
    except OSError as exc:
        raise DataError(f"Cannot download {url} ({getattr(exc, 'reason', exc)}); check the connection or "
                        f"place the files in the data directory by hand.") from None


def download_dataset(name: str | DatasetSpec, root: str | os.PathLike | None = None, *,
                     force: bool = False) -> Path:
    """Fetch the files of a data set into the data directory, verifying each sha256; return the directory.

    Files already present with the right checksum are kept. A file whose checksum differs is not written.
    """
    spec = get_spec(name)
    if spec.packaged:
        return dataset_root(spec)
    if not spec.downloads:
        raise DataError(f"Data set {spec.name!r} has no download source.")
    base = dataset_root(spec, root)
    archives: dict[str, zipfile.ZipFile] = {}
    for item in spec.downloads:
        target = base / item.path
        expected = spec.sha256.get(item.path)
        if target.is_file() and not force and (expected is None or sha256_file(target) == expected):
            continue
        if item.member is not None:
            if item.url not in archives:
                archives[item.url] = zipfile.ZipFile(io.BytesIO(_fetch(item.url)))
            try:
                data = archives[item.url].read(item.member)
            except KeyError:
                raise DataError(f"The archive {item.url} has no member {item.member}.") from None
        else:
            data = _fetch(item.url)
        got = hashlib.sha256(data).hexdigest()
        if expected is not None and got != expected:
            raise DataError(f"{item.url} gave {item.path} with sha256 {got[:12]}..., expected {expected[:12]}...; "
                            f"the source changed, so the file was not written.")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        tmp.write_bytes(data)
        shutil.move(str(tmp), target)
    return base
