"""Token shards for corpora bigger than memory: tokenise once into memmap files, then sample windows.

``prepare_shards`` streams texts (strings, or files read lazily by a reader mode), tokenises them in
batches, in worker processes when ``num_workers > 1`` (each batch through the HF tokenizer's Rust
``encode_batch``), and appends the ids, EOS after each document, to flat binary files of
``shard_tokens`` tokens each: uint16 when every id fits (vocab_size <= 65,536), else uint32. A
``manifest.json`` written last lists the shards, the dtype and the tokenizer's special ids; the tokenizer
itself is saved beside them, so the directory is self-describing. Documents run on across shard
boundaries: the shards are one token stream cut into pieces.

``ShardDataset`` reads them back through ``numpy.memmap`` (opened lazily, so it is safe in DataLoader
workers) and serves windows of ``seq_len + 1`` tokens as input_ids / labels / loss_mask.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from ..errors import DataError
from .readers import iter_examples

MANIFEST = "manifest.json"
FORMAT = "gptgen-token-shards"
DEFAULT_SHARD_TOKENS = 100_000_000
BATCH_TEXTS = 1024
WORKER_BYTES = 128 << 20  # a tokenising worker process: the interpreter, a tokenizer, a batch


def choose_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (0 .. vocab_size - 1) fits in 16 bits, else uint32."""
    if vocab_size <= 0:
        raise DataError(f"vocab_size must be positive, got {vocab_size}.")
    if vocab_size <= 2 ** 16:
        return np.dtype(np.uint16)
    if vocab_size <= 2 ** 32:
        return np.dtype(np.uint32)
    raise DataError(f"A vocabulary of {vocab_size:,} tokens does not fit in uint32 shards.")


# Texts ---------------------------------------------------------------------------------------------
def iter_texts(paths, mode: str = "lines", min_length: int = 0, **opts) -> Iterator[str]:
    """Examples of files streamed one file at a time (see readers.iter_examples), longer than min_length."""
    for text in iter_examples(paths, mode, **opts):
        if len(text) > min_length:
            yield text


def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        if not isinstance(t, str):
            raise DataError(f"prepare_shards takes strings or paths; got a {type(t).__name__}.")
        batch.append(t)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# Tokenising in worker processes ---------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(tokenizer_json: str, bos: int | None, eos: int | None) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core instead of Rust threads
    from tokenizers import Tokenizer as HFTokenizer

    _WORKER.update(backend=HFTokenizer.from_str(tokenizer_json), bos=bos, eos=eos)


def _encode(backend, texts: list[str], bos: int | None, eos: int | None, dtype: np.dtype) -> tuple[np.ndarray, int]:
    pieces = []
    for enc in backend.encode_batch(texts, add_special_tokens=False):
        if bos is not None:
            pieces.append([bos])
        pieces.append(enc.ids)
        if eos is not None:
            pieces.append([eos])
    total = sum(map(len, pieces))
    return np.fromiter(itertools.chain.from_iterable(pieces), dtype=dtype, count=total), len(texts)


def _encode_in_worker(args) -> tuple[np.ndarray, int]:
    texts, dtype = args
    return _encode(_WORKER["backend"], texts, _WORKER["bos"], _WORKER["eos"], np.dtype(dtype))


class _ShardWriter:
    def __init__(self, out_dir: Path, dtype: np.dtype, shard_tokens: int) -> None:
        self.out_dir, self.dtype, self.shard_tokens = out_dir, dtype, shard_tokens
        self.shards: list[dict] = []
        self.handle = None
        self.in_shard = 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.handle is None:
                name = f"shard_{len(self.shards):05d}.bin"
                self.handle = open(self.out_dir / name, "wb")
                self.shards.append({"file": name, "num_tokens": 0})
                self.in_shard = 0
            take = min(len(ids), self.shard_tokens - self.in_shard)
            ids[:take].tofile(self.handle)
            self.in_shard += take
            self.shards[-1]["num_tokens"] = self.in_shard
            ids = ids[take:]
            if self.in_shard == self.shard_tokens:
                self.close()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def prepare_shards(texts_or_paths, tokenizer, out_dir: str | os.PathLike, *,
                   shard_tokens: int = DEFAULT_SHARD_TOKENS, num_workers: int | None = 1,
                   add_eos: bool = True, add_bos: bool = False, mode: str = "lines",
                   batch_texts: int = BATCH_TEXTS, overwrite: bool = False, **reader_opts) -> dict:
    """Tokenise texts into memmap shards in out_dir and return the manifest (also written as manifest.json).

    texts_or_paths: an iterable of strings, or paths / directories / globs read lazily with the reader
    `mode` (and reader_opts such as min_length); a single str is a path, a list of str is texts.
    num_workers: tokenising processes; 1 (default) tokenises in this process, where the HF tokenizer's
    encode_batch already runs on all cores; None uses one process per CPU. The token stream equals
    tokenizer.encode_batch(texts, add_bos=add_bos, add_eos=add_eos) concatenated, in input order.
    """
    from ..tokenizer import Tokenizer

    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.from_pretrained(tokenizer)
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}.")
    if batch_texts < 1:
        raise DataError(f"batch_texts must be positive, got {batch_texts}.")
    if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                    or num_workers < 1):
        raise DataError(f"num_workers (--workers) must be a positive integer, got {num_workers!r}.")
    from ..limits import check_allocation

    # each worker process holds a copy of the tokenizer and a batch of texts and their ids
    check_allocation("num_workers (--workers)", (num_workers or 1) * WORKER_BYTES, value=num_workers,
                     error=DataError)
    bos = tokenizer._required_id("bos") if add_bos else None
    eos = tokenizer._required_id("eos") if add_eos else None
    texts = _as_texts(texts_or_paths, mode, reader_opts)
    dtype = choose_dtype(tokenizer.vocab_size)
    out_dir = Path(out_dir)
    ours = _check_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # a name no user picks, made by this call alone: only it is ever deleted on failure
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.gptgen-", suffix=".partial", dir=out_dir.parent))
    writer = _ShardWriter(tmp, dtype, shard_tokens)
    num_docs = 0
    workers = (os.cpu_count() or 1) if num_workers is None else max(1, int(num_workers))
    try:
        batches = _batches(texts, batch_texts)
        if workers > 1:
            # fork where it exists (no `if __name__ == "__main__"` needed in user scripts); workers build
            # their own tokenizer from JSON and run it single-threaded, one process per core.
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            saved = os.environ.get("TOKENIZERS_PARALLELISM")
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # children run single-threaded, without a warning
            try:
                with ctx.Pool(workers, initializer=_init_worker,
                              initargs=(tokenizer.backend.to_str(), bos, eos)) as pool:
                    for ids, n in pool.imap(_encode_in_worker, ((b, dtype.str) for b in batches)):
                        writer.write(ids)
                        num_docs += n
            finally:
                if saved is None:
                    os.environ.pop("TOKENIZERS_PARALLELISM", None)
                else:
                    os.environ["TOKENIZERS_PARALLELISM"] = saved
        else:
            for batch in batches:
                ids, n = _encode(tokenizer.backend, batch, bos, eos, dtype)
                writer.write(ids)
                num_docs += n
        writer.close()
        total = sum(s["num_tokens"] for s in writer.shards)
        if num_docs == 0:
            raise DataError("The corpus is empty: no text reached prepare_shards; check the inputs, the reader mode "
                                "and min_length.")
        if total < 2:
            raise DataError(f"The corpus tokenises to {total} token(s); shards need at least two.")
        manifest = {
            "format": FORMAT, "version": 1, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
            "num_tokens": total, "num_documents": num_docs, "add_bos": add_bos, "add_eos": add_eos,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "shard_tokens": shard_tokens, "shards": writer.shards,
            "tokenizer": "tokenizer",
        }
        tokenizer.save(tmp / "tokenizer")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), "utf-8")
        _move_into_place(tmp, out_dir, ours)
    except BaseException:
        writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _owned_names(out_dir: Path) -> set[str]:
    """The entries of out_dir that gptgen's manifest there says it wrote (the shards, the tokenizer, itself)."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text("utf-8"))
        names = {MANIFEST, str(manifest.get("tokenizer", "tokenizer"))}
        names |= {str(shard["file"]) for shard in manifest["shards"]}
        if manifest.get("format") != FORMAT:
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{out_dir / MANIFEST} is not a manifest gptgen wrote, so gptgen does not replace what is in "
                        f"{out_dir}; choose another directory.") from None
    return {n for n in names if n and "/" not in n and "\\" not in n and n not in (".", "..")}


def _check_target(out_dir: Path, overwrite: bool) -> set[str]:
    """What of out_dir a new preparation may replace (nothing changes here): DataError for a directory
    holding shards without overwrite, or holding files gptgen did not write and no manifest."""
    from ..written import check_not_root_or_home

    check_not_root_or_home(out_dir, "The output directory", error=DataError)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"The output directory {out_dir} is a file; choose a directory.")
    if (out_dir / MANIFEST).exists():
        if not overwrite:
            raise DataError(f"{out_dir} already holds prepared shards; choose another directory or pass "
                            "overwrite=True (--overwrite).")
        return _owned_names(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(f"{out_dir} exists and is not empty; choose an empty or new directory.")
    return set()


def _move_into_place(tmp: Path, out_dir: Path, ours: set[str]) -> None:
    """Put the finished shards of tmp at out_dir, replacing only the earlier shards gptgen wrote there."""
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    entries = {p.name for p in out_dir.iterdir()}
    if not entries:
        out_dir.rmdir()
        tmp.rename(out_dir)
        return
    if entries <= ours:  # nothing but gptgen's: swap the directories, then drop the old one
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.gptgen-", suffix=".old", dir=out_dir.parent))
        old.rmdir()
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
        return
    # the user's files live beside the shards: replace gptgen's entries one by one, the manifest last
    clash = sorted({p.name for p in tmp.iterdir()} & (entries - ours))
    if clash:
        raise DataError(f"{out_dir / clash[0]} is not a file gptgen wrote, and the new shards need its name; move "
                        "it away or choose another directory.")
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for name in sorted(ours & entries):
        target = out_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    for item in sorted(tmp.iterdir(), key=lambda p: p.name == MANIFEST):
        os.replace(item, out_dir / item.name)
    tmp.rmdir()


def _as_texts(source, mode: str, reader_opts: dict) -> Iterable[str]:
    if isinstance(source, (str, os.PathLike)):
        return iter_texts(source, mode, **reader_opts)
    if isinstance(source, (list, tuple)) and source and all(isinstance(s, os.PathLike) for s in source):
        return iter_texts(list(source), mode, **reader_opts)
    if reader_opts:
        raise DataError(f"Reader options {sorted(reader_opts)} apply only to paths, not to a list of texts.")
    return source


def load_manifest(out_dir: str | os.PathLike) -> dict:
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    if not path.is_file():
        raise DataError(f"{out_dir} holds no {MANIFEST}; prepare it first with `gptgen prepare`.")
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError:
        raise DataError(f"{path} is not valid JSON; prepare the shards again.") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path} is not a gptgen token-shard manifest.")
    for shard in manifest["shards"]:
        f = out_dir / shard["file"]
        expected = shard["num_tokens"] * np.dtype(manifest["dtype"]).itemsize
        if not f.is_file() or f.stat().st_size != expected:
            raise DataError(f"Shard {f} is missing or truncated (expected {expected:,} bytes); prepare again.")
    return manifest


class ShardDataset(torch.utils.data.Dataset):
    """Windows of seq_len + 1 tokens from prepared shards, as input_ids / labels / loss_mask.

    random (default): item i is a window at a position drawn from a generator seeded by (seed, i), uniform
    over every start in every shard, so items are reproducible in any DataLoader worker; the length is
    num_samples (default: as many windows as would tile the corpus once). sequential: the corpus tiled
    by non-overlapping windows in order (for evaluation); every label counted once.
    """

    def __init__(self, out_dir: str | os.PathLike, seq_len: int, seed: int = 0, *,
                 num_samples: int | None = None, sequential: bool = False) -> None:
        if not isinstance(seq_len, int) or seq_len < 1:
            raise DataError(f"seq_len must be a positive integer, got {seq_len!r}.")
        self.out_dir = Path(out_dir)
        self.manifest = load_manifest(self.out_dir)
        self.seq_len, self.seed, self.sequential = seq_len, seed, sequential
        self.dtype = np.dtype(self.manifest["dtype"])
        self._files = [s["file"] for s in self.manifest["shards"]]
        sizes = np.array([s["num_tokens"] for s in self.manifest["shards"]], dtype=np.int64)
        self._sizes = sizes
        window = seq_len + 1
        if sequential:
            counts = np.maximum(sizes - 1, 0) // seq_len
        else:
            counts = np.maximum(sizes - window + 1, 0)  # start positions per shard
        if counts.sum() == 0:
            raise DataError(f"No shard in {self.out_dir} holds a window of seq_len + 1 = {window} tokens "
                            f"(largest: {int(sizes.max()) if len(sizes) else 0}); lower seq_len.")
        self._counts = counts
        self._cum = np.cumsum(counts)
        if sequential:
            self._len = int(counts.sum())
        else:
            self._len = int(num_samples) if num_samples is not None else max(1, int(sizes.sum() // seq_len))
        self._maps: dict[int, np.memmap] = {}

    @property
    def tokenizer_dir(self) -> Path:
        return self.out_dir / self.manifest.get("tokenizer", "tokenizer")

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["num_tokens"])

    def __len__(self) -> int:
        return self._len

    def _shard(self, k: int) -> np.memmap:
        if k not in self._maps:
            self._maps[k] = np.memmap(self.out_dir / self._files[k], dtype=self.dtype, mode="r")
        return self._maps[k]

    def _locate(self, index: int) -> tuple[int, int]:
        """(shard, start) of a window."""
        if self.sequential:
            k = int(np.searchsorted(self._cum, index, side="right"))
            before = int(self._cum[k - 1]) if k else 0
            return k, (index - before) * self.seq_len
        g = np.random.default_rng([self.seed, index])
        flat = int(g.integers(0, int(self._cum[-1])))
        k = int(np.searchsorted(self._cum, flat, side="right"))
        before = int(self._cum[k - 1]) if k else 0
        return k, flat - before

    def window(self, index: int) -> np.ndarray:
        """The seq_len + 1 tokens of item `index`."""
        if not -self._len <= index < self._len:
            raise IndexError(f"index {index} out of range for {self._len} windows")
        index %= self._len
        k, start = self._locate(index)
        return np.asarray(self._shard(k)[start: start + self.seq_len + 1], dtype=np.int64)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        w = torch.from_numpy(self.window(int(index)))
        return {"input_ids": w[:-1], "labels": w[1:], "loss_mask": torch.ones(self.seq_len, dtype=torch.bool)}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = {}  # memmaps reopen in each worker
        return state

    def tokens(self) -> np.ndarray:
        """The whole token stream (loads every shard; for tests and small corpora)."""
        if not self._files:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.asarray(self._shard(k), dtype=np.int64) for k in range(len(self._files))])
