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


def _values(value, integer: bool = False):
    """A Python number as it is, or per-row values as a tuple (one per row). Values come checked from a
    GenerationConfig."""
    cast = int if integer else float
    if isinstance(value, (int, float)):
        return cast(value)
    return tuple(cast(v) for v in (value.tolist() if isinstance(value, torch.Tensor) else value))


class _PerRow:
    """Per-row values as a (rows, 1) tensor on the scores' device, made once per device and dtype."""

    def __init__(self, values) -> None:
        self.values = values
        self._cache: torch.Tensor | None = None

    @property
    def scalar(self) -> bool:
        return not isinstance(self.values, tuple)

    def column(self, scores: torch.Tensor, dtype=None):
        if self.scalar:
            return self.values
        dtype = dtype or scores.dtype
        c = self._cache
        if c is None or c.device != scores.device or c.dtype != dtype:
            c = torch.tensor(self.values, dtype=torch.float64, device=scores.device).to(dtype)[:, None]
            self._cache = c
        if c.shape[0] != scores.shape[0]:
            raise GenerationError(f"Per-row values were given for {c.shape[0]} rows, but the scores have "
                                  f"{scores.shape[0]}.")
        return c

    def all(self, pred) -> bool:
        return all(pred(v) for v in (self.values if not self.scalar else (self.values,)))

    def max(self):
        return max(self.values) if not self.scalar else self.values


class RepetitionPenalty(LogitsProcessor):
    """CTRL's penalty (as HF): scores of tokens already present (prompt or generated) are divided by
    `penalty` (multiplied where negative). `penalty` is one number or one per row (1.0: off)."""

    def __init__(self, penalty) -> None:
        self.penalty = _values(penalty)
        self._rows = _PerRow(self.penalty)

    def __call__(self, scores, state):
        if self._rows.all(lambda v: v == 1.0):
            return scores
        pen = self._rows.column(scores)
        present = state.presence(scores.shape[-1])
        penalised = torch.where(scores < 0, scores * pen, scores / pen)
        return torch.where(present, penalised, scores)


class PresenceFrequencyPenalty(LogitsProcessor):
    """OpenAI's penalties over the generated tokens only:
    logit -= presence * (count > 0) + frequency * count. Each is one number or one per row (0: off)."""

    def __init__(self, presence=0.0, frequency=0.0) -> None:
        self.presence, self.frequency = _values(presence), _values(frequency)
        self._p, self._f = _PerRow(self.presence), _PerRow(self.frequency)

    def __call__(self, scores, state):
        p_off, f_off = self._p.all(lambda v: v == 0), self._f.all(lambda v: v == 0)
        if p_off and f_off:
            return scores
        counts = state.generated_counts(scores.shape[-1])
        if not p_off:
            scores = scores - self._p.column(scores) * (counts > 0).to(scores.dtype)
        if not f_off:
            scores = scores - self._f.column(scores) * counts.to(scores.dtype)
        return scores


def _ban(scores: torch.Tensor, rows: list[int], cols: list[int]) -> torch.Tensor:
    """scores with the (row, token) pairs set to -inf (a copy; the input is left as it is)."""
    if not rows:
        return scores
    scores = scores.clone()
    scores[torch.tensor(rows, device=scores.device), torch.tensor(cols, device=scores.device)] = NEG_INF
    return scores


class NoRepeatNGram(LogitsProcessor):
    """Ban every token that would complete an n-gram already present in the row (HF semantics).
    `n` is one size or one per row (0: off for that row)."""

    def __init__(self, n) -> None:
        self.n = _values(n, integer=True)

    def banned(self, seq: Sequence[int], n: int | None = None) -> set[int]:
        n = self.n if n is None else n
        if n <= 0 or len(seq) + 1 < n:
            return set()
        prefix = tuple(seq[len(seq) - n + 1:]) if n > 1 else ()
        out = set()
        for i in range(len(seq) - n + 1):
            if tuple(seq[i:i + n - 1]) == prefix:
                out.add(seq[i + n - 1])
        return out

    def __call__(self, scores, state):
        rows, cols = [], []
        sizes = self.n if isinstance(self.n, tuple) else None
        for r, seq in enumerate(state.row_lists()):
            for tok in self.banned(seq, None if sizes is None else sizes[r]):
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


def generated_lengths(state, vocab_size: int) -> torch.Tensor:
    """(rows,) tokens generated so far in each row."""
    fn = getattr(state, "generated_lengths", None)
    if fn is not None:
        return fn()
    return state.generated_counts(vocab_size).sum(dim=-1)


class MinNewTokens(LogitsProcessor):
    """Ban the end-of-sequence tokens until a row has produced `min_new_tokens` tokens (one number or
    one per row; 0: off)."""

    def __init__(self, min_new_tokens, eos_ids: Sequence[int]) -> None:
        self.min_new_tokens = _values(min_new_tokens, integer=True)
        self._rows = _PerRow(self.min_new_tokens)
        self.eos_ids = [int(e) for e in eos_ids]
        self._eos: torch.Tensor | None = None

    def __call__(self, scores, state):
        steps = getattr(state, "generated_steps", None)  # the longest row's count, when the state knows it
        if not self.eos_ids or (steps is not None and steps >= self._rows.max()):
            return scores
        V = scores.shape[-1]
        if self._eos is None or self._eos.device != scores.device or self._eos.shape[-1] != V:
            eos = torch.zeros(1, V, dtype=torch.bool, device=scores.device)
            eos[0, torch.tensor([e for e in self.eos_ids if 0 <= e < V], dtype=torch.long, device=scores.device)] = True
            self._eos = eos
        if self._rows.scalar and steps is not None:
            return scores.masked_fill(self._eos, NEG_INF)  # same count in every row
        short = generated_lengths(state, V)[:, None] < self._rows.column(scores, torch.long)
        return scores.masked_fill(short & self._eos, NEG_INF)


def build_processors(*, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                     bad_words_ids=None, min_new_tokens=0, eos_ids: Sequence[int] = (),
                     vocab_size: int, presence_penalty: float = 0.0,
                     frequency_penalty: float = 0.0) -> list[LogitsProcessor]:
    """The processors the options ask for, in HF's order. min_new_tokens may be one value per row."""
    procs: list[LogitsProcessor] = []
    if repetition_penalty is not None and repetition_penalty != 1.0:
        procs.append(RepetitionPenalty(repetition_penalty))
    if presence_penalty or frequency_penalty:
        procs.append(PresenceFrequencyPenalty(presence_penalty, frequency_penalty))
    if no_repeat_ngram_size:
        procs.append(NoRepeatNGram(no_repeat_ngram_size))
    if bad_words_ids:
        # As transformers: a banned single token that is an end-of-sequence token is dropped from the list,
        # so banning words never stops a sequence from ending.
        eos = {int(e) for e in eos_ids}
        bad_words_ids = [seq for seq in bad_words_ids if not (len(seq) == 1 and int(seq[0]) in eos)]
        if bad_words_ids:
            procs.append(BadWords(bad_words_ids, vocab_size))
    if isinstance(min_new_tokens, (tuple, list)) or min_new_tokens:
        procs.append(MinNewTokens(min_new_tokens, eos_ids))
    return procs
