"""The decode engine: one loop for every sampler, over a static KV cache or a user's next() function.

    prefill the (left-padded) prompts -> logits
    repeat: sampler.select -> reorder rows (beam / contrastive) -> commit tokens -> stop rows
            sampler.feed -> one model step for the fed tokens -> logits

Rows are prompts times the sampler's rows per prompt (num_return_sequences, beams, or contrastive
candidates). Left padding is masked out of attention and positions count real tokens only, so a
prompt gives the same tokens alone or in a batch. The model runs through runner.Runner (the one caller
of the model while generating, shared with the batch engine), whose backends (native, compiled, eager)
are chosen in one place.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch

from ..errors import GenerationError
from .loop import DecodeState, FunctionBackend, decode_steps, eos_list, run_functional  # noqa: F401
from .config import DEFAULT_MAX_NEW_TOKENS, GenerationConfig
from .processors import build_processors
from .runner import Runner, check_compile, require_cxx_compiler  # noqa: F401
from .samplers import (BeamSampler, ContrastiveSampler, GreedySampler, RandomSampler, Sampler, TopKSampler,
                       TopPSampler)
from .stopping import StreamEmitter, TextTracker


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
def resolve_sampler(config=None, **options) -> Sampler:
    """The sampler a GenerationConfig asks for: its `sampler` (a KerasHub name or object), else HF's rules:
    num_beams > 1 -> beam search; temperature 0 -> greedy; penalty_alpha with top_k > 1 -> contrastive;
    do_sample or any sampling option -> top-p, top-k (HF's default k of 50; 0 turns it off) or random;
    otherwise greedy. Also takes the options themselves: resolve_sampler("top_k", top_k=10)."""
    c = config if isinstance(config, GenerationConfig) else GenerationConfig.from_kwargs(sampler=config, **options)
    temp = 1.0 if c.temperature is None else c.temperature
    warpers = {n: getattr(c, n) for n in ("min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "min_tokens_to_keep")
               if getattr(c, n) is not None}
    if isinstance(c.sampler, Sampler):
        return c.sampler
    name = c.sampler
    if name == "greedy":
        return GreedySampler()
    if name == "random":
        return RandomSampler(temperature=temp, **warpers)
    if name == "top_k":
        return TopKSampler(k=5 if c.top_k is None else c.top_k, temperature=temp, **warpers)
    if name == "top_p":
        return TopPSampler(p=0.1 if c.top_p is None else c.top_p, k=c.top_k or None, temperature=temp, **warpers)
    if name == "beam":  # a named sampler takes the temperature, as KerasHub's sampler objects do
        return BeamSampler(num_beams=c.num_beams or 5, length_penalty=c.length_penalty,
                           early_stopping=c.early_stopping, temperature=temp)
    if name == "contrastive":
        return ContrastiveSampler(k=5 if c.top_k is None else c.top_k,
                                  alpha=0.6 if c.penalty_alpha is None else c.penalty_alpha, temperature=temp)
    if c.num_beams is not None and c.num_beams > 1:
        return BeamSampler(num_beams=c.num_beams, length_penalty=c.length_penalty, early_stopping=c.early_stopping)
    if c.temperature == 0:
        return GreedySampler()
    if c.penalty_alpha and c.top_k is not None and c.top_k > 1 and not c.do_sample:
        return ContrastiveSampler(k=c.top_k, alpha=c.penalty_alpha)
    if not c.is_sampling():
        return GreedySampler()
    k = 50 if c.top_k is None else (c.top_k or None)  # HF: top_k defaults to 50, 0 turns it off
    if c.top_p is not None and c.top_p < 1.0:
        return TopPSampler(p=c.top_p, k=k, temperature=temp, **warpers)
    if k:
        return TopKSampler(k=k, temperature=temp, **warpers)
    return RandomSampler(temperature=temp, **warpers)


def end_ids(config: GenerationConfig, default) -> list[int]:
    """The ids that end a sequence: eos_token_id (else `default`, unless ignore_eos) and stop_token_ids."""
    eos = [] if config.ignore_eos else eos_list(config.eos_token_id if config.eos_token_id is not None else default)
    return eos + [t for t in (config.stop_token_ids or ()) if t not in eos]


class _Run:
    """Everything generate_ids needs once options are checked: built by _prepare, run by _iterate."""


def _prepare(model, input_ids, config: GenerationConfig, *, truncate_prompt=False, compile=None,
             stop_fn_factory=None, default_eos=None, constraint=None) -> _Run:
    if not input_ids:
        raise GenerationError("The prompt list is empty; pass at least one prompt.")
    prompts = [[int(t) for t in p] for p in input_ids]
    if any(len(p) == 0 for p in prompts):
        raise GenerationError("A prompt has no tokens; give it text or a BOS token.")
    c, cfg = config, model.config
    vocab = cfg.vocab_size
    for p in prompts:
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"Prompt token id {bad[0]} is outside the model's vocabulary of {vocab}.")
    chosen = resolve_sampler(c)
    n = c.num_return_sequences
    chosen.check(n)
    rows_per = chosen.rows_per_sequence(n)
    if c.response_format is not None and constraint is None:
        raise GenerationError("response_format needs the tokenizer: use LanguageModel.generate, not generate_ids.")
    if constraint is not None and isinstance(chosen, (BeamSampler, ContrastiveSampler)):
        raise GenerationError("response_format works with greedy decoding and sampling, not with beam or "
                              "contrastive search.")
    ctx = cfg.n_positions
    new = c.max_new_tokens if c.max_new_tokens is not None else (None if c.max_length is not None
                                                                 else DEFAULT_MAX_NEW_TOKENS)
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
        new = max(0, min(c.max_length, ctx) - longest)
    new = min(new, ctx - longest)
    _check_sizes(model, chosen, len(prompts), rows_per, longest + new, c)
    eos = end_ids(c, default_eos if default_eos is not None else cfg.eos_token_id)
    pad = c.pad_token_id if c.pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None
                                                             else (eos[0] if eos else 0))
    for name, ids in (("eos_token_id", eos), ("pad_token_id", [pad])):
        bad = [e for e in ids if not 0 <= e < vocab]
        if bad:
            raise GenerationError(f"{name} {bad[0]} is outside the model's vocabulary of {vocab}.")
    min_new = c.min_new_tokens
    if c.min_length is not None:
        # HF counts prompt + generated tokens; per row, so a prompt's padding in a batch does not count.
        per_row = tuple(max(min_new, c.min_length - len(p)) for p in prompts for _ in range(rows_per))
        min_new = per_row[0] if len(set(per_row)) == 1 else per_row
    procs = build_processors(repetition_penalty=c.repetition_penalty, no_repeat_ngram_size=c.no_repeat_ngram_size,
                             bad_words_ids=c.bad_words_ids, min_new_tokens=min_new, eos_ids=eos,
                             vocab_size=vocab, presence_penalty=c.presence_penalty,
                             frequency_penalty=c.frequency_penalty)
    if constraint is not None:  # last: the grammar's mask is what sampling sees
        from .grammar import SequenceGrammar

        procs = list(procs) + [SequenceGrammar(constraint)]
    device = model.embed.wte.weight.device
    generator = None
    if c.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(c.seed)
    run = _Run()
    run.model, run.sampler, run.prompts = model, chosen, prompts
    stop_fn = stop_fn_factory(prompts, rows_per) if stop_fn_factory is not None else None
    run.state = DecodeState(prompts=prompts, rows_per_prompt=rows_per, num_return_sequences=n,
                            max_new_tokens=new, eos_ids=eos, pad_id=pad, device=device, generator=generator,
                            processors=procs, stop_fn=stop_fn, row_stopping=chosen.row_stopping)
    run.backend = ModelBackend(model, compile=compile)
    run.check_every = 1 if device.type == "cpu" else 8
    return run


def _check_sizes(model, sampler, prompts: int, rows_per: int, length: int, config: GenerationConfig) -> None:
    """Refuse, before anything is allocated, rows x length that would not fit the machine's memory, naming
    the option that made the rows (num_beams, contrastive top_k, num_return_sequences, or the prompts)."""
    from ..limits import check_allocation, kv_cache_bytes

    option, value = "prompts", prompts
    if rows_per > 1:
        option = ("num_beams" if isinstance(sampler, BeamSampler) else
                  "top_k" if isinstance(sampler, ContrastiveSampler) else "num_return_sequences")
        value = rows_per
    rows, cfg = prompts * rows_per, model.config
    # the cache, the token history, and a few (rows, vocab) float32 score tensors per step
    nbytes = kv_cache_bytes(cfg, rows, length, model.embed.wte.weight.dtype) + rows * (16 * length + 32 * cfg.vocab_size)
    check_allocation(option, nbytes, value=value, error=GenerationError)


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


def _config(base, config, options) -> GenerationConfig:
    """config (else the model directory's, else the defaults) with the keyword options applied."""
    if config is not None and not isinstance(config, GenerationConfig):
        raise GenerationError(f"config must be a GenerationConfig, got {type(config).__name__}.")
    return (config or base or GenerationConfig()).replace(**options)


def generate_ids(model, input_ids: Sequence[Sequence[int]], config: GenerationConfig | None = None, *,
                 truncate_prompt=False, compile=None, **options) -> list[list[int]]:
    """New tokens for each prompt (ids, no padding): num_return_sequences lists per prompt, flattened."""
    run = _prepare(model, input_ids, _config(None, config, options), truncate_prompt=truncate_prompt,
                   compile=compile)
    for _ in _iterate(run):
        pass
    return [seq for seqs in _finalize(run) for seq in seqs]


# Text-level API ------------------------------------------------------------------------------------
def _text_run(lm, prompts: list[str], config: GenerationConfig, *, add_bos=None, skip_special_tokens=True,
              truncate_prompt=False, compile=None):
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
    bad = [list(b) for b in (config.bad_words_ids or [])]
    for word in config.bad_words or ():
        enc = tok.encode(word)
        if not enc:
            raise GenerationError(f"The banned word {word!r} encodes to no tokens.")
        bad.append(enc)
    if bad:
        config = config.replace(bad_words_ids=bad)
    default_eos = tok.eos_token_id if tok.eos_token_id is not None else lm.config.eos_token_id
    stops = list(config.stop)
    trackers: list[TextTracker] = []

    def stop_factory(final_prompts, rows_per):
        trackers.extend(TextTracker(tok, p, stops, skip_special_tokens, config.include_stop_str_in_output)
                        for p in final_prompts)
        if not stops:
            return None
        return lambda r, gen: trackers[r // rows_per].stop_hit(gen)

    constraint = None
    if config.response_format is not None:
        from .grammar import compile_constraint

        constraint = compile_constraint(tok, config.response_format)
    run = _prepare(lm.model, ids, config, stop_fn_factory=stop_factory, default_eos=default_eos,
                   truncate_prompt=truncate_prompt, compile=compile, constraint=constraint)
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


def _pieces(run, trackers, n: int, texts: list, live: bool = True) -> Iterator[tuple[int, str]]:
    """Run the generation: with live, yield (index of the returned sequence, text piece) as tokens are
    produced (beam search: at the end); the final texts go into `texts`."""
    rows = _stream_rows(run) if live else None
    emitters = [StreamEmitter() for _ in range(len(trackers) * n)]
    for state in _iterate(run):
        if rows is None:
            continue
        gens = state.row_generated()
        for i, r in enumerate(rows):
            piece = emitters[i].piece(trackers[i // n].safe(gens[r], bool(state.finished[r])))
            if piece:
                yield i, piece
    texts.extend(_texts(run, trackers))
    for i, emitter in enumerate(emitters if live else ()):
        piece = emitter.piece(texts[i // n][i % n])
        if piece:
            yield i, piece


def generate(lm, prompts, config: GenerationConfig | None = None, *, add_bos=None, include_prompt=True,
             skip_special_tokens=True, truncate_prompt=False, callback=None, compile=None, **options):
    """Generate text for a prompt (-> str, or list[str] with num_return_sequences > 1) or a list of
    prompts (-> list[str], or list[list[str]]). The decoding options are a GenerationConfig (`config`, else the
    model directory's generation_config.json, else the defaults) with any keyword options applied: KerasHub's
    names (max_length, sampler=) and HF's (max_new_tokens, do_sample, top_k (0 = off), top_p, temperature,
    num_beams, ...); see GenerationConfig. callback(index, text_piece) receives text as it is produced; index
    numbers the returned sequences."""
    config = _config(getattr(lm, "generation_config", None), config, options)
    single = isinstance(prompts, str)
    if prompts is None or not (single or isinstance(prompts, Iterable)):
        raise GenerationError(f"Prompts must be a string or a list of strings, got {type(prompts).__name__}.")
    plist = [prompts] if single else list(prompts)
    if not plist:
        raise GenerationError("The prompt list is empty; pass at least one prompt.")
    run, trackers = _text_run(lm, plist, config, add_bos=add_bos, skip_special_tokens=skip_special_tokens,
                              truncate_prompt=truncate_prompt, compile=compile)
    n, texts = config.num_return_sequences, []
    for i, piece in _pieces(run, trackers, n, texts, live=callback is not None):
        callback(i, piece)
    if include_prompt:
        texts = [[p + t for t in ts] for p, ts in zip(plist, texts)]
    if single:
        return texts[0][0] if n == 1 else texts[0]
    return [ts[0] for ts in texts] if n == 1 else texts


def stream(lm, prompt: str, config: GenerationConfig | None = None, *, add_bos=None, skip_special_tokens=True,
           truncate_prompt=False, compile=None, include_prompt=None, callback=None, **options) -> Iterator[str]:
    """Yield the generated text of one prompt in pieces as tokens are produced; the pieces join to the
    text generate() returns with include_prompt=False."""
    config = _config(getattr(lm, "generation_config", None), config, options)
    if not isinstance(prompt, str):
        raise GenerationError("stream() takes one prompt string.")
    if config.num_return_sequences != 1:
        raise GenerationError("stream() produces one sequence; use generate() for num_return_sequences > 1.")
    run, trackers = _text_run(lm, [prompt], config, add_bos=add_bos, skip_special_tokens=skip_special_tokens,
                              truncate_prompt=truncate_prompt, compile=compile)
    for _, piece in _pieces(run, trackers, 1, []):
        yield piece
