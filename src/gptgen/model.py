"""The GPT model: embeddings, decoder blocks, LM head, and a static KV cache for generation.

One module serves GPT-2 (pre-norm, GELU, tied head) and the KerasHub mini-GPT (post-norm, ReLU,
untied head with bias). Attention goes through scaled_dot_product_attention.

KV-cache protocol (driven by gptgen.generation.runner, the one caller while generating):
    model.setup_kv_cache(batch_size, max_seq_len)      # buffers, so CUDA graphs accept the writes
    logits = model(prompt_ids, input_pos=torch.arange(T), attention_mask=key_mask)   # prefill
    logits = model(next_ids[:, None], input_pos=torch.tensor([T]), attention_mask=key_mask)
    logits = model(ids, input_pos=positions, rows=rows)   # positions (B, T): a position per row
    model.clear_kv_cache()
`input_pos` holds the cache slots written by this call: (T,) the same for every row (left padding lines
rows up; `attention_mask` (B, max_seq_len) marks which slots hold real tokens), or (B, T) a position
per row and token (each row attends its own slots up to its position). `rows` picks the cache rows of
the call's rows (None: rows 0..B-1); `kv_len` limits attention to the first slots.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig


class KVCache(nn.Module):
    """k/v buffers (rows, heads, max_len, head_dim); a call writes at shared or per-row positions."""

    def __init__(self, batch_size: int, max_seq_len: int, n_head: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None) -> None:
        super().__init__()
        shape = (batch_size, n_head, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows=None, kv_len=None):
        if input_pos.dim() == 1:  # the same slots for every row (rows 0..B-1)
            B = k.shape[0]
            kc, vc = (self.k_cache, self.v_cache) if B == self.k_cache.shape[0] else (self.k_cache[:B], self.v_cache[:B])
            kc.index_copy_(2, input_pos, k.to(kc.dtype))
            vc.index_copy_(2, input_pos, v.to(vc.dtype))
            return kc, vc
        B, _, T, _ = k.shape
        at = rows if rows is not None else torch.arange(B, device=k.device)
        index = (at[:, None].expand(B, T), slice(None), input_pos)
        self.k_cache[index] = k.transpose(1, 2).to(self.k_cache.dtype)
        self.v_cache[index] = v.transpose(1, 2).to(self.v_cache.dtype)
        if rows is None:
            return self.k_cache[:B], self.v_cache[:B]
        n = kv_len or self.k_cache.shape[2]  # a gather: only the attended slots
        return self.k_cache[rows, :, :n], self.v_cache[rows, :, :n]

    def copy_rows(self, index: torch.Tensor) -> None:
        """Row r takes what row index[r] holds (beam reorders)."""
        for buf in (self.k_cache, self.v_cache):
            buf.copy_(buf.index_select(0, index))

    def move_row(self, src: int, dst: int, length: int) -> None:
        for buf in (self.k_cache, self.v_cache):
            buf[dst, :, :length] = buf[src, :, :length]

    def swap_rows(self, a: int, b: int, length: int) -> None:
        for buf in (self.k_cache, self.v_cache):
            tmp = buf[a, :, :length].clone()
            buf[a, :, :length] = buf[b, :, :length]
            buf[b, :, :length] = tmp


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.attn_head_dim
        inner = config.attn_inner_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * inner)
        self.c_proj = nn.Linear(inner, config.n_embd)
        self.dropout = config.dropout
        self.kv_cache: KVCache | None = None

    def forward(self, x, mask=None, input_pos=None, kv_len=None, rows=None):
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.n_head * self.head_dim, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v, rows, kv_len)
            if kv_len is not None:
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]
            k, v = k.to(q.dtype), v.to(q.dtype)
        if T == 1 and mask is not None and x.device.type == "cpu" and torch.compiler.is_compiling():
            y = _one_query_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None,
                dropout_p=self.dropout if self.training else 0.0,
            )
        return self.c_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


def _one_query_attention(q, k, v, mask):
    """Attention of one query per row over the cache as plain products and a softmax (fp32 scores):
    compiled on CPU, inductor fuses it into a few loops, where the SDPA kernel costs a call per layer."""
    scores = (q.float() @ k.float().transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.ffn_dim)
        self.c_proj = nn.Linear(config.ffn_dim, config.n_embd)
        if config.activation == "relu":
            self.act = nn.ReLU()
        else:
            self.act = nn.GELU(approximate="tanh" if config.activation == "gelu_tanh" else "none")

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    """A decoder block; pre-norm as GPT-2 or post-norm as keras_hub.layers.TransformerDecoder."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, mask=None, input_pos=None, kv_len=None, rows=None):
        if self.pre_norm:
            x = x + self.drop(self.attn(self.ln_1(x), mask, input_pos, kv_len, rows))
            return x + self.drop(self.mlp(self.ln_2(x)))
        x = self.ln_1(x + self.drop(self.attn(x, mask, input_pos, kv_len, rows)))
        return self.ln_2(x + self.drop(self.mlp(x)))


class Embedding(nn.Module):
    """Token embedding plus learned position embedding (KerasHub's TokenAndPositionEmbedding)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, idx, position_ids):
        return self.drop(self.wte(idx) + self.wpe(position_ids))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = Embedding(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = (nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
                     if config.final_norm else nn.Identity())
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.lm_head_bias)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.wte.weight
        self.max_cache_len = 0
        self.gradient_checkpointing = False  # set by the Trainer (gradient_checkpointing=True)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    # Initialisation --------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.config
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if cfg.init == "keras":
                    nn.init.xavier_uniform_(module.weight)
                else:
                    std = cfg.init_std
                    if name.endswith("c_proj"):  # GPT-2's scaling of residual projections
                        std = std / math.sqrt(2 * cfg.n_layer)
                    nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                if cfg.init == "keras":
                    nn.init.uniform_(module.weight, -0.05, 0.05)
                else:
                    nn.init.normal_(module.weight, 0.0, cfg.init_std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields tied weights once

    # KV cache ----------------------------------------------------------------------------------
    def setup_kv_cache(self, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> None:
        param = self.embed.wte.weight
        dtype = dtype or param.dtype
        device = device or param.device
        for block in self.blocks:
            attn = block.attn
            attn.kv_cache = KVCache(batch_size, max_seq_len, attn.n_head, attn.head_dim, dtype, device)
        self.max_cache_len = max_seq_len

    def clear_kv_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None
        self.max_cache_len = 0

    def kv_caches(self) -> list[KVCache]:
        """The layers' caches, first layer first (empty without setup_kv_cache)."""
        return [block.attn.kv_cache for block in self.blocks if block.attn.kv_cache is not None]

    # Forward -------------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, input_pos: torch.Tensor | None = None,
                kv_len: int | None = None, rows: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                return_hidden: bool = False, last_token_only: bool = False, head_t: torch.Tensor | None = None):
        """Return logits (B, T, vocab), or (logits, final hidden states) with return_hidden.

        attention_mask: (B, T) without a cache, (B, cache length) with one; 1 marks real tokens.
        input_pos: the cache positions this call writes, (T,) or (B, T); None means no cache is used.
        position_ids: (B, T) or (T,); default input_pos with a cache, else 0..T-1.
        rows: the cache rows of the B rows (per-row input_pos only; None: rows 0..B-1).
        mask: a ready boolean SDPA mask (True = attend), instead of one built from the above.
        head_t: transposed_head(), the LM head's faster layout on CPU.
        """
        x = self.hidden_states(idx, position_ids=position_ids, attention_mask=attention_mask,
                               input_pos=input_pos, kv_len=kv_len, rows=rows, mask=mask)
        if last_token_only:
            x = x[:, -1:, :]
        logits = self.lm_logits(x, head_t)
        return (logits, x) if return_hidden else logits

    def hidden_states(self, idx: torch.Tensor, *, position_ids=None, attention_mask=None, input_pos=None,
                      kv_len=None, rows=None, mask=None) -> torch.Tensor:
        """The final hidden states (B, T, n_embd): forward() without the LM head."""
        B, T = idx.shape
        use_cache = input_pos is not None and self.max_cache_len > 0
        if position_ids is None:
            position_ids = input_pos if use_cache else torch.arange(T, device=idx.device)
        if mask is None:
            mask = self._attention_mask(T, idx.device, attention_mask, input_pos if use_cache else None, kv_len)
        x = self.embed(idx, position_ids)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Activation checkpointing (HF's name): keep only block inputs; recompute the rest in backward.
                x = torch.utils.checkpoint.checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask, input_pos if use_cache else None, kv_len, rows)
        return self.ln_f(x)

    def lm_logits(self, x: torch.Tensor, head_t: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of hidden states x (B, C) or (B, T, C). With head_t (transposed_head()) the head is a product
        with the transposed weight: on CPU that layout makes the batch-1 head (the largest matmul of a small
        GPT) about 4x faster than F.linear's."""
        if head_t is None:
            return self.lm_head(x)
        if x.dim() == 3 and x.shape[1] == 1:
            logits = (x[:, 0] @ head_t)[:, None]  # a 2-D product: the GEMV path
        else:
            logits = x @ head_t
        return logits + self.lm_head.bias if self.lm_head.bias is not None else logits

    def transposed_head(self) -> torch.Tensor | None:
        """The fp32 LM head weight transposed and contiguous (cached until the weight changes), or None where
        the head runs as its module (bf16, where F.linear's layout is the fast one; int8)."""
        if not isinstance(self.lm_head, nn.Linear) or self.lm_head.weight.dtype != torch.float32:
            return None
        w = self.lm_head.weight
        key = (w.data_ptr(), w._version, w.dtype, w.shape, fingerprint(w))
        cached = self.__dict__.get("_gptgen_head_t")
        if cached is None or cached[0] != key:
            cached = (key, w.detach().t().contiguous())
            self.__dict__["_gptgen_head_t"] = cached
        return cached[1]

    def _attention_mask(self, T, device, attention_mask, input_pos, kv_len):
        """A boolean SDPA mask (True = attend), or None for plain causal attention."""
        if input_pos is None:
            if attention_mask is None:
                return None
            keys = attention_mask.to(torch.bool)
            if bool(keys.all()):
                return None
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            mask = causal[None] & keys[:, None, :]
            # A padded query row would attend to nothing (NaN); let it see itself.
            mask |= torch.eye(T, dtype=torch.bool, device=device)[None]
            return mask[:, None]
        L = kv_len if kv_len is not None else self.max_cache_len
        slots = torch.arange(L, device=device)
        if input_pos.dim() == 2:  # a position per row: each token sees its row's slots up to its own
            return (slots[None, None, :] <= input_pos[:, :, None])[:, None]
        mask = slots[None, :] <= input_pos[:, None]  # (T, L): causal over cache slots
        if attention_mask is None:
            return mask[None, None]
        keys = attention_mask[:, :L].to(torch.bool)
        mask = (mask[None] & keys[:, None, :]) | (slots[None, :] == input_pos[:, None])[None]
        return mask[:, None]


def fingerprint(t: torch.Tensor) -> float:
    """The sum of ~4,096 evenly spaced elements: in-place updates that leave the version counter alone (the
    fused AdamW kernels do) still change it."""
    flat = t.detach().reshape(-1)
    return float(flat[::max(1, flat.numel() // 4096)].float().sum())
