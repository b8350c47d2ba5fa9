"""The GPT model: embeddings, decoder blocks, LM head, and a static KV cache for generation.

One module serves GPT-2 (pre-norm, GELU, tied head) and the KerasHub mini-GPT (post-norm, ReLU,
untied head with bias). Attention goes through scaled_dot_product_attention.

KV-cache protocol (used by gptgen.generation):
    model.setup_kv_cache(batch_size, max_seq_len)      # buffers, so CUDA graphs accept the writes
    logits = model(prompt_ids, input_pos=torch.arange(T), attention_mask=key_mask)   # prefill
    logits = model(next_ids[:, None], input_pos=torch.tensor([T]), attention_mask=key_mask)
    model.clear_kv_cache()
`input_pos` holds the cache slots written by this call; `attention_mask` (B, max_seq_len) marks
which cache slots hold real tokens (left padding); `kv_len` limits attention to the first slots.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig


class KVCache(nn.Module):
    def __init__(self, batch_size: int, max_seq_len: int, n_head: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None) -> None:
        super().__init__()
        shape = (batch_size, n_head, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k_cache.index_copy_(2, input_pos, k.to(self.k_cache.dtype))
        self.v_cache.index_copy_(2, input_pos, v.to(self.v_cache.dtype))
        return self.k_cache, self.v_cache


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

    def forward(self, x, mask=None, input_pos=None, kv_len=None):
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.n_head * self.head_dim, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
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

    def forward(self, x, mask=None, input_pos=None, kv_len=None):
        if self.pre_norm:
            x = x + self.drop(self.attn(self.ln_1(x), mask, input_pos, kv_len))
            return x + self.drop(self.mlp(self.ln_2(x)))
        x = self.ln_1(x + self.drop(self.attn(x, mask, input_pos, kv_len)))
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

    # Forward -------------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, input_pos: torch.Tensor | None = None,
                kv_len: int | None = None, return_hidden: bool = False,
                last_token_only: bool = False):
        """Return logits (B, T, vocab), or (logits, final hidden states) with return_hidden.

        attention_mask: (B, T) without a cache, (B, cache length) with one; 1 marks real tokens.
        input_pos: the cache slots this call writes (a (T,) tensor); None means no cache is used.
        position_ids: (B, T) or (T,); default input_pos with a cache, else 0..T-1.
        """
        B, T = idx.shape
        use_cache = input_pos is not None and self.max_cache_len > 0
        if position_ids is None:
            position_ids = input_pos if use_cache else torch.arange(T, device=idx.device)
        mask = self._attention_mask(T, idx.device, attention_mask, input_pos if use_cache else None, kv_len)
        x = self.embed(idx, position_ids)
        for block in self.blocks:
            x = block(x, mask, input_pos if use_cache else None, kv_len)
        x = self.ln_f(x)
        if last_token_only:
            x = x[:, -1:, :]
        logits = self.lm_head(x)
        return (logits, x) if return_hidden else logits

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
        mask = slots[None, :] <= input_pos[:, None]  # (T, L): causal over cache slots
        if attention_mask is None:
            return mask[None, None]
        keys = attention_mask[:, :L].to(torch.bool)
        mask = (mask[None] & keys[:, None, :]) | (slots[None, :] == input_pos[:, None])[None]
        return mask[:, None]
