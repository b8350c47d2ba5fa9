"""Tokenizer: a thin layer over Hugging Face `tokenizers` with special tokens by role.

Kinds that can be trained: wordpiece, bpe (SentencePiece-style, "▁" word marks), byte-bpe (GPT-2
style byte-level), unigram. Files that can be loaded: GPT-2's encoder.json + vocab.bpe, a
vocab.json + merges.txt pair, a tokenizer.json, a SentencePiece .model (needs the `sentencepiece`
extra). Saved in a model directory as tokenizer.json + tokenizer_config.json (roles).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

from .errors import TokenizerError

KINDS = ("wordpiece", "bpe", "byte-bpe", "unigram")
ROLES = ("pad", "unk", "bos", "eos", "mask")
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# Defaults per kind, the conventions of the tutorials each kind comes from.
DEFAULT_SPECIALS = {
    "wordpiece": {"pad": "[PAD]", "unk": "[UNK]", "bos": "[BOS]"},
    "bpe": {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"},
    "byte-bpe": {"bos": "<|endoftext|>", "eos": "<|endoftext|>"},
    "unigram": {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"},
}
_ROLE_GUESSES = {
    "pad": ("[PAD]", "<pad>", "<|pad|>"),
    "unk": ("[UNK]", "<unk>", "<|unk|>"),
    "bos": ("[BOS]", "<s>", "<|endoftext|>", "[CLS]"),
    "eos": ("[EOS]", "</s>", "<|endoftext|>", "[SEP]"),
}


class Tokenizer:
    """Encode text to ids and back. `special_tokens` maps roles (pad, unk, bos, eos) to tokens."""

    def __init__(self, backend: HFTokenizer, special_tokens: dict[str, str] | None = None,
                 kind: str | None = None) -> None:
        self.backend = backend
        self.kind = kind
        self.chat_template: str | None = None  # Jinja, saved as tokenizer_config.json's chat_template
        self.special_tokens: dict[str, str] = {}
        for role, token in (special_tokens or {}).items():
            self._set_role(role, token)

    # Construction ------------------------------------------------------------------------------
    @classmethod
    def train(cls, kind: str, data: str | os.PathLike | Iterable[str] | Sequence[str | os.PathLike],
              vocab_size: int, *, special_tokens: dict[str, str] | None = None,
              reserved_tokens: Sequence[str] | None = None, lowercase: bool = False,
              min_frequency: int = 2, show_progress: bool = False) -> "Tokenizer":
        """Train a tokenizer of `kind` on files or on texts.

        Files: a path (str or Path), or a list of paths (Path objects, or strings that name existing
        files, e.g. ["corpus.txt"]). Texts: a list whose first item is not a file name, or any iterator of
        strings. A list of file names (existing files, or strings without spaces ending in .txt/.json/...)
        of which one does not exist is refused, and so is a list mixing existing files and texts.

        reserved_tokens are placed first, in order (ids 0, 1, ...); role tokens not among them follow.
        """
        if kind not in KINDS:
            raise TokenizerError(f"Unknown tokenizer kind {kind!r}; choose one of {', '.join(KINDS)}.")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
            raise TokenizerError(f"vocab_size (--vocab-size) must be a whole number of at least 2, got {vocab_size!r}.")
        if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or not 0 <= min_frequency < 2**32:
            raise TokenizerError(f"min_frequency (--min-frequency) must be a whole number from 0 to {2**32 - 1:,}, "
                                 f"got {min_frequency!r}.")
        check_vocab_size_memory(vocab_size)
        roles = dict(DEFAULT_SPECIALS[kind]) if special_tokens is None else dict(special_tokens)
        reserved = list(reserved_tokens or [])
        for token in roles.values():
            if token not in reserved:
                reserved.append(token)
        backend = _new_backend(kind, roles, lowercase)
        trainer = _trainer(kind, vocab_size, reserved, roles, min_frequency, show_progress)
        files, texts = _split_sources(data)
        if files:
            missing = [f for f in files if not Path(f).is_file()]
            if missing:
                raise TokenizerError(f"Training file {missing[0]} does not exist.")
            texts = _file_lines(files)  # read in Python so non-UTF-8 bytes become U+FFFD, not a crash
        backend.train_from_iterator(texts, trainer)
        if backend.get_vocab_size() <= len(reserved):
            raise TokenizerError("The tokenizer training data is empty: no vocabulary was learned.")
        return cls(backend, roles, kind)

    @classmethod
    def from_gpt2_files(cls, encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike) -> "Tokenizer":
        """GPT-2's original encoder.json + vocab.bpe (byte-level BPE, <|endoftext|> special)."""
        vocab = _read_json(encoder_json)
        merges = _read_merges(vocab_bpe)
        return cls._byte_level(vocab, merges, {"bos": "<|endoftext|>", "eos": "<|endoftext|>"})

    @classmethod
    def from_vocab_merges(cls, vocab_json: str | os.PathLike, merges_txt: str | os.PathLike,
                          special_tokens: dict[str, str] | None = None) -> "Tokenizer":
        """A vocab.json + merges.txt pair: byte-level (GPT-2) or SentencePiece-style ("▁") BPE."""
        vocab = _read_json(vocab_json)
        merges = _read_merges(merges_txt)
        if any(t.startswith("▁") for t in list(vocab)[:5000]):
            backend = HFTokenizer(models.BPE(vocab, merges, unk_token=_present(vocab, "<unk>"),
                                             fuse_unk=True))
            backend.pre_tokenizer = pre_tokenizers.Metaspace()
            backend.decoder = decoders.Metaspace()
            roles = special_tokens or {r: t for r, t in DEFAULT_SPECIALS["bpe"].items() if t in vocab}
            tok = cls(backend, roles, "bpe")
            tok._register_specials()
            return tok
        roles = special_tokens or _guess_roles(vocab)
        return cls._byte_level(vocab, merges, roles)

    @classmethod
    def _byte_level(cls, vocab, merges, roles) -> "Tokenizer":
        backend = HFTokenizer(models.BPE(vocab, merges))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        tok = cls(backend, roles, "byte-bpe")
        tok._register_specials()
        return tok

    @classmethod
    def from_file(cls, path: str | os.PathLike, special_tokens: dict[str, str] | None = None) -> "Tokenizer":
        """A tokenizer.json; roles from a tokenizer_config.json beside it, or guessed."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"Tokenizer file {path} does not exist.")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exceptions
            raise TokenizerError(f"{path} is not a valid tokenizer.json ({exc}).") from None
        kind = None
        if (path.parent / TOKENIZER_CONFIG_FILE).is_file():
            kind = _read_json(path.parent / TOKENIZER_CONFIG_FILE).get("gptgen_kind")
        declared, extra = _declared_specials(path.parent)
        vocab = backend.get_vocab()
        roles = special_tokens if special_tokens is not None else (declared or _guess_roles(vocab))
        tok = cls(backend, roles, kind)
        tok._register_present(extra)
        return tok

    @classmethod
    def from_sentencepiece(cls, model_file: str | os.PathLike,
                           special_tokens: dict[str, str] | None = None) -> "Tokenizer":
        """A SentencePiece .model file (unigram or BPE); needs `pip install gptgen[sentencepiece]`."""
        try:
            import sentencepiece as spm
        except ImportError:
            raise TokenizerError(
                "Loading a SentencePiece .model needs the sentencepiece package: pip install 'gptgen[sentencepiece]'."
            ) from None
        if not Path(model_file).is_file():
            raise TokenizerError(f"SentencePiece model {model_file} does not exist.")
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(model_file))
        except Exception:
            raise TokenizerError(f"{model_file} is not a valid SentencePiece model.") from None
        proto = _sentencepiece_proto(sp)
        pieces = [(sp.IdToPiece(i), sp.GetScore(i)) for i in range(sp.GetPieceSize())]
        unk_id = sp.unk_id()
        byte_fallback = bool(proto.trainer_spec.byte_fallback)
        if proto.trainer_spec.model_type == type(proto.trainer_spec).BPE:
            kind = "bpe"
            vocab = {p: i for i, (p, _) in enumerate(pieces)}
            merges = _merges_from_vocab(vocab, [s for _, s in pieces])
            model = models.BPE(vocab, merges, unk_token=pieces[unk_id][0] if unk_id >= 0 else None,
                               fuse_unk=True, byte_fallback=byte_fallback)
        else:
            kind = "unigram"
            model = models.Unigram(pieces, unk_id=unk_id if unk_id >= 0 else None, byte_fallback=byte_fallback)
        backend = HFTokenizer(model)
        # SentencePiece's own normalisation: its compiled NFKC map, then collapsed and stripped spaces.
        steps = []
        charsmap = proto.normalizer_spec.precompiled_charsmap
        if charsmap:
            steps.append(normalizers.Precompiled(charsmap))
        if proto.normalizer_spec.remove_extra_whitespaces:
            steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip(left=True, right=True)]
        if steps:
            backend.normalizer = normalizers.Sequence(steps)
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always",
                                                         split=bool(proto.trainer_spec.split_by_whitespace))
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                             decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        roles = special_tokens or {}
        if not roles:
            for role, ident in (("unk", unk_id), ("bos", sp.bos_id()), ("eos", sp.eos_id()), ("pad", sp.pad_id())):
                if ident >= 0:
                    roles[role] = pieces[ident][0]
        tok = cls(backend, roles, kind)
        tok._register_specials()
        return tok

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load from a directory or a file, whichever format is found there."""
        path = Path(path)
        if path.is_file():
            if path.suffix == ".model":
                return cls.from_sentencepiece(path)
            return cls.from_file(path)
        if not path.is_dir():
            raise TokenizerError(f"Tokenizer path {path} does not exist.")
        keras = path / "assets" / "tokenizer"  # a KerasHub preset: its tokenizer.json is a Keras layer config
        if (keras / "vocabulary.json").is_file() and (keras / "merges.txt").is_file():
            return cls.from_vocab_merges(keras / "vocabulary.json", keras / "merges.txt")
        if (path / TOKENIZER_FILE).is_file():
            return cls.from_file(path / TOKENIZER_FILE)
        if (path / "encoder.json").is_file() and (path / "vocab.bpe").is_file():
            return cls.from_gpt2_files(path / "encoder.json", path / "vocab.bpe")
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            roles, extra = _declared_specials(path)
            tok = cls.from_vocab_merges(path / "vocab.json", path / "merges.txt", roles or None)
            tok._register_present(extra)
            return tok
        models_ = sorted(path.glob("*.model"))
        if models_:
            return cls.from_sentencepiece(models_[0])
        raise TokenizerError(
            f"No tokenizer found in {path}: expected tokenizer.json, encoder.json + vocab.bpe, "
            "vocab.json + merges.txt, or a SentencePiece .model file."
        )

    # Special tokens ----------------------------------------------------------------------------
    def _set_role(self, role: str, token: str) -> None:
        if role not in ROLES:
            raise TokenizerError(f"Unknown special-token role {role!r}; choose one of {', '.join(ROLES)}.")
        self.special_tokens[role] = token

    def _register_specials(self) -> None:
        tokens = sorted(set(self.special_tokens.values()))
        if tokens:
            self.backend.add_special_tokens(tokens)

    def _register_present(self, tokens: Sequence[str]) -> None:
        """Mark declared special tokens that the vocabulary holds as special (never split, skippable)."""
        present = [t for t in tokens if self.backend.token_to_id(t) is not None]
        if present:
            self.backend.add_special_tokens(present)

    def add_special_tokens(self, tokens: dict[str, str] | Sequence[str]) -> int:
        """Add special tokens (a role -> token dict, or a list); return how many were new."""
        before = self.vocab_size
        if isinstance(tokens, dict):
            for role, token in tokens.items():
                self._set_role(role, token)
            tokens = list(tokens.values())
        self.backend.add_special_tokens(list(tokens))
        return self.vocab_size - before

    def _role_id(self, role: str) -> int | None:
        token = self.special_tokens.get(role)
        return None if token is None else self.backend.token_to_id(token)

    pad_token = property(lambda self: self.special_tokens.get("pad"))
    unk_token = property(lambda self: self.special_tokens.get("unk"))
    bos_token = property(lambda self: self.special_tokens.get("bos"))
    eos_token = property(lambda self: self.special_tokens.get("eos"))
    pad_token_id = property(lambda self: self._role_id("pad"))
    unk_token_id = property(lambda self: self._role_id("unk"))
    bos_token_id = property(lambda self: self._role_id("bos"))
    eos_token_id = property(lambda self: self._role_id("eos"))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, ident: int) -> str | None:
        return self.backend.id_to_token(int(ident))

    # Encoding ----------------------------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False,
               max_length: int | None = None, padding: bool = False) -> list[int]:
        """Ids of `text`; optionally with BOS/EOS, truncated and right-padded to max_length."""
        return self.encode_batch([text], add_bos=add_bos, add_eos=add_eos,
                                 max_length=max_length, padding=padding)[0]

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False,
                     max_length: int | None = None, padding: bool | str = False) -> list[list[int]]:
        """Encode many texts in parallel (Rust threads). padding: False, True/"max_length", "longest"."""
        if isinstance(texts, str):
            raise TokenizerError("encode_batch takes a list of strings, not one string.")
        bos = self._required_id("bos") if add_bos else None
        eos = self._required_id("eos") if add_eos else None
        out = []
        texts = list(texts)
        try:
            encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        except TypeError:  # tokenizers refuses non-strings and strings with lone surrogates
            raise TokenizerError(_unencodable(texts)) from None
        for enc in encodings:
            ids = enc.ids
            if bos is not None:
                ids = [bos] + ids
            if eos is not None:
                ids = ids + [eos]
            if max_length is not None:
                ids = ids[:max_length]
            out.append(ids)
        if padding:
            pad = self._required_id("pad")
            width = max_length if (padding in (True, "max_length") and max_length) else max(map(len, out), default=0)
            out = [ids + [pad] * (width - len(ids)) for ids in out]
        return out

    def _required_id(self, role: str) -> int:
        ident = self._role_id(role)
        if ident is None:
            raise TokenizerError(f"This tokenizer has no {role} token; add one with add_special_tokens({{'{role}': ...}}).")
        return ident

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(self._known_ids(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return self.backend.decode_batch([self._known_ids(ids) for ids in batch],
                                         skip_special_tokens=skip_special_tokens)

    def _known_ids(self, ids: Sequence[int]) -> list[int]:
        out = [int(i) for i in ids]
        if out and (min(out) < 0 or max(out) >= self.vocab_size):
            bad = next(i for i in out if not 0 <= i < self.vocab_size)
            raise TokenizerError(f"Token id {bad} is outside the tokenizer's vocabulary of {self.vocab_size}.")
        return out

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, special_tokens={self.special_tokens})"

    # Saving ------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json (roles, readable by transformers too)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / TOKENIZER_FILE))
        cfg = {"gptgen_kind": self.kind, "special_tokens": self.special_tokens,
               "tokenizer_class": "PreTrainedTokenizerFast",
               "model_max_length": int(1e30)}
        for role, token in self.special_tokens.items():
            cfg[f"{role}_token"] = token
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(cfg, indent=2, ensure_ascii=False), "utf-8")


# Helpers -------------------------------------------------------------------------------------------
def _unencodable(texts) -> str:
    """The sentence for a batch the backend refused: a non-string, or a lone surrogate (not valid Unicode)."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            return f"Text {i} to encode is a {type(text).__name__}, not a string."
        for j, ch in enumerate(text):
            if "\ud800" <= ch <= "\udfff":
                return (f"Text {i} holds a lone surrogate U+{ord(ch):04X} at character {j}, which is not valid "
                        "Unicode; pass valid text (for instance, decode bytes as UTF-8 with errors='replace').")
    return "The texts to encode are not valid strings."


# The trainers of `tokenizers` reserve tables sized by vocab_size before reading any text: about 71 bytes
# an entry for BPE and WordPiece (measured: 10**9 asked for 70,866,960,400 bytes), more while merging.
TRAINER_BYTES_PER_TOKEN = 128


def check_vocab_size_memory(vocab_size: int) -> None:
    """TokenizerError naming --vocab-size when the trainer's tables for it would not fit in memory."""
    from .limits import check_allocation

    check_allocation("vocab_size (--vocab-size)", vocab_size * TRAINER_BYTES_PER_TOKEN, value=vocab_size,
                     error=TokenizerError)


def _new_backend(kind: str, roles: dict[str, str], lowercase: bool) -> HFTokenizer:
    unk = roles.get("unk")
    if kind == "wordpiece":
        backend = HFTokenizer(models.WordPiece(unk_token=unk or "[UNK]"))
        backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                        strip_accents=None, lowercase=lowercase)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##")
        return backend
    if kind == "byte-bpe":
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    elif kind == "bpe":
        backend = HFTokenizer(models.BPE(unk_token=unk, fuse_unk=True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        backend.decoder = decoders.Metaspace()
    else:  # unigram
        backend = HFTokenizer(models.Unigram())
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        backend.decoder = decoders.Metaspace()
    if lowercase:
        backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    else:
        backend.normalizer = normalizers.NFKC()
    return backend


def _trainer(kind, vocab_size, reserved, roles, min_frequency, show_progress):
    if kind == "wordpiece":
        return trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=reserved,
                                         min_frequency=min_frequency, show_progress=show_progress)
    if kind == "byte-bpe":
        return trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=reserved, min_frequency=min_frequency,
                                   initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                   show_progress=show_progress)
    if kind == "bpe":
        return trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=reserved, min_frequency=min_frequency,
                                   show_progress=show_progress)
    return trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=reserved, unk_token=roles.get("unk"),
                                   show_progress=show_progress)


_FILE_SUFFIXES = (".txt", ".text", ".json", ".jsonl", ".csv", ".tsv", ".md", ".raw", ".tokens")


def _source_kind(item: str) -> str:
    """"file" for a string naming an existing file, "path" for one that looks like a file name (no
    whitespace, a text-file suffix) but names nothing, "text" otherwise."""
    if "\n" in item or len(item) > 4096 or not item.strip():
        return "text"
    try:
        if Path(item).is_file():
            return "file"
    except (OSError, ValueError):
        return "text"
    if not any(c.isspace() for c in item) and item.lower().endswith(_FILE_SUFFIXES):
        return "path"
    return "text"


def _split_sources(data):
    """(files, None) or (None, texts). A str or PathLike is a file; a list or tuple whose first item is a
    PathLike or a file name (an existing file, or a string that looks like one) is a list of files when every
    item names an existing file, and is refused when one is missing or when existing files and texts mix;
    any other list is texts."""
    if isinstance(data, (str, os.PathLike)):
        return [data], None
    if isinstance(data, (list, tuple)) and data:
        if all(isinstance(d, os.PathLike) for d in data):
            return list(data), None
        kind = lambda d: "file" if isinstance(d, os.PathLike) else _source_kind(d)  # noqa: E731
        # Only a list that starts with a file name is looked at item by item (a stat per text is slow).
        if isinstance(data[0], (str, os.PathLike)) and kind(data[0]) != "text" and all(
                isinstance(d, (str, os.PathLike)) for d in data):
            kinds = [kind(d) for d in data]
            if all(k == "file" for k in kinds):
                return list(data), None
            if any(k == "path" for k in kinds) and all(k != "text" for k in kinds):
                missing = data[kinds.index("path")]
                raise TokenizerError(f"Training file {missing} does not exist (a list of file names trains on "
                                     "the files; pass texts as strings that are not file names).")
            if "file" in kinds and "text" in kinds:
                name = data[kinds.index("file")]
                raise TokenizerError(f"The training data mixes file names ({name}) and texts; pass either a list "
                                     "of files or a list of texts.")

    def texts() -> Iterator[str]:
        for item in data:
            yield str(item)

    return None, texts()


def _file_lines(files) -> Iterator[str]:
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as handle:
            yield from handle


def _read_json(path):
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"Tokenizer file {path} does not exist.")
    try:
        return json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TokenizerError(f"{path} is not valid JSON.") from None


def _read_merges(path):
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"Merges file {path} does not exist.")
    merges = []
    for line in path.read_text("utf-8").splitlines():
        if line.startswith("#version") or not line.strip():
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"{path} has a malformed merge line: {line!r}.")
        merges.append((parts[0], parts[1]))
    return merges


def _declared_specials(directory: Path) -> tuple[dict[str, str], list[str]]:
    """Roles and other special tokens declared in transformers' tokenizer_config.json and
    special_tokens_map.json (plain strings or {"content": ...} objects); gptgen's own "special_tokens" first."""
    roles: dict[str, str] = {}
    extra: list[str] = []
    for name in (TOKENIZER_CONFIG_FILE, "special_tokens_map.json"):
        if not (directory / name).is_file():
            continue
        cfg = _read_json(directory / name)
        if not isinstance(cfg, dict):
            continue
        for role, token in (cfg.get("special_tokens") or {}).items():
            if role in ROLES and isinstance(token, str):
                roles.setdefault(role, token)
        for role in ROLES:
            token = _token_text(cfg.get(f"{role}_token"))
            if token is not None:
                roles.setdefault(role, token)
        for token in cfg.get("additional_special_tokens") or []:
            token = _token_text(token)
            if token is not None and token not in extra:
                extra.append(token)
    return roles, list(roles.values()) + [t for t in extra if t not in roles.values()]


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _present(vocab, token):
    return token if token in vocab else None


def _guess_roles(vocab) -> dict[str, str]:
    roles = {}
    for role, candidates in _ROLE_GUESSES.items():
        for token in candidates:
            if token in vocab:
                roles[role] = token
                break
    return roles


def _sentencepiece_proto(sp):
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:
        raise TokenizerError(
            "Reading a SentencePiece .model needs protobuf: pip install 'gptgen[sentencepiece]'."
        ) from None
    proto = pb.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    return proto


def _merges_from_vocab(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """Rebuild BPE merges from a SentencePiece BPE vocabulary: a piece is the merge of two pieces."""
    found = []
    for piece, ident in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                found.append((scores[ident] if ident < len(scores) else 0.0, vocab[left], vocab[right], left, right))
    found.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [(left, right) for _, _, _, left, right in found]
