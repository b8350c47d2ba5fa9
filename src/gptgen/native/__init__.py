"""gptgen's native code in one place: the one-token decode step, the int8 x int8 product, the sampler kernels.

Public API:
  decoder(model)  -> the native one-token decode step of a float32 or int8-dynamic GPT on this CPU (methods
                     set_cache(list of k/v tensors), step(tokens, pad_counts, mask, slot), step_rows(ids,
                     positions)), or None where it cannot run (status() says why).
  status()        -> dict: which kernels run, on which instruction-set path, and why the others do not.
  build_and_load  -> the build-once-then-load step of every native library (cached per machine).
"""

from __future__ import annotations

from ..model import fingerprint
from .build import build_and_load, cache_dir, native_off

__all__ = ["decoder", "status", "build_and_load", "cache_dir", "native_off", "weights_key", "quantize_notice"]


def weights_key(model) -> tuple:
    """A key of a float32 model's weights that changes with load_state_dict, .to() and in-place updates."""
    return tuple((p.data_ptr(), p._version, p.dtype, tuple(p.shape), fingerprint(p)) for p in model.parameters())


def decoder(model):
    """The native one-token decode step of `model` (float32, quantize="int8-dynamic" or "int8", on CPU), built once per
    model and rebuilt when its weights change; None where it cannot run here."""
    from . import step as int8_step

    if getattr(model, "quantized", None) in ("int8-dynamic", "int8"):
        return int8_step.decoder(model)
    if getattr(model, "quantized", None) is not None:
        return None
    return int8_step.decoder(model, weights_key)


def status() -> dict:
    """Which native kernels run here, on which instruction-set path, and why the others do not."""
    from . import int8 as int8_ops
    from . import sampler
    from ..hardware import cpu_features

    int8_ops.available()
    sampler.library()
    return {"cpu": cpu_features().describe(), "decoder": int8_ops.status(), "int8_dynamic_linear": int8_ops.status(),
            "sampler": sampler.status()}


def quantize_notice(mode: str, device: str = "cpu") -> str | None:
    """One line saying that quantize=`mode` has no fast path on this CPU (which instructions are missing, and what
    runs instead), or None where it has one."""
    if str(device) != "cpu" and not str(device).startswith("cpu"):
        return None
    from ..hardware import cpu_bf16_native, cpu_features
    from . import int8

    if mode == "int8":  # decoded by the native step's weight-only product, else by PyTorch's (fast with bf16 units)
        if (int8.available() and int8.current_path() in int8.FAST_INT8_PATHS) or cpu_bf16_native():
            return None
        if int8.available():
            missing = int8.paths().get("avx2") or "no AVX2 + FMA"
            return (f"quantize='int8' has no vector kernel on this CPU ({missing}): it runs the portable C++ "
                    "kernel instead, which may be slower than float32.")
        return (f"quantize='int8' has no fast path here ({int8.status()['detail']}; {cpu_features().model}: no "
                "AVX512-BF16 or AMX): it runs PyTorch's weight-only int8 product in float32 instead, slower than "
                "float32 weights here; no quantization decodes faster.")
    if mode == "int8-dynamic":
        if not int8.available():
            return (f"quantize='int8-dynamic' has no native kernel here ({int8.status()['detail']}): it runs "
                    "PyTorch's torch._int_mm reference instead, slower than float32.")
        path = int8.current_path()
        if path in int8.FAST_INT8_PATHS:
            return None
        missing = int8.paths().get("avx2") or "no AVX2 + FMA"
        return (f"quantize='int8-dynamic' has no vector int8 kernel on this CPU ({missing}): it runs the portable "
                "C++ kernel instead, which may be slower than float32.")
    return None
