"""What the CPU computes natively, detected (never guessed from a model or a machine name).

bf16 pays on a CPU only where it has bf16 arithmetic: Intel AMX tiles (Sapphire Rapids and later) or
AVX512-BF16 (Cooper Lake, Zen 4 and later). Elsewhere PyTorch emulates bf16 with fp32 conversions and it
is slower than fp32, so `precision="auto"` and the decode engine use it only where `cpu_bf16_native()` (precision="auto" on CPU: see CPU_AUTO_BF16).

Detection asks PyTorch's own runtime checks (torch.cpu._is_amx_tile_supported and friends, the same
cpuinfo PyTorch's kernels dispatch on) and falls back to the flags of /proc/cpuinfo on Linux.
GPTGEN_CPU_BF16=0/1 overrides the answer (to measure fp32 on a bf16 machine, or in tests).

GPTGEN_CPU_FEATURES=portable|avx2|avx512|amx masks what gptgen uses to at most that instruction-set path (the
native kernels' paths, see `isa_paths`; avx2 also hides AVX-512 and AMX from the bf16 choice): an AVX-512 machine
can run and test what an AVX2-only CPU runs, and any machine the portable C++ path.
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


ISA_PATHS = ("portable", "avx2", "avx512", "amx")  # the native kernels' paths, lowest first


def cpu_mask() -> str | None:
    """The path GPTGEN_CPU_FEATURES caps gptgen at (one of ISA_PATHS), or None."""
    value = os.environ.get("GPTGEN_CPU_FEATURES", "").strip().lower()
    if not value:
        return None
    aliases = {"none": "portable", "generic": "portable", "scalar": "portable", "avx512-vnni": "avx512",
               "avx512_vnni": "avx512", "vnni": "avx512"}
    value = aliases.get(value, value)
    if value not in ISA_PATHS:
        from .errors import ConfigError

        raise ConfigError(f"GPTGEN_CPU_FEATURES must be one of {', '.join(ISA_PATHS)}, got {value!r}.")
    return value


_MASKED = {"portable": ("avx2", "fma", "avx512", "amx"), "avx2": ("avx512", "amx"), "avx512": ("amx",), "amx": ()}


@functools.lru_cache(maxsize=1)
def cpu_features() -> CPUFeatures:
    """What the CPU has, less what GPTGEN_CPU_FEATURES masks."""
    feats = _detect()
    mask = cpu_mask()
    if mask is None or not _MASKED[mask]:
        return feats
    hidden = _MASKED[mask]
    flags = frozenset(f for f in feats.flags if not f.startswith(hidden))
    capability = {"portable": "DEFAULT", "avx2": "AVX2"}.get(mask, feats.capability)
    if feats.capability in ("DEFAULT", "AVX2") and mask == "avx2":
        capability = feats.capability
    return CPUFeatures(model=feats.model, capability=capability, amx_bf16=False,
                       avx512_bf16=feats.avx512_bf16 and "avx512" not in hidden, amx_int8=False,
                       avx512_vnni=feats.avx512_vnni and "avx512" not in hidden, flags=flags)


def isa_paths() -> dict[str, str]:
    """Each native kernel path (ISA_PATHS) this CPU runs, mapped to '' , or to why it does not (the missing
    instructions, or the GPTGEN_CPU_FEATURES mask)."""
    real = _detect()
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    masked = cpu_mask()
    need = {"avx2": {"avx2", "fma"}, "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"},
            "amx": {"amx_tile", "amx_int8"}}
    out = {"portable": ""}
    for path in ISA_PATHS[1:]:
        missing = sorted(need[path] - real.flags) if x86 else []
        if path == "avx512" and real.avx512_vnni and "avx512_vnni" in missing:
            missing.remove("avx512_vnni")
        if path == "amx" and real.amx_int8:
            missing = []
        if not x86:
            out[path] = f"not an x86-64 CPU ({platform.machine()})"
        elif missing:
            out[path] = f"the CPU lacks {', '.join(m.upper() for m in missing)}"
        elif masked is not None and ISA_PATHS.index(path) > ISA_PATHS.index(masked):
            out[path] = f"masked by GPTGEN_CPU_FEATURES={masked}"
        else:
            out[path] = ""
    return out


@functools.lru_cache(maxsize=1)
def _detect() -> CPUFeatures:
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
