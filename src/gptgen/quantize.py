"""int8 weight-only quantization for CPU decoding.

Every nn.Linear of the decoder blocks and the LM head becomes an Int8Linear: int8 weights with one
symmetric scale per output row (absmax / 127), activations left in floating point. A one-token decode
step reads every weight once, so its time follows the bytes of the weights: int8 reads a quarter of
fp32's. On CPU the decode step runs in gptgen's native step (gptgen.native: the int8 weights widened to
float in registers, AVX2 / AVX-512 / portable C++), on every CPU; the layers themselves (prefill, GPU, no
C++ compiler) use PyTorch's weight-only int8 kernel (aten._weight_int8pack_mm, the one gpt-fast uses), in
bf16 where the CPU has bf16 units and in fp32 elsewhere.

"int8-dynamic" (Int8DynamicLinear) also quantizes the activations: each row of a layer's input becomes
int8 at run time (symmetric, max|x| / 127, as CTranslate2's and llama.cpp's int8 modes do) and the product
sums int8 pairs in int32 (gptgen.native.int8: AMX, AVX512-VNNI, AVX2 + FMA or portable C++ kernels, or
PyTorch operations with the same numbers where no C++ compiler is at hand). Where the kernel runs, a batch-1 step streams the weights at the cache's bandwidth,
about twice as fast as the weight-only kernel; the numbers differ a little more from fp32's.

The embedding keeps its floating-point table (a lookup reads one row); a tied head gets its own int8
copy. The quality cost is measured in bench/bench_cpu_peers.py --ppl (docs/performance.md).
"""

from __future__ import annotations

import logging
import platform

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError

QUANTIZE_MODES = ("int8", "int8-dynamic")
QUANTIZE_HELP = ("int8: int8 weight-only layers (a quarter of fp32's bytes); int8-dynamic: int8 weights and "
                 "activations quantized per token (CPU; fastest decoding on CPUs with AVX2 or AVX512-VNNI)")
# aten._weight_int8pack_mm is a batch-1 kernel: measured here at 0.9 ms for a 50,257x384 head at one
# row (bf16), but 123 ms at 16 rows where dequantizing and a bf16 product took less.
KERNEL_MAX_ROWS = 4


def _quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 (out, in), float32 scale per output row): symmetric, absmax / 127."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    """y = x W^T * scale + b with W int8 (out, in) and scale per output row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> None:
        super().__init__()
        q, scale = _quantize_weight(weight)
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.compute_dtype = compute_dtype
        self.register_buffer("weight_int8", q.contiguous())
        # aten._weight_int8pack_mm gives wrong sums on aarch64 (torch 2.10) when in_features is not a multiple
        # of 8 (measured under emulation: errors of 0.05-22 at K = 1..255 off multiples of 8); exact on x86-64
        self.kernel_ok = self.in_features % 8 == 0 or platform.machine().lower() in ("x86_64", "amd64")
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
        if (x2.device.type == "cpu" and self.kernel_ok
                and (x2.shape[0] <= KERNEL_MAX_ROWS or torch.compiler.is_compiling())):
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


class Int8DynamicLinear(nn.Module):
    """y = (int8(x) W^T) * x_scale * w_scale + b: W int8 with a scale per output row, each row of x
    quantized to int8 when the layer runs (gptgen.native.int8). Output in x's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        from .native import int8 as int8_ops

        q, scale = _quantize_weight(weight)
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        # One copy of the weights, in the layout of whichever product runs here.
        self.kernel = q.device.type == "cpu" and int8_ops.available()
        if self.kernel:
            packed, offset = int8_ops.pack(q)
            self.register_buffer("packed", packed)
            self.register_buffer("offset", offset)
        else:
            self.register_buffer("q", q.contiguous())

    def _apply(self, fn, recurse=True):
        # The scales and bias stay float32 whatever dtype the model moves to (model.to(bfloat16)): a cast
        # is undone from the originals, not by casting back.
        kept = {name: buf for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, buf in kept.items():
            moved = self._buffers[name]
            if moved is not None and moved.dtype != buf.dtype:
                self._buffers[name] = buf.to(moved.device)
        return self

    def weight_int8(self) -> torch.Tensor:
        from .native import int8 as int8_ops

        return int8_ops.unpack(self.packed, self.out_features, self.in_features) if self.kernel else self.q

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8().float() * self.scale[:, None]

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, for code that reads a Linear's weight (the evaluation loss)."""
        return self.dequantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .native import int8 as int8_ops

        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.kernel and x2.device.type == "cpu":
            if x2.dtype not in (torch.float32, torch.bfloat16):
                x2 = x2.float()
            y = int8_ops.linear(x2.contiguous(), self.packed, self.offset, self.scale, self.bias, self.out_features)
        else:
            y = int8_ops.reference(x2, self.weight_int8(), self.scale, self.bias)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 weights and activations, "
                f"{'native kernel' if self.kernel else 'PyTorch reference'}")


_noticed: set = set()


def _notice_once(mode: str, device) -> None:
    """Say once per process, on stderr, when `mode` has no fast path on this CPU (gptgen.native.quantize_notice)."""
    from .native import quantize_notice

    line = quantize_notice(mode, str(torch.device(device).type))
    if line and line not in _noticed:
        _noticed.add(line)
        logging.getLogger("gptgen.quantize").warning(line)


def default_compute_dtype(device: torch.device | str = "cpu", mode: str = "int8") -> torch.dtype:
    """bf16 where the CPU has bf16 units (PyTorch's weight-only int8 kernel is fastest there), fp32 elsewhere;
    fp32 for weight-only int8 wherever gptgen's native step decodes it (its products sum in fp32 either way,
    and bf16 would only add roundings: measured slower than the fp32 step at batch 16)."""
    from .hardware import cpu_bf16_native
    from .native import int8 as int8_ops

    if torch.device(device).type != "cpu":
        return torch.float32
    if mode == "int8" and int8_ops.available():
        return torch.float32
    return torch.bfloat16 if cpu_bf16_native() else torch.float32


def quantize_model(model: nn.Module, mode: str = "int8", compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace the model's Linear layers (blocks and LM head) by Int8Linear ("int8": weight-only) or
    Int8DynamicLinear ("int8-dynamic": int8 weights and activations, CPU), in place; returns the model.

    The rest of the model (embeddings, layer norms) moves to compute_dtype. The result is for inference:
    it is not trainable and is not saved by LanguageModel.save (save the unquantized model).
    """
    if mode not in QUANTIZE_MODES:
        raise ConfigError(f"Unknown quantization {mode!r}; choose one of {', '.join(QUANTIZE_MODES)}.")
    if getattr(model, "quantized", None):
        raise ConfigError(f"The model is already quantized ({model.quantized}).")
    from .lora import has_lora

    if has_lora(model):  # its LoRA layers wrap the Linears: quantizing would drop the adapters silently
        raise ConfigError("The model has LoRA adapters that are not merged; merge them first (lm.merge_lora(), or "
                          "load with lora=DIR, which merges) and quantize the merged model.")
    device = next(model.parameters()).device
    if mode == "int8-dynamic" and device.type != "cpu":
        raise ConfigError(f"int8-dynamic quantization runs on CPU; the model is on {device} (use int8 there, or "
                          "move the model to CPU first).")
    dtype = compute_dtype or default_compute_dtype(device, mode)
    replace = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    for name, mod in replace:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = (Int8DynamicLinear(mod.weight, mod.bias) if mode == "int8-dynamic"
                 else Int8Linear(mod.weight, mod.bias, dtype))
        setattr(parent, child, layer.to(device))
    model.to(dtype=dtype)  # int8 buffers keep their dtype; scales were built from the fp32 weights
    model.quantized = mode
    _notice_once(mode, device)
    model.requires_grad_(False)
    return model
