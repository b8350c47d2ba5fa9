"""Samplers: small objects that choose the next token (KerasHub style).

A sampler plugs into the one decode loop in engine.py through three hooks:
  select(logits, hidden, state) -> (tokens or None, reorder or None)   tokens to commit this step
  feed(tokens, logits, state)   -> (tokens to run through the model, cache slot)
  finalize(state)               -> generated token lists, per prompt and returned sequence
Plain samplers only implement `choose(scores, generator)`; beam search and contrastive search use the
reorder index to move rows (and their cache) between hypotheses. Select by name or instance:
`get_sampler("top_k")`, `get_sampler(TopKSampler(k=10))`.

Every sampler is also callable in KerasHub's functional form for custom models:
    sampler(next=fn, prompt=ids, index=1, cache=None)  with  fn(prompt, cache, index) -> (logits, hidden, cache)
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ..errors import GenerationError
from ..native import sampler as native
from .config import check_option
from .loop import run_functional

NEG = -1.0e9
NEG_INF = float("-inf")
LARGE_VOCAB = 1024  # CPU rows at least this long: top-p orders ties canonically; sample() may use candidates


def _positive_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise GenerationError(f"top_k must be a positive integer for this sampler, got {k!r}.")
    return k


def _positive_temperature(temperature, sampler: str) -> float:
    t = 1.0 if temperature is None else check_option("temperature", temperature)
    if t == 0:
        raise GenerationError(f"The {sampler} sampler needs a temperature above 0, got {temperature!r}.")
    return t


# Per-row functions ----------------------------------------------------------------------------------
# Every parameter is a Python number (the same for all rows) or a 1-D tensor / sequence with one value
# per row. Per-row float values are read in float64 and cast to the scores' dtype only where compared,
# so a row gives exactly the result the same value as a Python number gives.
def _rows(value, scores: torch.Tensor, integer: bool = False):
    """A Python number as it is, or per-row values as a (rows, 1) tensor on the scores' device."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    t = torch.as_tensor(value, device=scores.device)
    t = t.long() if integer else t.double()
    if t.dim() != 1 or t.shape[0] != scores.shape[0]:
        raise GenerationError(f"Per-row values must have one value per row ({scores.shape[0]}), got shape {tuple(t.shape)}.")
    return t[:, None]


def _apply_removal(scores, remove, off):
    if isinstance(off, torch.Tensor):
        remove = remove & ~off
    return scores.masked_fill(remove, NEG_INF)


def _kth_largest(scores: torch.Tensor, k) -> torch.Tensor:
    """(rows, 1) the k-th largest score per row (k a Python int >= 1 or a (rows, 1) long tensor >= 1)."""
    V = scores.shape[-1]
    if isinstance(k, int):
        return torch.topk(scores, min(k, V), dim=-1).values[:, -1:]
    k = k.clamp(1, V)
    values = torch.topk(scores, int(k.max()), dim=-1).values
    return values.gather(1, k - 1)


def apply_temperature(scores: torch.Tensor, temperature) -> torch.Tensor:
    """scores / temperature; rows with temperature 0 are returned unchanged (the caller takes their argmax).
    Below 1 the row's maximum is taken off first and the divisor is at least the dtype's smallest normal
    number, so nothing overflows: the top score becomes 0, the others finite or -inf (1e-300 acts as greedy)."""
    t = _rows(temperature, scores)
    tiny = torch.finfo(scores.dtype).tiny
    if not isinstance(t, torch.Tensor):
        if t in (0, 1):
            return scores
        return scores / t if t > 1 else (scores - _row_max(scores)) / max(t, tiny)
    t = torch.where(t == 0, torch.ones_like(t), t)
    shift = torch.where(t < 1, _row_max(scores), torch.zeros((), dtype=scores.dtype, device=scores.device))
    return (scores - shift) / t.to(scores.dtype).clamp(min=tiny)


def _row_max(scores: torch.Tensor) -> torch.Tensor:
    """(rows, 1) each row's highest score (the dtype's lowest number for a row of -inf: no inf - inf)."""
    return scores.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(scores.dtype).min)


def top_k_filter(scores: torch.Tensor, k, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """-inf outside the k highest scores (k <= 0: off). Every token tied with the k-th is kept, as in
    transformers' TopKLogitsWarper; at least min_tokens_to_keep tokens stay."""
    k = _rows(k, scores, integer=True)
    if not isinstance(k, torch.Tensor):
        if k <= 0:
            return scores
        return scores.masked_fill(scores < _kth_largest(scores, max(int(k), min_tokens_to_keep)), NEG_INF)
    off = k <= 0
    if bool(off.all()):
        return scores
    kth = _kth_largest(scores, torch.where(off, torch.ones_like(k), k.clamp(min=min_tokens_to_keep)))
    return _apply_removal(scores, scores < kth, off)


def _nucleus_removal(ascending_probs: torch.Tensor, p, min_tokens_to_keep: int) -> torch.Tensor:
    """The tokens top-p removes, for probabilities in ascending order: those whose mass together with
    every less likely token's is at most 1 - p, less the min_tokens_to_keep most likely."""
    limit = 1 - p
    if isinstance(limit, torch.Tensor):
        limit = limit.to(ascending_probs.dtype)
    remove = ascending_probs.cumsum(dim=-1) <= limit
    if min_tokens_to_keep > 0:
        remove[:, -min_tokens_to_keep:] = False
    return remove


def top_p_filter(scores: torch.Tensor, p, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """-inf outside the nucleus: the smallest set of most likely tokens whose probability reaches p
    (p >= 1: off). Computed from the least likely end (a token goes when the mass of it and every less
    likely token is at most 1 - p), as transformers does, so float32 rounding of the running sum does not
    keep an extra token: on probabilities [0.3, 0.1, 0.1, 0.5] with p = 0.8 two tokens stay. On CPU rows
    of LARGE_VOCAB tokens or more, of tokens with equal scores the one with the higher id counts as the
    more likely (a stable sort), so the result does not depend on which other tokens a row holds (and
    sample() can work on top-k candidates); shorter rows order ties as transformers' torch.sort does."""
    p, off = _nucleus_rows(p, scores)
    if off is None:
        return scores
    probs = torch.softmax(scores, dim=-1)
    V = scores.shape[-1]
    large = scores.device.type == "cpu" and V >= LARGE_VOCAB
    finite = int(torch.isfinite(scores).sum(dim=-1).max()) if large else V
    if finite < V // 4:
        # After a top-k filter most tokens are -inf: sort only the finite ones. Tokens of probability 0
        # add nothing to the running sum, so the result is the same as sorting the whole row.
        ids = torch.sort(torch.topk(scores, finite, dim=-1).indices, dim=-1).values
        order = ids.gather(1, torch.sort(scores.gather(1, ids), dim=-1, stable=True).indices)
    else:
        order = torch.sort(scores, dim=-1, stable=large).indices  # ascending
    remove_sorted = _nucleus_removal(probs.gather(1, order), p, min_tokens_to_keep)
    if order.shape[-1] < V:
        remove = torch.isinf(scores).scatter(1, order, remove_sorted)
    else:
        remove = torch.zeros_like(remove_sorted).scatter(1, order, remove_sorted)
    return _apply_removal(scores, remove, off)


def _keep_top(remove: torch.Tensor, scores: torch.Tensor, min_tokens_to_keep: int) -> torch.Tensor:
    """remove, with the min_tokens_to_keep highest-scoring tokens of each row kept."""
    if min_tokens_to_keep <= 0:
        return remove
    return remove & (scores < _kth_largest(scores, min_tokens_to_keep))


def min_p_filter(scores: torch.Tensor, min_p, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """-inf for tokens less likely than min_p times the most likely token (min_p <= 0: off)."""
    m = _rows(min_p, scores)
    if not isinstance(m, torch.Tensor) and m <= 0:
        return scores
    off = m <= 0
    probs = torch.softmax(scores, dim=-1)
    if isinstance(m, torch.Tensor):
        m = m.to(scores.dtype)
    remove = probs < m * probs.amax(dim=-1, keepdim=True)
    return _apply_removal(scores, _keep_top(remove, scores, min_tokens_to_keep), off)


def typical_filter(scores: torch.Tensor, typical_p, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Locally typical sampling (Meister et al., 2022): keep the tokens whose surprisal is closest to the
    distribution's entropy, until their probability reaches typical_p (typical_p >= 1: off)."""
    mass = _rows(typical_p, scores)
    if not isinstance(mass, torch.Tensor) and mass >= 1:
        return scores
    off = mass >= 1
    logp = torch.log_softmax(scores, dim=-1)
    probs = logp.exp()
    entropy = -(logp * probs).nansum(dim=-1, keepdim=True)
    distance = (-logp - entropy).abs()
    ordered, order = torch.sort(distance, dim=-1)
    cum = torch.softmax(scores.gather(1, order), dim=-1).cumsum(dim=-1)
    if isinstance(mass, torch.Tensor):
        mass = mass.to(scores.dtype)
    last = (cum < mass).sum(dim=1, keepdim=True).clamp(max=scores.shape[-1] - 1)
    remove_sorted = ordered > ordered.gather(1, last)
    if min_tokens_to_keep > 0:
        remove_sorted[:, :min_tokens_to_keep] = False
    remove = torch.zeros_like(remove_sorted).scatter(1, order, remove_sorted)
    return _apply_removal(scores, remove, off)


def epsilon_filter(scores: torch.Tensor, epsilon, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Epsilon sampling (Hewitt et al., 2022): -inf for tokens of probability below epsilon (epsilon <= 0: off)."""
    eps = _rows(epsilon, scores)
    if not isinstance(eps, torch.Tensor) and eps <= 0:
        return scores
    off = eps <= 0
    if isinstance(eps, torch.Tensor):
        eps = eps.to(scores.dtype)
    remove = torch.softmax(scores, dim=-1) < eps
    return _apply_removal(scores, _keep_top(remove, scores, min_tokens_to_keep), off)


def eta_filter(scores: torch.Tensor, eta, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Eta sampling (Hewitt et al., 2022): -inf for tokens of probability below
    min(eta, sqrt(eta) * exp(-entropy)) (eta <= 0: off)."""
    e = _rows(eta, scores)
    if not isinstance(e, torch.Tensor) and e <= 0:
        return scores
    off = e <= 0
    e = torch.as_tensor(e, dtype=scores.dtype, device=scores.device)
    if e.dim() == 0:
        e = e.expand(scores.shape[0], 1)
    logp = torch.log_softmax(scores, dim=-1)
    probs = logp.exp()
    entropy = -(probs * logp.masked_fill(probs == 0, 0)).sum(dim=-1, keepdim=True)
    cutoff = torch.minimum(e, e.sqrt() * torch.exp(-entropy))
    remove = probs < cutoff
    return _apply_removal(scores, _keep_top(remove, scores, min_tokens_to_keep), off)


def warp(scores: torch.Tensor, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0,
         eta_cutoff=0.0, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Temperature, then the filters in transformers' order: top-k, top-p, min-p, typical, epsilon, eta."""
    scores = apply_temperature(scores, temperature)
    scores = top_k_filter(scores, top_k, min_tokens_to_keep)
    scores = top_p_filter(scores, top_p, min_tokens_to_keep)
    scores = min_p_filter(scores, min_p, min_tokens_to_keep)
    scores = typical_filter(scores, typical_p, min_tokens_to_keep)
    scores = epsilon_filter(scores, epsilon_cutoff, min_tokens_to_keep)
    return eta_filter(scores, eta_cutoff, min_tokens_to_keep)


def _uniforms(rows: int, generator, device) -> torch.Tensor:
    """(rows, 1) float64 uniforms in [0, 1), one per row, from the generator(s) draw() accepts."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(rows, 1, generator=generator, device=device, dtype=torch.float64)
    generators = list(generator)
    if len(generators) != rows:
        raise GenerationError(f"draw() needs one generator (or None) per row: {rows} rows, "
                              f"{len(generators)} generators.")
    if all(g is None for g in generators):
        return torch.rand(rows, 1, device=device, dtype=torch.float64)
    u = torch.empty(rows, 1, device=device, dtype=torch.float64)
    shared = []
    for r, g in enumerate(generators):
        if g is None:
            shared.append(r)
        else:
            u[r] = torch.rand(1, generator=g, device=device, dtype=torch.float64)
    if shared:
        u[torch.tensor(shared, device=device)] = torch.rand(len(shared), 1, device=device, dtype=torch.float64)
    return u


def draw(probs: torch.Tensor, generator=None) -> torch.Tensor:
    """One draw per row from probs (rows, n) (any non-negative weights): the token where a uniform number
    falls in the row's cumulative distribution (float32, float64 for float64 weights; on CPU the running
    sum is kept in float64 either way), so one random number per row and no host sync.
    `generator` is None, one torch.Generator for all rows, or a list with a generator (or None) per row:
    a row with its own generator reads only that generator's numbers, so a seeded row draws the same
    token whatever other rows share the batch. A token of probability 0 is never drawn, and the result is a
    token id even for a row of NaN weights (the batch engine ends such a row with an error)."""
    if probs.dtype not in (torch.float32, torch.float64):
        probs = probs.float()
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:].contiguous()
    point = (_uniforms(probs.shape[0], generator, probs.device) * total).to(cdf.dtype)
    picks = torch.searchsorted(cdf, point, right=True)
    last = torch.searchsorted(cdf, total)  # the last token of non-zero probability
    # a row of non-finite weights (NaN) would point past the end: the pick stays a token id whatever comes in
    return torch.minimum(picks, last).clamp_(max=probs.shape[-1] - 1)[:, 0]


def _weights(scores: torch.Tensor) -> torch.Tensor:
    """exp(scores - row max) (float32, or float64 for float64 scores): unnormalised probabilities that are
    the same numbers for a token whether a row holds the whole vocabulary or only its candidates (0 for
    -inf)."""
    w = scores - scores.amax(dim=-1, keepdim=True)
    if w.dtype not in (torch.float32, torch.float64):
        w = w.float()
    return w.exp_()


_CHUNK = 32  # tokens per block in top_values' first pass


@functools.lru_cache(maxsize=16)
def _block_index(vocab: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """arange(_CHUNK), and the ids of the tokens past the last whole block."""
    return (torch.arange(_CHUNK, device=device),
            torch.arange(vocab // _CHUNK * _CHUNK, vocab, device=device))


def top_values(scores: torch.Tensor, n: int):
    """torch.topk(scores, n, dim=-1) for rows of a large vocabulary (CPU): the same values, highest first,
    found among the tokens of the n blocks of _CHUNK tokens with the highest maxima (and the tokens past the
    last whole block). Those hold the n highest values: a token in a block left out scores no more than
    each of the n chosen blocks' maxima, n other tokens. (Among tokens of equal score the ids may differ
    from torch.topk's choice.)"""
    rows, V = scores.shape
    blocks = V // _CHUNK
    if scores.device.type != "cpu" or V < 4096 or 4 * n * _CHUNK > V:
        return torch.topk(scores, n, dim=-1)
    scores = scores.contiguous()
    offsets, tail = _block_index(V, str(scores.device))
    best = torch.topk(scores[:, :blocks * _CHUNK].view(rows, blocks, _CHUNK).amax(dim=-1), n, dim=-1).indices
    ids = (best[:, :, None] * _CHUNK + offsets).view(rows, n * _CHUNK)
    if tail.numel():
        ids = torch.cat([ids, tail.expand(rows, -1)], dim=1)
    values, where = torch.topk(scores.gather(1, ids), n, dim=-1)
    return values, ids.gather(1, where)


def argmax(scores: torch.Tensor) -> torch.Tensor:
    """torch.argmax(scores, dim=-1), through the native kernel for long CPU rows (same answer)."""
    if scores.device.type == "cpu" and scores.dim() == 2 and scores.shape[-1] >= LARGE_VOCAB:
        out = native.argmax(scores)
        if out is not None:
            return out
    return torch.argmax(scores, dim=-1)


def _candidates(scores: torch.Tensor, k, min_tokens_to_keep: int):
    """(values, ids, in_id_order) with (values, ids) (rows, n) for n tokens that hold every token a top-k
    filter keeps (ties with the k-th included), values -inf where the filter removes the token (or pads
    the row); highest score first, or in increasing id order where in_id_order. None when that set is not
    small (or top-k is off for some row)."""
    V = scores.shape[-1]
    if scores.device.type != "cpu" or V < LARGE_VOCAB:  # the size check needs the host; full rows are cheap there
        return None
    if isinstance(k, torch.Tensor):
        if not bool((k > 0).all()):
            return None
        k = k.clamp(min=min_tokens_to_keep)
        kmax = int(k.max())
    else:
        if k <= 0:
            return None
        k = kmax = max(int(k), min_tokens_to_keep)
    if 4 * kmax > V:
        return None
    fast = native.top_candidates(scores, k, cap=kmax + max(kmax, 256))
    if fast is not None:
        return fast[0], fast[1], True
    values, ids = top_values(scores, kmax + 1)
    kth = values[:, kmax - 1:kmax] if isinstance(k, int) else values.gather(1, k - 1)
    if bool((values[:, kmax:] >= kth).any()):  # ties with a k-th value beyond the first kmax tokens
        # (common with bf16 logits): widen until every row's last value is below its k-th, so the set
        # holds every tied token; the set of values >= kth is the same whichever ties topk picks.
        n = kmax + 1
        while bool((values[:, -1:] >= kth).any()):
            n *= 2
            if 4 * n > V:
                return None
            values, ids = top_values(scores, n)
        return values.masked_fill(values < kth, NEG_INF), ids, False
    values, ids = values[:, :kmax], ids[:, :kmax]
    if not isinstance(k, int):  # rows whose k is below kmax
        values = values.masked_fill(values < kth, NEG_INF)
    return values, ids, False


def _nucleus_rows(p, scores: torch.Tensor):
    """p per row (see _rows) and the rows where top-p is off (p >= 1); off is None when it is off for all."""
    p = _rows(p, scores)
    if not isinstance(p, torch.Tensor) and p >= 1:
        return p, None
    off = p >= 1
    if isinstance(off, torch.Tensor) and bool(off.all()):
        return p, None
    return p, off


def _top_p_id_order(scores: torch.Tensor, p, min_tokens_to_keep: int) -> torch.Tensor:
    """top_p_filter for candidates in increasing token-id order: the same stable order of scores, so
    tokens of equal score go in the order they go in the whole row."""
    p, off = _nucleus_rows(p, scores)
    if off is None:
        return scores
    ascending, order = torch.sort(scores, dim=-1, stable=True)
    remove_sorted = _nucleus_removal(torch.softmax(ascending, dim=-1), p, min_tokens_to_keep)
    return _apply_removal(scores, torch.zeros_like(remove_sorted).scatter(1, order, remove_sorted), off)


_OFF = {"min_p": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}


def _all_off(filters: dict) -> bool:
    """Whether warp's remaining filters (besides temperature, top-k and top-p) are all off as Python numbers."""
    for name, value in filters.items():
        if name not in _OFF or isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if (value > 0) if _OFF[name] == 0.0 else (value < 1):
            return False
    return True


def sample(scores: torch.Tensor, generator=None, *, temperature=1.0, top_k=0, min_tokens_to_keep: int = 1,
           **filters) -> torch.Tensor:
    """The next token of every row: argmax where temperature is 0, otherwise a draw from the scores after
    warp(scores, temperature, top_k, ..., min_tokens_to_keep) (`filters`: warp's other keyword arguments).
    With top-k on for every row, only the candidates are warped and drawn from (on CPU), which gives the
    same token as the whole row would for the same random number."""
    t = _rows(temperature, scores)
    if not isinstance(t, torch.Tensor) and t == 0:
        return argmax(scores)
    k = _rows(top_k, scores, integer=True)
    cand = _candidates(scores, k, min_tokens_to_keep)
    if cand is None:
        picks = draw(_weights(warp(scores, temperature=temperature, top_k=k[:, 0] if isinstance(k, torch.Tensor)
                                   else k, min_tokens_to_keep=min_tokens_to_keep, **filters)), generator)
    else:
        # The candidates in token-id order: top-p orders them as it orders the whole row, and the draw
        # meets them as it meets the whole row, so the token is the one the whole row would give.
        values, ids, in_id_order = cand
        if not in_id_order:
            ids, order = torch.sort(ids, dim=-1)
            values = values.gather(1, order)
        values = apply_temperature(values, temperature)
        values = _top_p_id_order(values, filters.pop("top_p", 1.0), min_tokens_to_keep)
        if not _all_off(filters):
            values = warp(values, min_tokens_to_keep=min_tokens_to_keep, **filters)
        picks = ids.gather(1, draw(_weights(values), generator)[:, None])[:, 0]
    if isinstance(t, torch.Tensor):
        greedy = (t == 0)[:, 0]
        picks = torch.where(greedy, argmax(scores), picks)
    return picks


class Sampler:
    """Base class. Subclasses of the simple kind implement choose(scores, generator)."""

    name = "sampler"
    row_stopping = True  # the loop ends rows at EOS / stop strings / max tokens
    needs_hidden = None  # None, "last" or "all" (hidden states of every prompt position too)
    deterministic = False

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = 1.0 if temperature is None else check_option("temperature", temperature)

    # Engine hooks ---------------------------------------------------------------------------------
    def rows_per_sequence(self, num_return_sequences: int) -> int:
        return num_return_sequences

    def check(self, num_return_sequences: int) -> None:
        if self.deterministic and num_return_sequences > 1:
            raise GenerationError(
                f"The {self.name} sampler returns one sequence per prompt; use a random sampler or beam "
                f"search for num_return_sequences={num_return_sequences}."
            )

    def start(self, state) -> None:
        pass

    def select(self, logits, hidden, state):
        scores = state.process(logits.float())
        return self.choose(scores, state.generator), None

    def feed(self, tokens, logits, state):
        return tokens, state.cur - 1

    def is_done(self, state) -> bool:
        return False  # plain samplers stop by rows and length only

    def finalize(self, state) -> list[list[list[int]]]:
        rows = state.row_generated()
        n = state.num_rows // state.batch_size
        return [rows[b * n:(b + 1) * n] for b in range(state.batch_size)]

    def choose(self, scores: torch.Tensor, generator) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    # KerasHub functional form -------------------------------------------------------------------
    def __call__(self, next, prompt, cache=None, index: int = 0, mask=None, stop_token_ids=None,
                 hidden_states=None, model=None, seed=None):
        """Fill `prompt` (batch, length) from position `index` on, calling next(prompt, cache, index) ->
        (logits, hidden_states, cache) for the distribution of the token at `index`. Returns the filled ids."""
        return run_functional(self, next, prompt, cache=cache, index=index, mask=mask,
                              stop_token_ids=stop_token_ids, hidden_states=hidden_states, seed=seed)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class GreedySampler(Sampler):
    """The most likely token at every step."""

    name = "greedy"
    deterministic = True

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__(temperature)  # accepted as KerasHub does; it does not change the argmax

    def choose(self, scores, generator):
        return argmax(scores)


class FilteringSampler(Sampler):
    """A draw from softmax(scores / temperature) after the filters the sampler and its options name:
    transformers' warpers min_p, typical_p, epsilon_cutoff and eta_cutoff are accepted by every
    drawing sampler, and min_tokens_to_keep applies to each filter."""

    top_k = 0
    top_p = 1.0

    def __init__(self, temperature: float = 1.0, *, min_p: float | None = None, typical_p: float | None = None,
                 epsilon_cutoff: float | None = None, eta_cutoff: float | None = None,
                 min_tokens_to_keep: int = 1) -> None:
        super().__init__(temperature)
        self.min_p = check_option("min_p", min_p) or 0.0
        self.typical_p = check_option("typical_p", typical_p) or 1.0
        self.epsilon_cutoff = check_option("epsilon_cutoff", epsilon_cutoff) or 0.0
        self.eta_cutoff = check_option("eta_cutoff", eta_cutoff) or 0.0
        self.min_tokens_to_keep = check_option("min_tokens_to_keep", min_tokens_to_keep) or 1

    def filter(self, scores: torch.Tensor) -> torch.Tensor:
        """The scores after temperature and every filter (-inf for tokens that cannot be drawn)."""
        return warp(scores, temperature=self.temperature, top_k=self.top_k or 0, top_p=self.top_p,
                    min_p=self.min_p, typical_p=self.typical_p, epsilon_cutoff=self.epsilon_cutoff,
                    eta_cutoff=self.eta_cutoff, min_tokens_to_keep=self.min_tokens_to_keep)

    def choose(self, scores, generator):
        return sample(scores, generator, temperature=self.temperature, top_k=self.top_k or 0, top_p=self.top_p,
                      min_p=self.min_p, typical_p=self.typical_p, epsilon_cutoff=self.epsilon_cutoff,
                      eta_cutoff=self.eta_cutoff, min_tokens_to_keep=self.min_tokens_to_keep)


class RandomSampler(FilteringSampler):
    """A draw from the whole softmax(logits / temperature)."""

    name = "random"


class TopKSampler(FilteringSampler):
    """A draw among the k most likely tokens (and every token tied with the k-th), renormalised."""

    name = "top_k"

    def __init__(self, k: int = 5, temperature: float = 1.0, **options) -> None:
        super().__init__(temperature, **options)
        self.k = _positive_k(k)

    @property
    def top_k(self):
        return self.k


class TopPSampler(FilteringSampler):
    """Nucleus sampling: a draw among the smallest set of most likely tokens whose probability reaches p
    (always at least one), optionally within the k most likely first."""

    name = "top_p"

    def __init__(self, p: float = 0.1, k: int | None = None, temperature: float = 1.0, **options) -> None:
        super().__init__(temperature, **options)
        self.p = check_option("top_p", p)
        self.k = None if k is None else _positive_k(k)

    @property
    def top_k(self):
        return self.k or 0

    @property
    def top_p(self):
        return self.p


class BeamSampler(Sampler):
    """Beam search with HF transformers' scoring: length_penalty divides a finished hypothesis' log
    probability by its generated length ** length_penalty; early_stopping True, False or "never"."""

    name = "beam"
    row_stopping = False
    deterministic = True

    def __init__(self, num_beams: int = 5, length_penalty: float = 1.0, early_stopping: bool | str = False,
                 return_all_beams: bool = False, temperature: float = 1.0) -> None:
        super().__init__(_positive_temperature(temperature, "beam"))
        self.num_beams = check_option("num_beams", num_beams)
        self.length_penalty = check_option("length_penalty", length_penalty)
        self.early_stopping = check_option("early_stopping", early_stopping)
        self.return_all_beams = bool(return_all_beams)

    def rows_per_sequence(self, num_return_sequences):
        return self.num_beams

    def check(self, num_return_sequences):
        if num_return_sequences > self.num_beams:
            raise GenerationError(
                f"Beam search returns at most num_beams={self.num_beams} sequences per prompt, "
                f"but num_return_sequences={num_return_sequences} were asked for."
            )

    def start(self, state):
        B, nb, dev = state.batch_size, self.num_beams, state.device
        s = state.sampler_state
        s["running"] = torch.zeros(B, nb, device=dev)
        s["running"][:, 1:] = NEG
        s["fin_scores"] = torch.full((B, nb), NEG, device=dev)
        s["fin_log_probs"] = torch.full((B, nb), NEG, device=dev)  # the same hypotheses' summed log-probs
        s["fin_tokens"] = torch.full((B, nb, max(state.max_new_tokens, 1)), state.pad_id, dtype=torch.long, device=dev)
        s["fin_len"] = torch.zeros(B, nb, dtype=torch.long, device=dev)
        s["finished"] = torch.zeros(B, nb, dtype=torch.bool, device=dev)
        s["improvable"] = torch.ones(B, 1, dtype=torch.bool, device=dev)
        s["done"] = False
        n_eos = len(state.eos_ids)
        s["keep"] = max(2, 1 + n_eos) * nb

    def select(self, logits, hidden, state):
        s = state.sampler_state
        B, nb = state.batch_size, self.num_beams
        V = logits.shape[-1]
        g = state.generated_steps  # tokens generated so far (same for every beam)
        log_probs = state.process(F.log_softmax(apply_temperature(logits.float(), self.temperature), dim=-1))
        log_probs = (log_probs.view(B, nb, V) + s["running"][:, :, None]).view(B, nb * V)
        K = s["keep"]
        top_lp, top_idx = torch.topk(log_probs, K, dim=-1)
        src = top_idx // V  # beam each candidate extends
        tok = top_idx % V
        hits = torch.zeros_like(tok, dtype=torch.bool)
        if g + 1 >= state.max_new_tokens:
            hits |= True
        if state.eos_ids:
            hits |= torch.isin(tok, state.eos_tensor)

        # Running beams for the next step: the best candidates that did not finish.
        run_lp = top_lp + hits.float() * NEG
        nxt = torch.topk(run_lp, nb, dim=-1)[1]
        new_running = run_lp.gather(1, nxt)
        new_src = src.gather(1, nxt)
        new_tok = tok.gather(1, nxt)

        # Finished hypotheses: only the top num_beams candidates may finish.
        top_mask = torch.zeros(K, dtype=torch.bool, device=tok.device)
        top_mask[:nb] = True
        just = hits & top_mask[None, :]
        fin_lp = top_lp / ((g + 1) ** self.length_penalty)
        full = s["finished"].all(dim=-1, keepdim=True) & (self.early_stopping is True)
        fin_lp = fin_lp + full.float() * NEG
        fin_lp = fin_lp + (~s["improvable"]).float() * NEG
        fin_lp = fin_lp + (~just).float() * NEG
        # Candidate sequences (generated part) that may enter the finished set.
        gen = state.generated_tensor().view(B, nb, g)  # (B, nb, g)
        cand = torch.full((B, K, s["fin_tokens"].shape[-1]), state.pad_id, dtype=torch.long, device=tok.device)
        if g:
            cand[:, :, :g] = gen.gather(1, src[:, :, None].expand(B, K, g))
        cand[:, :, g] = tok
        merged_scores = torch.cat([s["fin_scores"], fin_lp], dim=1)
        merged_lp = torch.cat([s["fin_log_probs"], top_lp], dim=1)
        merged_tokens = torch.cat([s["fin_tokens"], cand], dim=1)
        merged_len = torch.cat([s["fin_len"], torch.full_like(tok, g + 1)], dim=1)
        merged_fin = torch.cat([s["finished"], just], dim=1)
        best = torch.topk(merged_scores, nb, dim=-1)[1]
        s["fin_scores"] = merged_scores.gather(1, best)
        s["fin_log_probs"] = merged_lp.gather(1, best)
        s["fin_tokens"] = merged_tokens.gather(1, best[:, :, None].expand(B, nb, merged_tokens.shape[-1]))
        s["fin_len"] = merged_len.gather(1, best)
        s["finished"] = merged_fin.gather(1, best)
        s["running"] = new_running

        # Can any running beam still beat the worst finished one?
        if self.early_stopping == "never" and self.length_penalty > 0:
            best_len = state.max_new_tokens
        else:
            best_len = g + 1
        best_running = new_running[:, :1] / (best_len ** self.length_penalty)
        worst = torch.where(s["finished"], s["fin_scores"].min(dim=1, keepdim=True)[0], torch.full_like(s["fin_scores"], NEG))
        s["improvable"] = s["improvable"] & (best_running > worst).any(dim=-1, keepdim=True)
        go_on = (bool(s["improvable"].any())
                 and not (bool(s["finished"].all()) and self.early_stopping is True)
                 and not bool(hits.all()))
        s["done"] = not go_on
        offset = torch.arange(B, device=tok.device)[:, None] * nb
        reorder = (new_src + offset).view(-1)
        return new_tok.view(-1), reorder

    def is_done(self, state):
        return state.sampler_state.get("done", False)

    def finalize(self, state):
        return self._finished(state, state.num_return_sequences)[0]

    def all_beams(self, state) -> tuple[list[list[list[int]]], torch.Tensor]:
        """Every finished hypothesis per prompt, best first, and (batch, num_beams) their summed
        log-probabilities (of the tempered, processed distributions)."""
        return self._finished(state, self.num_beams)

    def _finished(self, state, n: int):
        s = state.sampler_state
        out = []
        toks, lens = s["fin_tokens"].tolist(), s["fin_len"].tolist()
        for b in range(state.batch_size):
            out.append([toks[b][j][:lens[b][j]] for j in range(n)])
        return out, s["fin_log_probs"][:, :n]


class ContrastiveSampler(Sampler):
    """Contrastive search (Su et al., 2022): among the k most likely tokens pick the one maximising
    (1 - alpha) * p(token) - alpha * max cosine similarity of its hidden state to the context's."""

    name = "contrastive"
    needs_hidden = "all"
    deterministic = True

    def __init__(self, k: int = 5, alpha: float = 0.6, temperature: float = 1.0) -> None:
        super().__init__(_positive_temperature(temperature, "contrastive"))
        self.k = _positive_k(k)
        self.alpha = check_option("penalty_alpha", alpha)

    def rows_per_sequence(self, num_return_sequences):
        return self.k

    def start(self, state):
        s = state.sampler_state
        s["primed"] = False
        s["context"] = None  # (rows, L, H) normalised hidden states of the committed tokens (None: none yet)
        s["context_valid"] = None
        s["cand_probs"] = None
        s["cand_ids"] = None

    def select(self, logits, hidden, state):
        s = state.sampler_state
        k, rows = self.k, state.num_rows
        B = rows // k
        if not s["primed"]:  # after the prefill: hidden holds every prompt position (none at index 0)
            s["primed"] = True
            if hidden is not None and hidden.shape[1] > 0:
                s["context"] = F.normalize(hidden.float(), dim=-1)
                s["context_valid"] = state.valid[:, :state.cur].clone()
            return None, None
        h = F.normalize(hidden[:, -1].float(), dim=-1)  # (rows, H): candidate j of a prompt in row j
        ones = torch.ones(rows, 1, dtype=torch.bool, device=h.device)
        if s["context"] is None:  # nothing to be similar to yet
            degeneration = torch.zeros(B, k, device=h.device)
        else:
            sims = torch.einsum("rlh,rh->rl", s["context"], h).masked_fill(~s["context_valid"], float("-inf"))
            degeneration = sims.max(dim=-1).values.view(B, k)
        score = (1 - self.alpha) * s["cand_probs"] - self.alpha * degeneration
        score = score.masked_fill(s["cand_probs"] <= 0, float("-inf"))  # a banned token is never a candidate
        best = score.argmax(dim=-1)  # (B,)
        reorder = (best[:, None] + torch.arange(B, device=best.device)[:, None] * k).expand(B, k).reshape(-1)
        tokens = s["cand_ids"].gather(1, best[:, None]).expand(B, k).reshape(-1)
        if s["context"] is None:
            s["context"], s["context_valid"] = h[reorder][:, None], ones
        else:
            s["context"] = torch.cat([s["context"][reorder], h[reorder][:, None]], dim=1)
            s["context_valid"] = torch.cat([s["context_valid"][reorder], ones], dim=1)
        return tokens, reorder

    def feed(self, tokens, logits, state):
        s = state.sampler_state
        k, rows = self.k, state.num_rows
        B = rows // k
        # Every row of a prompt holds the same context here; the first row speaks for all.
        scores = state.process(logits.float()).view(B, k, -1)[:, 0]
        probs = torch.softmax(apply_temperature(scores, self.temperature), dim=-1)
        top_p, top_i = torch.topk(probs, k, dim=-1)
        s["cand_probs"], s["cand_ids"] = top_p, top_i
        return top_i.reshape(-1), state.cur  # candidate j goes to row j, in the next free slot

    def finalize(self, state):
        rows = state.row_generated()
        k = self.k
        return [[rows[b * k]] for b in range(state.batch_size)]


SAMPLERS = {
    "greedy": GreedySampler,
    "beam": BeamSampler,
    "random": RandomSampler,
    "top_k": TopKSampler,
    "top_p": TopPSampler,
    "contrastive": ContrastiveSampler,
}


def get_sampler(identifier, **options) -> Sampler:
    """A sampler from a name ("top_k", ...) with options, or an instance returned as is."""
    if isinstance(identifier, Sampler):
        return identifier
    if isinstance(identifier, str):
        key = identifier.lower().replace("-", "_")
        if key not in SAMPLERS:
            raise GenerationError(f"Unknown sampler {identifier!r}; choose one of {', '.join(SAMPLERS)}.")
        return SAMPLERS[key](**options)
    raise GenerationError(f"sampler must be a name or a Sampler instance, got {type(identifier).__name__}.")
