"""Logits processors: decoding controls that work with every sampler.

Each processor takes the scores of the next token (rows, vocab) and the decode state, and returns
scores with some tokens penalised or banned (-inf). They see only real tokens of a row (prompt and
generated), never left padding, so a prompt gives the same result alone or in a batch.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import GenerationError

NEG_INF = float("-inf")


class LogitsProcessor:
    """Base class: __call__(scores, state) -> scores."""

    def __call__(self, scores: torch.Tensor, state) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class RepetitionPenalty(LogitsProcessor):
    """CTRL's penalty (as HF): scores of tokens already present are divided by `penalty` (multiplied if < 0)."""

    def __init__(self, penalty: float) -> None:
        if not penalty > 0:
            raise GenerationError(f"repetition_penalty must be positive, got {penalty!r}.")
        self.penalty = float(penalty)

    def __call__(self, scores, state):
        present = state.presence(scores.shape[-1])
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(present, penalised, scores)


def _ban(scores: torch.Tensor, rows: list[int], cols: list[int]) -> torch.Tensor:
    """scores with the (row, token) pairs set to -inf (a copy; the input is left as it is)."""
    if not rows:
        return scores
    scores = scores.clone()
    scores[torch.tensor(rows, device=scores.device), torch.tensor(cols, device=scores.device)] = NEG_INF
    return scores


class NoRepeatNGram(LogitsProcessor):
    """Ban every token that would complete an n-gram already present in the row (HF semantics)."""

    def __init__(self, n: int) -> None:
        if not isinstance(n, int) or n < 1:
            raise GenerationError(f"no_repeat_ngram_size must be a positive integer, got {n!r}.")
        self.n = n

    def banned(self, seq: Sequence[int]) -> set[int]:
        n = self.n
        if len(seq) + 1 < n:
            return set()
        prefix = tuple(seq[len(seq) - n + 1:]) if n > 1 else ()
        out = set()
        for i in range(len(seq) - n + 1):
            if tuple(seq[i:i + n - 1]) == prefix:
                out.add(seq[i + n - 1])
        return out

    def __call__(self, scores, state):
        rows, cols = [], []
        for r, seq in enumerate(state.row_lists()):
            for tok in self.banned(seq):
                rows.append(r)
                cols.append(tok)
        return _ban(scores, rows, cols)


class BadWords(LogitsProcessor):
    """Never emit a banned sequence: single tokens are always masked, a longer sequence's last token is
    masked whenever the row ends with the sequence's other tokens."""

    def __init__(self, bad_words_ids: Sequence[Sequence[int]], vocab_size: int) -> None:
        self.single: list[int] = []
        self.multi: list[tuple[tuple[int, ...], int]] = []
        for seq in bad_words_ids:
            seq = [int(t) for t in seq]
            if not seq:
                raise GenerationError("bad_words_ids must not contain an empty sequence.")
            bad = [t for t in seq if not 0 <= t < vocab_size]
            if bad:
                raise GenerationError(f"bad_words_ids holds token id {bad[0]}, outside the vocabulary of {vocab_size}.")
            if len(seq) == 1:
                self.single.append(seq[0])
            else:
                self.multi.append((tuple(seq[:-1]), seq[-1]))
        self._mask: torch.Tensor | None = None

    def __call__(self, scores, state):
        if self.single:
            if self._mask is None or self._mask.device != scores.device or self._mask.shape[-1] != scores.shape[-1]:
                mask = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
                mask[torch.tensor(self.single, device=scores.device)] = True
                self._mask = mask
            scores = scores.masked_fill(self._mask, NEG_INF)
        if self.multi:
            rows, cols = [], []
            for r, seq in enumerate(state.row_lists()):
                for prefix, last in self.multi:
                    k = len(prefix)
                    if len(seq) >= k and tuple(seq[len(seq) - k:]) == prefix:
                        rows.append(r)
                        cols.append(last)
            scores = _ban(scores, rows, cols)
        return scores


class MinNewTokens(LogitsProcessor):
    """Ban the end-of-sequence tokens until a row has produced `min_new_tokens` tokens."""

    def __init__(self, min_new_tokens: int, eos_ids: Sequence[int]) -> None:
        self.min_new_tokens = int(min_new_tokens)
        self.eos_ids = list(eos_ids)

    def __call__(self, scores, state):
        if state.generated_steps >= self.min_new_tokens or not self.eos_ids:
            return scores
        scores = scores.clone()
        scores[:, self.eos_ids] = NEG_INF
        return scores


def build_processors(*, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                     bad_words_ids=None, min_new_tokens: int = 0, eos_ids: Sequence[int] = (),
                     vocab_size: int) -> list[LogitsProcessor]:
    """The processors the options ask for, in HF's order."""
    procs: list[LogitsProcessor] = []
    if repetition_penalty is not None and repetition_penalty != 1.0:
        procs.append(RepetitionPenalty(repetition_penalty))
    if no_repeat_ngram_size:
        procs.append(NoRepeatNGram(no_repeat_ngram_size))
    if bad_words_ids:
        procs.append(BadWords(bad_words_ids, vocab_size))
    if min_new_tokens:
        if min_new_tokens < 0:
            raise GenerationError(f"min_new_tokens must be at least 0, got {min_new_tokens}.")
        procs.append(MinNewTokens(min_new_tokens, eos_ids))
    return procs
