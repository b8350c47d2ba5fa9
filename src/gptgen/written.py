"""What gptgen wrote into a directory, so that it replaces only its own files.

The rule everywhere gptgen writes (tokenizer directories, prepared shards, run directories): it writes into a
new or empty directory, or replaces only files it wrote itself, recorded in RECORD beside them (with each
file's sha256 where the file is final, so a file the user changed since is theirs again). It never writes into
the filesystem root or the home directory itself.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from .errors import ConfigError, GptgenError

RECORD = ".gptgen-written.json"


def check_not_root_or_home(path: str | os.PathLike, what: str = "the output directory",
                           error: type[GptgenError] = ConfigError) -> None:
    """Refuse `/` (any filesystem root) and the home directory itself as a directory gptgen fills."""
    resolved = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    try:
        resolved = resolved.resolve()
    except OSError:
        pass
    if resolved.parent == resolved:
        raise error(f"{what} {path} is the filesystem root; choose a new directory for gptgen to write into.")
    try:
        home = Path.home().resolve()
    except (RuntimeError, OSError, KeyError):
        home = None
    if home is not None and resolved == home:
        raise error(f"{what} {path} is your home directory itself; choose a new directory inside it.")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read(directory: Path) -> dict:
    try:
        data = json.loads((directory / RECORD).read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    return files if isinstance(files, dict) else {}


def record(directory: str | os.PathLike, names: Iterable[str], *, hashed: bool = True) -> None:
    """Note `names` (files or directories inside `directory`) as written by gptgen; files get their sha256
    unless hashed=False (a file gptgen goes on appending to, such as metrics.jsonl)."""
    directory = Path(directory)
    files = _read(directory)
    for name in names:
        path = directory / name
        files[name] = _sha256(path) if hashed and path.is_file() else ("dir" if path.is_dir() else "")
    tmp = directory / f"{RECORD}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"files": files}, indent=1, sort_keys=True), "utf-8")
    os.replace(tmp, directory / RECORD)


def forget(directory: str | os.PathLike, names: Iterable[str]) -> None:
    directory = Path(directory)
    files = _read(directory)
    if any(files.pop(name, None) is not None for name in list(names)):
        record(directory, [])
        if not _read(directory):
            (directory / RECORD).unlink(missing_ok=True)


def wrote(directory: str | os.PathLike, name: str) -> bool:
    """True when gptgen recorded `name` in `directory` and a recorded file is unchanged since."""
    directory = Path(directory)
    files = _read(directory)
    if name not in files:
        return False
    path = directory / name
    expected = files[name]
    if expected in ("", "dir") or not path.is_file():
        return True
    return _sha256(path) == expected


def check_replaceable(directory: str | os.PathLike, names: Iterable[str], overwrite: bool, *,
                      flag: str = "--overwrite", error: type[GptgenError] = ConfigError) -> None:
    """Refuse to write `names` into `directory` where one exists and was not written by gptgen, or exists and
    overwrite was not asked for. Nothing is changed."""
    directory = Path(directory)
    for name in names:
        path = directory / name
        if not (path.exists() or path.is_symlink()):
            continue
        if not wrote(directory, name):
            raise error(f"{path} is not a file gptgen wrote (or it was changed since), so gptgen does not replace "
                        "it; move it away or choose another directory.")
        if not overwrite:
            raise error(f"{path} already exists; pass {flag} to replace it, or choose another directory.")
