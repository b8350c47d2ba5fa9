"""What the CPU computes natively, detected (never guessed from a model or a machine name).

bf16 pays on a CPU only where it has bf16 arithmetic: Intel AMX tiles (Sapphire Rapids and later) or
AVX512-BF16 (Cooper Lake, Zen 4 and later). Elsewhere PyTorch emulates bf16 with fp32 conversions and it
is slower than fp32, so `precision="auto"` and the decode engine use it only where `cpu_bf16_native()` (precision="auto" on CPU: see CPU_AUTO_BF16).

Detection asks PyTorch's own runtime checks (torch.cpu._is_amx_tile_supported and friends, the same
cpuinfo PyTorch's kernels dispatch on) and falls back to the flags of /proc/cpuinfo on Linux.
GPTGEN_CPU_BF16=0/1 overrides the answer (to measure fp32 on a bf16 machine, or in tests).
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class CPUFeatures:
    model: str
    capability: str  # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, ...
    amx_bf16: bool
    avx512_bf16: bool
    amx_int8: bool
    avx512_vnni: bool
    flags: frozenset = field(default_factory=frozenset, repr=False)

    @property
    def bf16_native(self) -> bool:
        return self.amx_bf16 or self.avx512_bf16

    def describe(self) -> str:
        native = [n for n, ok in (("AMX-BF16", self.amx_bf16), ("AVX512-BF16", self.avx512_bf16),
                                  ("AMX-INT8", self.amx_int8), ("AVX512-VNNI", self.avx512_vnni)) if ok]
        return f"{self.model} ({self.capability}; {', '.join(native) or 'no bf16/int8 units'})"


def _proc_cpuinfo() -> tuple[str, frozenset]:
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine()):
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = frozenset(value.split())
                if flags and model:
                    break
    except OSError:
        pass
    return model, flags


def _torch_check(name: str) -> bool | None:
    fn = getattr(torch.cpu, name, None)
    if fn is None:
        return None
    try:
        return bool(fn())
    except Exception:  # an old or odd build: fall back to the flags
        return None


@functools.lru_cache(maxsize=1)
def cpu_features() -> CPUFeatures:
    model, flags = _proc_cpuinfo()
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:
        capability = "unknown"

    def check(torch_name: str | None, *flag_names: str) -> bool:
        found = _torch_check(torch_name) if torch_name else None
        if found is not None:
            return found
        return all(f in flags for f in flag_names) if flags else False

    amx_tile = check("_is_amx_tile_supported", "amx_tile")
    # torch reports the AMX tile unit; the bf16 instructions are a separate flag where the OS lists them.
    amx_bf16 = amx_tile and ("amx_bf16" in flags if flags else True)
    amx_int8 = amx_tile and ("amx_int8" in flags if flags else True)
    return CPUFeatures(model=model, capability=capability, amx_bf16=amx_bf16,
                       avx512_bf16=check("_is_avx512_bf16_supported", "avx512_bf16"), amx_int8=amx_int8,
                       avx512_vnni=check("_is_vnni_supported", "avx512_vnni"), flags=flags)


def cpu_bf16_native() -> bool:
    """True where this CPU has bf16 arithmetic units (AMX or AVX512-BF16); GPTGEN_CPU_BF16 overrides."""
    env = os.environ.get("GPTGEN_CPU_BF16")
    if env is not None and env.strip() != "":
        return env.strip().lower() not in ("0", "false", "no", "off")
    return cpu_features().bf16_native


# precision="auto" picks bf16 on CPUs with bf16 units: the keras-mini recipe kept its validation perplexity
# within 2% of fp32 on such a CPU (148.5 bf16 vs 147.8 fp32 after 5 epochs, docs/performance.md).
CPU_AUTO_BF16 = True


def auto_precision(device: torch.device | str, allow_cpu_bf16: bool | None = None) -> tuple[str, str]:
    """The training precision `precision="auto"` picks on a device, and why (a short phrase)."""
    allow_cpu_bf16 = CPU_AUTO_BF16 if allow_cpu_bf16 is None else allow_cpu_bf16
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "CUDA device with bf16"
        return "fp16", "CUDA device without bf16"
    if device.type == "cpu":
        if cpu_bf16_native():
            if allow_cpu_bf16:
                return "bf16", f"CPU with native bf16: {cpu_features().describe()}"
            return "fp32", f"CPU with native bf16, opt-in with --precision bf16: {cpu_features().describe()}"
        return "fp32", f"CPU without native bf16: {cpu_features().describe()}"
    return "fp32", f"{device.type} device"
