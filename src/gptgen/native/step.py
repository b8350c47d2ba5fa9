"""The native one-token decode step of a float32, int8-dynamic or weight-only int8 GPT (Int8Decoder in
gptgen/native/kernels.cpp), built per model.

The step runs what GPT.forward does for one new token per row over the KV cache, with every Linear the model's
product (float32; int8 x int8 of gptgen.native.int8; or int8 weights times float activations), in one call: the
runner (generation/runner.py) decodes such models on CPU through it, for the per-call and the batch engine.
"""

from __future__ import annotations

import itertools
import weakref

import torch

from . import int8 as int8_ops

_ACTIVATIONS = {"relu": 0, "gelu": 1, "gelu_tanh": 2}
_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (key, Int8Decoder or None)


def decoder(model, weights_key=None):
    """The one-token decode step of an int8-dynamic or weight-only int8 GPT (its int8 weights repacked into a
    copy), or of a float32 GPT (its weights packed into a copy),
    as one native call (torch.classes.gptgen.Int8Decoder), built once per model and rebuilt when its tensors
    change; None where it cannot run (the kernel library is unavailable, the model is on another device or
    dtype, or a layer differs from the step's). weights_key(model): for a float32 model, a key of its
    weights that changes with in-place updates too (engine._weights_key)."""
    # Rebuilt when the model's tensors change (load_state_dict, model.to(dtype)): the step holds them, and
    # float32 copies of the layer norms. fp32 weights are packed into copies too: an in-place update (an
    # optimizer step) must rebuild them, so their key also samples the values.
    mode = getattr(model, "quantized", None)
    int8, w8 = mode == "int8-dynamic", mode == "int8"
    if not (int8 or w8) and weights_key is None:
        return None
    key = _tensors_key(model) if int8 or w8 else weights_key(model)
    cached = _decoders.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    dec = None
    cfg = model.config
    dtype = model.embed.wte.weight.dtype
    linears = [m for b in model.blocks for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
    linears.append(model.lm_head)
    if int8:
        layers_ok = dtype in (torch.float32, torch.bfloat16) and all(
            getattr(m, "kernel", False) and isinstance(getattr(m, "packed", None), torch.Tensor) for m in linears)
    elif w8:
        layers_ok = dtype in (torch.float32, torch.bfloat16) and all(
            isinstance(getattr(m, "weight_int8", None), torch.Tensor) for m in linears)
    else:
        layers_ok = (getattr(model, "quantized", None) is None and dtype == torch.float32
                     and all(type(m) is torch.nn.Linear for m in linears))
    if (layers_ok and int8_ops.available() and model.embed.wte.weight.device.type == "cpu"
            and cfg.activation in _ACTIVATIONS
            and all(isinstance(n, torch.nn.LayerNorm) for b in model.blocks for n in (b.ln_1, b.ln_2))):
        def f32(t):
            return t.detach().float().contiguous()

        def product(m):
            bias = f32(m.bias) if m.bias is not None else torch.empty(0)
            if int8:
                return [m.packed, m.offset, m.scale, bias]
            if w8:
                return [_pack_blocks(m.weight_int8, torch.int8), torch.empty(m.out_features, dtype=torch.int32),
                        f32(m.scale), bias]
            return [_pack_blocks(m.weight, torch.float32), torch.empty(m.out_features, dtype=torch.int32),
                    torch.empty(0), bias]

        tensors = [model.embed.wte.weight.detach().contiguous(), model.embed.wpe.weight.detach().contiguous()]
        eps = model.blocks[0].ln_1.eps  # GPTConfig has at least one layer
        for b in model.blocks:
            tensors += [f32(b.ln_1.weight), f32(b.ln_1.bias)]
            for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj):
                tensors += product(m)
            tensors += [f32(b.ln_2.weight), f32(b.ln_2.bias)]
        final = isinstance(model.ln_f, torch.nn.LayerNorm)
        tensors += [f32(model.ln_f.weight), f32(model.ln_f.bias)] if final else [torch.empty(0), torch.empty(0)]
        tensors += product(model.lm_head)
        attn = model.blocks[0].attn
        ints = [len(model.blocks), cfg.n_embd, attn.n_head, attn.head_dim, int(cfg.norm_position == "pre"),
                _ACTIVATIONS[cfg.activation], int(final), cfg.vocab_size, int(dtype == torch.bfloat16)]
        if all(n.eps == eps for b in model.blocks for n in (b.ln_1, b.ln_2)):
            dec = torch.classes.gptgen.Int8Decoder(tensors, ints, float(eps))
    _decoders[model] = (key, dec)
    return dec


def _pack_blocks(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A weight (N, K) as the native step's fp32 and weight-only int8 products read it: (ceil(N/16), K, 16) of
    `dtype`, each k a line of 16 outputs."""
    n, k = w.shape
    np_ = -(-n // 16) * 16
    padded = torch.zeros(np_, k, dtype=dtype)
    padded[:n] = w.detach()
    return padded.view(np_ // 16, 16, k).transpose(1, 2).contiguous()


def _tensors_key(model) -> tuple:
    """Where every parameter and buffer (but the KV cache) lives, its version counter, dtype and shape: a
    load_state_dict bumps the versions, model.to(dtype) moves the storage. (A quantized model does not train,
    so no optimizer writes around the version counter.)"""
    return tuple((t.data_ptr(), t._version, t.dtype, tuple(t.shape))
                 for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
                 if ".kv_cache." not in name)
