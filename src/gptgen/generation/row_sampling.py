"""Choosing the next token of many rows at once, each row with its own sampling parameters.

    tokens = choose_tokens(scores, temperature=[...], top_k=[...], top_p=[...], min_p=[...],
                           generators=[...])

`scores` are the processed logits (rows, vocab). Rows with temperature 0 take the argmax. The others
go through temperature -> top-k -> top-p -> min-p -> one draw, in one vectorised pass per group:

* candidate rows: rows whose filters provably keep only tokens among their CANDIDATES most likely
  ones (top_k <= CANDIDATES, or a nucleus that the CANDIDATES most likely tokens already cover). They
  are filtered and drawn over those (rows, CANDIDATES) columns, which costs a top-k instead of a sort
  of the whole vocabulary. A nucleus over candidates uses p / (mass of the candidates), which keeps
  exactly the tokens the full-vocabulary filter keeps.
* full rows: everything else, over the whole vocabulary.
Which group a row falls in depends only on that row's parameters and distribution, and each group
has a fixed width, so a seeded row draws the same token alone or beside any other rows.
"""

from __future__ import annotations

from typing import Sequence

import torch

NEG_INF = float("-inf")
CANDIDATES = 256


# Per-row filters (local stand-ins with the shared interface until samplers.py provides them) ---------
def apply_temperature(scores, t):
    t = torch.as_tensor(t, dtype=scores.dtype, device=scores.device)
    if t.dim() == 0:
        return scores if t == 0 else scores / t
    return scores / torch.where(t == 0, torch.ones_like(t), t)[:, None]


def _per_row(value, scores, dtype=None):
    v = torch.as_tensor(value, device=scores.device, dtype=dtype)
    return v.expand(scores.shape[0]) if v.dim() == 0 else v


def top_k_filter(scores, k, min_tokens_to_keep=1):
    V = scores.shape[-1]
    k = _per_row(k, scores, torch.long)
    k = torch.where(k <= 0, torch.full_like(k, V), k.clamp(min=min_tokens_to_keep, max=V))
    kth = torch.topk(scores, int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
    return scores.masked_fill(scores < kth, NEG_INF)


def top_p_filter(scores, p, min_tokens_to_keep=1):
    p = _per_row(p, scores, scores.dtype)
    values, ids = torch.sort(scores, dim=-1, descending=True)
    probs = torch.softmax(values, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs
    drop = (before >= p[:, None]) & (p[:, None] < 1.0)
    drop[:, :min_tokens_to_keep] = False
    return scores.masked_fill(torch.zeros_like(drop).scatter(1, ids, drop), NEG_INF)


def min_p_filter(scores, min_p, min_tokens_to_keep=1):
    min_p = _per_row(min_p, scores, scores.dtype)
    probs = torch.softmax(scores, dim=-1)
    top = probs.max(dim=-1, keepdim=True).values
    drop = (probs < min_p[:, None] * top) & (min_p[:, None] > 0)
    return scores.masked_fill(drop, NEG_INF)


def draw(probs, generator=None):
    """One sample per row by inverting the row's CDF with one uniform number drawn from that row's
    generator (or the shared one): a row consumes the same random numbers whatever the batch."""
    rows, n = probs.shape
    if isinstance(generator, (list, tuple)):
        gens = list(generator)
    else:
        gens = [generator] * rows
    u = torch.empty(rows, 1, dtype=torch.float64, device=probs.device)
    shared = [i for i, g in enumerate(gens) if g is None]
    if shared:
        u[shared] = torch.rand(len(shared), 1, dtype=torch.float64, device=probs.device)
    for i, g in enumerate(gens):
        if g is not None:
            u[i] = torch.rand(1, dtype=torch.float64, device=probs.device, generator=g)
    cdf = probs.double().cumsum(dim=-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0].clamp(max=n - 1)


# The per-row choice -------------------------------------------------------------------------------
def choose_tokens(scores: torch.Tensor, *, temperature: Sequence[float], top_k: Sequence[int],
                  top_p: Sequence[float], min_p: Sequence[float], generators: Sequence) -> torch.Tensor:
    """Next token per row (LongTensor (rows,)) from processed scores (rows, vocab)."""
    sampled = [i for i, t in enumerate(temperature) if t > 0]
    dev = scores.device
    if len(sampled) < len(temperature):
        out = torch.argmax(scores, dim=-1)
    else:
        out = torch.empty(scores.shape[0], dtype=torch.long, device=dev)
    if not sampled:
        return out
    V = scores.shape[-1]
    K = min(CANDIDATES, V)
    idx = torch.tensor(sampled, device=dev)
    raw = scores if len(sampled) == scores.shape[0] else scores.index_select(0, idx)
    temps = [float(temperature[i]) for i in sampled]
    ks = [top_k[i] if top_k[i] > 0 else 0 for i in sampled]
    ps = [top_p[i] for i in sampled]
    mps = [min_p[i] for i in sampled]
    by_k = [0 < k <= K for k in ks]
    maybe_p = [not bk and k == 0 and p < 1.0 for bk, k, p in zip(by_k, ks, ps)]
    narrow = list(by_k)
    cand_vals = cand_ids = None
    mass = [1.0] * len(sampled)
    if any(by_k) or any(maybe_p):
        # temperature keeps the order, so the candidates come from the raw scores
        cand_vals, cand_ids = torch.topk(raw, K, dim=-1)
        if any(maybe_p):  # does the candidates' probability mass reach the row's p?
            t = torch.tensor(temps, device=dev)
            full = torch.logsumexp(apply_temperature(raw, t), dim=-1)
            mass = torch.exp(torch.logsumexp(apply_temperature(cand_vals, t), dim=-1) - full).tolist()
            narrow = [bk or (mp and mass[j] >= ps[j]) for j, (bk, mp) in enumerate(zip(by_k, maybe_p))]
    for group in (True, False):
        rows = [j for j, nb in enumerate(narrow) if nb == group]
        if not rows:
            continue
        sel = torch.tensor(rows, device=dev)
        g = (cand_vals if group else raw).index_select(0, sel)
        g = apply_temperature(g, torch.tensor([temps[j] for j in rows], device=dev, dtype=g.dtype))
        p_eff = [min(1.0, ps[j] / mass[j]) if group and maybe_p[j] else ps[j] for j in rows]
        k_row = [ks[j] for j in rows]
        if any(k_row):
            g = top_k_filter(g, torch.tensor(k_row, device=dev))
        if any(p < 1.0 for p in p_eff):
            g = top_p_filter(g, torch.tensor(p_eff, device=dev, dtype=g.dtype))
        m_row = [mps[j] for j in rows]
        if any(m > 0 for m in m_row):
            g = min_p_filter(g, torch.tensor(m_row, device=dev, dtype=g.dtype))
        pick = draw(torch.softmax(g, dim=-1), [generators[sampled[j]] for j in rows])
        if group:
            pick = cand_ids.index_select(0, sel).gather(1, pick[:, None])[:, 0]
        out[idx.index_select(0, sel)] = pick
    return out
