"""Choosing the next token of many rows at once, each row with its own sampling parameters.

    tokens = choose_tokens(scores, temperature=[...], top_k=[...], top_p=[...], min_p=[...],
                           generators=[...])

`scores` are the processed logits (rows, vocab). Rows with temperature 0 take the argmax; the others
go through gptgen.generation.samplers.sample (temperature -> top-k -> top-p -> min-p -> one draw per
row, every parameter per row), in at most three vectorised calls:

* rows with top-k on: `sample` narrows them to their top-k candidates itself;
* rows with only a nucleus (top-p) whose CANDIDATES most likely tokens already hold probability p: they
  are sampled over those candidates with p / (mass of the candidates), which keeps exactly the tokens
  the whole-vocabulary nucleus keeps (a token goes when the mass of it and every less likely token is
  at most 1 - p, over the vocabulary as over the candidates) - a top-k instead of a 50k sort per row;
* every other row, over the whole vocabulary.
`draw` inverts each row's CDF in token-id order with one uniform number from the row's own generator,
over weights that are the same numbers for a token whether the row holds the vocabulary or only its
candidates, so the group a row lands in does not change its token: a seeded row draws the same tokens
alone or beside any other rows.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .samplers import argmax, top_values, apply_temperature, sample

CANDIDATES = 256


def _one(values: list):
    """One Python number when every row has the same value (the samplers' cheaper scalar path, which
    gives a row the same result as per-row values do), else the per-row list."""
    return values[0] if all(v == values[0] for v in values) else values


# The per-row choice -------------------------------------------------------------------------------
def choose_tokens(scores: torch.Tensor, *, temperature: Sequence[float], top_k: Sequence[int],
                  top_p: Sequence[float], min_p: Sequence[float], generators: Sequence) -> torch.Tensor:
    """Next token per row (LongTensor (rows,)) from processed scores (rows, vocab)."""
    sampled = [i for i, t in enumerate(temperature) if t > 0]
    dev = scores.device
    if len(sampled) < len(temperature):
        out = argmax(scores)
    else:
        out = torch.empty(scores.shape[0], dtype=torch.long, device=dev)
    if not sampled:
        return out
    V = scores.shape[-1]
    K = min(CANDIDATES, V)
    by_k = [i for i in sampled if top_k[i] > 0]
    p_only = [i for i in sampled if top_k[i] <= 0 and top_p[i] < 1.0]
    narrow_p, mass = [], {}
    if p_only and K < V:
        # does each row's CANDIDATES most likely tokens' probability reach its p?
        rows = scores if len(p_only) == scores.shape[0] else scores.index_select(0, torch.tensor(p_only, device=dev))
        sub = apply_temperature(rows, _one([float(temperature[i]) for i in p_only]))
        vals, ids = top_values(sub, K)  # torch.topk's values, found faster on CPU
        covered = torch.exp(torch.logsumexp(vals, dim=-1) - torch.logsumexp(sub, dim=-1)).tolist()
        cand_ids = {}
        for j, i in enumerate(p_only):
            if covered[j] >= top_p[i]:
                narrow_p.append(i)
                mass[i] = covered[j]
                cand_ids[i] = ids[j]
    taken = set(by_k) | set(narrow_p)
    rest = [i for i in sampled if i not in taken]
    for rows, narrowed in ((by_k, False), (narrow_p, True), (rest, False)):
        if not rows:
            continue
        sel = torch.tensor(rows, device=dev)
        sub = scores if len(rows) == scores.shape[0] else scores.index_select(0, sel)
        if narrowed:  # candidates in token-id order, so draw() meets them in the whole row's order
            ids = torch.sort(torch.stack([cand_ids[i] for i in rows]), dim=-1).values
            sub = sub.gather(1, ids)
        options = dict(temperature=_one([float(temperature[i]) for i in rows]),
                       top_k=_one([max(0, int(top_k[i])) for i in rows]),
                       top_p=_one([min(1.0, top_p[i] / mass[i]) if narrowed else float(top_p[i]) for i in rows]),
                       min_p=_one([float(min_p[i]) for i in rows]))
        pick = sample(sub, [generators[i] for i in rows], **options)
        if narrowed:
            pick = ids.gather(1, pick[:, None])[:, 0]
        out[sel] = pick
    return out
