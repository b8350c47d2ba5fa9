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

import torch
import torch.nn.functional as F

from ..errors import GenerationError

NEG = -1.0e9


def _check_temperature(temperature) -> float:
    if temperature is None:
        return 1.0
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature < 0:
        raise GenerationError(f"temperature must be a number of at least 0 (0 means greedy), got {temperature!r}.")
    return float(temperature)


def _check_k(k, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise GenerationError(f"{name} must be a positive integer, got {k!r}.")
    return k


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row from probs (rows, n): argmax of p / Exp(1), the exponential-race form of
    multinomial sampling; it needs no host sync."""
    q = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return torch.argmax(probs / q, dim=-1)


class Sampler:
    """Base class. Subclasses of the simple kind implement choose(scores, generator)."""

    name = "sampler"
    row_stopping = True  # the loop ends rows at EOS / stop strings / max tokens
    needs_hidden = None  # None, "last" or "all" (hidden states of every prompt position too)
    deterministic = False

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = _check_temperature(temperature)

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
        from .engine import run_functional

        return run_functional(self, next, prompt, cache=cache, index=index, mask=mask,
                              stop_token_ids=stop_token_ids, hidden_states=hidden_states, seed=seed)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class GreedySampler(Sampler):
    """The most likely token at every step."""

    name = "greedy"
    deterministic = True

    def __init__(self) -> None:
        super().__init__(1.0)

    def choose(self, scores, generator):
        return torch.argmax(scores, dim=-1)


class RandomSampler(Sampler):
    """A draw from the whole softmax(logits / temperature)."""

    name = "random"

    def choose(self, scores, generator):
        if self.temperature == 0:
            return torch.argmax(scores, dim=-1)
        return _sample(torch.softmax(scores / self.temperature, dim=-1), generator)


class TopKSampler(Sampler):
    """A draw among the k most likely tokens, renormalised."""

    name = "top_k"

    def __init__(self, k: int = 5, temperature: float = 1.0) -> None:
        super().__init__(temperature)
        self.k = _check_k(k)

    def choose(self, scores, generator):
        if self.temperature == 0:
            return torch.argmax(scores, dim=-1)
        values, ids = torch.topk(scores, min(self.k, scores.shape[-1]), dim=-1)
        pick = _sample(torch.softmax(values / self.temperature, dim=-1), generator)
        return ids.gather(-1, pick[:, None])[:, 0]


class TopPSampler(Sampler):
    """Nucleus sampling: a draw among the smallest set of most likely tokens whose probability reaches p
    (always at least one), optionally within the k most likely first."""

    name = "top_p"

    def __init__(self, p: float = 0.1, k: int | None = None, temperature: float = 1.0) -> None:
        super().__init__(temperature)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise GenerationError(f"p (top_p) must be in (0, 1], got {p!r}.")
        self.p = float(p)
        self.k = None if k is None else _check_k(k)

    def choose(self, scores, generator):
        if self.temperature == 0:
            return torch.argmax(scores, dim=-1)
        if self.k is not None:
            values, ids = torch.topk(scores, min(self.k, scores.shape[-1]), dim=-1)
        else:
            values, ids = torch.sort(scores, dim=-1, descending=True)
        values = values / self.temperature
        probs = torch.softmax(values, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # probability of the more likely tokens
        keep = before < self.p
        keep[:, 0] = True
        probs = torch.softmax(values.masked_fill(~keep, float("-inf")), dim=-1)
        pick = _sample(probs, generator)
        return ids.gather(-1, pick[:, None])[:, 0]


class BeamSampler(Sampler):
    """Beam search with HF transformers' scoring: length_penalty divides a finished hypothesis' log
    probability by its generated length ** length_penalty; early_stopping True, False or "never"."""

    name = "beam"
    row_stopping = False
    deterministic = True

    def __init__(self, num_beams: int = 5, length_penalty: float = 1.0, early_stopping: bool | str = False) -> None:
        super().__init__(1.0)
        if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
            raise GenerationError(f"num_beams must be a positive integer, got {num_beams!r}.")
        if early_stopping not in (True, False, "never"):
            raise GenerationError(f"early_stopping must be True, False or 'never', got {early_stopping!r}.")
        self.num_beams = num_beams
        self.length_penalty = float(length_penalty)
        self.early_stopping = early_stopping

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
        log_probs = state.process(F.log_softmax(logits.float(), dim=-1))
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
        merged_tokens = torch.cat([s["fin_tokens"], cand], dim=1)
        merged_len = torch.cat([s["fin_len"], torch.full_like(tok, g + 1)], dim=1)
        merged_fin = torch.cat([s["finished"], just], dim=1)
        best = torch.topk(merged_scores, nb, dim=-1)[1]
        s["fin_scores"] = merged_scores.gather(1, best)
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
        s = state.sampler_state
        out = []
        toks, lens = s["fin_tokens"].tolist(), s["fin_len"].tolist()
        for b in range(state.batch_size):
            out.append([toks[b][j][:lens[b][j]] for j in range(state.num_return_sequences)])
        return out


class ContrastiveSampler(Sampler):
    """Contrastive search (Su et al., 2022): among the k most likely tokens pick the one maximising
    (1 - alpha) * p(token) - alpha * max cosine similarity of its hidden state to the context's."""

    name = "contrastive"
    needs_hidden = "all"
    deterministic = True

    def __init__(self, k: int = 5, alpha: float = 0.6) -> None:
        super().__init__(1.0)
        self.k = _check_k(k)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise GenerationError(f"alpha (penalty_alpha) must be in [0, 1], got {alpha!r}.")
        self.alpha = float(alpha)

    def rows_per_sequence(self, num_return_sequences):
        return self.k

    def start(self, state):
        s = state.sampler_state
        s["context"] = None  # (rows, L, H) normalised hidden states of the committed tokens
        s["context_valid"] = None
        s["cand_probs"] = None
        s["cand_ids"] = None

    def select(self, logits, hidden, state):
        s = state.sampler_state
        k, rows = self.k, state.num_rows
        B = rows // k
        if s["context"] is None:  # after the prefill: hidden holds every prompt position
            s["context"] = F.normalize(hidden.float(), dim=-1)
            s["context_valid"] = state.valid[:, :state.cur].clone()
            return None, None
        h = F.normalize(hidden[:, -1].float(), dim=-1)  # (rows, H): candidate j of a prompt in row j
        sims = torch.einsum("rlh,rh->rl", s["context"], h).masked_fill(~s["context_valid"], float("-inf"))
        degeneration = sims.max(dim=-1).values.view(B, k)
        score = (1 - self.alpha) * s["cand_probs"] - self.alpha * degeneration
        best = score.argmax(dim=-1)  # (B,)
        reorder = (best[:, None] + torch.arange(B, device=best.device)[:, None] * k).expand(B, k).reshape(-1)
        tokens = s["cand_ids"].gather(1, best[:, None]).expand(B, k).reshape(-1)
        s["context"] = torch.cat([s["context"][reorder], h[reorder][:, None]], dim=1)
        s["context_valid"] = torch.cat([s["context_valid"][reorder],
                                        torch.ones(rows, 1, dtype=torch.bool, device=best.device)], dim=1)
        return tokens, reorder

    def feed(self, tokens, logits, state):
        s = state.sampler_state
        k, rows = self.k, state.num_rows
        B = rows // k
        # Every row of a prompt holds the same context here; the first row speaks for all.
        scores = state.process(logits.float()).view(B, k, -1)[:, 0]
        probs = torch.softmax(scores, dim=-1)
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
