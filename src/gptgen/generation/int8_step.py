"""The native one-token decode step of an int8-dynamic GPT (Int8Decoder in gptgen/int8_ops.cpp), built per model.

The step runs what GPT.forward does for one new token per row over the KV cache, with every Linear the int8
product of gptgen.int8_ops, in one call: the per-call engine (engine.ModelBackend) and the serving engine
(slot_cache.SlotModel) decode int8-dynamic models on CPU through it.
"""

from __future__ import annotations

import itertools
import weakref

import torch

from .. import int8_ops
from ..quantize import Int8DynamicLinear

_ACTIVATIONS = {"relu": 0, "gelu": 1, "gelu_tanh": 2}
_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (key, Int8Decoder or None)


def decoder(model):
    """The one-token decode step of an int8-dynamic GPT as one native call (torch.classes.gptgen.Int8Decoder),
    built once per model; None where it cannot run (the kernel is unavailable, the model is not int8-dynamic
    on CPU in float32/bf16, or a layer differs from the kernel's)."""
    # Rebuilt when the model's tensors change (load_state_dict, model.to(dtype)): the step holds them, and
    # float32 copies of a bf16 model's layer norms.
    key = _tensors_key(model)
    cached = _decoders.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    dec = None
    cfg = model.config
    dtype = model.embed.wte.weight.dtype
    linears = [m for b in model.blocks for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
    linears.append(model.lm_head)
    if (getattr(model, "quantized", None) == "int8-dynamic" and int8_ops.available()
            and dtype in (torch.float32, torch.bfloat16) and model.embed.wte.weight.device.type == "cpu"
            and cfg.activation in _ACTIVATIONS
            and all(isinstance(m, Int8DynamicLinear) and m.kernel for m in linears)
            and all(isinstance(n, torch.nn.LayerNorm) for b in model.blocks for n in (b.ln_1, b.ln_2))):
        def f32(t):
            return t.detach().float().contiguous()

        def product(m):
            bias = m.bias if m.bias is not None else torch.empty(0)
            return [m.packed, m.offset, m.scale, bias]

        tensors = [model.embed.wte.weight.detach().contiguous(), model.embed.wpe.weight.detach().contiguous()]
        eps = model.blocks[0].ln_1.eps if len(model.blocks) else 1e-5
        for b in model.blocks:
            tensors += [f32(b.ln_1.weight), f32(b.ln_1.bias)]
            for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj):
                tensors += product(m)
            tensors += [f32(b.ln_2.weight), f32(b.ln_2.bias)]
        final = isinstance(model.ln_f, torch.nn.LayerNorm)
        tensors += [f32(model.ln_f.weight), f32(model.ln_f.bias)] if final else [torch.empty(0), torch.empty(0)]
        tensors += product(model.lm_head)
        attn = model.blocks[0].attn if len(model.blocks) else None
        ints = [len(model.blocks), cfg.n_embd, attn.n_head if attn else 1, attn.head_dim if attn else 1,
                int(cfg.norm_position == "pre"), _ACTIVATIONS[cfg.activation], int(final), cfg.vocab_size,
                int(dtype == torch.bfloat16)]
        if attn is not None and all(n.eps == eps for b in model.blocks for n in (b.ln_1, b.ln_2)):
            dec = torch.classes.gptgen.Int8Decoder(tensors, ints, float(eps))
    _decoders[model] = (key, dec)
    return dec


def _tensors_key(model) -> tuple:
    """Where every parameter and buffer (but the KV cache) lives, its version counter, dtype and shape: a
    load_state_dict bumps the versions, model.to(dtype) moves the storage. (A quantized model does not train,
    so no optimizer writes around the version counter.)"""
    return tuple((t.data_ptr(), t._version, t.dtype, tuple(t.shape))
                 for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
                 if ".kv_cache." not in name)
