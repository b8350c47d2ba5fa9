"""A KV cache of S slots for continuous batching: every row writes and reads at its own positions.

The per-call engine gives all rows of a batch the same cache positions (left padding lines them up).
A continuous-batching scheduler runs sequences that started at different times in one forward, so
each row has its own write positions and its own filled length. `SlotKVCache` keeps the model's
`KVCache.update(input_pos, k, v)` protocol, with `input_pos` of shape (rows, T) — one position per
row and token — and `SlotModel` runs the GPT's own blocks over it:

    sm = SlotModel(model, slots=16, max_len=1024)
    logits = sm.forward(ids, positions, rows=None)   # rows 0..B-1 (decode: views, no copies)
    logits = sm.forward(ids, positions, rows=rows, last=last)   # any rows (chunked prefill: a gather)
    sm.move_row(src, dst, length)                    # the scheduler keeps decoding rows packed

SlotModel works on a copy of the GPT's modules that shares the parameters (no weight memory), so the
per-call engine can keep using the model's own cache attributes from another thread meanwhile. The
cache lives in module buffers and a decode step has fixed shapes for a given batch size, so on CUDA
the step is compiled with torch.compile(mode="reduce-overhead") (CUDA graphs) per bucketed batch size.
"""

from __future__ import annotations

import copy

import torch

from ..model import KVCache
from .engine import _compiled_cpu_step, _head, _lm_head, _native_decoder


class SlotKVCache(KVCache):
    """k/v buffers (slots, heads, max_len, head_dim); writes land at per-row positions."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rows: torch.Tensor | None = None  # None: rows 0..B-1 (views); else the slots of this call
        self.read_len: int | None = None       # with `rows`: how much of each slot the call attends over

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        B, _, T, _ = k.shape
        rows = self.rows if self.rows is not None else torch.arange(B, device=k.device)
        index = (rows[:, None].expand(B, T), slice(None), input_pos)
        self.k_cache[index] = k.transpose(1, 2).to(self.k_cache.dtype)
        self.v_cache[index] = v.transpose(1, 2).to(self.v_cache.dtype)
        if self.rows is None:
            return self.k_cache[:B], self.v_cache[:B]
        n = self.read_len or self.k_cache.shape[2]
        return self.k_cache[self.rows, :, :n], self.v_cache[self.rows, :, :n]


def _clone_sharing_weights(model):
    """A copy of the module tree whose parameters and buffers are the original's tensors."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    for name, value in vars(model).items():
        if name.startswith("_gptgen_"):  # per-model caches (transposed head, compiled steps)
            memo[id(value)] = None
    clone = copy.deepcopy(model, memo)
    for name in [n for n in vars(clone) if n.startswith("_gptgen_")]:
        delattr(clone, name)
    return clone


def attention_mask(positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Boolean SDPA mask (rows, 1, T, kv_len): each token sees its row's slots up to its own position."""
    slots = torch.arange(kv_len, device=positions.device)
    return (slots[None, None, :] <= positions[:, :, None])[:, None]


def _run_blocks(model, idx, positions, mask, kv_len):
    x = model.embed(idx, positions)
    for block in model.blocks:
        x = block(x, mask, positions, kv_len)
    return model.ln_f(x)


def _decode_step(model, idx, positions, mask):
    """One token per row over the whole cache (fixed shapes): what a CUDA graph captures."""
    return model.lm_head(_run_blocks(model, idx, positions, mask, None)[:, -1])


def _cpu_slot_step(model, idx, positions, mask, head_t):
    """One token per row for rows 0..B-1 (CPU, compiled): each row writes its own position and attends
    its slots up to it, reading the first mask.shape[1] slots of the cache (the longest filled length)."""
    x = _run_blocks(model, idx, positions, mask[:, None, None, :], mask.shape[1])[:, -1:]
    return _lm_head(model, x, head_t)[:, 0].float()


class SlotModel:
    """The GPT's modules over a SlotKVCache of `slots` rows and `max_len` positions."""

    def __init__(self, model, slots: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        self.model = _clone_sharing_weights(model).eval()
        m = self.model
        param = m.embed.wte.weight
        self.device = param.device
        self.slots, self.max_len = slots, max_len
        dtype = dtype or param.dtype
        for block in m.blocks:
            attn = block.attn
            attn.kv_cache = SlotKVCache(slots, max_len, attn.n_head, attn.head_dim, dtype, self.device)
        m.max_cache_len = max_len
        self.caches = [block.attn.kv_cache for block in m.blocks]
        # An int8-dynamic model on CPU decodes through its native step (gptgen.int8_ops), over these caches.
        self.native = _native_decoder(m) if self.device.type == "cpu" else None
        if self.native is not None:
            self.native.set_cache([t for c in self.caches for t in (c.k_cache, c.v_cache)])
        self._compiled = None
        self._cpu_head = None  # (_head(model),): looked up at each prefill, reused by the decode steps
        self._cpu_step = None  # the compiled CPU step: looked up (a check of the weights) after each prefill

    def _logits(self, x: torch.Tensor, prefill: bool) -> torch.Tensor:
        """LM head over (rows, n_embd); on CPU as the per-call engine does it (same numbers). The CPU head
        is looked up when a prompt joins (a check of the weights), not on every decode step."""
        m = self.model
        if self.device.type == "cpu" and (prefill or self._cpu_head is None):
            self._cpu_head = (_head(m),)
            self._cpu_step = None
        head_t = self._cpu_head[0] if self.device.type == "cpu" else None
        if head_t is None:  # CUDA, bf16 and int8 heads run as their module, as in the per-call engine
            return m.lm_head(x)
        logits = x @ head_t
        return logits + m.lm_head.bias if m.lm_head.bias is not None else logits

    def forward(self, idx: torch.Tensor, positions: torch.Tensor, *, rows: torch.Tensor | None = None,
                last: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (rows, vocab) of one token per row: the last column, or column `last[r]` of row r.

        idx, positions: (B, T). rows: the cache slots of the B rows (None: slots 0..B-1). Positions past
        a row's real tokens may hold padding: they write slots nobody reads before they are rewritten.
        """
        kv_len = int(positions.max()) + 1
        mask = attention_mask(positions, kv_len)
        for cache in self.caches:
            cache.rows, cache.read_len = rows, kv_len
        try:
            x = _run_blocks(self.model, idx, positions, mask, kv_len)
        finally:
            for cache in self.caches:
                cache.rows, cache.read_len = None, None
        if last is None:
            x = x[:, -1]
        else:
            x = x[torch.arange(x.shape[0], device=x.device), last]
        return self._logits(x, prefill=last is not None or idx.shape[1] > 1).float()

    # CUDA: one captured graph per bucketed batch size ------------------------------------------------
    def decode_graphed(self, idx: torch.Tensor, positions: torch.Tensor, bucket: int) -> torch.Tensor:
        """The decode step of rows 0..B-1 padded to `bucket` rows, over the full cache length so every
        shape is fixed; padding rows write the last slot, which no sequence reads (prompt + new tokens
        never fill the whole cache)."""
        B = idx.shape[0]
        L = self.max_len
        pad = bucket - B
        if pad:
            idx = torch.cat([idx, idx.new_zeros(pad, 1)])
            positions = torch.cat([positions, positions.new_full((pad, 1), L - 1)])
        mask = attention_mask(positions, L)
        if self._compiled is None:
            self._compiled = torch.compile(_decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)
        logits = self._compiled(self.model, idx, positions, mask)
        return logits[:B].float().clone()  # a replay overwrites the graph's outputs

    # CPU: the decode step compiled by inductor ----------------------------------------------------------
    def decode_compiled_cpu(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """forward(idx, positions) for rows 0..B-1 (one token each) through the compiled CPU step: one graph
        for batch 1 and one for every larger batch (a dynamic dimension, as is the attended length)."""
        kv_len = int(positions.max()) + 1
        mask = torch.arange(kv_len, device=positions.device)[None, :] <= positions
        torch._dynamo.maybe_mark_dynamic(mask, 1)
        if self._cpu_step is None:
            self._cpu_step = _compiled_cpu_step(self.model, _cpu_slot_step)
        return self._cpu_step(idx, positions, mask)

    def decode_native(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """forward(idx, positions) for rows 0..B-1 (one token each) through the native int8-dynamic step."""
        return self.native.step_rows(idx.reshape(-1), positions.reshape(-1))[0]

    # Row moves (the scheduler keeps decoding rows packed at the front) ------------------------------
    def move_row(self, src: int, dst: int, length: int) -> None:
        if src == dst or length <= 0:
            return
        for c in self.caches:
            c.k_cache[dst, :, :length] = c.k_cache[src, :, :length]
            c.v_cache[dst, :, :length] = c.v_cache[src, :, :length]

    def swap_rows(self, a: int, b: int, length: int) -> None:
        if a == b or length <= 0:
            return
        for c in self.caches:
            for buf in (c.k_cache, c.v_cache):
                tmp = buf[a, :, :length].clone()
                buf[a, :, :length] = buf[b, :, :length]
                buf[b, :, :length] = tmp
