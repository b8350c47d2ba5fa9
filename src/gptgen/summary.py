"""A per-layer table of output shapes and parameter counts, like Keras `model.summary()`."""

from __future__ import annotations

import torch

from .model import GPT


def summary_rows(model: GPT, seq_len: int | None = None) -> list[tuple[str, str, int]]:
    """(layer name and type, output shape, parameter count) for each top-level layer.

    Runs one forward pass on the meta device, so even gpt2-xl costs no memory or time.
    """
    cfg = model.config
    seq_len = seq_len or cfg.n_positions
    with torch.device("meta"):
        probe = GPT(cfg)
    layers = [("embedding", "TokenAndPositionEmbedding", probe.embed)]
    layers += [(f"decoder_{i}", "PreNormDecoderBlock" if cfg.norm_position == "pre" else "PostNormDecoderBlock", b)
               for i, b in enumerate(probe.blocks)]
    if cfg.final_norm:
        layers.append(("ln_f", "LayerNorm", probe.ln_f))
    layers.append(("lm_head", "Linear", probe.lm_head))
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [module.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape)))
             for name, _, module in layers]
    with torch.no_grad():
        probe(torch.zeros(1, seq_len, dtype=torch.long, device="meta"))
    for hook in hooks:
        hook.remove()
    rows, seen = [], set()
    for name, kind, module in layers:
        count = sum(p.numel() for p in module.parameters() if id(p) not in seen)
        seen.update(id(p) for p in module.parameters())
        shape = "(None, " + ", ".join(str(d) for d in shapes[name][1:]) + ")"
        rows.append((f"{name} ({kind})", shape, count))
    return rows


def format_summary(model: GPT, title: str = "GPT") -> str:
    rows = summary_rows(model)
    cfg = model.config
    header = ("Layer (type)", "Output Shape", "Param #")
    w0 = max(len(header[0]), *(len(r[0]) for r in rows)) + 2
    w1 = max(len(header[1]), *(len(r[1]) for r in rows)) + 2
    w2 = max(len(header[2]), *(len(f"{r[2]:,}") for r in rows))
    rule = "─" * (w0 + w1 + w2)
    lines = [f'Model: "{title}"', rule, f"{header[0]:<{w0}}{header[1]:<{w1}}{header[2]:>{w2}}", rule]
    lines += [f"{n:<{w0}}{s:<{w1}}{c:>{w2},}" for n, s, c in rows]
    total = model.num_parameters()
    lines += [rule, f"Total params: {total:,}", f"Trainable params: {total:,}", "Non-trainable params: 0",
              f"Config: vocab {cfg.vocab_size:,}, context {cfg.n_positions}, width {cfg.n_embd}, "
              f"{cfg.n_layer} layers, {cfg.n_head} heads x {cfg.attn_head_dim}, feed-forward {cfg.ffn_dim}, "
              f"{cfg.norm_position}-norm, {cfg.activation}, "
              f"{'tied' if cfg.tie_word_embeddings else 'untied'} head"]
    return "\n".join(lines)
