"""Packing token lists into fixed-length language-modelling examples.

Two ways, both giving inputs, next-token labels and a loss mask of shape [N, seq_len]:

- ``pack_examples``: one row per example (fine-tuning, the seed's StartEndPacker): ``[BOS] + tokens
  (+ [EOS])``, truncated to ``seq_len + 1`` tokens, inputs ``seq[:-1]``, labels ``seq[1:]``, right-padded
  with ``pad_id``; the mask is False where the label is padding.
- ``chunk_tokens``: the examples concatenated (EOS after each) and cut into windows (pretraining).

The mask is positional, so a pad id that is also a real token (GPT-2 has no pad token) is handled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import DataError


@dataclass
class PackedExamples:
    """input_ids, labels: LongTensor[N, seq_len]; loss_mask: BoolTensor[N, seq_len] (True = counts in the loss)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor

    def __post_init__(self) -> None:
        if not (self.input_ids.shape == self.labels.shape == self.loss_mask.shape) or self.input_ids.dim() != 2:
            shapes = ", ".join(str(tuple(t.shape)) for t in (self.input_ids, self.labels, self.loss_mask))
            raise DataError(f"input_ids, labels and loss_mask must share one [N, seq_len] shape; got {shapes}.")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index], "loss_mask": self.loss_mask[index]}

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_target_tokens(self) -> int:
        """How many labels count in the loss."""
        return int(self.loss_mask.sum())

    def select(self, index) -> "PackedExamples":
        """A subset (index: slice, list or tensor of row indices)."""
        return PackedExamples(self.input_ids[index], self.labels[index], self.loss_mask[index])


def _as_list(tokens) -> list[int]:
    if isinstance(tokens, torch.Tensor):
        return tokens.tolist()
    if isinstance(tokens, np.ndarray):
        return tokens.tolist()
    return list(tokens)


def _check_seq_len(seq_len: int) -> None:
    if not isinstance(seq_len, int) or seq_len < 1:
        raise DataError(f"seq_len must be a positive integer, got {seq_len!r}.")


def pack_examples(token_lists: Sequence[Sequence[int]], seq_len: int, *, bos_id: int | None = None,
                  eos_id: int | None = None, pad_id: int = 0) -> PackedExamples:
    """One row per example: [BOS] + tokens (+ [EOS]), cut to seq_len + 1, shifted into inputs and labels.

    With bos_id set and eos_id None this gives the seed's StartEndPacker loss (labels = tokens[:seq_len],
    inputs = [BOS] + tokens[:seq_len - 1], padding masked out); the one difference, the seed's final token
    fed as an input at the first masked position, feeds no counted output of a causal model.
    """
    _check_seq_len(seq_len)
    token_lists = list(token_lists)
    if not token_lists:
        raise DataError("There are no examples to pack: the token list is empty.")
    n = len(token_lists)
    inputs = np.full((n, seq_len), pad_id, dtype=np.int64)
    labels = np.full((n, seq_len), pad_id, dtype=np.int64)
    mask = np.zeros((n, seq_len), dtype=bool)
    head = [] if bos_id is None else [bos_id]
    tail = [] if eos_id is None else [eos_id]
    for row, tokens in enumerate(token_lists):
        seq = (head + _as_list(tokens) + tail)[: seq_len + 1]
        k = len(seq) - 1  # number of (input, label) pairs
        if k <= 0:
            continue
        inputs[row, :k] = seq[:-1]
        labels[row, :k] = seq[1:]
        mask[row, :k] = True
    if not mask.any():
        raise DataError(f"None of the {n:,} examples has a token to predict: each is shorter than two tokens "
                        f"after adding BOS/EOS; pass bos_id or eos_id, or check the tokenizer.")
    return PackedExamples(torch.from_numpy(inputs), torch.from_numpy(labels), torch.from_numpy(mask))


def chunk_tokens(token_lists: Sequence[Sequence[int]], seq_len: int, *, eos_id: int | None = None,
                 drop_last: bool = False, pad_id: int = 0) -> PackedExamples:
    """Concatenate the examples (EOS after each when eos_id is set) and cut the stream into windows.

    Window i covers stream[i*seq_len : (i+1)*seq_len + 1]: inputs are its first seq_len tokens, labels
    the last seq_len, so every token but the first is a label exactly once. The last, shorter window is
    padded and masked (kept so no token is lost) unless drop_last.
    """
    _check_seq_len(seq_len)
    token_lists = list(token_lists)
    if not token_lists:
        raise DataError("There are no examples to chunk: the token list is empty.")
    parts = []
    for tokens in token_lists:
        parts.append(tokens.astype(np.int64) if isinstance(tokens, np.ndarray)
                     else np.asarray(_as_list(tokens), dtype=np.int64))
        if eos_id is not None:
            parts.append(np.asarray([eos_id], dtype=np.int64))
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    n_pairs = len(stream) - 1
    if n_pairs < 1:
        raise DataError(f"The corpus has {len(stream)} token(s) in all; chunking needs at least two.")
    n_full = n_pairs // seq_len
    n_rows = n_full if (drop_last or n_pairs % seq_len == 0) else n_full + 1
    if n_rows == 0:
        raise DataError(f"The corpus has {len(stream):,} tokens, fewer than one window of seq_len + 1 = "
                        f"{seq_len + 1}; lower seq_len or keep the last window (drop_last=False).")
    inputs = np.full((n_rows, seq_len), pad_id, dtype=np.int64)
    labels = np.full((n_rows, seq_len), pad_id, dtype=np.int64)
    mask = np.zeros((n_rows, seq_len), dtype=bool)
    if n_full:
        full = np.lib.stride_tricks.sliding_window_view(stream, seq_len + 1)[::seq_len][:n_full]
        inputs[:n_full] = full[:, :-1]
        labels[:n_full] = full[:, 1:]
        mask[:n_full] = True
    if n_rows > n_full:
        rest = stream[n_full * seq_len:]
        k = len(rest) - 1
        inputs[-1, :k] = rest[:-1]
        labels[-1, :k] = rest[1:]
        mask[-1, :k] = True
    return PackedExamples(torch.from_numpy(inputs), torch.from_numpy(labels), torch.from_numpy(mask))


def pack_texts(texts: Sequence[str], tokenizer, seq_len: int, packing: str = "pad", add_bos: bool = False,
               add_eos: bool = False) -> PackedExamples:
    """Tokenise texts and pack them: "pad" (one example per text) or "chunk" (concatenate and cut).

    Texts are tokenised a bounded batch at a time and kept as compact arrays (pad packing keeps only the
    seq_len + 1 tokens a row can hold), so memory stays proportional to the packed result."""
    keep = None if packing == "chunk" else seq_len + 1
    ids = list(_encode_bounded(tokenizer, texts, keep))
    if packing == "chunk":
        eos = tokenizer.eos_token_id
        return chunk_tokens(ids, seq_len, eos_id=eos)
    bos = tokenizer.bos_token_id if add_bos else None
    eos = tokenizer.eos_token_id if add_eos else None
    if add_bos and bos is None:
        raise DataError("Adding BOS (--add-bos) needs a tokenizer with a BOS token.")
    if add_eos and eos is None:
        raise DataError("Adding EOS (--add-eos) needs a tokenizer with an EOS token.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return pack_examples(ids, seq_len, bos_id=bos, eos_id=eos, pad_id=pad)


_HEAD_CHARS_PER_TOKEN = 16  # pad packing encodes a long text's head of this many characters per kept token
_SPACE = re.compile(r"\s")


def _head(text: str, keep: int) -> str:
    """The start of a long text, cut just after a whitespace character, that should hold `keep` tokens."""
    chars = _HEAD_CHARS_PER_TOKEN * keep + 1024
    if len(text) <= 2 * chars:
        return text
    match = _SPACE.search(text, chars, 2 * chars)
    return text if match is None else text[:match.end()]


ENCODE_BATCH_CHARS = 1 << 22  # characters tokenised at once: the tokenizer's per-token objects stay small


def _encode_bounded(tokenizer, texts: Sequence[str], keep: int | None):
    """Each text's ids as an int32/int64 array (its first `keep` ids when keep is set), in batches of at most
    ENCODE_BATCH_CHARS characters."""
    dtype = np.int32 if tokenizer.vocab_size < 2**31 else np.int64
    batch: list[str] = []
    size = 0

    def flush():
        if keep is None:
            for ids in tokenizer.encode_batch(batch):
                yield np.asarray(ids, dtype=dtype)
            return
        heads = [_head(text, keep) for text in batch]
        for text, head, ids in zip(batch, heads, tokenizer.encode_batch(heads)):
            # a head cut after a space holds the text's own first tokens but its last one or two: with two
            # to spare it gives the first `keep` exactly; short of that, the whole text is encoded
            if len(head) < len(text) and len(ids) < keep + 2:
                ids = tokenizer.encode(text)
            yield np.asarray(ids[:keep], dtype=dtype)

    for text in texts:
        if keep is not None:
            text_size = min(len(text), _HEAD_CHARS_PER_TOKEN * keep + 1024)
        else:
            text_size = len(text)
        batch.append(text)
        size += text_size
        if size >= ENCODE_BATCH_CHARS or len(batch) >= 4096:
            yield from flush()
            batch, size = [], 0
    if batch:
        yield from flush()
