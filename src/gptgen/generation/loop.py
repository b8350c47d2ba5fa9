"""The decode loop and its state, shared by the model engine (engine.py) and KerasHub's functional form.

    prefill the (left-padded) prompts -> logits
    repeat: sampler.select -> reorder rows (beam / contrastive) -> commit tokens -> stop rows
            sampler.feed -> one step of the backend for the fed tokens -> logits

A backend says where logits come from: engine.py's ModelBackend runs a gptgen GPT through runner.Runner,
FunctionBackend calls a user's next(prompt, cache, index). This module imports neither the engine nor
the samplers, so both can import it.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from ..errors import GenerationError


# Decode state ---------------------------------------------------------------------------------------
class DecodeState:
    """Token history and bookkeeping of one generation, shared by the loop, samplers and processors."""

    def __init__(self, *, prompts: Sequence[Sequence[int]], rows_per_prompt: int, num_return_sequences: int,
                 max_new_tokens: int, eos_ids: Sequence[int], pad_id: int, device, generator, processors,
                 stop_fn: Callable[[int, list[int]], bool] | None = None, row_stopping: bool = True) -> None:
        self.batch_size = len(prompts)
        self.rows_per_prompt = rows_per_prompt
        self.num_rows = self.batch_size * rows_per_prompt
        self.num_return_sequences = num_return_sequences
        self.max_new_tokens = max_new_tokens
        self.eos_ids = list(eos_ids)
        self.pad_id = pad_id
        self.device = torch.device(device)
        self.eos_tensor = torch.tensor(self.eos_ids, dtype=torch.long, device=self.device)
        self.generator = generator
        self.processors = processors
        self.stop_fn = stop_fn
        self.row_stopping = row_stopping
        self.sampler_state: dict = {}
        P = max(len(p) for p in prompts)
        self.prompt_len = P
        total = P + max_new_tokens
        tokens = torch.full((self.batch_size, total), pad_id, dtype=torch.long)
        valid = torch.zeros((self.batch_size, total), dtype=torch.bool)
        for b, p in enumerate(prompts):
            if p:
                tokens[b, P - len(p):P] = torch.tensor(list(p), dtype=torch.long)
            valid[b, P - len(p):] = True
        self.tokens = tokens.repeat_interleave(rows_per_prompt, 0).to(self.device)
        self.valid = valid.repeat_interleave(rows_per_prompt, 0).to(self.device)
        self.pad_counts = (P - torch.tensor([len(p) for p in prompts])).repeat_interleave(rows_per_prompt).to(self.device)
        self.cur = P
        self.finished = torch.zeros(self.num_rows, dtype=torch.bool, device=self.device)
        self.gen_count = torch.zeros(self.num_rows, dtype=torch.long, device=self.device)
        self._lists: list[list[int]] | None = None
        self._counts = None

    # Views used by processors and samplers ----------------------------------------------------
    @property
    def generated_steps(self) -> int:
        return self.cur - self.prompt_len

    def generated_tensor(self) -> torch.Tensor:
        return self.tokens[:, self.prompt_len:self.cur]

    def row_lists(self) -> list[list[int]]:
        """Each row's real tokens (prompt and generated) as Python lists."""
        if self._lists is None:
            toks = self.tokens[:, :self.cur].tolist()
            valid = self.valid[:, :self.cur].tolist()
            self._lists = [[t for t, v in zip(tr, vr) if v] for tr, vr in zip(toks, valid)]
        return self._lists

    def presence(self, vocab_size: int) -> torch.Tensor:
        """(rows, vocab) True where the token occurs in the row."""
        idx = torch.where(self.valid[:, :self.cur], self.tokens[:, :self.cur], vocab_size)
        out = torch.zeros(self.num_rows, vocab_size + 1, dtype=torch.bool, device=self.device)
        out.scatter_(1, idx, True)
        return out[:, :vocab_size]

    def generated_counts(self, vocab_size: int) -> torch.Tensor:
        """(rows, vocab) how often each token was generated in the row (prompt tokens not counted)."""
        key = (self.cur, vocab_size)
        if self._counts is not None and self._counts[0] == key:
            return self._counts[1]
        gen = self.tokens[:, self.prompt_len:self.cur]
        steps = torch.arange(gen.shape[1], device=self.device)[None, :]
        idx = torch.where(steps < self.gen_count[:, None], gen, vocab_size)
        out = torch.zeros(self.num_rows, vocab_size + 1, dtype=torch.long, device=self.device)
        out.scatter_add_(1, idx, torch.ones_like(idx))
        self._counts = (key, out[:, :vocab_size])
        return self._counts[1]

    def generated_lengths(self) -> torch.Tensor:
        """(rows,) tokens generated so far in each row (a finished row stops counting)."""
        return self.gen_count

    def process(self, scores: torch.Tensor) -> torch.Tensor:
        for proc in self.processors:
            scores = proc(scores, self)
        return scores

    def row_generated(self) -> list[list[int]]:
        counts = self.gen_count.tolist()
        gen = self.tokens[:, self.prompt_len:self.cur].tolist()
        return [g[:c] for g, c in zip(gen, counts)]

    # Updates by the loop ----------------------------------------------------------------------
    def reorder(self, index: torch.Tensor) -> None:
        self.tokens = self.tokens.index_select(0, index)
        self.valid = self.valid.index_select(0, index)
        self.finished = self.finished.index_select(0, index)
        self.gen_count = self.gen_count.index_select(0, index)
        self._lists = None
        self._counts = None

    def append(self, tokens: torch.Tensor) -> None:
        if self.row_stopping:
            tokens = torch.where(self.finished, torch.full_like(tokens, self.pad_id), tokens)
        self.tokens[:, self.cur] = tokens
        self.gen_count += (~self.finished).long()
        self.cur += 1
        self._lists = None
        if not self.row_stopping:
            return
        if self.eos_ids:
            self.finished |= torch.isin(tokens, self.eos_tensor)
        if self.stop_fn is not None:
            finished = self.finished.tolist()
            hits = [r for r, gen in enumerate(self.row_generated()) if gen and not finished[r] and self.stop_fn(r, gen)]
            if hits:
                self.finished[torch.tensor(hits, device=self.device)] = True

    def done(self, check_rows: bool = True) -> bool:
        if self.cur - self.prompt_len >= self.max_new_tokens:
            return True
        return bool(self.row_stopping and check_rows and self.finished.all())


class FunctionBackend:
    """KerasHub's functional form: next(prompt, cache, index) -> (logits, hidden_states, cache)."""

    def __init__(self, next_fn, buffer: torch.Tensor, index: int, cache, hidden_states) -> None:
        self.next_fn = next_fn
        self.buffer = buffer
        self.index = index
        self.cache = cache
        self.hidden_states = hidden_states

    def _rows(self, x):
        """next()'s output with one row per sequence: a row per prompt (or one for all) is repeated for
        the prompt's beams / candidates, as KerasHub broadcasts it."""
        x = torch.as_tensor(x)
        rows, n = self.buffer.shape[0], x.shape[0]
        if n != rows:
            if n == 0 or rows % n:
                raise GenerationError(f"next() returned {n} rows for {rows} sequences; return one row per "
                                      "sequence or one per prompt.")
            x = x.repeat_interleave(rows // n, 0)
        return x

    def prefill(self, state, need_hidden):
        logits, hidden, self.cache = self.next_fn(self.buffer, self.cache, self.index)
        if need_hidden == "all":
            if self.hidden_states is None:
                if self.index > 0:
                    raise GenerationError("The contrastive sampler needs hidden_states of the prompt in the "
                                          "functional form.")
                hidden = None  # nothing before index 0
            else:
                hidden = self._rows(self.hidden_states)[:, :self.index]
        return self._rows(logits).float(), hidden

    def step(self, feed, slot, need_hidden):
        self.buffer[:, slot] = feed.to(self.buffer.dtype)
        logits, hidden, self.cache = self.next_fn(self.buffer, self.cache, slot + 1)
        if hidden is not None:
            hidden = self._rows(hidden)
            if hidden.dim() == 2:
                hidden = hidden[:, None]
        return self._rows(logits).float(), hidden

    def reorder(self, index):
        self.buffer = self.buffer.index_select(0, index)
        self.cache = map_tensors(self.cache, lambda t: t.index_select(0, index.to(t.device)))

    def close(self):
        pass


def map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


# The loop --------------------------------------------------------------------------------------------
def decode_steps(backend, sampler, state: DecodeState, check_every: int = 1) -> Iterator[DecodeState]:
    """The one decode loop. Yields the state after every committed step; the caller reads the
    result with sampler.finalize(state) once the iterator ends."""
    sampler.start(state)
    if state.max_new_tokens <= 0:
        return
    try:
        logits, hidden = backend.prefill(state, sampler.needs_hidden)
        step = 0
        while True:
            tokens, reorder = sampler.select(logits, hidden, state)
            if reorder is not None:
                state.reorder(reorder)
                backend.reorder(reorder)
                logits = logits.index_select(0, reorder)
                if hidden is not None:
                    hidden = hidden.index_select(0, reorder)
            if tokens is not None:
                state.append(tokens)
                step += 1
                yield state
                if state.done(check_rows=step % check_every == 0) or sampler.is_done(state):
                    break
            feed, slot = sampler.feed(tokens, logits, state)
            logits, hidden = backend.step(feed, slot, sampler.needs_hidden)
    finally:
        backend.close()


def eos_list(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(e) for e in eos_token_id]


# KerasHub functional form --------------------------------------------------------------------------
class _ForcedTokens:
    """KerasHub's `mask`: where it is True past `index`, the prompt's token is kept instead of a chosen
    one (scores -inf except that token, which gets 0, so beams add nothing for it)."""

    def __init__(self, prompt: torch.Tensor, mask: torch.Tensor, rows_per: int) -> None:
        self.prompt = prompt.repeat_interleave(rows_per, 0)
        self.mask = mask.repeat_interleave(rows_per, 0)

    def __call__(self, scores, state):
        pos = state.cur
        if pos >= self.mask.shape[1]:
            return scores
        forced = self.mask[:, pos].to(scores.device)
        if not bool(forced.any()):
            return scores
        only = torch.full_like(scores, float("-inf"))
        only.scatter_(1, self.prompt[:, pos:pos + 1].to(scores.device), 0.0)
        return torch.where(forced[:, None], only, scores)


def run_functional(sampler, next_fn, prompt, *, cache=None, index: int = 0, mask=None,
                   stop_token_ids=None, hidden_states=None, seed=None):
    """Drive `next_fn` with the same loop; returns `prompt` (batch, length) filled from `index` on, or
    with BeamSampler(return_all_beams=True) (every beam (batch, num_beams, length), best first, and their
    log-probabilities (batch, num_beams)). Where `mask` is True the prompt's token stays (KerasHub)."""
    prompt = torch.as_tensor(prompt)
    squeeze = prompt.dim() == 1
    if squeeze:
        prompt = prompt[None]
    prompt = prompt.clone().long()
    B, L = prompt.shape
    if isinstance(index, torch.Tensor):
        index = int(index)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= L:
        raise GenerationError(f"index must be in [0, {L}] for a prompt of length {L}, got {index!r}.")
    sampler.check(1)
    rows_per = sampler.rows_per_sequence(1)
    processors, stop_fn, eos = [], None, eos_list(stop_token_ids)
    if mask is not None:
        mask = torch.as_tensor(mask).bool().reshape(B, L).cpu()
        if bool(mask[:, index:].any()):
            processors.append(_ForcedTokens(prompt.cpu(), mask, rows_per))
            if eos and sampler.row_stopping:
                # A stop token the mask keeps is part of the prompt: it does not end the row (KerasHub).
                stops, kept = set(eos), mask.tolist()
                stop_fn = lambda r, gen: gen[-1] in stops and not kept[r // rows_per][index + len(gen) - 1]  # noqa: E731
                eos = []
    prompts = prompt[:, :index].tolist()
    generator = None
    if seed is not None:
        generator = torch.Generator(device=prompt.device)
        generator.manual_seed(int(seed))
    state = DecodeState(prompts=prompts, rows_per_prompt=rows_per, num_return_sequences=1,
                        max_new_tokens=L - index, eos_ids=eos, pad_id=0,
                        device=prompt.device, generator=generator, processors=processors, stop_fn=stop_fn,
                        row_stopping=sampler.row_stopping)
    buffer = prompt.repeat_interleave(rows_per, 0)
    if cache is not None and rows_per > 1:
        cache = map_tensors(cache, lambda t: t.repeat_interleave(rows_per, 0))
    if hidden_states is not None and rows_per > 1:
        hidden_states = torch.as_tensor(hidden_states).repeat_interleave(rows_per, 0)
    backend = FunctionBackend(next_fn, buffer, index, cache, hidden_states)
    for _ in decode_steps(backend, sampler, state):
        pass
    if getattr(sampler, "return_all_beams", False):
        beams, log_probs = sampler.all_beams(state)
        out = prompt[:, None].repeat(1, len(beams[0]), 1)
        for b, seqs in enumerate(beams):
            for j, seq in enumerate(seqs):
                if seq:
                    out[b, j, index:index + len(seq)] = torch.tensor(seq, dtype=out.dtype)
        return (out[0], log_probs[0]) if squeeze else (out, log_probs)
    out = prompt.clone()
    for b, seqs in enumerate(sampler.finalize(state)):
        seq = seqs[0]
        if seq:
            out[b, index:index + len(seq)] = torch.tensor(seq, dtype=out.dtype)
    return out[0] if squeeze else out
