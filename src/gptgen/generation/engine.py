"""The decode engine: one loop for every sampler, over a static KV cache or a user's next() function.

    prefill the (left-padded) prompts -> logits
    repeat: sampler.select -> reorder rows (beam / contrastive) -> commit tokens -> stop rows
            sampler.feed -> one model step for the fed tokens -> logits

Rows are prompts times the sampler's rows per prompt (num_return_sequences, beams, or contrastive
candidates). Left padding is masked out of attention and positions count real tokens only, so a
prompt gives the same tokens alone or in a batch. On CUDA the one-token decode step is compiled with
torch.compile(mode="reduce-overhead") (CUDA graphs) over a cache kept between calls; the first call
compiles, later calls of the same batch shape replay it.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Iterator, Sequence

import torch

from ..errors import GenerationError
from .loop import DecodeState, FunctionBackend, decode_steps, eos_list, run_functional  # noqa: F401
from .processors import build_processors
from .runner import Runner, check_compile, require_cxx_compiler  # noqa: F401
from .samplers import (BeamSampler, ContrastiveSampler, GreedySampler, RandomSampler, Sampler, TopKSampler,
                       TopPSampler, _check_fraction, _check_min_tokens_to_keep, _check_temperature, get_sampler)
from .stopping import StreamEmitter, TextTracker, normalize_stop

DEFAULT_MAX_NEW_TOKENS = 50


# Backends: where logits come from ---------------------------------------------------------------
class ModelBackend:
    """The decode loop's view of a gptgen GPT: a Runner (runner.py) over the left-padded rows."""

    def __init__(self, model, compile: bool | None = None) -> None:
        check_compile(compile)
        self.model, self.compile_option = model, compile
        self.device = model.embed.wte.weight.device
        # grad mode only: no_grad where a step may be compiled (CUDA graphs refuse inference tensors)
        self.compile = (self.device.type == "cuda") if compile is None else compile
        self.runner: Runner | None = None

    @property
    def native(self):
        return self.runner.native if self.runner is not None else None

    def prefill(self, state: DecodeState, need_hidden):
        P = state.prompt_len
        self.runner = Runner(self.model, state.num_rows, P + state.max_new_tokens, compile=self.compile_option)
        self.runner.start_padded(state.valid[:, :P].long(), state.pad_counts)
        return self.runner.forward_padded(state.tokens[:, :P], 0, hidden=True, last_only=need_hidden != "all",
                                          prefill=True)

    def step(self, feed: torch.Tensor, slot: int, need_hidden):
        return self.runner.forward_padded(feed[:, None], slot, hidden=need_hidden)

    def reorder(self, index: torch.Tensor) -> None:
        self.runner.copy_rows(index)

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()


# Token-level API -----------------------------------------------------------------------------------
def resolve_sampler(sampler=None, *, do_sample=None, temperature=None, top_k=None, top_p=None, num_beams=None,
                    length_penalty=1.0, early_stopping=False, penalty_alpha=None, min_p=None, typical_p=None,
                    epsilon_cutoff=None, eta_cutoff=None, min_tokens_to_keep=None) -> Sampler:
    """Map KerasHub (`sampler=`) and HF (`do_sample`, `top_k`, ...) options onto one sampler."""
    temperature = _check_temperature(temperature) if temperature is not None else None
    if length_penalty is not None and (isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float))
                                       or not math.isfinite(length_penalty)):
        raise GenerationError(f"length_penalty must be a finite number, got {length_penalty!r}.")
    if penalty_alpha is not None:
        _check_fraction(penalty_alpha, "penalty_alpha", low_open=False, high_open=False)
    # transformers' warpers: checked whatever the sampler, passed to the drawing samplers.
    warpers = dict(min_p=_check_fraction(min_p, "min_p", low_open=False, high_open=False),
                   typical_p=_check_fraction(typical_p, "typical_p", high_open=False),
                   epsilon_cutoff=_check_fraction(epsilon_cutoff, "epsilon_cutoff", low_open=False),
                   eta_cutoff=_check_fraction(eta_cutoff, "eta_cutoff", low_open=False),
                   min_tokens_to_keep=(None if min_tokens_to_keep is None
                                       else _check_min_tokens_to_keep(min_tokens_to_keep)))
    warpers = {k: v for k, v in warpers.items() if v is not None}
    if num_beams is not None and (isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1):
        raise GenerationError(f"num_beams must be a positive integer, got {num_beams!r}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise GenerationError(f"top_k must be a positive integer (0 turns it off), got {top_k!r}.")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise GenerationError(f"top_p must be in (0, 1], got {top_p!r}.")
    temp = 1.0 if temperature is None else float(temperature)
    if isinstance(sampler, Sampler):
        return sampler
    if sampler is not None:
        if not isinstance(sampler, str):
            raise GenerationError(f"sampler must be a name or a Sampler instance, got {type(sampler).__name__}.")
        name = sampler.lower().replace("-", "_")
        if name == "greedy":
            return GreedySampler()
        if name == "random":
            return RandomSampler(temperature=temp, **warpers)
        if name == "top_k":
            return TopKSampler(k=5 if top_k is None else top_k, temperature=temp, **warpers)
        if name == "top_p":
            return TopPSampler(p=0.1 if top_p is None else top_p, k=top_k or None, temperature=temp, **warpers)
        if name == "beam":  # a named sampler takes the temperature, as KerasHub's sampler objects do
            return BeamSampler(num_beams=num_beams or 5, length_penalty=length_penalty, early_stopping=early_stopping,
                               temperature=temp)
        if name == "contrastive":
            return ContrastiveSampler(k=5 if top_k is None else top_k,
                                      alpha=0.6 if penalty_alpha is None else penalty_alpha, temperature=temp)
        return get_sampler(sampler)  # raises the unknown-name error
    if num_beams is not None and num_beams > 1:
        if do_sample:
            raise GenerationError("Beam sampling (do_sample with num_beams > 1) is not supported; drop one of them.")
        return BeamSampler(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping)
    if temperature == 0:
        return GreedySampler()
    if penalty_alpha is not None and penalty_alpha > 0 and top_k is not None and top_k > 1 and not do_sample:
        return ContrastiveSampler(k=top_k, alpha=penalty_alpha)
    sampling = do_sample if do_sample is not None else any(
        v is not None for v in (temperature, top_k, top_p, min_p, typical_p, epsilon_cutoff, eta_cutoff))
    if not sampling:
        return GreedySampler()
    k = 50 if top_k is None else (top_k or None)  # HF: top_k defaults to 50, 0 turns it off
    p = 1.0 if top_p is None else float(top_p)
    if p < 1.0:
        return TopPSampler(p=p, k=k, temperature=temp, **warpers)
    if k:
        return TopKSampler(k=k, temperature=temp, **warpers)
    return RandomSampler(temperature=temp, **warpers)


class _Run:
    """Everything generate_ids needs once options are checked: built by _prepare, run by _iterate."""


def _prepare(model, input_ids, *, max_length=None, max_new_tokens=None, sampler=None, do_sample=None,
             temperature=None, top_k=None, top_p=None, num_beams=None, length_penalty=1.0, early_stopping=False,
             penalty_alpha=None, no_repeat_ngram_size=0, repetition_penalty=1.0, bad_words_ids=None,
             min_new_tokens=0, eos_token_id=None, num_return_sequences=1, seed=None, truncate_prompt=False,
             pad_token_id=None, compile=None, stop_fn_factory=None, min_length=None, min_p=None, typical_p=None,
             epsilon_cutoff=None, eta_cutoff=None, min_tokens_to_keep=None) -> _Run:
    if not input_ids:
        raise GenerationError("The prompt list is empty; pass at least one prompt.")
    prompts = [[int(t) for t in p] for p in input_ids]
    if any(len(p) == 0 for p in prompts):
        raise GenerationError("A prompt has no tokens; give it text or a BOS token.")
    cfg = model.config
    vocab = cfg.vocab_size
    for p in prompts:
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"Prompt token id {bad[0]} is outside the model's vocabulary of {vocab}.")
    if isinstance(num_return_sequences, bool) or not isinstance(num_return_sequences, int) or num_return_sequences < 1:
        raise GenerationError(f"num_return_sequences must be a positive integer, got {num_return_sequences!r}.")
    chosen = resolve_sampler(sampler, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                             num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                             penalty_alpha=penalty_alpha, min_p=min_p, typical_p=typical_p,
                             epsilon_cutoff=epsilon_cutoff, eta_cutoff=eta_cutoff,
                             min_tokens_to_keep=min_tokens_to_keep)
    chosen.check(num_return_sequences)
    ctx = cfg.n_positions
    if max_new_tokens is not None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}.")
        new = max_new_tokens
    elif max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise GenerationError(f"max_length must be a positive integer, got {max_length!r}.")
        new = None
    else:
        new = DEFAULT_MAX_NEW_TOKENS
    longest = max(len(p) for p in prompts)
    if longest >= ctx or (truncate_prompt and new is not None and longest + new > ctx):
        if not truncate_prompt:
            raise GenerationError(
                f"A prompt of {longest} tokens leaves no room in the model's context of {ctx} tokens; "
                "shorten it or pass truncate_prompt=True to keep its end."
            )
        # Keep at least half the context for the prompt: a budget of new tokens as large as the context
        # would otherwise cut the prompt down to one token; the budget shrinks to fit instead.
        room = max(1, min(new if new is not None else 1, ctx // 2))
        prompts = [p[-(ctx - room):] for p in prompts]
        longest = max(len(p) for p in prompts)
    if new is None:
        new = max(0, min(max_length, ctx) - longest)
    new = min(new, ctx - longest)
    eos = eos_list(eos_token_id if eos_token_id is not None else cfg.eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None
                                                         else (eos[0] if eos else 0))
    if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int) or min_new_tokens < 0:
        raise GenerationError(f"min_new_tokens must be a non-negative integer, got {min_new_tokens!r}.")
    bad_eos = [e for e in eos if not 0 <= e < vocab]
    if bad_eos:
        raise GenerationError(f"eos_token_id {bad_eos[0]} is outside the model's vocabulary of {vocab}.")
    if min_length is not None:
        if isinstance(min_length, bool) or not isinstance(min_length, int) or min_length < 0:
            raise GenerationError(f"min_length must be a non-negative integer, got {min_length!r}.")
        # HF counts prompt + generated tokens; per row, so a prompt's padding in a batch does not count.
        per_prompt = [max(min_new_tokens, min_length - len(p)) for p in prompts]
        rows_per_min = chosen.rows_per_sequence(num_return_sequences)
        per_row = tuple(m for m in per_prompt for _ in range(rows_per_min))
        min_new_tokens = per_row[0] if len(set(per_row)) == 1 else per_row
    procs = build_processors(repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                             bad_words_ids=bad_words_ids, min_new_tokens=min_new_tokens, eos_ids=eos,
                             vocab_size=vocab)
    if not 0 <= pad < vocab:
        raise GenerationError(f"pad_token_id {pad} is outside the model's vocabulary of {vocab}.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not -2**63 <= int(seed) < 2**64):
        raise GenerationError(f"seed must be an integer of at most 64 bits, got {seed!r}.")
    device = model.embed.wte.weight.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed))
    run = _Run()
    run.model, run.sampler, run.prompts = model, chosen, prompts
    rows_per = chosen.rows_per_sequence(num_return_sequences)
    stop_fn = stop_fn_factory(prompts, rows_per) if stop_fn_factory is not None else None
    run.state = DecodeState(prompts=prompts, rows_per_prompt=rows_per, num_return_sequences=num_return_sequences,
                            max_new_tokens=new, eos_ids=eos, pad_id=pad, device=device, generator=generator,
                            processors=procs, stop_fn=stop_fn, row_stopping=chosen.row_stopping)
    run.backend = ModelBackend(model, compile=compile)
    run.check_every = 1 if device.type == "cpu" else 8
    return run


def _iterate(run: _Run) -> Iterator[DecodeState]:
    # Only the modules in training mode switch to eval and back (model.eval()/train() set every module's
    # flag: ~1 ms a call for GPT-2's ~150 modules, a few percent of a short generation).
    training = [m for m in run.model.modules() if m.training]
    for m in training:
        m.training = False
    # CUDA graphs are captured under no_grad (inference tensors would tie the graph to inference mode).
    grad_off = torch.no_grad() if run.backend.compile else torch.inference_mode()
    try:
        with grad_off:
            yield from decode_steps(run.backend, run.sampler, run.state, run.check_every)
    finally:
        for m in training:
            m.training = True


def _finalize(run: _Run) -> list[list[list[int]]]:
    """Generated tokens per prompt and returned sequence, each ending at (and including) its EOS."""
    out = run.sampler.finalize(run.state)
    eos = set(run.state.eos_ids)
    trimmed = []
    for seqs in out:
        row = []
        for seq in seqs:
            for i, t in enumerate(seq):
                if t in eos:
                    seq = seq[:i + 1]
                    break
            row.append(seq)
        trimmed.append(row)
    return trimmed


def generate_ids(model, input_ids: Sequence[Sequence[int]], **options) -> list[list[int]]:
    """New tokens for each prompt (ids, no padding): num_return_sequences lists per prompt, flattened."""
    run = _prepare(model, input_ids, **options)
    for _ in _iterate(run):
        pass
    return [seq for seqs in _finalize(run) for seq in seqs]


# Text-level API ------------------------------------------------------------------------------------
_TEXT_ONLY = ("bad_words", "stop", "add_bos", "include_prompt", "skip_special_tokens", "callback")


def _text_run(lm, prompts: list[str], *, bad_words=None, bad_words_ids=None, stop=None, add_bos=None,
              eos_token_id=None, skip_special_tokens=True, **options):
    tok = lm.tokenizer
    for p in prompts:
        if not isinstance(p, str):
            raise GenerationError(f"Prompts must be strings, got {type(p).__name__}.")
    if add_bos is None:
        add_bos = bool(lm.config.extra.get("add_bos", False))
    ids = tok.encode_batch(prompts, add_bos=add_bos)
    fallback = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    for i, p in enumerate(ids):
        if not p:
            if fallback is None:
                raise GenerationError("An empty prompt needs a BOS or EOS token to start from, and this tokenizer has neither.")
            ids[i] = [fallback]
    bad = [list(b) for b in (bad_words_ids or [])]
    if bad_words:
        if isinstance(bad_words, str):
            bad_words = [bad_words]
        for word in bad_words:
            enc = tok.encode(word)
            if not enc:
                raise GenerationError(f"The banned word {word!r} encodes to no tokens.")
            bad.append(enc)
    if eos_token_id is None:
        eos_token_id = tok.eos_token_id if tok.eos_token_id is not None else lm.config.eos_token_id
    stops = normalize_stop(stop)
    trackers: list[TextTracker] = []

    def stop_factory(final_prompts, rows_per):
        trackers.extend(TextTracker(tok, p, stops, skip_special_tokens) for p in final_prompts)
        if not stops:
            return None
        return lambda r, gen: trackers[r // rows_per].stop_hit(gen)

    run = _prepare(lm.model, ids, bad_words_ids=bad or None, eos_token_id=eos_token_id,
                   stop_fn_factory=stop_factory, **options)
    return run, trackers


def _stream_rows(run) -> list[int] | None:
    """The row that carries each returned sequence while decoding, or None (beam: known only at the end)."""
    s = run.sampler
    if isinstance(s, BeamSampler):
        return None
    rows_per = run.state.rows_per_prompt
    n = run.state.num_return_sequences
    return [b * rows_per + j for b in range(run.state.batch_size) for j in range(n)]


def _texts(run, trackers) -> list[list[str]]:
    out = []
    for b, seqs in enumerate(_finalize(run)):
        out.append([trackers[b].final(seq) for seq in seqs])
    return out


_MORE_OPTIONS = {"min_length", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "min_tokens_to_keep", "pad_token_id"}


def generate(lm, prompts, *, max_length=None, max_new_tokens=None, sampler=None, do_sample=None, temperature=None,
             top_k=None, top_p=None, num_beams=None, length_penalty=1.0, early_stopping=False, penalty_alpha=None,
             no_repeat_ngram_size=0, repetition_penalty=1.0, bad_words_ids=None, bad_words=None, min_new_tokens=0,
             eos_token_id=None, stop=None, num_return_sequences=1, seed=None, add_bos=None, include_prompt=True,
             skip_special_tokens=True, truncate_prompt=False, callback=None, compile=None, **options):
    """Generate text for a prompt (-> str, or list[str] with num_return_sequences > 1) or a list of
    prompts (-> list[str], or list[list[str]]). Accepts KerasHub's names (max_length, sampler=) and HF's
    (max_new_tokens, do_sample, top_k (0 = off), top_p, temperature, num_beams, ...).
    callback(index, text_piece) receives text as it is produced; index numbers the returned sequences.
    Further HF options (min_length, min_p, typical_p, epsilon_cutoff, eta_cutoff, min_tokens_to_keep) pass on."""
    unknown = sorted(set(options) - _MORE_OPTIONS)
    if unknown:
        raise GenerationError(f"generate() has no option {unknown[0]!r}.")
    single = isinstance(prompts, str)
    if prompts is None or not (single or isinstance(prompts, Iterable)):
        raise GenerationError(f"Prompts must be a string or a list of strings, got {type(prompts).__name__}.")
    plist = [prompts] if single else list(prompts)
    if not plist:
        raise GenerationError("The prompt list is empty; pass at least one prompt.")
    run, trackers = _text_run(
        lm, plist, bad_words=bad_words, bad_words_ids=bad_words_ids, stop=stop, add_bos=add_bos,
        eos_token_id=eos_token_id, skip_special_tokens=skip_special_tokens, max_length=max_length,
        max_new_tokens=max_new_tokens, sampler=sampler, do_sample=do_sample, temperature=temperature, top_k=top_k,
        top_p=top_p, num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
        penalty_alpha=penalty_alpha, no_repeat_ngram_size=no_repeat_ngram_size,
        repetition_penalty=repetition_penalty, min_new_tokens=min_new_tokens,
        num_return_sequences=num_return_sequences, seed=seed, truncate_prompt=truncate_prompt, compile=compile,
        **options)
    n = num_return_sequences
    rows = _stream_rows(run) if callback is not None else None
    emitters = [StreamEmitter() for _ in range(len(plist) * n)]
    for state in _iterate(run):
        if rows is None:
            continue
        gens = state.row_generated()
        for i, r in enumerate(rows):
            done = bool(state.finished[r])
            piece = emitters[i].piece(trackers[i // n].safe(gens[r], done))
            if piece:
                callback(i, piece)
    texts = _texts(run, trackers)
    if callback is not None:
        for i in range(len(plist) * n):
            piece = emitters[i].piece(texts[i // n][i % n])
            if piece:
                callback(i, piece)
    if include_prompt:
        texts = [[p + t for t in ts] for p, ts in zip(plist, texts)]
    if single:
        return texts[0][0] if n == 1 else texts[0]
    return [ts[0] for ts in texts] if n == 1 else texts


def stream(lm, prompt: str, **options) -> Iterator[str]:
    """Yield the generated text of one prompt in pieces as tokens are produced; the pieces join to the
    text generate() returns with include_prompt=False."""
    if not isinstance(prompt, str):
        raise GenerationError("stream() takes one prompt string.")
    if options.get("num_return_sequences", 1) != 1:
        raise GenerationError("stream() produces one sequence; use generate() for num_return_sequences > 1.")
    for key in ("include_prompt", "callback"):
        options.pop(key, None)
    run, trackers = _text_run(lm, [prompt], **options)
    rows = _stream_rows(run)
    emitter = StreamEmitter()
    for state in _iterate(run):
        if rows is None:
            continue
        gen = state.row_generated()[rows[0]]
        piece = emitter.piece(trackers[0].safe(gen, bool(state.finished[rows[0]])))
        if piece:
            yield piece
    piece = emitter.piece(_texts(run, trackers)[0][0])
    if piece:
        yield piece
