"""Continuous batching: many requests decoded together, joining and leaving between steps.

    engine = BatchEngine(lm, max_batch=16)
    with engine:
        req = engine.submit(prompt_ids, GenerationConfig(max_new_tokens=64, temperature=0.8, seed=1), on_event)
        ...                                   # on_event(TokenEvent) is called from the engine thread
        engine.cancel(req)                    # its slot is free before the next step runs
        [completion] = engine.generate(prompt_ids, GenerationConfig(max_new_tokens=16, temperature=0))

The engine owns a Runner (runner.py) over a KV cache of `max_batch` rows and one background thread. Each
step of that thread:
  1. drops cancelled requests and admits queued ones into free slots (FIFO);
  2. prefills joining prompts, at most `prefill_chunk` prompt tokens in all per step (one forward for
     every joining row), so a long prompt is spread over several steps and running requests keep
     getting a token every step;
  3. runs ONE forward for every decoding slot, each row at its own position, then chooses every row's
     next token in one vectorised pass with that row's own sampling parameters;
  4. streams text deltas (never half a UTF-8 character, never a possible stop-string prefix) and
     frees the slots of finished requests at once.
Decoding rows are kept packed at the front of the cache (a leaving row is replaced by the last one),
so a decode step reads contiguous cache rows and its cost follows the number of running requests.

A seeded request draws from its own torch.Generator (seed + i for choice i) a fixed amount of noise
per step, so it produces the same text alone or beside any other requests. Beam search and
contrastive search need whole-batch bookkeeping and stay on the per-call engine (`lm.generate`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import GenerationError
from .config import GenerationConfig
from .engine import end_ids, resolve_sampler
from .processors import BadWords, MinNewTokens, NoRepeatNGram, PresenceFrequencyPenalty, RepetitionPenalty
from .row_sampling import apply_temperature, choose_tokens
from .samplers import GreedySampler, FilteringSampler
from .runner import Runner
from .stopping import StreamEmitter, TextTracker

log = logging.getLogger(__name__)
PREFIX_MIN = 8  # shared leading tokens worth copying a row's cache for


class QueueFull(GenerationError):
    """The engine's queue of waiting requests is full; retry later."""


class PromptTooLong(GenerationError):
    """The prompt plus the requested new tokens do not fit the engine's context."""


# Parameters and events ----------------------------------------------------------------------------
def SamplingParams(**fields) -> GenerationConfig:
    """A GenerationConfig from an OpenAI request's names (max_tokens=16 unless given, temperature 1 unless
    given, n, min_tokens, ...): GenerationConfig.from_openai."""
    fields.setdefault("max_tokens", 16)
    return GenerationConfig.from_openai(fields)


def _row_options(config: GenerationConfig) -> dict:
    """temperature (0: greedy), top_k, top_p and min_p of a config's sampler, as the rows are sampled here; the
    samplers that need whole-batch bookkeeping (beam, contrastive) or the other warpers are refused."""
    sampler = resolve_sampler(config)
    if isinstance(sampler, GreedySampler):
        return dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)
    if not isinstance(sampler, FilteringSampler):
        raise GenerationError(f"The {sampler.name} sampler is not available in the batch engine; use "
                              "LanguageModel.generate or gptgen generate.")
    for name, off in (("typical_p", 1.0), ("epsilon_cutoff", 0.0), ("eta_cutoff", 0.0), ("min_tokens_to_keep", 1)):
        if getattr(sampler, name) != off:
            raise GenerationError(f"{name} is not available in the batch engine; use LanguageModel.generate.")
    return dict(temperature=sampler.temperature, top_k=sampler.top_k or 0, top_p=sampler.top_p, min_p=sampler.min_p)


@dataclass
class TokenEvent:
    """One per generated token, then a final one (token_id None) that carries finish_reason."""
    index: int                        # choice index (0..n-1)
    token_id: int | None
    text: str                         # text delta; held back until a character completes and a
                                      # possible stop-string prefix is decided
    logprob: float | None
    top_logprobs: list[tuple[int, str, float]] | None   # (token id, token text, logprob)
    finish_reason: str | None         # None while running; "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Completion:
    """One finished choice, as BatchEngine.generate returns it."""
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, str, float]]] | None
    prompt_tokens: int
    completion_tokens: int


class Request:
    """A submitted prompt: its n choices share one prefill. Returned by BatchEngine.submit."""

    _next_id = 0
    _id_lock = threading.Lock()

    def __init__(self, prompt_ids: list[int], params: GenerationConfig, on_event) -> None:
        with Request._id_lock:
            Request._next_id += 1
            self.id = Request._next_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.on_event = on_event
        self.prompt_tokens = len(prompt_ids)
        self.prefilled = 0            # prompt tokens already in the cache
        self.cancelled = False
        self.n = params.num_return_sequences
        self.sampling = _row_options(params)
        # min_length counts the prompt, as in HF
        self.min_new_tokens = max(params.min_new_tokens, (params.min_length or 0) - len(prompt_ids))
        self.finish_reasons: list[str | None] = [None] * self.n
        self.done = threading.Event()  # set once every choice has finished
        self.submitted_at = time.monotonic()
        self.admitted_at: float | None = None   # given a row (queue time: admitted_at - submitted_at)
        self.prefilled_at: float | None = None  # its prompt in the cache (prefill time: - admitted_at)
        self.constraint = None                  # response_format compiled (grammar.Constraint) or None
        self.seqs: list[_Seq] = []

    def __repr__(self) -> str:
        return f"Request(id={self.id}, prompt_tokens={self.prompt_tokens}, n={self.n})"


class _Seq:
    """One choice of a request while it holds a cache row."""

    def __init__(self, request: Request, index: int, row: int, generator, tracker, stop_ids, bad_words) -> None:
        self.request = request
        # the row's response_format state (grammar.RowState) or None
        self.grammar = request.constraint.new_row() if request.constraint is not None else None
        self.params = request.params
        self.index = index
        self.row = row
        self.generator = generator
        self.tracker = tracker
        self.emitter = StreamEmitter()
        self.stop_ids = stop_ids
        self.bad_words = bad_words       # BadWords processor or None
        self.tokens: list[int] = []      # generated so far
        self.cache_len = 0               # positions of this row already written in the cache
        self.finish_reason: str | None = None

    @property
    def hist_len(self) -> int:
        return self.request.prompt_tokens + len(self.tokens)


class _RowsState:
    """The decode-state view the logits processors read, over the rows being sampled."""

    def __init__(self, engine: "BatchEngine", seqs: list[_Seq]) -> None:
        self.engine, self.seqs = engine, seqs
        self.num_rows = len(seqs)
        self.device = engine.device
        self._lists = None

    def _hist(self):
        rows = torch.tensor([s.row for s in self.seqs], device=self.device)
        lens = torch.tensor([s.hist_len for s in self.seqs], device=self.device)
        hist = self.engine._history.index_select(0, rows)
        return hist, lens

    def row_lists(self) -> list[list[int]]:
        if self._lists is None:
            self._lists = [s.request.prompt_ids + s.tokens for s in self.seqs]
        return self._lists

    def presence(self, vocab_size: int) -> torch.Tensor:
        hist, lens = self._hist()
        slots = torch.arange(hist.shape[1], device=self.device)
        idx = torch.where(slots[None] < lens[:, None], hist, vocab_size)
        out = torch.zeros(self.num_rows, vocab_size + 1, dtype=torch.bool, device=self.device)
        out.scatter_(1, idx, True)
        return out[:, :vocab_size]

    def generated_counts(self, vocab_size: int) -> torch.Tensor:
        hist, lens = self._hist()
        prompt = torch.tensor([s.request.prompt_tokens for s in self.seqs], device=self.device)
        slots = torch.arange(hist.shape[1], device=self.device)
        gen = (slots[None] >= prompt[:, None]) & (slots[None] < lens[:, None])
        out = torch.zeros(self.num_rows, vocab_size + 1, dtype=torch.long, device=self.device)
        out.scatter_add_(1, torch.where(gen, hist, vocab_size), torch.ones_like(hist))
        return out[:, :vocab_size]

    def generated_lengths(self) -> torch.Tensor:
        return torch.tensor([len(s.tokens) for s in self.seqs], device=self.device)


# The engine ---------------------------------------------------------------------------------------
def token_text(tokenizer, token_id: int) -> str:
    """The text of one token; "" for ids past the tokenizer's vocabulary (a model's embedding may be padded
    beyond it) or without a tokenizer."""
    if tokenizer is None or not 0 <= token_id < tokenizer.vocab_size:
        return ""
    return tokenizer.decode([token_id])


class BatchEngine:
    """Continuous batching over `max_batch` cache slots, stepped by one background thread."""

    def __init__(self, lm, *, max_batch: int = 16, max_queue: int = 256, prefill_chunk: int = 256,
                 max_context: int | None = None, device=None, logprobs_mode: str = "raw",
                 compile: bool | None = None, prefix_caching: bool = True) -> None:
        model = getattr(lm, "model", lm)
        self.lm = lm
        self.tokenizer = getattr(lm, "tokenizer", None)
        if device is not None:
            model.to(device)
        cfg = model.config
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("prefill_chunk", prefill_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GenerationError(f"{name} must be a positive integer, got {value!r}.")
        if logprobs_mode not in ("raw", "processed"):
            raise GenerationError(f"logprobs_mode must be 'raw' or 'processed', got {logprobs_mode!r}.")
        self.max_context = min(max_context or cfg.n_positions, cfg.n_positions)
        if self.max_context < 2:
            raise GenerationError(f"max_context must be at least 2, got {max_context!r}.")
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.logprobs_mode = logprobs_mode
        self.vocab_size = cfg.vocab_size
        eos = cfg.eos_token_id
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos = self.tokenizer.eos_token_id
        self.eos_id = eos
        # compile as everywhere (runner.select_backend): the native step where it runs, CUDA graphs per
        # bucketed batch size on CUDA, inductor on CPU with compile=True (the first steps compile: warm_up()).
        self.runner = Runner(model, max_batch, self.max_context, compile=compile, private=True)
        self.device = self.runner.device
        self.compile_cpu = self.runner.backend == "compiled" and not self.runner.graphs
        self._warmed_up = False
        self._history = torch.zeros(max_batch, self.max_context, dtype=torch.long, device=self.device)
        self._rows: list[_Seq | None] = [None] * max_batch
        self._n_dec = 0                        # rows 0.._n_dec-1 are decoding
        self._prefilling: list[Request] = []   # admitted, prompt not fully in the cache yet
        self._waiting: deque[Request] = deque()
        self._active: list[Request] = []       # admitted and not finished
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._token_text: dict[int, str] = {}
        self._stats = dict(steps=0, tokens_generated=0, prompt_tokens=0, requests_finished=0,
                           requests_cancelled=0, prefill_chunks=0, prefix_cache_queries=0, prefix_cache_hits=0,
                           prefix_tokens_reused=0)
        # Prefix caching: a new prompt that shares PREFIX_MIN+ leading tokens with a row's cache (a running
        # sequence, or a finished one whose free row has not been written since: _retired) starts from a copy
        # of that row's keys and values instead of recomputing them.
        self.prefix_caching = bool(prefix_caching)
        self._retired: dict[int, list[int]] = {}  # free row -> the tokens its cache still holds

    # Lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._closed:
                raise GenerationError("This BatchEngine is closed; create a new one.")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="gptgen-batcher", daemon=True)
                self._thread.start()

    def warm_up(self) -> float:
        """Compile the CPU decode step now, for every batch size up to max_batch, so no request waits for
        it; seconds spent. Call before start(). A no-op unless compile=True on CPU, and after the first call."""
        if not self.compile_cpu:
            return 0.0
        with self._lock:
            if self._thread is not None or self._active:
                raise GenerationError("warm_up() must run before the engine starts.")
        if self._warmed_up:
            return 0.0
        t0 = time.perf_counter()
        with self.runner.grad_mode:
            # Batch 1 gets a graph of its own, larger batches share graphs over ranges of sizes (inductor
            # guards them), so every size is stepped once; most reuse a graph. Largest first: a graph's GEMMs
            # are autotuned at the batch size that compiles it, and large batches are where the time goes
            # (fp32, 6-layer 384-wide: batch 24 took 8.5 ms a step tuned at 31 rows, 15.4 ms tuned at 2).
            # The rows write position 2 of free slots, rewritten before any row reads them (a row reads
            # only up to its own position); three attended slots, as lengths 1 and 2 get graphs of their own.
            for rows in range(self.max_batch, 0, -1):
                self.runner.warm_up(rows)
        self._warmed_up = True
        return time.perf_counter() - t0

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> "BatchEngine":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # Public calls (any thread) --------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: GenerationConfig,
               on_event: Callable[[TokenEvent], None]) -> Request:
        """Queue a prompt decoded with a GenerationConfig (checked when it was made); on_event gets its events."""
        prompt = self._check_prompt(prompt_ids)
        if not isinstance(params, GenerationConfig):
            raise GenerationError(f"submit() takes a GenerationConfig, got {type(params).__name__}.")
        n, new = params.num_return_sequences, params.max_new_tokens
        if n > self.max_batch:
            raise GenerationError(f"n ({n}) must not exceed the engine's max_batch of {self.max_batch}.")
        room = self.max_context - len(prompt)
        if new is None:
            if room < 1:
                raise PromptTooLong(f"The prompt has {len(prompt)} tokens and leaves no room in the context of "
                                    f"{self.max_context}.")
        elif len(prompt) + new > self.max_context:
            raise PromptTooLong(f"The prompt ({len(prompt)} tokens) plus max_tokens ({new}) exceeds "
                                f"the context of {self.max_context} tokens.")
        constraint = None
        if params.response_format is not None:  # compiled here, so a bad schema is the caller's error
            from .grammar import compile_constraint

            if self.tokenizer is None:
                raise GenerationError("response_format needs a tokenizer; pass a LanguageModel to the engine.")
            constraint = compile_constraint(self.tokenizer, params.response_format)
        if params.bad_words and self.tokenizer is None:
            raise GenerationError("bad_words needs a tokenizer; pass a LanguageModel to the engine.")
        bad = [t for t in end_ids(params, self.eos_id) if t >= self.vocab_size]
        if bad:
            raise GenerationError(f"stop_token_ids holds {bad[0]}, outside the model's vocabulary of {self.vocab_size}.")
        request = Request(prompt, params, on_event)
        request.constraint = constraint
        if self._thread is None:
            self.start()
        with self._lock:
            if self._closed:
                raise GenerationError("This BatchEngine is closed; create a new one.")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"The queue already holds {self.max_queue} waiting requests; retry later.")
            self._waiting.append(request)
            self._wake.notify()
        return request

    def cancel(self, request: Request) -> None:
        with self._lock:
            request.cancelled = True
            self._wake.notify()

    def generate(self, prompt_ids: Sequence[int], params: GenerationConfig | None = None,
                 timeout: float | None = None) -> list[Completion]:
        """Submit and wait: one Completion per choice, in choice order."""
        params = params or SamplingParams()
        parts: dict[int, list[TokenEvent]] = {}
        request = self.submit(prompt_ids, params, lambda ev: parts.setdefault(ev.index, []).append(ev))
        if not request.done.wait(timeout):
            self.cancel(request)
            request.done.wait()
        out = []
        for i in range(request.n):
            evs = parts.get(i, [])
            toks = [e for e in evs if e.token_id is not None]
            final = evs[-1]
            out.append(Completion(
                index=i, text="".join(e.text for e in evs), token_ids=[e.token_id for e in toks],
                finish_reason=final.finish_reason, logprobs=None if params.logprobs is None else [e.logprob for e in toks],
                top_logprobs=None if params.logprobs is None else [e.top_logprobs for e in toks],
                prompt_tokens=final.prompt_tokens, completion_tokens=final.completion_tokens))
        return out

    def stats(self) -> dict:
        with self._lock:
            out = dict(self._stats)
            out.update(queue_depth=len(self._waiting), active_slots=sum(r is not None for r in self._rows),
                       max_batch=self.max_batch)
        return out

    # Checks -------------------------------------------------------------------------------------------------
    def _check_prompt(self, prompt_ids) -> list[int]:
        try:
            prompt = [int(t) for t in prompt_ids]
        except (TypeError, ValueError):
            raise GenerationError("The prompt must be a list of token ids.") from None
        if not prompt:
            raise GenerationError("The prompt has no tokens; give it text or a BOS token.")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise GenerationError(f"Prompt token id {bad[0]} is outside the model's vocabulary of {self.vocab_size}.")
        return prompt

    # The engine thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        with self.runner.grad_mode:
            while True:
                with self._lock:
                    while not self._closed and not self._waiting and not self._active:
                        self._wake.wait()
                    if self._closed:
                        break
                    cancelled = [r for r in self._active if r.cancelled]
                    dropped = [r for r in self._waiting if r.cancelled]
                    for req in dropped:
                        self._waiting.remove(req)
                    admitted = self._admit_locked()
                for req in dropped:  # callbacks run outside the lock: they may call cancel() or stats()
                    self._finish_request_unadmitted(req)
                try:
                    self._step(cancelled, admitted)
                except Exception:  # a bug must not hang the clients: end every request
                    log.exception("continuous-batching step failed")
                    self._fail_all()
            self._fail_all(reason="cancelled")

    def _admit_locked(self) -> list[Request]:
        """Move waiting requests into free rows (FIFO), reserving one row per choice."""
        admitted = []
        free = [r for r in range(self.max_batch - 1, self._n_dec - 1, -1) if self._rows[r] is None]
        while self._waiting and len(free) >= self._waiting[0].n:
            req = self._waiting.popleft()
            req.admitted_at = time.monotonic()
            length, source = self._longest_prefix(req.prompt_ids) if self.prefix_caching else (0, None)
            if source in free:  # a finished sequence's row: take it, its cache is already in place
                free.remove(source)
                free.insert(0, source)
            rows = [free.pop(0) for _ in range(req.n)]  # highest rows first: fewer swaps later
            for row in rows:
                self._retired.pop(row, None)
            req.seqs = [self._new_seq(req, i, row) for i, row in enumerate(rows)]
            for seq in req.seqs:
                self._rows[seq.row] = seq
            if length:
                self.runner.move_row(source, rows[0], length)
                req.prefilled = req.seqs[0].cache_len = length
                self._stats["prefix_cache_hits"] += 1
                self._stats["prefix_tokens_reused"] += length
            self._active.append(req)
            admitted.append(req)
        return admitted

    def _longest_prefix(self, prompt: list[int]) -> tuple[int, int | None]:
        """(tokens, row): the longest run of the prompt's leading tokens whose keys and values a row holds
        (the prompt's last token is always computed: its logits choose the first new token)."""
        self._stats["prefix_cache_queries"] += 1
        best, source = 0, None
        candidates = [(row, toks) for row, toks in self._retired.items()]
        candidates += [(s.row, (s.request.prompt_ids + s.tokens)[:s.cache_len]) for s in self._rows if s is not None]
        limit = len(prompt) - 1
        for row, toks in candidates:
            n = min(limit, len(toks))
            if n <= best:
                continue
            common = 0
            while common < n and toks[common] == prompt[common]:
                common += 1
            if common > best:
                best, source = common, row
        return (best, source) if best >= PREFIX_MIN else (0, None)

    def _new_seq(self, req: Request, index: int, row: int) -> _Seq:
        p = req.params
        generator = None
        if p.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed((p.seed + index) % (2 ** 64))
        stop_ids = set(end_ids(p, self.eos_id))
        tracker = (TextTracker(self.tokenizer, req.prompt_ids, p.stop, include_stop=p.include_stop_str_in_output)
                   if self.tokenizer is not None else None)
        bad = None
        # as transformers: a banned single token that ends the sequence stays allowed
        words = [ids for ids in (self.tokenizer.encode(w) for w in p.bad_words or ()) if ids]
        words += [list(ids) for ids in p.bad_words_ids or ()]
        words = [ids for ids in words if not (len(ids) == 1 and ids[0] in stop_ids)]
        if words:
            bad = BadWords(words, self.vocab_size)
        return _Seq(req, index, row, generator, tracker, stop_ids, bad)

    def _step(self, cancelled: list[Request], admitted: list[Request]) -> None:
        for req in cancelled:
            self._end_request(req, "cancelled")
        for req in admitted:
            P = req.prompt_tokens
            prompt = torch.tensor(req.prompt_ids, device=self.device)
            for seq in req.seqs:
                self._history[seq.row, :P] = prompt
            self._prefilling.append(req)
        ran = False
        if self._prefilling:
            self._prefill_chunk()
            ran = True
        if self._n_dec:
            seqs = self._rows[:self._n_dec]
            idx = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)
            pos = torch.tensor([[s.cache_len] for s in seqs], device=self.device)
            logits = self.runner.forward(idx, pos)
            for s in seqs:
                s.cache_len += 1
            self._sample_and_commit(logits, list(seqs))
            ran = True
        if ran:
            with self._lock:
                self._stats["steps"] += 1

    def _prefill_chunk(self) -> None:
        """One forward over the next prompt chunk of each joining request, prefill_chunk tokens at most."""
        parts = []  # (request, start, end); rows are padded to the longest, so the budget counts padding
        T = 0
        for req in self._prefilling:
            start = req.prefilled
            if not parts:
                end = min(req.prompt_tokens, start + self.prefill_chunk)
            else:
                end = min(req.prompt_tokens, start + T)
                if (len(parts) + 1) * max(T, end - start) > self.prefill_chunk:
                    break
            parts.append((req, start, end))
            T = max(T, end - start)
        idx = torch.zeros(len(parts), T, dtype=torch.long)
        pos = torch.zeros(len(parts), T, dtype=torch.long)
        last = []
        for i, (req, start, end) in enumerate(parts):
            n = end - start
            idx[i, :n] = torch.tensor(req.prompt_ids[start:end])
            # padding continues the positions (its writes land past the prompt, rewritten before read)
            pos[i] = torch.arange(start, start + T).clamp(max=self.max_context - 1)
            last.append(n - 1)
        rows = torch.tensor([req.seqs[0].row for req, _, _ in parts], device=self.device)
        logits = self.runner.forward(idx.to(self.device), pos.to(self.device), rows=rows,
                                    last=torch.tensor(last, device=self.device))
        with self._lock:
            self._stats["prefill_chunks"] += 1
            self._stats["prompt_tokens"] += sum(end - start for _, start, end in parts)
        joined_logits, joined = [], []
        for req, start, end in parts:  # every row's cache length first: joining rows swap places below
            req.prefilled = end
            req.seqs[0].cache_len = end
        for i, (req, start, end) in enumerate(parts):
            if end < req.prompt_tokens:
                continue
            self._prefilling.remove(req)
            lead = req.seqs[0]
            for seq in req.seqs[1:]:  # the other choices start from a copy of the prompt's cache
                self.runner.move_row(lead.row, seq.row, end)
                seq.cache_len = end
            for seq in req.seqs:
                self._join_decoding(seq)
                joined.append(seq)
                joined_logits.append(logits[i])
        if joined:
            self._sample_and_commit(torch.stack(joined_logits), joined)

    def _join_decoding(self, seq: _Seq) -> None:
        """Move a row that finished its prefill to the end of the packed decoding rows."""
        if seq.request.prefilled_at is None:
            seq.request.prefilled_at = time.monotonic()
        target = self._n_dec
        other = self._rows[target]
        self._retired.pop(target, None)  # written below
        if other is not seq:
            if other is None:
                self.runner.move_row(seq.row, target, seq.cache_len)
                self._history[target] = self._history[seq.row]
            else:
                self.runner.swap_rows(seq.row, target, max(seq.cache_len, other.cache_len))
                self._history[[seq.row, target]] = self._history[[target, seq.row]]
                other.row = seq.row
                self._rows[seq.row] = other
            if other is None:
                self._rows[seq.row] = None
            self._rows[target] = seq
            seq.row = target
        self._n_dec += 1

    # Choosing tokens ----------------------------------------------------------------------------------------
    def _process(self, scores: torch.Tensor, seqs: list[_Seq], state: _RowsState) -> torch.Tensor:
        """The logits processors of generation/processors.py with one value per row (off: the neutral one)."""
        ps = [s.params for s in seqs]
        if any(p.repetition_penalty != 1.0 for p in ps):
            scores = RepetitionPenalty(tuple(p.repetition_penalty for p in ps))(scores, state)
        if any(p.presence_penalty or p.frequency_penalty for p in ps):
            scores = PresenceFrequencyPenalty(tuple(p.presence_penalty for p in ps),
                                              tuple(p.frequency_penalty for p in ps))(scores, state)
        if any(p.no_repeat_ngram_size for p in ps):
            scores = NoRepeatNGram(tuple(p.no_repeat_ngram_size for p in ps))(scores, state)
        if any(s.bad_words is not None for s in seqs):
            scores = scores.clone()
        for r, s in enumerate(seqs):
            if s.bad_words is not None:
                scores[r:r + 1] = s.bad_words(scores[r:r + 1], _OneRow(state.row_lists()[r]))
        short = [s for s in seqs if len(s.tokens) < s.request.min_new_tokens]
        for stop_ids in {frozenset(s.stop_ids) for s in short}:  # rows that share a stop set, together
            mins = tuple(s.request.min_new_tokens if frozenset(s.stop_ids) == stop_ids else 0 for s in seqs)
            scores = MinNewTokens(mins, sorted(stop_ids))(scores, state)
        if any(s.grammar is not None for s in seqs):  # response_format rows: their masks
            from .grammar import GrammarProcessor

            scores = GrammarProcessor([s.grammar for s in seqs])(None, scores.clone())
        return scores

    def _sample_and_commit(self, logits: torch.Tensor, seqs: list[_Seq]) -> None:
        """Choose and commit every row's next token. A row fails alone: non-finite scores, a token outside the
        vocabulary or an error while its scores are processed end that choice with finish_reason "error" and
        leave the other rows as they are (an error in the vectorised pass is narrowed down row by row)."""
        try:
            picks = self._choose(logits, seqs)
        except Exception:
            if len(seqs) > 1:
                for r, seq in enumerate(seqs):
                    self._sample_and_commit(logits[r:r + 1], [seq])
                return
            log.exception("request %s failed while choosing its next token", seqs[0].request.id)
            picks = [None]
        for seq, pick in zip(seqs, picks):
            if pick is None:
                self._finish_seq(seq, "error")
            else:
                self._commit(seq, *pick)
        self._release_finished(seqs)

    def _choose(self, logits: torch.Tensor, seqs: list[_Seq]) -> list[tuple | None]:
        """(token, logprob, top logprobs) per row; None for a row that cannot go on."""
        ps = [s.params for s in seqs]
        dev = self.device
        state = _RowsState(self, seqs)
        want_lp = any(p.logprobs is not None for p in ps)
        logprobs = torch.log_softmax(logits, dim=-1) if want_lp and self.logprobs_mode == "raw" else None
        scores = self._process(logits, seqs, state)
        # A row's maximum is NaN or +inf when any score is, -inf when every token is banned: one reduction.
        broken = ~torch.isfinite(scores.amax(dim=-1))
        broken_rows = broken.tolist()
        if any(broken_rows):
            log.warning("%d row(s) have no finite scores; ending them with an error", sum(broken_rows))
            scores = scores.masked_fill(broken[:, None], 0.0)  # something to choose from; dropped below
        rows = [s.request.sampling for s in seqs]
        temps = [r["temperature"] for r in rows]
        if want_lp and logprobs is None:  # "processed": after penalties and temperature, before filters
            logprobs = torch.log_softmax(apply_temperature(scores, torch.tensor(temps, device=dev)), dim=-1)
        tokens = choose_tokens(scores, temperature=temps, top_k=[r["top_k"] for r in rows],
                               top_p=[r["top_p"] for r in rows], min_p=[r["min_p"] for r in rows],
                               generators=[sq.generator for sq in seqs])
        chosen_lp = top = None
        if want_lp:
            chosen_lp = logprobs.gather(1, tokens[:, None].clamp(0, logprobs.shape[-1] - 1))[:, 0].tolist()
            k = max(p.logprobs or 0 for p in ps)
            if k:
                vals, ids = torch.topk(logprobs, k, dim=-1)
                top = (vals.tolist(), ids.tolist())
        out = []
        for r, (seq, tok) in enumerate(zip(seqs, tokens.tolist())):
            if broken_rows[r] or not 0 <= tok < self.vocab_size:
                out.append(None)
                continue
            lp = tl = None
            if seq.params.logprobs is not None:
                lp = chosen_lp[r]
                n = seq.params.logprobs
                tl = [(i, self._text_of(i), v) for v, i in zip(top[0][r][:n], top[1][r][:n])] if n else []
            out.append((tok, lp, tl))
        return out

    def _text_of(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = token_text(self.tokenizer, token_id)
            self._token_text[token_id] = text
        return text

    def _commit(self, seq: _Seq, token: int, logprob, top_logprobs) -> None:
        seq.tokens.append(token)
        hist = seq.hist_len
        if hist - 1 < self.max_context:
            self._history[seq.row, hist - 1] = token
        p = seq.params
        reason = None
        grammar = seq.grammar
        if grammar is not None and token not in seq.stop_ids:
            grammar.accept(token)
        if token in seq.stop_ids:
            reason = "stop"
        elif grammar is not None and grammar.is_finished():
            reason = "stop"  # the response_format's text is complete
        elif seq.tracker is not None and p.stop and seq.tracker.stop_hit(seq.tokens):
            reason = "stop"
        elif (p.max_new_tokens is not None and len(seq.tokens) >= p.max_new_tokens) or hist >= self.max_context:
            reason = "length"
        text = ""
        if seq.tracker is not None:
            text = seq.emitter.piece(seq.tracker.safe(seq.tokens, False)) if reason is None else ""
        with self._lock:
            self._stats["tokens_generated"] += 1
        self._emit(seq, TokenEvent(seq.index, token, text, logprob, top_logprobs, None,
                                   seq.request.prompt_tokens, len(seq.tokens)))
        if reason is not None:
            self._finish_seq(seq, reason)

    def _emit(self, seq: _Seq, event: TokenEvent) -> None:
        try:
            seq.request.on_event(event)
        except Exception:  # a broken consumer ends its own request, never the engine
            log.exception("on_event of request %s raised; cancelling it", seq.request.id)
            seq.request.cancelled = True

    def _finish_seq(self, seq: _Seq, reason: str) -> None:
        if seq.finish_reason is not None:
            return
        seq.finish_reason = reason
        text = ""
        if seq.tracker is not None:
            text = seq.emitter.piece(seq.tracker.final(seq.tokens))
        self._emit(seq, TokenEvent(seq.index, None, text, None, None, reason,
                                   seq.request.prompt_tokens, len(seq.tokens)))
        req = seq.request
        req.finish_reasons[seq.index] = reason
        if all(r is not None for r in req.finish_reasons):
            with self._lock:
                if req in self._active:
                    self._active.remove(req)
                self._stats["requests_finished"] += 1
                if reason == "cancelled":
                    self._stats["requests_cancelled"] += 1
            req.done.set()

    def _release_finished(self, seqs: list[_Seq]) -> None:
        """Free the rows of finished sequences, keeping the decoding rows packed."""
        gone = sorted((s.row for s in seqs if s.finish_reason is not None and s.row >= 0), reverse=True)
        for row in gone:
            self._free_row(row)

    def _free_row(self, row: int) -> None:
        seq = self._rows[row]
        seq.row = -1
        if row < self._n_dec:
            last = self._n_dec - 1
            if row != last:
                moved = self._rows[last]
                if self.prefix_caching:  # swap: the finished sequence's cache stays usable in row `last`
                    self.runner.swap_rows(last, row, max(moved.cache_len, seq.cache_len))
                    self._history[[row, last]] = self._history[[last, row]]
                else:
                    self.runner.move_row(last, row, moved.cache_len)
                    self._history[row] = self._history[last]
                moved.row = row
                self._rows[row] = moved
                row = last
            self._n_dec -= 1
        if self.prefix_caching and seq.cache_len >= PREFIX_MIN:
            self._retired[row] = (seq.request.prompt_ids + seq.tokens)[:seq.cache_len]
        with self._lock:
            self._rows[row] = None

    def _end_request(self, req: Request, reason: str) -> None:
        if req in self._prefilling:
            self._prefilling.remove(req)
        seqs = [s for s in req.seqs if s.row >= 0]
        for seq in req.seqs:
            self._finish_seq(seq, reason)
        for row in sorted((s.row for s in seqs), reverse=True):
            self._free_row(row)

    def _finish_request_unadmitted(self, req: Request) -> None:
        for i in range(req.n):
            req.finish_reasons[i] = "cancelled"
            try:
                req.on_event(TokenEvent(i, None, "", None, None, "cancelled", req.prompt_tokens, 0))
            except Exception:
                log.exception("on_event of request %s raised", req.id)
        with self._lock:
            self._stats["requests_finished"] += 1
            self._stats["requests_cancelled"] += 1
        req.done.set()

    def _fail_all(self, reason: str = "error") -> None:
        for req in list(self._active):
            try:
                self._end_request(req, reason)
            except Exception:
                log.exception("ending request %s failed", req.id)
        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
            self._active.clear()
        for req in waiting:
            self._finish_request_unadmitted(req)
        self._prefilling.clear()
        self._rows = [None] * self.max_batch
        self._n_dec = 0


class _OneRow:
    def __init__(self, tokens: list[int]) -> None:
        self._tokens = tokens

    def row_lists(self):
        return [self._tokens]
