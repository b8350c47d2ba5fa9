"""int8 weight-only quantization for CPU decoding.

Every nn.Linear of the decoder blocks and the LM head becomes an Int8Linear: int8 weights with one
symmetric scale per output row (absmax / 127), activations left in floating point. A one-token decode
step reads every weight once, so its time follows the bytes of the weights: int8 reads a quarter of
fp32's. The product runs in PyTorch's weight-only int8 kernel (aten._weight_int8pack_mm, the one
gpt-fast uses), in bf16 where the CPU has bf16 units and in fp32 elsewhere.

The embedding keeps its floating-point table (a lookup reads one row); a tied head gets its own int8
copy. The quality cost is measured in bench/bench_cpu_peers.py --ppl (docs/performance.md).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError

QUANTIZE_MODES = ("int8",)
# aten._weight_int8pack_mm is a batch-1 kernel: measured here at 0.9 ms for a 50,257x384 head at one
# row (bf16), but 123 ms at 16 rows where dequantizing and a bf16 product took less.
KERNEL_MAX_ROWS = 4


class Int8Linear(nn.Module):
    """y = x W^T * scale + b with W int8 (out, in) and scale per output row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> None:
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.compute_dtype = compute_dtype
        self.register_buffer("weight_int8", q.contiguous())
        self.register_buffer("scale", scale.to(compute_dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(compute_dtype))

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scale.float()[:, None]

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, for code that reads a Linear's weight (the evaluation loss)."""
        return self.dequantized().to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)
        # Compiled (the decode step), inductor turns the int8 product into a fused GEMM at any row count.
        if x2.device.type == "cpu" and (x2.shape[0] <= KERNEL_MAX_ROWS or torch.compiler.is_compiling()):
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight_int8, self.scale)
        else:  # many rows (prefill, evaluation, wide batches): the kernel is a GEMV; dequantize instead
            y = F.linear(x2, self.weight_int8.to(self.compute_dtype)) * self.scale
        # The bias goes on after the reshape: added to the 2-D product and then reshaped, inductor's int8
        # GEMM template (torch 2.13, max-autotune) returned wrong values.
        y = y.reshape(*shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, {self.compute_dtype}"


def default_compute_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """bf16 where the CPU has bf16 units (the int8 kernel is fastest there), fp32 elsewhere."""
    from .hardware import cpu_bf16_native

    return torch.bfloat16 if torch.device(device).type == "cpu" and cpu_bf16_native() else torch.float32


def quantize_model(model: nn.Module, mode: str = "int8", compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace the model's Linear layers (blocks and LM head) by Int8Linear, in place; returns the model.

    The rest of the model (embeddings, layer norms) moves to compute_dtype. The result is for inference:
    it is not trainable and is not saved by LanguageModel.save (save the unquantized model).
    """
    if mode not in QUANTIZE_MODES:
        raise ConfigError(f"Unknown quantization {mode!r}; choose one of {', '.join(QUANTIZE_MODES)}.")
    if getattr(model, "quantized", None):
        raise ConfigError(f"The model is already quantized ({model.quantized}).")
    device = next(model.parameters()).device
    dtype = compute_dtype or default_compute_dtype(device)
    replace = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    for name, mod in replace:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(mod.weight, mod.bias, dtype).to(device))
    model.to(dtype=dtype)  # int8 buffers keep their dtype; scales were built from the fp32 weights
    model.quantized = mode
    model.requires_grad_(False)
    return model
